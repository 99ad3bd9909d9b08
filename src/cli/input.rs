//! JSONL input for `extract`: one object per line with `text` (or pre-tokenized `ids`).
//! The parsing itself is [`resid::io::parse_jsonl`] (fuzzed in `fuzz/`).
use anyhow::Result;
use std::path::Path;

pub use resid::io::InputItem;

pub fn read_jsonl(path: &Path) -> Result<Vec<InputItem>> {
    let bytes = std::fs::read(path).map_err(|e| resid::Error::io(path, e))?;
    Ok(resid::io::parse_jsonl(&bytes, &path.display().to_string())?)
}
