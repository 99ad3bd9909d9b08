//! Reading and writing tensor files: atomic safetensors output and steering-vector files.
use crate::error::{Error, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

pub struct OutTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// A file path that is renamed into place on `commit` and removed if dropped before.
pub struct AtomicPath {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicPath {
    pub fn new(dest: &Path) -> Self {
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
        let tmp = dest.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        AtomicPath { tmp, dest: dest.to_owned(), committed: false }
    }

    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    pub fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicPath {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Checks that `path` can be created (its directory exists and is writable) before any compute.
pub fn check_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        let e = std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory, expected an output file path");
        return Err(Error::io(path, e));
    }
    let probe = AtomicPath::new(path);
    std::fs::File::create(probe.tmp()).map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// Writes a safetensors file through a temporary name, flushed and renamed, so that a failure
/// never leaves a partial file at `path`.
pub fn write_safetensors(path: &Path, tensors: &[OutTensor], metadata: HashMap<String, String>) -> Result<()> {
    write_safetensors_typed(path, tensors, metadata, false)
}

/// As [`write_safetensors`], storing f32 tensors as bf16 when `f32_as_bf16`.
pub fn write_safetensors_typed(path: &Path, tensors: &[OutTensor], metadata: HashMap<String, String>, f32_as_bf16: bool) -> Result<()> {
    let data = serialize_safetensors(tensors, &metadata, f32_as_bf16)?;
    let out = AtomicPath::new(path);
    let mut file = std::fs::File::create(out.tmp()).map_err(|e| Error::io(path, e))?;
    file.write_all(&data).map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    drop(file);
    out.commit()
}

/// Safetensors bytes with a deterministic header (metadata keys sorted, tensors in the given
/// order with 8-byte elements first so every tensor is aligned), so the same tensors always give
/// the same file, byte for byte. The `safetensors` crate writes metadata from a `HashMap`, whose
/// order changes from run to run.
pub fn serialize_safetensors(tensors: &[OutTensor], metadata: &HashMap<String, String>, f32_as_bf16: bool) -> Result<Vec<u8>> {
    let mut order: Vec<&OutTensor> = tensors.iter().collect();
    order.sort_by_key(|t| match t.data {
        TensorData::I64(_) => 0,
        TensorData::F32(_) => 1,
    });
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let sorted: std::collections::BTreeMap<&String, &String> = metadata.iter().collect();
        header.insert("__metadata__".into(), serde_json::to_value(sorted).map_err(|e| Error::input(e.to_string()))?);
    }
    let mut offset = 0usize;
    let mut body = Vec::new();
    for t in &order {
        let (dtype, bytes): (&str, Vec<u8>) = match &t.data {
            TensorData::F32(v) if f32_as_bf16 => ("BF16", v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()),
            TensorData::F32(v) => ("F32", bytemuck::cast_slice(v).to_vec()),
            TensorData::I64(v) => ("I64", bytemuck::cast_slice(v).to_vec()),
        };
        let elems: usize = t.shape.iter().product();
        let elem_size = if dtype == "BF16" { 2 } else if dtype == "F32" { 4 } else { 8 };
        if elems * elem_size != bytes.len() {
            return Err(Error::input(format!("tensor `{}`: shape {:?} does not match its {} values", t.name, t.shape, bytes.len() / elem_size)));
        }
        if header.contains_key(&t.name) {
            return Err(Error::input(format!("tensor `{}` appears twice", t.name)));
        }
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": t.shape, "data_offsets": [offset, offset + bytes.len()] }),
        );
        offset += bytes.len();
        body.extend_from_slice(&bytes);
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| Error::input(e.to_string()))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + body.len());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&body);
    Ok(out)
}

/// A tensor read fully into f32, with the file's metadata.
pub struct LoadedTensor {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
    pub metadata: HashMap<String, String>,
}

/// Reads tensor `name` (f32, bf16 or f16) from a safetensors file.
pub fn read_f32_tensor(path: &Path, name: &str) -> Result<LoadedTensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    f32_tensor_from_bytes(&bytes, &path.display().to_string(), name)
}

/// As [`read_f32_tensor`] on the bytes of a safetensors file; `file` names it in errors.
pub fn f32_tensor_from_bytes(bytes: &[u8], file: &str, name: &str) -> Result<LoadedTensor> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::input(format!("{file}: not a valid safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::input(format!("{file}: not a valid safetensors file: {e}")))?;
    let view = st.tensor(name).map_err(|_| {
        let mut names = st.names();
        names.sort_unstable();
        Error::input(format!("{file}: no tensor `{name}` (found: {})", names.join(", ")))
    })?;
    let raw = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::BF16 => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F16 => raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => return Err(Error::input(format!("{file}: tensor `{name}` has dtype {other:?}, expected f32, bf16 or f16"))),
    };
    Ok(LoadedTensor { data, shape: view.shape().to_vec(), metadata: meta.metadata().clone().unwrap_or_default() })
}

/// Reads a steering/concept vector file: tensor `directions` of shape `[L+1, hidden]`, finite.
pub fn read_directions(path: &Path, num_layers: usize, hidden: usize) -> Result<LoadedTensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_directions(&bytes, &path.display().to_string(), num_layers, hidden)
}

/// As [`read_directions`] on the bytes of a safetensors file; `file` names it in errors.
pub fn parse_directions(bytes: &[u8], file: &str, num_layers: usize, hidden: usize) -> Result<LoadedTensor> {
    let t = f32_tensor_from_bytes(bytes, file, "directions")?;
    if t.shape.len() != 2 || t.shape[1] != hidden {
        return Err(Error::input(format!(
            "{file}: `directions` has shape {:?}, expected [{}, {hidden}] for this model",
            t.shape,
            num_layers + 1
        )));
    }
    if t.shape[0] != num_layers + 1 {
        return Err(Error::input(format!(
            "{file}: `directions` has {} rows, expected {} (one per hidden-state index 0..={num_layers})",
            t.shape[0],
            num_layers + 1
        )));
    }
    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::input(format!(
            "{file}: `directions` contains NaN or Inf (row {}, column {})",
            i / hidden.max(1),
            i % hidden.max(1)
        )));
    }
    Ok(t)
}

/// One line of an `extract` input file.
#[derive(Debug, Clone, PartialEq)]
pub enum InputItem {
    Text(String),
    /// Pre-tokenized input.
    Ids(Vec<u32>),
}

/// Parses JSONL input: one object per line with a string `text` or a list `ids` of token ids.
/// Blank lines, invalid UTF-8 and an input without lines are errors; `file` names the source
/// in error messages (`FILE: line N: ...`).
pub fn parse_jsonl(bytes: &[u8], file: &str) -> Result<Vec<InputItem>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        Error::input(format!("{file}: line {line}: invalid UTF-8"))
    })?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let at = || format!("{file}: line {n}");
        if line.trim().is_empty() {
            return Err(Error::input(format!("{}: empty line (expected a JSON object with a `text` field)", at())));
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| Error::input(format!("{}: malformed JSON: {e}", at())))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::input(format!("{}: expected a JSON object, got {}", at(), json_kind(&value))))?;
        match (obj.get("text"), obj.get("ids")) {
            (Some(serde_json::Value::String(s)), _) => items.push(InputItem::Text(s.clone())),
            (Some(other), _) => {
                return Err(Error::input(format!("{}: `text` must be a string, got {}", at(), json_kind(other))))
            }
            (None, Some(serde_json::Value::Array(ids))) => {
                let ids: Option<Vec<u32>> =
                    ids.iter().map(|v| v.as_u64().filter(|&x| x <= u32::MAX as u64).map(|x| x as u32)).collect();
                match ids {
                    Some(ids) => items.push(InputItem::Ids(ids)),
                    None => return Err(Error::input(format!("{}: `ids` must be a list of non-negative integers", at()))),
                }
            }
            _ => return Err(Error::input(format!("{}: no `text` field", at()))),
        }
    }
    if items.is_empty() {
        return Err(Error::input(format!("{file}: no input lines")));
    }
    Ok(items)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
