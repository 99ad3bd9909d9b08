//! The routes: OpenAI's completions, chat completions and models, and resid's own hidden
//! states, steering vectors, health and metrics.
use super::api::{self, ApiError, ApiResult, GenParams, Input, PromptInput, SteerEntry, VectorSource};
use super::{api_error, App, Command, QueueTicket};
use crate::engine::capture::{CapturePosition, CaptureSpec, Captured};
use crate::engine::generate::FinishReason;
use crate::engine::sample::Sampling;
use crate::engine::steer::{parse_steer_targets, SteerGeometry, SteerOp, Steering};
use crate::sched::text::TextStream;
use crate::sched::{CaptureFailure, CaptureListener, CaptureRequest, GenEvent, GenListener, GenRequest, Probe, TokenOut};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

type Shared = State<Arc<App>>;

fn body_bytes(body: Result<Bytes, BytesRejection>, limit_hint: &str) -> ApiResult<Bytes> {
    body.map_err(|r| match r.status().as_u16() {
        413 => ApiError::status(413, "invalid_request_error", format!("the request body is larger than the server's limit ({limit_hint})")),
        408 => ApiError::status(408, "invalid_request_error", "the request body arrived too slowly"),
        s => ApiError::status(if (400..500).contains(&s) { s } else { 400 }, "invalid_request_error", format!("cannot read the request body: {}", r.body_text())),
    })
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

// ---------------------------------------------------------------------------------------------
// Steering and probes

/// One request's steering entries as one intervention. Several entries combine only where the
/// result is exactly their sum: `add`, no norm preservation, the same positions.
fn resolve_steering(app: &App, entries: &[SteerEntry]) -> ApiResult<Option<Arc<Steering>>> {
    if entries.is_empty() {
        return Ok(None);
    }
    let c = &app.model.model().config;
    let (num_layers, hidden) = (c.num_layers, c.hidden_size);
    if let Some(i) = entries.iter().position(|e| e.points.is_some()) {
        return steering_at_points(app, entries, i).map(|s| Some(Arc::new(s)));
    }
    let mut parts = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let at = if entries.len() == 1 { "steering".to_string() } else { format!("steering[{i}]") };
        let table: Arc<Vec<f32>> = match &e.source {
            VectorSource::Named(name) => app.vectors.get(name, &format!("{at}.vector"))?.table.clone(),
            VectorSource::Directions(rows) if rows.len() == 1 => {
                if e.layers.is_none() {
                    return Err(ApiError::invalid(format!("{at}.layers"), format!("`{at}`: one direction row needs `layers`")));
                }
                Arc::new(rows[0].repeat(num_layers + 1))
            }
            VectorSource::Directions(rows) => Arc::new(rows.concat()),
        };
        let layers = match &e.layers {
            Some(l) => l.clone(),
            None => table.chunks(hidden).enumerate().filter(|(_, r)| r.iter().any(|&v| v != 0.0)).map(|(l, _)| l).collect(),
        };
        if layers.is_empty() {
            return Err(ApiError::invalid(format!("{at}.layers"), format!("`{at}`: the vector is zero at every layer; give `layers`")));
        }
        parts.push((table, layers, e));
    }
    let steering = if parts.len() == 1 {
        let (table, layers, e) = parts.remove(0);
        Steering { directions: table, hidden, layers, sites: Vec::new(), coef: e.coef, op: e.op, preserve_norm: e.preserve_norm, positions: e.positions }
    } else {
        let first = parts[0].2;
        if parts.iter().any(|(_, _, e)| e.op != SteerOp::Add || e.preserve_norm || e.positions != first.positions) {
            return Err(ApiError::invalid("steering", "several `steering` entries combine only with op `add`, no `preserve_norm`, and the same `positions`"));
        }
        let mut sum = vec![0f32; (num_layers + 1) * hidden];
        let mut layers: Vec<usize> = Vec::new();
        for (table, ls, e) in &parts {
            for &l in ls {
                for (d, &v) in sum[l * hidden..(l + 1) * hidden].iter_mut().zip(&table[l * hidden..(l + 1) * hidden]) {
                    *d += e.coef * v;
                }
                if !layers.contains(&l) {
                    layers.push(l);
                }
            }
        }
        layers.sort_unstable();
        Steering { directions: Arc::new(sum), hidden, layers, sites: Vec::new(), coef: 1.0, op: SteerOp::Add, preserve_norm: false, positions: first.positions }
    };
    steering.validate(num_layers, hidden).map_err(|e| api_error(&e, "steering"))?;
    Ok(Some(Arc::new(steering)))
}

/// A steering entry whose `layers` name points inside blocks: one entry only (sums of such
/// entries are not one intervention), its vectors the stored file's tensors named by the points.
fn steering_at_points(app: &App, entries: &[SteerEntry], i: usize) -> ApiResult<Steering> {
    let at = if entries.len() == 1 { "steering".to_string() } else { format!("steering[{i}]") };
    if entries.len() != 1 {
        return Err(ApiError::invalid(format!("{at}.layers"), format!("`{at}`: steering at points inside blocks takes one `steering` entry")));
    }
    let e = &entries[0];
    let c = &app.model.model().config;
    let g = SteerGeometry { num_layers: c.num_layers, hidden: c.hidden_size, heads: c.num_heads, head_dim: c.head_dim };
    let text = e.points.as_deref().unwrap_or_default();
    let targets = parse_steer_targets(text, g).map_err(|err| ApiError::invalid(format!("{at}.layers"), format!("`{at}.layers`: {err}")))?;
    let VectorSource::Named(name) = &e.source else {
        return Err(ApiError::invalid(format!("{at}.vector"), format!("`{at}`: points inside blocks take their vectors from a loaded vector file (`vector`), whose tensors name the points")));
    };
    let v = app.vectors.get(name, &format!("{at}.vector"))?;
    let mut tensors = v.points.clone();
    tensors.directions = (!v.table.is_empty()).then(|| v.table.to_vec());
    let s = tensors.steering(&targets, g, &format!("vector `{name}`")).map_err(|err| api_error(&err, &format!("{at}.layers")))?;
    let s = Steering { coef: e.coef, op: e.op, preserve_norm: e.preserve_norm, positions: e.positions, ..s };
    s.validate_for(g).map_err(|err| api_error(&err, "steering"))?;
    Ok(s)
}

fn resolve_probes(app: &App, specs: &[api::ProbeSpec]) -> ApiResult<Vec<Probe>> {
    let hidden = app.model.model().config.hidden_size;
    specs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let v = app.vectors.get(&p.vector, &format!("probes[{i}].vector"))?;
            let Some(row) = v.table.get(p.layer * hidden..(p.layer + 1) * hidden) else {
                return Err(ApiError::invalid(format!("probes[{i}].vector"), format!("`probes[{i}]`: vector `{}` has no `directions` (only points inside blocks)", p.vector)));
            };
            if row.iter().all(|&x| x == 0.0) {
                return Err(ApiError::invalid(format!("probes[{i}].layer"), format!("`probes[{i}]`: vector `{}` is zero at layer {}", p.vector, p.layer)));
            }
            Ok(Probe { layer: p.layer, direction: Arc::new(row.to_vec()) })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Generation

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// A generation request ready for the scheduler.
struct Job {
    kind: Kind,
    params: GenParams,
    prompts: Vec<Vec<u32>>,
    max_tokens: Vec<usize>,
    steering: Option<Arc<Steering>>,
    probes: Vec<Probe>,
    stop_tokens: Vec<u32>,
    sampling: Sampling,
    deadline: Instant,
    timeout: f64,
    /// Per prompt, the most of its tokens that one of its choices found in the prefix cache
    /// (`usage.prompt_tokens_details.cached_tokens`).
    cached: Arc<Vec<AtomicUsize>>,
}

fn tokenize(app: &App, input: &PromptInput, what: &str) -> ApiResult<Vec<u32>> {
    match input {
        PromptInput::Ids(ids) => Ok(ids.clone()),
        PromptInput::Text(text) => {
            let tok = app.model.model().tokenizer.as_ref().ok_or_else(|| ApiError::invalid(what, "this model has no tokenizer.json: give token ids"))?;
            tok.encode(text).map_err(|e| api_error(&e, what))
        }
    }
}

fn check_length(app: &App, ids: &[u32], what: &str) -> ApiResult<()> {
    let ctx = app.model.model().config.max_position_embeddings;
    if ids.len() >= ctx {
        return Err(ApiError { code: Some("context_length_exceeded"), ..ApiError::invalid(what, format!("`{what}` has {} tokens; the model's context is {ctx} tokens (max_position_embeddings), leaving no room to generate", ids.len())) });
    }
    Ok(())
}

fn prepare(app: &App, params: GenParams, kind: Kind) -> ApiResult<Job> {
    app.check_model(&params.model)?;
    let model = app.model.model();
    let ctx = model.config.max_position_embeddings;
    let prompts: Vec<Vec<u32>> = match &params.input {
        Input::Prompts(list) => {
            let mut out = Vec::with_capacity(list.len());
            for p in list {
                let ids = tokenize(app, p, "prompt")?;
                check_length(app, &ids, "prompt")?;
                out.push(ids);
            }
            out
        }
        Input::Chat(messages) => {
            let tok = model.tokenizer.as_ref().ok_or_else(|| ApiError::invalid("messages", "this model has no tokenizer.json: use /v1/completions with token ids"))?;
            let turns: Vec<(&str, &str)> = messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
            // Rendering and tokenizing only fail on what the client sent.
            let ids = tok.encode_chat(&turns).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
            check_length(app, &ids, "messages")?;
            vec![ids]
        }
    };
    let mut max_tokens = Vec::with_capacity(prompts.len());
    for p in &prompts {
        // Beyond the context a sequence ends with finish_reason "length".
        let room = ctx - p.len();
        let m = params.max_tokens.unwrap_or(room).min(room);
        let need = p.len() + m;
        if need > app.kv_slots {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("the prompt ({} tokens) and max_tokens ({m}) need {need} KV-cache slots; this server's --kv-budget-mib holds {}", p.len(), app.kv_slots),
            ));
        }
        max_tokens.push(m);
    }
    let steering = resolve_steering(app, &params.steering)?;
    let probes = resolve_probes(app, &params.probes)?;
    let sampling = if params.temperature <= 0.0 {
        Sampling::Greedy
    } else {
        Sampling::Sample { temperature: params.temperature, top_k: params.top_k, top_p: params.top_p, seed: params.seed.unwrap_or_else(rand::random) }
    };
    let stop_tokens = if params.ignore_eos { Vec::new() } else { app.model.stop_tokens().to_vec() };
    let timeout = params.timeout.unwrap_or(app.request_timeout).min(app.request_timeout.max(0.001));
    let cached = Arc::new(prompts.iter().map(|_| AtomicUsize::new(0)).collect());
    Ok(Job { kind, prompts, max_tokens, steering, probes, stop_tokens, sampling, deadline: Instant::now() + Duration::from_secs_f64(timeout), timeout, params, cached })
}

/// Sends a choice's events to its request's handler.
struct ChannelListener {
    index: usize,
    tx: UnboundedSender<(usize, GenEvent)>,
    cancel: Arc<AtomicBool>,
    ticket: Option<QueueTicket>,
    /// Its prompt's entry of [`Job::cached`].
    cached: (Arc<Vec<AtomicUsize>>, usize),
}

impl GenListener for ChannelListener {
    fn event(&mut self, event: GenEvent) -> bool {
        !self.cancel.load(Ordering::Relaxed) && self.tx.send((self.index, event)).is_ok()
    }
    fn gone(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.tx.is_closed()
    }
    fn admitted(&mut self, cached_tokens: usize) {
        self.ticket = None;
        // Read after the choice's last event, which the channel orders after this.
        if let Some(c) = self.cached.0.get(self.cached.1) {
            c.fetch_max(cached_tokens, Ordering::Relaxed);
        }
    }
}

struct Submitted {
    rx: UnboundedReceiver<(usize, GenEvent)>,
    cancel: Vec<Arc<AtomicBool>>,
}

fn submit(app: &App, job: &Job) -> ApiResult<Submitted> {
    let n = job.params.n;
    let total = job.prompts.len() * n;
    let mut tickets = app.enqueue(total)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut cancel = Vec::with_capacity(total);
    for (p, prompt) in job.prompts.iter().enumerate() {
        for c in 0..n {
            let flag = Arc::new(AtomicBool::new(false));
            cancel.push(flag.clone());
            let req = GenRequest {
                prompt: prompt.clone(),
                max_new_tokens: job.max_tokens[p],
                sampling: job.sampling,
                stream: c,
                stop_tokens: job.stop_tokens.clone(),
                steering: job.steering.clone(),
                probes: job.probes.clone(),
                logprobs: job.params.logprobs,
                deadline: Some(job.deadline),
            };
            let listener = ChannelListener { index: p * n + c, tx: tx.clone(), cancel: flag, ticket: tickets.pop(), cached: (job.cached.clone(), p) };
            app.send(Command::Gen(Box::new(req), Box::new(listener)))?;
        }
    }
    app.metrics.prompt_tokens.add(job.prompts.iter().map(|p| p.len() as u64).sum());
    if job.steering.is_some() {
        app.metrics.steered_requests.add(1);
    }
    Ok(Submitted { rx, cancel })
}

/// A generated token's text and log-probability, and its most likely alternatives'.
type TokenLogprob = (String, f32, Vec<(String, f32)>);

/// One choice as it accumulates.
struct Choice {
    text: TextStream,
    tokens: Vec<u32>,
    /// Per token: (token text, logprob, top alternatives).
    logprobs: Vec<TokenLogprob>,
    offsets: Vec<usize>,
    /// Per probe, one value per token.
    probes: Vec<Vec<f32>>,
    finish: Option<&'static str>,
    last_token: Option<Instant>,
}

/// What one event adds to a choice, for a streamed chunk.
#[derive(Default)]
struct Delta {
    text: String,
    token: Option<u32>,
    logprob: Option<TokenLogprob>,
    offset: usize,
    probes: Vec<f32>,
    finish: Option<&'static str>,
}

enum Outcome {
    Continue(Delta),
    Expired,
    Failed(crate::error::Error),
}

impl Choice {
    fn new(stop: &[String], hidden: &[u32], probes: usize) -> Self {
        Choice { text: TextStream::new(stop.to_vec(), hidden.to_vec()), tokens: Vec::new(), logprobs: Vec::new(), offsets: Vec::new(), probes: vec![Vec::new(); probes], finish: None, last_token: None }
    }

    fn apply(&mut self, app: &App, arrived: Instant, event: GenEvent, cancel: &AtomicBool) -> Outcome {
        let tok = app.model.model().tokenizer.as_ref();
        let mut d = Delta::default();
        match event {
            GenEvent::Token(TokenOut { id, logprob, top_logprobs, probes }) => {
                let now = Instant::now();
                match self.last_token {
                    None => app.metrics.time_to_first_token.observe(now.duration_since(arrived).as_secs_f64()),
                    Some(t) => app.metrics.inter_token_latency.observe(now.duration_since(t).as_secs_f64()),
                }
                self.last_token = Some(now);
                self.tokens.push(id);
                d.token = Some(id);
                d.offset = self.text.text().len();
                if let Some(tok) = tok {
                    d.text = self.text.push(tok, id).unwrap_or_default();
                }
                let piece = |id: u32| tok.and_then(|t| t.decode(&[id]).ok()).unwrap_or_default();
                if let Some(lp) = logprob {
                    let entry = (piece(id), lp, top_logprobs.iter().map(|&(t, l)| (piece(t), l)).collect::<Vec<_>>());
                    self.logprobs.push(entry.clone());
                    self.offsets.push(d.offset);
                    d.logprob = Some(entry);
                }
                for (acc, v) in self.probes.iter_mut().zip(&probes) {
                    acc.push(*v);
                }
                d.probes = probes;
                if self.text.stopped() {
                    cancel.store(true, Ordering::Relaxed);
                    self.finish = Some("stop");
                    d.finish = self.finish;
                }
            }
            GenEvent::Finished(reason) => {
                if let Some(tok) = tok {
                    d.text = self.text.finish(tok).unwrap_or_default();
                }
                self.finish = Some(match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                });
                d.finish = self.finish;
            }
            GenEvent::Expired => return Outcome::Expired,
            GenEvent::Failed(e) => return Outcome::Failed(e),
        }
        Outcome::Continue(d)
    }
}

fn expired(job: &Job) -> ApiError {
    ApiError { code: Some("timeout"), ..ApiError::status(504, "timeout_error", format!("the request did not finish within its {} s deadline", job.timeout)) }
}

fn probes_json(job: &Job, values: &[Vec<f32>]) -> Value {
    Value::Array(
        job.params
            .probes
            .iter()
            .zip(values)
            .map(|(p, v)| json!({ "vector": p.vector, "layer": p.layer, "values": v }))
            .collect(),
    )
}

fn completion_logprobs(entries: &[TokenLogprob], offsets: &[usize]) -> Value {
    json!({
        "tokens": entries.iter().map(|e| e.0.clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.1).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| e.2.iter().map(|(t, l)| (t.clone(), json!(l))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn chat_logprobs(entries: &[TokenLogprob]) -> Value {
    let one = |t: &str, l: f32| json!({ "token": t, "logprob": l, "bytes": t.as_bytes() });
    json!({
        "content": entries.iter().map(|(t, l, top)| {
            let mut e = one(t, *l);
            e["top_logprobs"] = top.iter().map(|(t, l)| one(t, *l)).collect();
            e
        }).collect::<Vec<_>>(),
    })
}

fn usage(job: &Job, choices: &[Choice]) -> Value {
    let prompt: usize = job.prompts.iter().map(Vec::len).sum();
    let completion: usize = choices.iter().map(|c| c.tokens.len()).sum();
    let cached: usize = job.cached.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    json!({
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": { "cached_tokens": cached },
    })
}

async fn generate(app: Arc<App>, job: Job) -> Response {
    let arrived = Instant::now();
    let Submitted { mut rx, cancel } = match submit(&app, &job) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let hidden = job.stop_tokens.clone();
    let mut choices: Vec<Choice> = (0..cancel.len()).map(|_| Choice::new(&job.params.stop, &hidden, job.probes.len())).collect();
    let id = random_id(if job.kind == Kind::Chat { "chatcmpl" } else { "cmpl" });
    if job.params.stream {
        return stream(app, job, rx, cancel, choices, id, arrived).await;
    }
    // Cancel every choice if this handler is dropped (the client went away).
    let _guard = CancelOnDrop(cancel.clone());
    let mut open = choices.len();
    while open > 0 {
        let Some((i, event)) = rx.recv().await else { break };
        if choices[i].finish.is_some() {
            continue;
        }
        match choices[i].apply(&app, arrived, event, &cancel[i]) {
            Outcome::Continue(d) => {
                if d.finish.is_some() {
                    open -= 1;
                }
            }
            Outcome::Expired => return expired(&job).into_response(),
            Outcome::Failed(e) => return api_error(&e, "").into_response(),
        }
    }
    if open > 0 {
        // The scheduler stopped (shutdown past the drain timeout) before every choice ended.
        return ApiError::status(503, "server_error", "the server stopped before the request finished").into_response();
    }
    let created = app.created_now();
    let rendered: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = match job.kind {
                Kind::Completion => json!({
                    "index": i, "text": c.text.text(), "finish_reason": c.finish,
                    "logprobs": if job.params.logprobs.is_some() { completion_logprobs(&c.logprobs, &c.offsets) } else { Value::Null },
                }),
                Kind::Chat => json!({
                    "index": i, "message": { "role": "assistant", "content": c.text.text() }, "finish_reason": c.finish,
                    "logprobs": if job.params.logprobs.is_some() { chat_logprobs(&c.logprobs) } else { Value::Null },
                }),
            };
            v["token_ids"] = json!(c.tokens);
            if !job.probes.is_empty() {
                v["probes"] = probes_json(&job, &c.probes);
            }
            v
        })
        .collect();
    let object = if job.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    Json(json!({ "id": id, "object": object, "created": created, "model": app.name, "choices": rendered, "usage": usage(&job, &choices) })).into_response()
}

struct CancelOnDrop(Vec<Arc<AtomicBool>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        for c in &self.0 {
            c.store(true, Ordering::Relaxed);
        }
    }
}

impl App {
    fn created_now(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(self.created, |d| d.as_secs())
    }
}

async fn stream(app: Arc<App>, job: Job, mut rx: UnboundedReceiver<(usize, GenEvent)>, cancel: Vec<Arc<AtomicBool>>, mut choices: Vec<Choice>, id: String, arrived: Instant) -> Response {
    let (out, out_rx) = tokio::sync::mpsc::channel::<Result<Event, std::convert::Infallible>>(64);
    let created = app.created_now();
    let chat = job.kind == Kind::Chat;
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let name = app.name.clone();
    let chunk = move |choice: Value| json!({ "id": id, "object": object, "created": created, "model": name, "choices": [choice] });
    tokio::spawn(async move {
        let _guard = CancelOnDrop(cancel.clone());
        let send = |v: Value| Event::default().data(v.to_string());
        if chat {
            for i in 0..choices.len() {
                let first = chunk(json!({ "index": i, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }));
                if out.send(Ok(send(first))).await.is_err() {
                    return;
                }
            }
        }
        let mut open = choices.len();
        while open > 0 {
            let next = tokio::select! {
                e = rx.recv() => e,
                _ = out.closed() => return,
            };
            let Some((i, event)) = next else {
                let stopped = ApiError::status(503, "server_error", "the server stopped before the request finished");
                let _ = out.send(Ok(send(stopped.body()))).await;
                break;
            };
            if choices[i].finish.is_some() {
                continue;
            }
            let d = match choices[i].apply(&app, arrived, event, &cancel[i]) {
                Outcome::Continue(d) => d,
                Outcome::Expired => {
                    let _ = out.send(Ok(send(expired(&job).body()))).await;
                    break;
                }
                Outcome::Failed(e) => {
                    let _ = out.send(Ok(send(api_error(&e, "").body()))).await;
                    break;
                }
            };
            if d.finish.is_some() {
                open -= 1;
            }
            let mut v = if chat {
                json!({
                    "index": i, "delta": { "content": d.text }, "finish_reason": d.finish,
                    "logprobs": d.logprob.as_ref().map_or(Value::Null, |e| chat_logprobs(std::slice::from_ref(e))),
                })
            } else {
                json!({
                    "index": i, "text": d.text, "finish_reason": d.finish,
                    "logprobs": d.logprob.as_ref().map_or(Value::Null, |e| completion_logprobs(std::slice::from_ref(e), &[d.offset])),
                })
            };
            if let Some(t) = d.token {
                v["token_ids"] = json!([t]);
            }
            if !job.probes.is_empty() && d.token.is_some() {
                let values: Vec<Vec<f32>> = d.probes.iter().map(|&x| vec![x]).collect();
                v["probes"] = probes_json(&job, &values);
            }
            if out.send(Ok(send(chunk(v)))).await.is_err() {
                return;
            }
        }
        if job.params.include_usage {
            let mut u = chunk(Value::Null);
            u["choices"] = json!([]);
            u["usage"] = usage(&job, &choices);
            let _ = out.send(Ok(send(u))).await;
        }
        let _ = out.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(out_rx)).into_response()
}

pub(super) async fn completions(State(app): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    generation_route(app, body, Kind::Completion).await
}

pub(super) async fn chat_completions(State(app): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    generation_route(app, body, Kind::Chat).await
}

async fn generation_route(app: Arc<App>, body: Result<Bytes, BytesRejection>, kind: Kind) -> Response {
    let job = body_bytes(body, &format!("{} bytes", app.max_body_hint())).and_then(|body| {
        let params = match kind {
            Kind::Completion => api::parse_completion(&body, &app.limits())?,
            Kind::Chat => api::parse_chat(&body, &app.limits())?,
        };
        prepare(&app, params, kind)
    });
    match job {
        Ok(job) => generate(app, job).await,
        Err(e) => e.into_response(),
    }
}

pub(super) async fn models(State(app): Shared) -> Response {
    let c = &app.model.model().config;
    Json(json!({
        "object": "list",
        "data": [{ "id": app.name, "object": "model", "created": app.created, "owned_by": "resid",
                   "max_model_len": c.max_position_embeddings, "num_layers": c.num_layers, "hidden_size": c.hidden_size }],
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// Hidden states

struct OneshotCapture {
    tx: Option<tokio::sync::oneshot::Sender<Result<Captured, CaptureFailure>>>,
    ticket: Option<QueueTicket>,
}

impl CaptureListener for OneshotCapture {
    fn done(&mut self, result: Result<Captured, CaptureFailure>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(result);
        }
    }
    fn gone(&self) -> bool {
        self.tx.as_ref().is_none_or(|t| t.is_closed())
    }
    fn admitted(&mut self) {
        self.ticket = None;
    }
}

pub(super) async fn hidden_states(State(app): Shared, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    match hidden_states_inner(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn hidden_states_inner(app: &Arc<App>, headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> ApiResult<Response> {
    let body = body_bytes(body, &format!("{} bytes", app.max_body_hint()))?;
    let p = api::parse_hidden_states(&body, &app.limits())?;
    app.check_model(&p.model)?;
    let mut seqs = Vec::with_capacity(p.inputs.len());
    // Lengths against the context and the KV budget: the scheduler's check (400, named by input).
    for input in &p.inputs {
        seqs.push(tokenize(app, input, "input")?);
    }
    let steering = resolve_steering(app, &p.steering)?;
    let timeout = p.timeout.unwrap_or(app.request_timeout).min(app.request_timeout.max(0.001));
    let spec = CaptureSpec { points: p.points.clone(), position: p.position };
    let tokens: usize = seqs.iter().map(Vec::len).sum();
    let mut tickets = app.enqueue(1)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let req = CaptureRequest { seqs, spec, steering: steering.clone(), deadline: Some(Instant::now() + Duration::from_secs_f64(timeout)) };
    app.send(Command::Capture(Box::new(req), Box::new(OneshotCapture { tx: Some(tx), ticket: tickets.pop() })))?;
    app.metrics.hidden_state_requests.add(1);
    app.metrics.prompt_tokens.add(tokens as u64);
    if steering.is_some() {
        app.metrics.steered_requests.add(1);
    }
    let captured = match rx.await {
        Ok(Ok(c)) => c,
        Ok(Err(CaptureFailure::Expired)) => {
            return Err(ApiError { code: Some("timeout"), ..ApiError::status(504, "timeout_error", format!("the request did not finish within its {timeout} s deadline")) })
        }
        Ok(Err(CaptureFailure::Failed(e))) => return Err(api_error(&e, "input")),
        Err(_) => return Err(ApiError::status(503, "server_error", "the server is shutting down")),
    };
    if let Some(i) = captured.data.iter().position(|v| !v.is_finite()) {
        let row = i / (captured.points * captured.hidden).max(1);
        return Err(ApiError::status(500, "server_error", format!("captured activations contain NaN or Inf (row {row})")));
    }
    let layers: Vec<i64> = crate::store::extract::layer_ids(&CaptureSpec { points: p.points.clone(), position: p.position });
    let shape = vec![captured.rows, captured.points, captured.hidden];
    let offsets: Option<Vec<i64>> = (p.position == CapturePosition::All).then(|| captured.offsets.iter().map(|&o| o as i64).collect());
    let binary = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("application/octet-stream"));
    if binary {
        use crate::io::{OutTensor, TensorData};
        let mut tensors = vec![
            OutTensor { name: "hidden_states".into(), shape: shape.clone(), data: TensorData::F32(captured.data) },
            OutTensor { name: "layers".into(), shape: vec![layers.len()], data: TensorData::I64(layers) },
        ];
        if let Some(o) = offsets {
            tensors.push(OutTensor { name: "offsets".into(), shape: vec![o.len()], data: TensorData::I64(o) });
        }
        let metadata = std::collections::HashMap::from([
            ("model".to_string(), app.name.clone()),
            ("position".to_string(), p.position.name().to_string()),
            ("compute".to_string(), app.compute.to_string()),
            ("sequences".to_string(), p.inputs.len().to_string()),
            ("tokens".to_string(), tokens.to_string()),
            ("resid_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]);
        let bytes = crate::io::serialize_safetensors(&tensors, &metadata, false).map_err(|e| api_error(&e, ""))?;
        return Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response());
    }
    let data = if p.floats {
        json!(captured.data)
    } else {
        use base64::Engine as _;
        let bytes: &[u8] = bytemuck::cast_slice(&captured.data);
        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
    };
    let mut v = json!({
        "object": "hidden_states", "model": app.name, "compute": app.compute, "position": p.position.name(), "layers": layers,
        "shape": shape, "dtype": "float32", "encoding_format": if p.floats { "float" } else { "base64" }, "data": data,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    });
    if let Some(o) = offsets {
        v["offsets"] = json!(o);
    }
    Ok(Json(v).into_response())
}

// ---------------------------------------------------------------------------------------------
// Steering vectors, health, metrics

pub(super) async fn list_vectors(State(app): Shared) -> Response {
    let data: Vec<Value> = app.vectors.list().iter().map(|(n, v)| app.vectors.describe(n, v)).collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}

pub(super) async fn upload_vector(State(app): Shared, RawQuery(query): RawQuery, body: Result<Bytes, BytesRejection>) -> Response {
    let run = || -> ApiResult<Response> {
        let body = body_bytes(body, &format!("{} bytes", app.max_body_hint()))?;
        let (mut name, mut replace) = (None, false);
        for pair in query.as_deref().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=').unwrap_or((pair, "")) {
                ("name", v) => name = Some(v.to_string()),
                ("replace", v) => replace = matches!(v, "true" | "1" | ""),
                (k, _) => return Err(ApiError::invalid(k, format!("unknown query parameter `{}`", k.chars().take(64).collect::<String>()))),
            }
        }
        let name = name.ok_or_else(|| ApiError::invalid("name", "give the vector's name: POST /v1/steering/vectors?name=NAME"))?;
        let v = app.vectors.insert(&name, &body, replace)?;
        Ok((StatusCode::CREATED, Json(app.vectors.describe(&name, &v))).into_response())
    };
    run().unwrap_or_else(IntoResponse::into_response)
}

pub(super) async fn delete_vector(State(app): Shared, Path(name): Path<String>) -> Response {
    match app.vectors.remove(&name) {
        Ok(()) => Json(json!({ "id": name, "object": "steering_vector", "deleted": true })).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn health(State(app): Shared) -> Response {
    if app.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "draining" }))).into_response();
    }
    Json(json!({ "status": "ok" })).into_response()
}

pub(super) async fn metrics(State(app): Shared) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}
