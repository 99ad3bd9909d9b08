//! Parsing and validating request bodies: pure functions over bytes (the fuzz target `serve_request`
//! runs them), each error an OpenAI-shaped [`ApiError`] naming the field.
use crate::engine::capture::{CapturePoint, CapturePosition};
use crate::engine::steer::{parse_layer_list, SteerOp, SteerPositions};
use serde_json::{Map, Value};

/// An error as OpenAI's API returns it: a status and `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

/// A message that quotes what a client sent stays one line of bounded length: control
/// characters are escaped and the middle of a long message is cut.
pub fn one_line(message: &str) -> String {
    const MAX: usize = 1000;
    let escaped: String = message.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect();
    if escaped.chars().count() <= MAX {
        return escaped;
    }
    let head: String = escaped.chars().take(MAX / 2).collect();
    let tail: String = escaped.chars().rev().take(MAX / 2).collect::<Vec<_>>().into_iter().rev().collect();
    format!("{head} … {tail}")
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = one_line(&param.into());
        ApiError { status: 400, message: one_line(&message.into()), kind: "invalid_request_error", param: (!param.is_empty()).then_some(param), code: None }
    }
    pub fn not_found(param: &str, message: impl Into<String>, code: &'static str) -> Self {
        ApiError { status: 404, message: one_line(&message.into()), kind: "invalid_request_error", param: Some(param.into()), code: Some(code) }
    }
    pub fn status(status: u16, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: one_line(&message.into()), kind, param: None, code: None }
    }
    pub fn body(&self) -> Value {
        serde_json::json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// What a request may ask of this model and server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub num_layers: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub max_n: usize,
    pub max_prompts: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum VectorSource {
    Named(String),
    /// `[L+1, hidden]` rows, or one row used at every steered layer.
    Directions(Vec<Vec<f32>>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SteerEntry {
    pub source: VectorSource,
    pub coef: f32,
    /// None: the layers where the vector is non-zero.
    pub layers: Option<Vec<usize>>,
    /// `layers` when it names points inside blocks (`"blocks.3.hook_mlp_out,10-12"`, or a list
    /// with such names), as `--steer-layers` takes them: resolved against the model's heads.
    pub points: Option<String>,
    pub op: SteerOp,
    pub positions: SteerPositions,
    pub preserve_norm: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeSpec {
    pub vector: String,
    pub layer: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Prompts(Vec<PromptInput>),
    Chat(Vec<ChatMessage>),
}

/// A completion or chat completion request, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub model: Option<String>,
    pub input: Input,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub n: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    /// Log-probabilities: Some(k) = the chosen token's and k alternatives.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    pub steering: Vec<SteerEntry>,
    pub probes: Vec<ProbeSpec>,
    /// Seconds this request may take in all.
    pub timeout: Option<f64>,
    pub ignore_eos: bool,
}

/// A `/v1/hidden_states` request.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenParams {
    pub model: Option<String>,
    pub inputs: Vec<PromptInput>,
    pub points: Vec<CapturePoint>,
    pub position: CapturePosition,
    pub steering: Vec<SteerEntry>,
    pub timeout: Option<f64>,
    /// `"encoding_format": "base64"` (default) or `"float"` (JSON numbers).
    pub floats: bool,
}

const MAX_STOP: usize = 16;
const MAX_PROBES: usize = 64;
const MAX_STEER_ENTRIES: usize = 16;
const MAX_TOP_LOGPROBS: usize = 20;

fn parse_object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    let text = std::str::from_utf8(crate::io::strip_bom(body)).map_err(|e| ApiError::invalid("", format!("the request body is not valid UTF-8: {e}")))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(ApiError::invalid("", format!("the request body must be a JSON object, not {}", crate::io::json_kind(&other)))),
        Err(e) => Err(ApiError::invalid("", format!("the request body is not valid JSON: {e}"))),
    }
}

/// Fields read from one JSON object, each checked with its name in the error.
struct Fields<'a> {
    m: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Fields<'a> {
    fn new(m: &'a Map<String, Value>, prefix: &str) -> Self {
        Fields { m, prefix: prefix.to_string() }
    }
    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.m.get(key).filter(|v| !v.is_null())
    }
    fn missing(&self, key: &str) -> ApiError {
        ApiError::invalid(self.name(key), format!("`{}` is missing", self.name(key)))
    }
    fn bad(&self, key: &str, what: &str) -> ApiError {
        let v = self.m.get(key).map(crate::io::json_kind).unwrap_or("nothing");
        ApiError::invalid(self.name(key), format!("`{}` must be {what} (got {v})", self.name(key)))
    }
    fn string(&self, key: &str) -> ApiResult<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.bad(key, "a string")),
        }
    }
    fn bool(&self, key: &str) -> ApiResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.bad(key, "true or false")),
        }
    }
    fn number(&self, key: &str, lo: f64, hi: f64) -> ApiResult<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().filter(|x| x.is_finite() && *x >= lo && *x <= hi);
                x.map(Some).ok_or_else(|| ApiError::invalid(self.name(key), format!("`{}` must be between {lo} and {hi} (got {n})", self.name(key))))
            }
            Some(_) => Err(self.bad(key, "a number")),
        }
    }
    fn integer(&self, key: &str, lo: i64, hi: i64) -> ApiResult<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_i64().or_else(|| n.as_u64().map(|_| i64::MAX)).or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64));
                match x {
                    Some(x) if x >= lo && x <= hi => Ok(Some(x)),
                    Some(_) => Err(ApiError::invalid(self.name(key), format!("`{}` must be an integer from {lo} to {hi} (got {n})", self.name(key)))),
                    None => Err(self.bad(key, "an integer")),
                }
            }
            Some(_) => Err(self.bad(key, "an integer")),
        }
    }
}

fn token_ids(v: &[Value], what: &str, vocab: usize) -> ApiResult<Vec<u32>> {
    v.iter()
        .enumerate()
        .map(|(i, x)| match x.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(id as u32),
            Some(id) => Err(ApiError::invalid(what, format!("`{what}`: token id {id} (item {i}) is outside the vocabulary of {vocab}"))),
            None => Err(ApiError::invalid(what, format!("`{what}`: item {i} is not a token id (a non-negative integer)"))),
        })
        .collect()
}

/// `prompt`/`input`: a string, a list of strings, a list of token ids, or a list of lists of ids.
fn prompts(v: &Value, what: &str, limits: &Limits) -> ApiResult<Vec<PromptInput>> {
    let out = match v {
        Value::String(s) => vec![PromptInput::Text(s.clone())],
        Value::Array(items) if items.is_empty() => return Err(ApiError::invalid(what, format!("`{what}` is empty"))),
        Value::Array(items) if items.iter().all(Value::is_number) => vec![PromptInput::Ids(token_ids(items, what, limits.vocab)?)],
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::String(s) => Ok(PromptInput::Text(s.clone())),
                Value::Array(ids) => Ok(PromptInput::Ids(token_ids(ids, &format!("{what}[{i}]"), limits.vocab)?)),
                other => Err(ApiError::invalid(what, format!("`{what}[{i}]` must be a string or a list of token ids, not {}", crate::io::json_kind(other)))),
            })
            .collect::<ApiResult<_>>()?,
        other => return Err(ApiError::invalid(what, format!("`{what}` must be a string or a list, not {}", crate::io::json_kind(other)))),
    };
    if out.len() > limits.max_prompts {
        return Err(ApiError::invalid(what, format!("`{what}` holds {} prompts; at most {} per request", out.len(), limits.max_prompts)));
    }
    for (i, p) in out.iter().enumerate() {
        match p {
            PromptInput::Text(s) if s.is_empty() => return Err(ApiError::invalid(what, format!("`{what}` item {i} is empty"))),
            PromptInput::Ids(ids) if ids.is_empty() => return Err(ApiError::invalid(what, format!("`{what}` item {i} has no tokens"))),
            _ => {}
        }
    }
    Ok(out)
}

fn messages(v: Option<&Value>) -> ApiResult<Vec<ChatMessage>> {
    let Some(Value::Array(items)) = v else {
        return Err(ApiError::invalid("messages", "`messages` must be a non-empty list of {role, content} objects"));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("messages[{i}]");
            let Value::Object(o) = m else {
                return Err(ApiError::invalid(&at, format!("`{at}` must be an object with `role` and `content`")));
            };
            let f = Fields::new(o, &at);
            let role = f.string("role")?.ok_or_else(|| f.missing("role"))?;
            if !["system", "user", "assistant", "developer", "tool"].contains(&role.as_str()) {
                return Err(ApiError::invalid(format!("{at}.role"), format!("`{at}.role` `{role}` is not one of system, user, assistant, developer, tool")));
            }
            let content = match o.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None if role == "assistant" => String::new(),
                // Content parts: only text parts carry anything a text model reads.
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (k, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => return Err(ApiError::invalid(format!("{at}.content[{k}]"), format!("`{at}.content[{k}]`: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"))),
                        }
                    }
                    text
                }
                _ => return Err(ApiError::invalid(format!("{at}.content"), format!("`{at}.content` must be a string or a list of text parts"))),
            };
            Ok(ChatMessage { role: if role == "developer" { "system".into() } else { role }, content })
        })
        .collect()
}

fn layer_list(v: &Value, what: &str, num_layers: usize) -> ApiResult<Vec<usize>> {
    let list = match v {
        Value::String(s) => parse_layer_list(s).map_err(|e| ApiError::invalid(what, format!("`{what}`: {e}")))?,
        Value::Number(_) => vec![v.as_u64().ok_or_else(|| ApiError::invalid(what, format!("`{what}` must be a layer index")))? as usize],
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|x| x.as_u64().map(|l| l as usize).ok_or_else(|| ApiError::invalid(what, format!("`{what}` must hold layer indices (non-negative integers)"))))
            .collect::<ApiResult<_>>()?,
        _ => return Err(ApiError::invalid(what, format!("`{what}` must be a list of layer indices or a string like \"10-15\""))),
    };
    if let Some(&l) = list.iter().find(|&&l| l > num_layers) {
        return Err(ApiError::invalid(what, format!("`{what}`: layer {l} is out of range: this model has hidden-state indices 0..={num_layers}")));
    }
    Ok(list)
}

fn steer_entry(v: &Value, at: &str, limits: &Limits) -> ApiResult<SteerEntry> {
    let Value::Object(o) = v else {
        return Err(ApiError::invalid(at, format!("`{at}` must be an object with `vector` or `directions`")));
    };
    let f = Fields::new(o, at);
    let source = match (f.string("vector")?, f.get("directions")) {
        (Some(name), None) => VectorSource::Named(name),
        (None, Some(Value::Array(rows))) => {
            let name = f.name("directions");
            let rows: Vec<Vec<f32>> = rows
                .iter()
                .enumerate()
                .map(|(r, row)| {
                    let Value::Array(xs) = row else {
                        return Err(ApiError::invalid(&name, format!("`{name}[{r}]` must be a list of numbers")));
                    };
                    xs.iter()
                        .map(|x| x.as_f64().map(|x| x as f32).filter(|x| x.is_finite()))
                        .collect::<Option<Vec<f32>>>()
                        .ok_or_else(|| ApiError::invalid(&name, format!("`{name}[{r}]` must hold finite numbers")))
                })
                .collect::<ApiResult<_>>()?;
            if rows.len() != 1 && rows.len() != limits.num_layers + 1 {
                return Err(ApiError::invalid(&name, format!("`{name}` has {} rows; give one row, or {} (one per hidden-state index 0..={})", rows.len(), limits.num_layers + 1, limits.num_layers)));
            }
            if let Some((r, row)) = rows.iter().enumerate().find(|(_, row)| row.len() != limits.hidden) {
                return Err(ApiError::invalid(&name, format!("`{name}[{r}]` has {} values; the model's hidden size is {}", row.len(), limits.hidden)));
            }
            VectorSource::Directions(rows)
        }
        (Some(_), Some(_)) => return Err(ApiError::invalid(at, format!("`{at}`: give `vector` or `directions`, not both"))),
        (None, Some(_)) => return Err(f.bad("directions", "a list of rows of numbers")),
        (None, None) => return Err(ApiError::invalid(at, format!("`{at}` needs `vector` (a loaded vector's name) or `directions`"))),
    };
    let coef = f.number("coef", -1e6, 1e6)?.unwrap_or(1.0) as f32;
    // Point names go to `points` (checked against the model's heads when resolved).
    let names_points = |v: &Value| match v {
        Value::String(s) => s.contains("blocks."),
        Value::Array(items) => items.iter().any(|x| x.as_str().is_some_and(|s| s.contains("blocks."))),
        _ => false,
    };
    let (layers, points) = match f.get("layers") {
        Some(v) if names_points(v) => {
            let text = match v {
                Value::Array(items) => items
                    .iter()
                    .map(|x| match x {
                        Value::String(s) => Ok(s.clone()),
                        Value::Number(n) if n.is_u64() => Ok(n.to_string()),
                        _ => Err(ApiError::invalid(f.name("layers"), format!("`{}` must hold layer indices and point names", f.name("layers")))),
                    })
                    .collect::<ApiResult<Vec<_>>>()?
                    .join(","),
                other => other.as_str().unwrap_or_default().to_string(),
            };
            (None, Some(text))
        }
        Some(v) => (Some(layer_list(v, &f.name("layers"), limits.num_layers)?), None),
        None => (None, None),
    };
    let op = match f.string("op")? {
        None => SteerOp::Add,
        Some(s) => s.parse().map_err(|e| ApiError::invalid(f.name("op"), format!("`{}`: {e}", f.name("op"))))?,
    };
    let positions = match f.string("positions")? {
        None => SteerPositions::All,
        Some(s) => s.parse().map_err(|e| ApiError::invalid(f.name("positions"), format!("`{}`: {e}", f.name("positions"))))?,
    };
    let preserve_norm = f.bool("preserve_norm")?.unwrap_or(false);
    Ok(SteerEntry { source, coef, layers, points, op, positions, preserve_norm })
}

fn steering(v: Option<&Value>, limits: &Limits) -> ApiResult<Vec<SteerEntry>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => {
            if items.len() > MAX_STEER_ENTRIES {
                return Err(ApiError::invalid("steering", format!("`steering` holds {} entries; at most {MAX_STEER_ENTRIES}", items.len())));
            }
            items.iter().enumerate().map(|(i, x)| steer_entry(x, &format!("steering[{i}]"), limits)).collect()
        }
        Some(one) => Ok(vec![steer_entry(one, "steering", limits)?]),
    }
}

fn probes(v: Option<&Value>, limits: &Limits) -> ApiResult<Vec<ProbeSpec>> {
    let items = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid("probes", "`probes` must be a list of {\"vector\": NAME, \"layer\": L}")),
    };
    if items.len() > MAX_PROBES {
        return Err(ApiError::invalid("probes", format!("`probes` holds {} entries; at most {MAX_PROBES}", items.len())));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let at = format!("probes[{i}]");
            let Value::Object(o) = p else {
                return Err(ApiError::invalid(&at, format!("`{at}` must be {{\"vector\": NAME, \"layer\": L}}")));
            };
            let f = Fields::new(o, &at);
            let vector = f.string("vector")?.ok_or_else(|| f.missing("vector"))?;
            let layer = f.integer("layer", 0, limits.num_layers as i64)?.ok_or_else(|| f.missing("layer"))?;
            Ok(ProbeSpec { vector, layer: layer as usize })
        })
        .collect()
}

/// Fields OpenAI defines that resid does not implement: refused rather than ignored.
fn refuse_unsupported(f: &Fields) -> ApiResult<()> {
    for key in ["presence_penalty", "frequency_penalty"] {
        if let Some(x) = f.number(key, -2.0, 2.0)? {
            if x != 0.0 {
                return Err(ApiError::invalid(key, format!("`{key}` is not supported (only 0)")));
            }
        }
    }
    for key in ["logit_bias", "tools", "functions", "response_format", "suffix"] {
        if f.get(key).is_some_and(|v| !matches!(v, Value::Object(o) if o.is_empty()) && !matches!(v, Value::Array(a) if a.is_empty())) {
            return Err(ApiError::invalid(key, format!("`{key}` is not supported by this server")));
        }
    }
    if f.bool("echo")? == Some(true) {
        return Err(ApiError::invalid("echo", "`echo` is not supported by this server"));
    }
    Ok(())
}

fn common(f: &Fields, input: Input, limits: &Limits, chat: bool) -> ApiResult<GenParams> {
    refuse_unsupported(f)?;
    let max_tokens = match (f.integer("max_tokens", 0, i64::MAX)?, f.integer("max_completion_tokens", 0, i64::MAX)?) {
        (Some(a), _) | (None, Some(a)) => Some(usize::try_from(a).unwrap_or(usize::MAX)),
        (None, None) => None,
    };
    let n = f.integer("n", 1, limits.max_n as i64)?.unwrap_or(1) as usize;
    if let Some(best_of) = f.integer("best_of", 1, limits.max_n as i64)? {
        if best_of as usize != n {
            return Err(ApiError::invalid("best_of", "`best_of` other than `n` is not supported"));
        }
    }
    let stop = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|x| x.as_str().map(str::to_owned).ok_or_else(|| ApiError::invalid("stop", "`stop` must be a string or a list of strings")))
            .collect::<ApiResult<_>>()?,
        Some(_) => return Err(f.bad("stop", "a string or a list of strings")),
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid("stop", format!("`stop` holds {} strings; at most {MAX_STOP}", stop.len())));
    }
    let logprobs = if chat {
        match (f.bool("logprobs")?, f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS as i64)?) {
            (Some(true), top) => Some(top.unwrap_or(0) as usize),
            (_, Some(_)) => return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`")),
            _ => None,
        }
    } else {
        f.integer("logprobs", 0, MAX_TOP_LOGPROBS as i64)?.map(|k| k as usize)
    };
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields::new(o, "stream_options").bool("include_usage")?.unwrap_or(false),
        Some(_) => return Err(f.bad("stream_options", "an object")),
    };
    Ok(GenParams {
        model: f.string("model")?,
        input,
        max_tokens,
        temperature: f.number("temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32,
        top_p: match f.number("top_p", 0.0, 1.0)? {
            Some(p) if p <= 0.0 => return Err(ApiError::invalid("top_p", "`top_p` must be greater than 0")),
            p => p.unwrap_or(1.0) as f32,
        },
        top_k: f.integer("top_k", -1, limits.vocab as i64)?.map_or(0, |k| k.max(0) as usize),
        n,
        stop,
        seed: f.integer("seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
        logprobs,
        stream,
        include_usage,
        steering: steering(f.get("steering"), limits)?,
        probes: probes(f.get("probes"), limits)?,
        timeout: f.number("timeout", 0.001, 86_400.0)?,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
    })
}

/// `POST /v1/completions`.
pub fn parse_completion(body: &[u8], limits: &Limits) -> ApiResult<GenParams> {
    let m = parse_object(body)?;
    let f = Fields::new(&m, "");
    let prompt = f.get("prompt").ok_or_else(|| f.missing("prompt"))?;
    let input = Input::Prompts(prompts(prompt, "prompt", limits)?);
    let mut p = common(&f, input, limits, false)?;
    // OpenAI's default for completions.
    p.max_tokens = p.max_tokens.or(Some(16));
    Ok(p)
}

/// `POST /v1/chat/completions`.
pub fn parse_chat(body: &[u8], limits: &Limits) -> ApiResult<GenParams> {
    let m = parse_object(body)?;
    let f = Fields::new(&m, "");
    let input = Input::Chat(messages(f.get("messages"))?);
    common(&f, input, limits, true)
}

/// The points a `layers` string names (`resid extract --layers` syntax).
fn points_of(s: &str, limits: &Limits) -> ApiResult<Vec<CapturePoint>> {
    crate::engine::capture::parse_points(s, limits.num_layers).map_err(|e| ApiError::invalid("layers", format!("`layers`: {e}")))
}

/// `POST /v1/hidden_states`.
pub fn parse_hidden_states(body: &[u8], limits: &Limits) -> ApiResult<HiddenParams> {
    let m = parse_object(body)?;
    let f = Fields::new(&m, "");
    let input = f.get("input").ok_or_else(|| f.missing("input"))?;
    let inputs = prompts(input, "input", limits)?;
    let points = match f.get("layers") {
        None => (0..=limits.num_layers).map(CapturePoint::Hidden).collect(),
        Some(Value::String(s)) => points_of(s, limits)?,
        Some(Value::Array(items)) => {
            let mut points = Vec::new();
            for x in items {
                match x {
                    Value::String(s) => points.extend(points_of(s, limits)?),
                    _ => points.push(CapturePoint::Hidden(layer_list(x, "layers", limits.num_layers)?[0])),
                }
            }
            points
        }
        Some(_) => return Err(f.bad("layers", "a list of layer indices and point names (\"raw\", \"blocks.3.hook_mlp_out\") or a string like \"0,5,10-12,raw\"")),
    };
    if points.is_empty() {
        return Err(ApiError::invalid("layers", "`layers` names no layer"));
    }
    let mut seen = Vec::new();
    let points: Vec<CapturePoint> = points.into_iter().filter(|p| if seen.contains(p) { false } else { seen.push(*p); true }).collect();
    let position = match f.string("position")? {
        None => CapturePosition::Last,
        Some(s) => s.parse().map_err(|e| ApiError::invalid("position", format!("`position`: {e}")))?,
    };
    let floats = match f.string("encoding_format")?.as_deref() {
        None | Some("base64") => false,
        Some("float") => true,
        Some(other) => return Err(ApiError::invalid("encoding_format", format!("`encoding_format` `{other}` is not base64 or float"))),
    };
    Ok(HiddenParams {
        model: f.string("model")?,
        inputs,
        points,
        position,
        steering: steering(f.get("steering"), limits)?,
        timeout: f.number("timeout", 0.001, 86_400.0)?,
        floats,
    })
}

/// A vector's name, as given to `--vectors` files and uploads.
pub fn check_vector_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty() && name.len() <= 128 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid("name", format!("vector name `{}` must be 1 to 128 letters, digits, `-`, `_` or `.`, not starting with `.`", name.chars().take(64).collect::<String>())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { num_layers: 4, hidden: 3, vocab: 100, max_n: 8, max_prompts: 4 };

    #[test]
    fn completions_defaults_and_fields() {
        let p = parse_completion(br#"{"model":"m","prompt":"hi"}"#, &LIMITS).unwrap();
        assert_eq!(p.max_tokens, Some(16));
        assert_eq!((p.temperature, p.top_p, p.n), (1.0, 1.0, 1));
        let p = parse_completion(br#"{"prompt":[[1,2],[3]],"max_tokens":5,"temperature":0,"stop":"\n","logprobs":2,"seed":-1}"#, &LIMITS).unwrap();
        assert_eq!(p.input, Input::Prompts(vec![PromptInput::Ids(vec![1, 2]), PromptInput::Ids(vec![3])]));
        assert_eq!((p.max_tokens, p.logprobs, p.stop.len(), p.seed), (Some(5), Some(2), 1, Some(u64::MAX)));
    }

    #[test]
    fn errors_name_their_field() {
        let err = |body: &str| parse_completion(body.as_bytes(), &LIMITS).unwrap_err();
        assert_eq!(err("{").status, 400);
        assert_eq!(err("[1]").message, "the request body must be a JSON object, not an array");
        assert_eq!(err(r#"{"prompt":"x","temperature":"hot"}"#).param.as_deref(), Some("temperature"));
        assert_eq!(err(r#"{"prompt":"x","n":9}"#).param.as_deref(), Some("n"));
        assert_eq!(err(r#"{"prompt":[1,100]}"#).param.as_deref(), Some("prompt"));
        assert_eq!(err(r#"{"prompt":"x","max_tokens":-1}"#).param.as_deref(), Some("max_tokens"));
        assert_eq!(err(r#"{"prompt":"x","steering":{"vector":"v","layers":"9"}}"#).param.as_deref(), Some("steering.layers"));
        assert_eq!(err(r#"{"prompt":"x","steering":[{"directions":[[1,2]]}]}"#).param.as_deref(), Some("steering[0].directions"));
        assert_eq!(err(r#"{"prompt":"x","probes":[{"vector":"v","layer":5}]}"#).param.as_deref(), Some("probes[0].layer"));
        assert_eq!(err(r#"{"prompt":"x","presence_penalty":1}"#).param.as_deref(), Some("presence_penalty"));
        assert!(parse_completion(b"\xff\xfe", &LIMITS).unwrap_err().message.contains("UTF-8"));
        // What the client sent is quoted on one line (found by the fuzz target).
        let e = parse_hidden_states(b"{\"input\":\"a\",\"layers\":\"1\\n2\"}", &LIMITS).unwrap_err();
        assert!(e.message.contains("1\\n2") && !e.message.contains('\n'), "{e:?}");
        assert!(one_line(&"x".repeat(5000)).chars().count() < 1010);
        let chat = parse_chat(br#"{"messages":[{"role":"robot","content":"x"}]}"#, &LIMITS).unwrap_err();
        assert_eq!(chat.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn steering_entries() {
        let p = parse_chat(
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "steering":[{"vector":"honesty","coef":-2,"layers":"1-2","op":"piecewise","positions":"generated"},
                            {"directions":[[1,0,0]],"layers":[3]}],
                "probes":[{"vector":"honesty","layer":2}]}"#,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(p.input, Input::Chat(vec![ChatMessage { role: "user".into(), content: "ab".into() }]));
        assert_eq!(p.steering[0].layers, Some(vec![1, 2]));
        assert_eq!(p.steering[0].op, SteerOp::SignAware);
        assert_eq!(p.steering[1].source, VectorSource::Directions(vec![vec![1.0, 0.0, 0.0]]));
        assert_eq!(p.probes, vec![ProbeSpec { vector: "honesty".into(), layer: 2 }]);
    }

    #[test]
    fn hidden_states_requests() {
        let h = parse_hidden_states(br#"{"input":["a","b"],"layers":"0,2-3,raw","position":"mean"}"#, &LIMITS).unwrap();
        assert_eq!(h.points, vec![CapturePoint::Hidden(0), CapturePoint::Hidden(2), CapturePoint::Hidden(3), CapturePoint::LastBlockRaw]);
        assert_eq!(h.position, CapturePosition::Mean);
        let h = parse_hidden_states(br#"{"input":["a"],"layers":[2,"blocks.1.hook_z","blocks.0-1.hook_mlp_out"]}"#, &LIMITS).unwrap();
        use crate::engine::capture::Site;
        assert_eq!(h.points, vec![CapturePoint::Hidden(2), CapturePoint::Block(1, Site::Z), CapturePoint::Block(0, Site::MlpOut), CapturePoint::Block(1, Site::MlpOut)]);
        assert_eq!(parse_hidden_states(br#"{"input":"a","layers":"blocks.4.hook_z"}"#, &LIMITS).unwrap_err().param.as_deref(), Some("layers"));
        let p = parse_completion(br#"{"prompt":"x","steering":{"vector":"v","layers":["blocks.1.hook_z.0",2]}}"#, &LIMITS).unwrap();
        assert_eq!(p.steering[0].points.as_deref(), Some("blocks.1.hook_z.0,2"));
        assert_eq!(p.steering[0].layers, None);
        let h = parse_hidden_states(br#"{"input":[[1,2]],"layers":[1,"raw",1]}"#, &LIMITS).unwrap();
        assert_eq!(h.points, vec![CapturePoint::Hidden(1), CapturePoint::LastBlockRaw]);
        assert_eq!(parse_hidden_states(br#"{"input":"a","layers":[7]}"#, &LIMITS).unwrap_err().param.as_deref(), Some("layers"));
    }
}
