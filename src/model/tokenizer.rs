//! Text to token ids and back: `tokenizer.json` through the `tokenizers` crate (the same ids as
//! Hugging Face), or first-generation Qwen's `qwen.tiktoken` (see [`super::tiktoken`]); plus
//! the chat template from `tokenizer_config.json`, or Qwen's ChatML (`make_context`).
use super::tiktoken::{QwenTiktoken, ENDOFTEXT, IM_END, IM_START};
use crate::error::{Error, Result};
use std::path::Path;

pub struct TextTokenizer {
    inner: Inner,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Qwen(Box<QwenTiktoken>),
}

/// `make_context`'s default system prompt.
pub const QWEN_DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

/// One text (or id list) as ids and their tokens, for `resid tokenize`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
}

fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
        _ => None,
    }
}

impl TextTokenizer {
    /// None when the directory has neither `tokenizer.json` nor `qwen.tiktoken` (token ids must
    /// then be given directly). `qwen.tiktoken` is read when `tokenizer_config.json` names
    /// `QWenTokenizer`, or when there is no `tokenizer.json`.
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Option<serde_json::Value> = if cfg_path.is_file() {
            let text = super::config::read_model_text(&cfg_path)?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| Error::model(format!("{}: invalid JSON: {e}", cfg_path.display())))?,
            )
        } else {
            None
        };
        let hf_path = dir.join("tokenizer.json");
        let qwen_path = dir.join("qwen.tiktoken");
        let names_qwen = cfg.as_ref().and_then(|c| c.get("tokenizer_class")).and_then(|c| c.as_str()) == Some("QWenTokenizer");
        let use_qwen = if names_qwen { qwen_path.is_file() || !hf_path.is_file() } else { qwen_path.is_file() && !hf_path.is_file() };
        let inner = if use_qwen {
            if !qwen_path.is_file() {
                return Err(Error::model(format!(
                    "{}: tokenizer_config.json names QWenTokenizer but there is no qwen.tiktoken",
                    dir.display()
                )));
            }
            Inner::Qwen(Box::new(QwenTiktoken::open(&qwen_path)?))
        } else if hf_path.is_file() {
            let bytes = std::fs::read(&hf_path).map_err(|e| Error::io(&hf_path, e))?;
            Inner::Hf(Box::new(
                tokenizers::Tokenizer::from_bytes(crate::io::strip_bom(&bytes))
                    .map_err(|e| Error::model(format!("{}: cannot load tokenizer: {e}", hf_path.display())))?,
            ))
        } else {
            return Ok(None);
        };
        let (mut chat_template, mut bos_token, mut eos_token) = (None, None, None);
        if let Some(v) = &cfg {
            chat_template = match v.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: use the default one.
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_owned),
                _ => None,
            };
            bos_token = token_string(v.get("bos_token"));
            eos_token = token_string(v.get("eos_token"));
        }
        if matches!(inner, Inner::Qwen(_)) {
            // QWenTokenizer's own: no BOS, `<|endoftext|>` ends a document.
            eos_token = eos_token.or_else(|| Some(ENDOFTEXT.to_owned()));
        }
        Ok(Some(TextTokenizer { inner, chat_template, bos_token, eos_token }))
    }

    /// "tokenizer.json" or "qwen.tiktoken": what the ids come from.
    pub fn source(&self) -> &'static str {
        match self.inner {
            Inner::Hf(_) => "tokenizer.json",
            Inner::Qwen(_) => "qwen.tiktoken",
        }
    }

    /// Ids exactly as Hugging Face's `tokenizer(text)["input_ids"]` (special tokens added per
    /// the tokenizer's post-processor).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// `add_special_tokens` adds what the tokenizer's post-processor adds (BOS for some
    /// families); QWenTokenizer adds nothing either way.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        match &self.inner {
            Inner::Hf(t) => {
                let enc = t
                    .encode_fast(text, add_special_tokens)
                    .map_err(|e| Error::input(format!("cannot tokenize text: {e}")))?;
                Ok(enc.get_ids().to_vec())
            }
            Inner::Qwen(t) => t.encode(text),
        }
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Hf(t) => t.decode(ids, true).map_err(|e| Error::input(format!("cannot decode tokens: {e}"))),
            Inner::Qwen(t) => Ok(t.decode(ids)),
        }
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(t) => t.token_to_id(token),
            Inner::Qwen(t) => t.token_id(token),
        }
    }

    /// The vocabulary's string for `id` (HF's `convert_ids_to_tokens`; for `qwen.tiktoken` the
    /// bytes in the byte-level alphabet of Qwen2's `tokenizer.json`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(t) => t.id_to_token(id),
            Inner::Qwen(t) => t.id_to_token(id),
        }
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Ids that end a generation: the EOS token; for Qwen's ChatML also `<|im_end|>` and
    /// `<|im_start|>` (the stop words of Qwen's own `chat()`).
    pub fn stop_token_ids(&self) -> Vec<u32> {
        let mut names: Vec<&str> = self.eos_token().into_iter().collect();
        if matches!(self.inner, Inner::Qwen(_)) {
            names.extend([ENDOFTEXT, IM_END, IM_START]);
        }
        names.into_iter().filter_map(|t| self.token_id(t)).collect()
    }

    /// Ids of a conversation ending with the prompt for the assistant's turn, ready for the
    /// model: the chat template rendered and tokenized without added special tokens, or for
    /// Qwen's tiktoken `make_context`'s tokens (roles and contents encoded on their own, so a
    /// special token's text inside a message stays text).
    pub fn encode_chat(&self, messages: &[(&str, &str)]) -> Result<Vec<u32>> {
        let Inner::Qwen(t) = &self.inner else {
            return self.encode_with(&self.render_messages(messages)?, false);
        };
        if self.chat_template.is_some() {
            return self.encode_with(&self.render_messages(messages)?, false);
        }
        let id = |s: &str| t.token_id(s).ok_or_else(|| Error::model(format!("qwen.tiktoken: no {s} token")));
        let (im_start, im_end) = (id(IM_START)?, id(IM_END)?);
        let nl = t.encode_plain("\n")?;
        let mut ids = Vec::new();
        for (i, (role, content)) in qwen_turns(messages).into_iter().enumerate() {
            if i > 0 {
                ids.extend(&nl);
            }
            ids.push(im_start);
            ids.extend(t.encode_plain(role)?);
            ids.extend(&nl);
            ids.extend(t.encode_plain(content)?);
            ids.push(im_end);
        }
        ids.extend(&nl);
        ids.push(im_start);
        ids.extend(t.encode_plain("assistant")?);
        ids.extend(&nl);
        Ok(ids)
    }

    /// Tokens of one input line: text (through the chat template with `chat`) or given ids.
    /// `at` names the line in errors.
    pub fn tokenize(&self, item: &crate::io::InputItem, chat: bool, at: &str) -> Result<Tokenized> {
        let ids = match item {
            crate::io::InputItem::Text(text) if chat => self.encode_chat(&[("user", text)]),
            crate::io::InputItem::Text(text) => self.encode(text),
            crate::io::InputItem::Ids(_) if chat => Err(Error::input("--chat needs `text`, not `ids`")),
            crate::io::InputItem::Ids(ids) => Ok(ids.clone()),
        }
        .map_err(|e| e.prefixed(at))?;
        let tokens = ids
            .iter()
            .map(|&id| self.id_to_token(id).ok_or_else(|| Error::input(format!("{at}: token id {id} is not in the vocabulary"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tokenized { ids, tokens })
    }

    /// Renders a one-turn user conversation with the model's own chat template.
    pub fn render_chat(&self, user_message: &str) -> Result<String> {
        self.render_messages(&[("user", user_message)])
    }

    /// Renders a conversation of `(role, content)` turns with the model's own chat template,
    /// ending with the prompt for the assistant's turn.
    pub fn render_messages(&self, messages: &[(&str, &str)]) -> Result<String> {
        let template = match (&self.chat_template, &self.inner) {
            (Some(t), _) => t.as_str(),
            (None, Inner::Qwen(_)) => return Ok(render_qwen_chatml(messages)),
            (None, Inner::Hf(_)) => {
                return Err(Error::input("--chat: the model's tokenizer_config.json has no chat_template"));
            }
        };
        let mut env = minijinja::Environment::new();
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template)
            .map_err(|e| Error::model(format!("tokenizer_config.json: chat_template does not parse: {e}")))?;
        let tmpl = env.get_template("chat").map_err(|e| Error::model(e.to_string()))?;
        let messages: Vec<minijinja::Value> =
            messages.iter().map(|(role, content)| minijinja::context! { role => *role, content => *content }).collect();
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::model(format!("tokenizer_config.json: chat_template failed to render: {e}")))
    }
}

/// `make_context`'s turns: a leading system message, or the default system prompt, then the
/// other messages in order.
fn qwen_turns<'a>(messages: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut turns = Vec::with_capacity(messages.len() + 1);
    match messages.first() {
        Some(&("system", _)) => {}
        _ => turns.push(("system", QWEN_DEFAULT_SYSTEM)),
    }
    turns.extend_from_slice(messages);
    turns
}

/// The text of [`TextTokenizer::encode_chat`] for Qwen: `make_context`'s `raw_text`.
fn render_qwen_chatml(messages: &[(&str, &str)]) -> String {
    let mut text = String::new();
    for (i, (role, content)) in qwen_turns(messages).into_iter().enumerate() {
        if i > 0 {
            text.push('\n');
        }
        text += &format!("{IM_START}{role}\n{content}{IM_END}");
    }
    text + &format!("\n{IM_START}assistant\n")
}
