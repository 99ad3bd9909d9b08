//! `tokenizer.json` through the `tokenizers` crate (the same ids as Hugging Face), plus the
//! chat template from `tokenizer_config.json`.
use crate::error::{Error, Result};
use std::path::Path;

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
        _ => None,
    }
}

impl TextTokenizer {
    /// None when the directory has no tokenizer.json (token ids must then be given directly).
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(crate::io::strip_bom(&bytes))
            .map_err(|e| Error::model(format!("{}: cannot load tokenizer: {e}", path.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let (mut chat_template, mut bos_token, mut eos_token) = (None, None, None);
        if cfg_path.is_file() {
            let text = super::config::read_model_text(&cfg_path)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::model(format!("{}: invalid JSON: {e}", cfg_path.display())))?;
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
        Ok(Some(TextTokenizer { inner, chat_template, bos_token, eos_token }))
    }

    /// Ids exactly as Hugging Face's `tokenizer(text)["input_ids"]` (special tokens added per
    /// the tokenizer's post-processor).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::input(format!("cannot tokenize text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::input(format!("cannot decode tokens: {e}")))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders a one-turn user conversation with the model's own chat template.
    pub fn render_chat(&self, user_message: &str) -> Result<String> {
        self.render_messages(&[("user", user_message)])
    }

    /// Renders a conversation of `(role, content)` turns with the model's own chat template,
    /// ending with the prompt for the assistant's turn.
    pub fn render_messages(&self, messages: &[(&str, &str)]) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::input("--chat: the model's tokenizer_config.json has no chat_template"))?;
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
