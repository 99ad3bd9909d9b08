//! JSONL input for `extract`: one object per line with `text` (or pre-tokenized `ids`).
use anyhow::{bail, Result};
use std::path::Path;

pub enum InputItem {
    Text(String),
    Ids(Vec<u32>),
}

pub fn read_jsonl(path: &Path) -> Result<Vec<InputItem>> {
    let bytes = std::fs::read(path).map_err(|e| resid::Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        resid::Error::input(format!("{}: line {line}: invalid UTF-8", path.display()))
    })?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let at = || format!("{}: line {n}", path.display());
        if line.trim().is_empty() {
            return Err(resid::Error::input(format!("{}: empty line (expected a JSON object with a `text` field)", at())).into());
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| resid::Error::input(format!("{}: malformed JSON: {e}", at())))?;
        let obj = value
            .as_object()
            .ok_or_else(|| resid::Error::input(format!("{}: expected a JSON object, got {}", at(), kind(&value))))?;
        match (obj.get("text"), obj.get("ids")) {
            (Some(serde_json::Value::String(s)), _) => items.push(InputItem::Text(s.clone())),
            (Some(other), _) => {
                return Err(resid::Error::input(format!("{}: `text` must be a string, got {}", at(), kind(other))).into())
            }
            (None, Some(serde_json::Value::Array(ids))) => {
                let ids: Option<Vec<u32>> =
                    ids.iter().map(|v| v.as_u64().filter(|&x| x <= u32::MAX as u64).map(|x| x as u32)).collect();
                match ids {
                    Some(ids) => items.push(InputItem::Ids(ids)),
                    None => {
                        return Err(resid::Error::input(format!("{}: `ids` must be a list of non-negative integers", at())).into())
                    }
                }
            }
            _ => return Err(resid::Error::input(format!("{}: no `text` field", at())).into()),
        }
    }
    if items.is_empty() {
        bail!(resid::Error::input(format!("{}: no input lines", path.display())));
    }
    Ok(items)
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
