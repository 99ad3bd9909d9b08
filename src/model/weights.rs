//! Memory-mapped safetensors checkpoints (single file or sharded with an index).
use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::arch::ExpectedTensor;

/// f32 values either borrowed from the mapped file (f32 checkpoints) or converted once (bf16/f16).
pub enum F32Data {
    Mapped { mmap: Arc<Mmap>, start: usize, len: usize },
    Owned(Vec<f32>),
}

impl std::ops::Deref for F32Data {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32Data::Mapped { mmap, start, len } => bytemuck::cast_slice(&mmap[*start..*start + *len * 4]),
            F32Data::Owned(v) => v,
        }
    }
}

impl F32Data {
    pub fn is_mapped(&self) -> bool {
        matches!(self, F32Data::Mapped { .. })
    }
}

struct MappedFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    data_start: usize,
}

pub struct WeightStore {
    files: Vec<MappedFile>,
    index: HashMap<String, (usize, TensorInfo)>,
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}").to_lowercase()
}

/// Parses and validates a safetensors file's header against the whole file's bytes: header
/// length, JSON, dtypes, shapes, and data offsets that are contiguous, non-overlapping, match
/// each tensor's size and end exactly at the end of the file. Returns the header length and the
/// tensors' descriptions; every offset in them is then safe to slice with.
pub fn read_header(bytes: &[u8], path: &Path) -> Result<(usize, Metadata)> {
    SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::model(format!("{}: not a valid safetensors file: {e}", path.display())))
}

impl WeightStore {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let shard_paths: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            let text = super::config::read_model_text(&index_path)?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::model(format!("{}: invalid JSON: {e}", index_path.display())))?;
            let map = value.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
                Error::model(format!("{}: missing `weight_map` object", index_path.display()))
            })?;
            let mut names = BTreeSet::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    Error::model(format!("{}: weight_map entry `{tensor}` is not a file name", index_path.display()))
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(Error::model(format!(
                        "{}: shard name `{file}` must be a plain file name in the model directory",
                        index_path.display()
                    )));
                }
                names.insert(file.to_owned());
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(Error::model(format!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )));
        };

        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in shard_paths {
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the map is read-only; we treat concurrent modification of a model file as user error.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (header_len, metadata) = read_header(&mmap, &path)?;
            let file_idx = files.len();
            for (name, info) in metadata.tensors() {
                if let Some((other, _)) = index.get(&name) {
                    let other: &usize = other;
                    return Err(Error::model(format!(
                        "{}: tensor `{name}` also appears in {}",
                        path.display(),
                        files.get(*other).map(|f: &MappedFile| f.path.display().to_string()).unwrap_or_default()
                    )));
                }
                index.insert(name, (file_idx, info.clone()));
            }
            files.push(MappedFile { path, mmap: Arc::new(mmap), data_start: 8 + header_len });
        }
        Ok(WeightStore { files, index })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Finds a tensor; names under `transformer.` also match without that prefix (BLOOM
    /// checkpoints on the hub store `h.0.…`, transformers writes `transformer.h.0.…`).
    fn lookup(&self, name: &str) -> Option<&(usize, TensorInfo)> {
        self.index.get(name).or_else(|| name.strip_prefix("transformer.").and_then(|n| self.index.get(n)))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lookup(name).is_some()
    }

    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.lookup(name).map(|(f, _)| self.files[*f].path.as_path())
    }

    /// The dtype shared by the checkpoint's floating-point tensors (the most common one).
    pub fn dominant_dtype(&self) -> String {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for (_, info) in self.index.values() {
            *counts.entry(dtype_name(info.dtype)).or_default() += info.shape.iter().product::<usize>();
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d).unwrap_or_else(|| "none".into())
    }

    /// Checks presence, dtype and shape of every expected tensor. All problems are gathered;
    /// the error names the first and counts the rest.
    pub fn check(&self, expected: &[ExpectedTensor]) -> Result<()> {
        let mut problems = Vec::new();
        for e in expected {
            match self.lookup(&e.name) {
                None => problems.push(format!("missing tensor `{}` (expected shape {:?})", e.name, e.shape)),
                Some((f, info)) => {
                    let file = self.files[*f].path.display();
                    if !matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                        problems.push(format!(
                            "{file}: tensor `{}` has unsupported dtype {} (supported: f32, bf16, f16)",
                            e.name,
                            dtype_name(info.dtype)
                        ));
                    } else if info.shape != e.shape {
                        problems.push(format!(
                            "{file}: tensor `{}` has shape {:?}, expected {:?}",
                            e.name, info.shape, e.shape
                        ));
                    }
                }
            }
        }
        match problems.len() {
            0 => Ok(()),
            1 => Err(Error::model(problems.remove(0))),
            n => Err(Error::model(format!("{} (and {} more problems)", problems[0], n - 1))),
        }
    }

    /// Loads a tensor as f32: borrowed from the map when stored as aligned f32, converted otherwise.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<F32Data> {
        let (f, info) = self.lookup(name).ok_or_else(|| Error::model(format!("missing tensor `{name}`")))?;
        let file = &self.files[*f];
        if info.shape != shape {
            return Err(Error::model(format!(
                "{}: tensor `{name}` has shape {:?}, expected {shape:?}",
                file.path.display(),
                info.shape
            )));
        }
        let n: usize = shape.iter().product();
        let start = file.data_start + info.data_offsets.0;
        let bytes = &file.mmap[start..file.data_start + info.data_offsets.1];
        match info.dtype {
            Dtype::F32 if start % 4 == 0 => Ok(F32Data::Mapped { mmap: file.mmap.clone(), start, len: n }),
            Dtype::F32 => Ok(F32Data::Owned(
                bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            )),
            Dtype::BF16 => Ok(F32Data::Owned(
                bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            )),
            Dtype::F16 => Ok(F32Data::Owned(
                bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            )),
            other => Err(Error::model(format!(
                "{}: tensor `{name}` has unsupported dtype {} (supported: f32, bf16, f16)",
                file.path.display(),
                dtype_name(other)
            ))),
        }
    }
}
