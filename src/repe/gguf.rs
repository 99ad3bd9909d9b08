//! llama.cpp control vectors: GGUF export and import.
//!
//! A control-vector GGUF (as written by repeng's `export_gguf` and llama.cpp's cvector
//! generator) holds 1-D f32 tensors `direction.k` of length `hidden`, with metadata
//! `general.architecture = "controlvector"`, `controlvector.model_hint` and
//! `controlvector.layer_count`. llama.cpp adds `direction.k` to the output of decoder block k
//! (0-based) at every position, and rejects k = 0; repeng's layer k is the same point. In
//! Hugging Face indexing that is hidden-state index k + 1, so:
//!
//! * export writes row l of a `[L+1, hidden]` directions array as `direction.(l-1)` for
//!   l = 2..=L (row 1, the output of block 0, has no llama.cpp name and is left out; row 0, the
//!   embeddings, is never steered by llama.cpp);
//! * import puts `direction.k` in row k + 1 (several tensors for the same k are summed, as
//!   llama.cpp does).
//!
//! The writer emits GGUF version 3 little-endian with the default 32-byte alignment.
use crate::error::{Error, Result};
use crate::io::{AtomicPath, LoadedTensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

const ALIGN: usize = 32;
const T_U32: u32 = 4;
const T_STRING: u32 = 8;
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pad(out: &mut Vec<u8>, align: usize) {
    while !out.len().is_multiple_of(align) {
        out.push(0);
    }
}

/// Serialises control-vector tensors (index k → data) into GGUF v3 bytes.
pub fn control_vector_bytes(tensors: &[(usize, &[f32])], model_hint: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&3u64.to_le_bytes());
    put_str(&mut out, "general.architecture");
    out.extend_from_slice(&T_STRING.to_le_bytes());
    put_str(&mut out, "controlvector");
    put_str(&mut out, "controlvector.model_hint");
    out.extend_from_slice(&T_STRING.to_le_bytes());
    put_str(&mut out, model_hint);
    put_str(&mut out, "controlvector.layer_count");
    out.extend_from_slice(&T_U32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u32).to_le_bytes());
    let mut offset = 0usize;
    for (k, data) in tensors {
        put_str(&mut out, &format!("direction.{k}"));
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(&GGML_F32.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += (data.len() * 4).div_ceil(ALIGN) * ALIGN;
    }
    pad(&mut out, ALIGN);
    for (_, data) in tensors {
        for v in data.iter() {
            out.extend_from_slice(&v.to_le_bytes());
        }
        pad(&mut out, ALIGN);
    }
    out
}

/// Writes `[L+1, hidden]` directions as a llama.cpp control vector; returns the number of
/// `direction.k` tensors written (L − 1).
pub fn write_control_vector(path: &Path, directions: &[f32], num_layers: usize, hidden: usize, model_hint: &str) -> Result<usize> {
    if directions.len() != (num_layers + 1) * hidden {
        return Err(Error::input(format!(
            "{}: directions hold {} values, expected {} ([{}, {hidden}])",
            path.display(),
            directions.len(),
            (num_layers + 1) * hidden,
            num_layers + 1
        )));
    }
    let tensors: Vec<(usize, &[f32])> = (2..=num_layers).map(|l| (l - 1, &directions[l * hidden..(l + 1) * hidden])).collect();
    let bytes = control_vector_bytes(&tensors, model_hint);
    let out = AtomicPath::new(path);
    let mut f = std::fs::File::create(out.tmp()).map_err(|e| Error::io(path, e))?;
    f.write_all(&bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))?;
    drop(f);
    out.commit()?;
    Ok(tensors.len())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, what: &str) -> Error {
        Error::input(format!("{}: byte {}: {what}", self.path.display(), self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len().saturating_sub(self.pos) < n {
            return Err(self.err("truncated GGUF file"));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or([0; 4])))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap_or([0; 8])))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        if n > (1 << 30) {
            return Err(self.err("string length out of range"));
        }
        let b = self.take(n as usize)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    /// Reads a value of GGUF type `t`; returns it as u64 when it is an unsigned integer.
    fn value(&mut self, t: u32, depth: usize) -> Result<Option<u64>> {
        Ok(match t {
            0 | 1 | 7 => Some(self.take(1)?[0] as u64),
            2 | 3 => Some(u16::from_le_bytes(self.take(2)?.try_into().unwrap_or([0; 2])) as u64),
            4..=6 => Some(self.u32()? as u64),
            10..=12 => Some(self.u64()?),
            8 => {
                self.string()?;
                None
            }
            9 => {
                if depth > 4 {
                    return Err(self.err("nested arrays too deep"));
                }
                let et = self.u32()?;
                let n = self.u64()?;
                if n > (1 << 32) {
                    return Err(self.err("array length out of range"));
                }
                for _ in 0..n {
                    self.value(et, depth + 1)?;
                }
                None
            }
            other => return Err(self.err(&format!("unknown metadata value type {other}"))),
        })
    }
}

/// Reads a llama.cpp control-vector GGUF into the `[L+1, hidden]` directions layout
/// (`direction.k` → row k + 1; rows without a tensor are zero).
pub fn read_control_vector(path: &Path, num_layers: usize, hidden: usize) -> Result<LoadedTensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_control_vector(&bytes, path, num_layers, hidden)
}

/// As [`read_control_vector`] on a file's bytes (an upload); `path` only names it in errors.
pub fn parse_control_vector(bytes: &[u8], path: &Path, num_layers: usize, hidden: usize) -> Result<LoadedTensor> {
    parse_control_vector_for(bytes, path, Some((num_layers, hidden)))
}

/// Reads a control-vector GGUF without a model at hand: the hidden size is the tensors' own
/// and the table has rows up to the highest `direction.k` (k + 2 rows); a face pads it to its
/// model's `L + 1` rows when it steers with it.
pub fn read_control_vector_unsized(path: &Path) -> Result<LoadedTensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_control_vector_for(&bytes, path, None)
}

fn parse_control_vector_for(bytes: &[u8], path: &Path, model: Option<(usize, usize)>) -> Result<LoadedTensor> {
    let mut hidden = model.map(|m| m.1);
    let mut r = Reader { bytes, pos: 0, path };
    if r.take(4)? != b"GGUF" {
        return Err(Error::input(format!("{}: not a GGUF file (bad magic)", path.display())));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(Error::input(format!("{}: GGUF version {version} is not supported (expected 2 or 3)", path.display())));
    }
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    if n_tensors > 1 << 20 || n_kv > 1 << 20 {
        return Err(r.err("tensor or metadata count out of range"));
    }
    let mut alignment = ALIGN;
    let mut metadata = HashMap::new();
    for _ in 0..n_kv {
        let key = r.string()?;
        let t = r.u32()?;
        let start = r.pos;
        let v = r.value(t, 0)?;
        if key == "general.alignment" {
            alignment = v.filter(|&a| a > 0 && a.is_power_of_two() && a <= 1 << 20).ok_or_else(|| r.err("bad general.alignment"))? as usize;
        }
        if t == T_STRING {
            let s = &bytes[start + 8..r.pos];
            metadata.insert(key, String::from_utf8_lossy(s).into_owned());
        }
    }
    struct Info {
        name: String,
        layer: usize,
        dtype: u32,
        len: usize,
        offset: usize,
    }
    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > 4 {
            return Err(r.err(&format!("tensor `{name}` has {n_dims} dimensions")));
        }
        let dims: Vec<u64> = (0..n_dims).map(|_| r.u64()).collect::<Result<_>>()?;
        let dtype = r.u32()?;
        let offset = r.u64()? as usize;
        let layer = name
            .strip_prefix("direction.")
            .and_then(|k| k.parse::<usize>().ok())
            .ok_or_else(|| Error::input(format!("{}: tensor `{name}` is not named direction.<layer>", path.display())))?;
        if layer == 0 {
            return Err(Error::input(format!("{}: tensor `{name}`: layer 0 is invalid in a control vector (llama.cpp rejects it)", path.display())));
        }
        let hidden = *hidden.get_or_insert(dims.first().map_or(0, |&d| d as usize));
        if hidden == 0 || hidden > 1 << 20 {
            return Err(Error::input(format!("{}: tensor `{name}` has shape {dims:?}: no usable hidden size", path.display())));
        }
        if let Some((num_layers, _)) = model.filter(|&(n, _)| layer + 1 > n) {
            return Err(Error::input(format!(
                "{}: tensor `{name}` targets decoder block {layer}, but the model has blocks 0..{}",
                path.display(),
                num_layers.saturating_sub(1)
            )));
        }
        if n_dims != 1 || dims[0] as usize != hidden {
            return Err(Error::input(format!(
                "{}: tensor `{name}` has shape {dims:?}, expected [{hidden}] for this model",
                path.display()
            )));
        }
        if dtype != GGML_F32 && dtype != GGML_F16 {
            return Err(Error::input(format!("{}: tensor `{name}` has ggml type {dtype}, expected f32 (0) or f16 (1)", path.display())));
        }
        infos.push(Info { name, layer, dtype, len: hidden, offset });
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let Some(hidden) = hidden else {
        return Err(Error::input(format!("{}: no direction tensors", path.display())));
    };
    let num_layers = model.map_or_else(|| infos.iter().map(|i| i.layer + 1).max().unwrap_or(0), |m| m.0);
    let mut out = vec![0.0f32; (num_layers + 1) * hidden];
    for info in &infos {
        let width = if info.dtype == GGML_F32 { 4 } else { 2 };
        let start = data_start.checked_add(info.offset).filter(|s| s.checked_add(info.len * width).is_some_and(|e| e <= bytes.len()));
        let Some(start) = start else {
            return Err(Error::input(format!("{}: tensor `{}`: data lies outside the file (truncated?)", path.display(), info.name)));
        };
        let raw = &bytes[start..start + info.len * width];
        let row = &mut out[(info.layer + 1) * hidden..(info.layer + 2) * hidden];
        for (i, o) in row.iter_mut().enumerate() {
            let v = if width == 4 {
                f32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]])
            } else {
                half::f16::from_le_bytes([raw[2 * i], raw[2 * i + 1]]).to_f32()
            };
            *o += v;
        }
    }
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        return Err(Error::input(format!(
            "{}: direction.{} contains NaN or Inf (column {})",
            path.display(),
            i / hidden - 1,
            i % hidden
        )));
    }
    metadata.insert("source".into(), format!("llama.cpp control vector {}", path.display()));
    Ok(LoadedTensor { data: out, shape: vec![num_layers + 1, hidden], metadata })
}

/// Reads a vector file for steering: GGUF control vectors (by extension `.gguf`) or the
/// safetensors `directions` format.
pub fn read_any_directions(path: &Path, num_layers: usize, hidden: usize) -> Result<LoadedTensor> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        read_control_vector(path, num_layers, hidden)
    } else {
        crate::io::read_directions(path, num_layers, hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.gguf");
        let (layers, hidden) = (4, 3);
        let dirs: Vec<f32> = (0..(layers + 1) * hidden).map(|i| i as f32 * 0.5).collect();
        assert_eq!(write_control_vector(&p, &dirs, layers, hidden, "llama").unwrap(), 3);
        let back = read_control_vector(&p, layers, hidden).unwrap();
        assert_eq!(&back.data[..2 * hidden], &[0.0; 6]);
        assert_eq!(&back.data[2 * hidden..], &dirs[2 * hidden..]);
        assert_eq!(back.metadata.get("general.architecture").map(String::as_str), Some("controlvector"));
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 40]).unwrap();
        assert!(read_control_vector(&p, layers, hidden).err().expect("an error").to_string().contains("outside the file"));
    }
}
