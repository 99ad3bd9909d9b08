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

    /// A tensor's bytes as stored, after checking its shape and dtype.
    pub fn raw(&self, name: &str, shape: &[usize]) -> Result<RawTensor> {
        let (f, info) = self.lookup(name).ok_or_else(|| Error::model(format!("missing tensor `{name}`")))?;
        let file = &self.files[*f];
        if info.shape != shape {
            return Err(Error::model(format!(
                "{}: tensor `{name}` has shape {:?}, expected {shape:?}",
                file.path.display(),
                info.shape
            )));
        }
        let dtype = match info.dtype {
            Dtype::F32 => StoredDtype::F32,
            Dtype::BF16 => StoredDtype::Bf16,
            Dtype::F16 => StoredDtype::F16,
            other => {
                return Err(Error::model(format!(
                    "{}: tensor `{name}` has unsupported dtype {} (supported: f32, bf16, f16)",
                    file.path.display(),
                    dtype_name(other)
                )))
            }
        };
        // read_header checked that the offsets lie in the file and match the shape and dtype.
        Ok(RawTensor {
            mmap: file.mmap.clone(),
            start: file.data_start + info.data_offsets.0,
            elems: shape.iter().product(),
            dtype,
        })
    }

    /// Loads a tensor as f32: borrowed from the map when stored as aligned f32, converted otherwise.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<F32Data> {
        Ok(self.raw(name, shape)?.to_f32())
    }
}

/// The floating-point formats a checkpoint may store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    Bf16,
    F16,
}

impl StoredDtype {
    fn size(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::Bf16 | StoredDtype::F16 => 2,
        }
    }
}

/// One tensor's bytes in a mapped checkpoint file, as stored (little-endian).
#[derive(Clone)]
pub struct RawTensor {
    mmap: Arc<Mmap>,
    start: usize,
    elems: usize,
    dtype: StoredDtype,
}

impl RawTensor {
    pub fn len(&self) -> usize {
        self.elems
    }

    pub fn is_empty(&self) -> bool {
        self.elems == 0
    }

    pub fn dtype(&self) -> StoredDtype {
        self.dtype
    }

    fn bytes(&self, from: usize, n: usize) -> &[u8] {
        let size = self.dtype.size();
        &self.mmap[self.start + from * size..self.start + (from + n) * size]
    }

    /// All values as f32 (exact for every stored format): borrowed when stored as aligned f32.
    pub fn to_f32(&self) -> F32Data {
        if self.dtype == StoredDtype::F32 && self.start.is_multiple_of(4) {
            return F32Data::Mapped { mmap: self.mmap.clone(), start: self.start, len: self.elems };
        }
        let mut out = vec![0f32; self.elems];
        self.write_f32(0, &mut out);
        F32Data::Owned(out)
    }

    /// Values `from .. from + dst.len()` as f32.
    pub fn write_f32(&self, from: usize, dst: &mut [f32]) {
        let bytes = self.bytes(from, dst.len());
        match self.dtype {
            StoredDtype::F32 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            StoredDtype::Bf16 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            StoredDtype::F16 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = f32::from_bits(f16_bits_to_f32_bits(u16::from_le_bytes([b[0], b[1]])));
                }
            }
        }
    }

    /// Values `from .. from + dst.len()` as bf16 bits: bf16 copied, f32 and f16 rounded to
    /// nearest even (the same bits as converting to f32 first, which is exact).
    pub fn write_bf16(&self, from: usize, dst: &mut [u16]) {
        let bytes = self.bytes(from, dst.len());
        match self.dtype {
            // Aligned words (the usual case) let the loops vectorise; safetensors is little-endian.
            StoredDtype::Bf16 => match bytemuck::try_cast_slice::<u8, u16>(bytes) {
                Ok(halves) if cfg!(target_endian = "little") => dst.copy_from_slice(halves),
                _ => {
                    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                        *d = u16::from_le_bytes([b[0], b[1]]);
                    }
                }
            },
            // (the usual case) let the loops vectorise; safetensors is little-endian.
            StoredDtype::F32 => match bytemuck::try_cast_slice::<u8, u32>(bytes) {
                Ok(words) if cfg!(target_endian = "little") => {
                    for (d, &x) in dst.iter_mut().zip(words) {
                        *d = f32_bits_to_bf16(x);
                    }
                }
                _ => {
                    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                        *d = f32_bits_to_bf16(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    }
                }
            },
            StoredDtype::F16 => match bytemuck::try_cast_slice::<u8, u16>(bytes) {
                Ok(halves) if cfg!(target_endian = "little") => {
                    for (d, &h) in dst.iter_mut().zip(halves) {
                        *d = f32_bits_to_bf16(f16_bits_to_f32_bits(h));
                    }
                }
                _ => {
                    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                        *d = f32_bits_to_bf16(f16_bits_to_f32_bits(u16::from_le_bytes([b[0], b[1]])));
                    }
                }
            },
        }
    }
}

// Branch-free conversions (the loops above vectorise; `half`'s per-value calls do not), bit
// for bit what `half` gives, which the tests check over every f16 and a sweep of f32 patterns.

/// f32 bits to bf16 bits, rounding to nearest even; NaNs stay NaN (quiet).
#[inline(always)]
fn f32_bits_to_bf16(x: u32) -> u16 {
    let rounded = (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16;
    let quiet_nan = ((x >> 16) | 0x0040) as u16;
    if x & 0x7FFF_FFFF > 0x7F80_0000 { quiet_nan } else { rounded }
}

/// f16 bits to f32 bits (exact); NaNs become quiet.
#[inline(always)]
fn f16_bits_to_f32_bits(h: u16) -> u32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let (exp, man) = ((h >> 10) & 0x1F, h & 0x3FF);
    let normal = sign | ((exp + 112) << 23) | (man << 13);
    // Subnormals (and zero): man · 2⁻²⁴, exact in f32.
    let subnormal = sign | (man as f32 * (1.0 / 16_777_216.0)).to_bits();
    let special = sign | 0x7F80_0000 | (man << 13) | if man != 0 { 0x0040_0000 } else { 0 };
    match exp {
        0 => subnormal,
        0x1F => special,
        _ => normal,
    }
}

/// A row block of a [`MatrixSource`]: a stored tensor, values made in memory (benchmarks'
/// random matrices), or zeros (a stacked bias part the checkpoint does not have).
#[derive(Clone)]
pub enum SourcePart {
    Stored(RawTensor),
    Values(Arc<Vec<f32>>),
    Zeros(usize),
}

impl SourcePart {
    fn len(&self) -> usize {
        match self {
            SourcePart::Stored(t) => t.len(),
            SourcePart::Values(v) => v.len(),
            SourcePart::Zeros(n) => *n,
        }
    }

    fn write_f32(&self, from: usize, dst: &mut [f32]) {
        match self {
            SourcePart::Stored(t) => t.write_f32(from, dst),
            SourcePart::Values(v) => dst.copy_from_slice(&v[from..from + dst.len()]),
            SourcePart::Zeros(_) => dst.fill(0.0),
        }
    }

    fn write_bf16(&self, from: usize, dst: &mut [u16]) {
        match self {
            SourcePart::Stored(t) => t.write_bf16(from, dst),
            SourcePart::Values(v) => {
                let n = dst.len();
                for (d, &x) in dst.iter_mut().zip(&v[from..from + n]) {
                    *d = half::bf16::from_f32(x).to_bits();
                }
            }
            SourcePart::Zeros(_) => dst.fill(0),
        }
    }
}

/// A weight matrix `[rows, cols]` as the checkpoint stores it: row blocks stacked in order
/// (Q, K, V; gate, up), and for BLOOM's fused QKV, rows interleaved per head
/// (`[heads, 3, head_dim]`) that are put back in `[q; k; v]` order. A backend reads it in the
/// precision it keeps (the CPU as f32, CUDA as bf16 straight from the map), in row chunks.
#[derive(Clone)]
pub struct MatrixSource {
    parts: Vec<SourcePart>,
    rows: usize,
    cols: usize,
    /// `(heads, head_dim)` of an interleaved QKV matrix.
    interleaved_qkv: Option<(usize, usize)>,
}

impl MatrixSource {
    /// Row blocks stacked in order; each part's length must be a multiple of `cols`.
    pub fn stacked(parts: Vec<SourcePart>, cols: usize) -> Result<Self> {
        let total: usize = parts.iter().map(SourcePart::len).sum();
        if cols == 0 || parts.iter().any(|p| p.len() % cols != 0) {
            return Err(Error::model(format!("stacked matrix parts do not divide into rows of {cols}")));
        }
        Ok(MatrixSource { parts, rows: total / cols, cols, interleaved_qkv: None })
    }

    pub fn single(t: RawTensor, rows: usize, cols: usize) -> Result<Self> {
        Self::single_part(SourcePart::Stored(t), rows, cols)
    }

    /// A matrix of values made in memory.
    pub fn from_values(values: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        Self::single_part(SourcePart::Values(Arc::new(values)), rows, cols)
    }

    fn single_part(part: SourcePart, rows: usize, cols: usize) -> Result<Self> {
        let m = Self::stacked(vec![part], cols)?;
        if m.rows != rows {
            return Err(Error::model(format!("matrix of {} rows, expected {rows}", m.rows)));
        }
        Ok(m)
    }

    /// A fused QKV tensor whose rows are interleaved per head, `[heads · 3 · head_dim, cols]`.
    pub fn interleaved_qkv(t: RawTensor, heads: usize, head_dim: usize, cols: usize) -> Result<Self> {
        let m = Self::single(t, 3 * heads * head_dim, cols)?;
        Ok(MatrixSource { interleaved_qkv: Some((heads, head_dim)), ..m })
    }

    /// Rows of each stacked block, in order.
    pub fn part_rows(&self) -> Vec<usize> {
        self.parts.iter().map(|p| p.len() / self.cols).collect()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The part and the row within it that hold output row `r`.
    fn source_row(&self, r: usize) -> (usize, usize) {
        let r = match self.interleaved_qkv {
            Some((heads, head_dim)) => {
                let (block, within) = (r / head_dim, r % head_dim);
                let (part, head) = (block / heads, block % heads);
                (head * 3 + part) * head_dim + within
            }
            None => r,
        };
        let mut first = 0;
        for (i, p) in self.parts.iter().enumerate() {
            let rows = p.len() / self.cols;
            if r < first + rows {
                return (i, r - first);
            }
            first += rows;
        }
        (self.parts.len(), 0) // past the end: callers pass r < rows
    }

    fn row_part(&self, r: usize) -> Option<(&SourcePart, usize)> {
        let (i, row) = self.source_row(r);
        self.parts.get(i).map(|p| (p, row * self.cols))
    }

    /// The whole matrix as f32: borrowed from the map when it is one aligned f32 tensor in
    /// stored order, converted and assembled otherwise.
    pub fn to_f32(&self) -> F32Data {
        if let ([SourcePart::Stored(t)], None) = (&self.parts[..], self.interleaved_qkv) {
            return t.to_f32();
        }
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, dst) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            if let Some((part, at)) = self.row_part(r) {
                part.write_f32(at, dst);
            }
        }
        F32Data::Owned(out)
    }

    /// Rows `first_row ..` as bf16 bits into `dst` (a whole number of rows), converted in
    /// parallel: a device backend fills its pinned staging buffer with this.
    pub fn write_bf16_rows(&self, first_row: usize, dst: &mut [u16]) {
        use rayon::prelude::*;
        const ROWS_PER_TASK: usize = 64;
        let cols = self.cols.max(1);
        dst.par_chunks_mut(cols * ROWS_PER_TASK).enumerate().for_each(|(task, rows)| {
            for (i, d) in rows.chunks_exact_mut(cols).enumerate() {
                match self.row_part(first_row + task * ROWS_PER_TASK + i) {
                    Some((part, at)) => part.write_bf16(at, d),
                    None => d.fill(0),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // Distinct values with mantissa bits below bf16's precision, so rounding is exercised.
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761u32) ^ seed) as f32 / u32::MAX as f32 - 0.5) * 3.0 + 1e-3 * i as f32).collect()
    }

    /// A store holding `a` (f32, [6, 4]), `b` (bf16, [2, 4]), `c` (f16, [4, 4]) and `qkv`
    /// (bf16, [heads 2 · 3 · head_dim 2, 4]).
    fn store(dir: &Path) -> (WeightStore, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let a = values(24, 1);
        let b: Vec<f32> = values(8, 2).iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        let c: Vec<f32> = values(16, 3).iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
        let qkv: Vec<f32> = values(48, 4).iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        let a_bytes: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b_bytes: Vec<u8> = b.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        let c_bytes: Vec<u8> = c.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
        let qkv_bytes: Vec<u8> = qkv.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        let views = vec![
            ("a", TensorView::new(Dtype::F32, vec![6, 4], &a_bytes).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![2, 4], &b_bytes).unwrap()),
            ("c", TensorView::new(Dtype::F16, vec![4, 4], &c_bytes).unwrap()),
            ("qkv", TensorView::new(Dtype::BF16, vec![12, 4], &qkv_bytes).unwrap()),
        ];
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        (WeightStore::open(dir).unwrap(), a, b, c, qkv)
    }

    fn bf16_bits(v: &[f32]) -> Vec<u16> {
        v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()
    }

    /// Every way of cutting the rows into chunks gives the bf16 of the f32 assembly.
    fn check_chunks(src: &MatrixSource, expected: &[f32]) {
        assert_eq!(&src.to_f32()[..], expected);
        let cols = src.cols();
        for chunk in 1..=src.rows() {
            let mut got = vec![0xFFFFu16; src.rows() * cols];
            for first in (0..src.rows()).step_by(chunk) {
                let n = chunk.min(src.rows() - first);
                src.write_bf16_rows(first, &mut got[first * cols..(first + n) * cols]);
            }
            assert_eq!(got, bf16_bits(expected), "chunks of {chunk} rows");
        }
    }

    #[test]
    fn conversions_match_half_bit_for_bit() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f32::from_bits(f16_bits_to_f32_bits(h));
            assert!(got.to_bits() == want.to_bits(), "f16 {h:#06x}: {got:?} vs {want:?}");
            assert_eq!(f32_bits_to_bf16(got.to_bits()), half::bf16::from_f32(want).to_bits(), "f16 {h:#06x} to bf16");
        }
        let edges = [0u32, 0x8000_0000, 0x7F7F_FFFF, 0xFF7F_FFFF, 0x7F80_0000, 0x7F80_0001, 0xFFC0_0000, 0x3F80_8000, 0x3F81_8000, 0x0000_8000, 0x0001_8000, 0x7F7F_8000];
        for x in (0..=u32::MAX).step_by(9_973).chain(edges) {
            assert_eq!(f32_bits_to_bf16(x), half::bf16::from_f32(f32::from_bits(x)).to_bits(), "f32 {x:#010x}");
        }
    }

    /// Tensors at odd offsets in the file (legal in safetensors) take the byte-wise paths.
    #[test]
    fn unaligned_tensors_convert_the_same() {
        let a = values(8, 5);
        let h: Vec<f32> = values(8, 6).iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
        let mut data = vec![0u8; 1]; // one u8 first: everything after it is misaligned
        data.extend(a.iter().flat_map(|x| x.to_le_bytes()));
        data.extend(h.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()));
        let b: Vec<f32> = h.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect();
        data.extend(b.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()));
        let header = serde_json::json!({
            "pad": { "dtype": "U8", "shape": [1], "data_offsets": [0, 1] },
            "a": { "dtype": "F32", "shape": [2, 4], "data_offsets": [1, 33] },
            "h": { "dtype": "F16", "shape": [2, 4], "data_offsets": [33, 49] },
            "b": { "dtype": "BF16", "shape": [2, 4], "data_offsets": [49, 65] },
        })
        .to_string();
        let mut header = header.into_bytes();
        while !(8 + header.len()).is_multiple_of(8) {
            header.push(b' ');
        }
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header);
        file.extend(data);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("model.safetensors"), file).unwrap();
        let st = WeightStore::open(tmp.path()).unwrap();
        for (name, want) in [("a", &a), ("h", &h), ("b", &b)] {
            let t = st.raw(name, &[2, 4]).unwrap();
            assert!(!t.start.is_multiple_of(t.dtype.size()), "{name} should be misaligned");
            assert_eq!(&t.to_f32()[..], &want[..], "{name}");
            let mut got = vec![0u16; 8];
            t.write_bf16(0, &mut got);
            assert_eq!(got, bf16_bits(want), "{name}");
        }
    }

    #[test]
    fn matrix_sources_assemble_and_convert_like_the_f32_path() {
        let tmp = tempfile::tempdir().unwrap();
        let (st, a, b, c, qkv) = store(tmp.path());
        let raw = |n: &str, shape: &[usize]| st.raw(n, shape).unwrap();
        // A single f32 tensor is borrowed from the map; stacked parts of mixed dtypes are
        // assembled in order, zeros where a part is missing.
        let single = MatrixSource::single(raw("a", &[6, 4]), 6, 4).unwrap();
        assert!(single.to_f32().is_mapped());
        check_chunks(&single, &a);
        let parts = vec![
            SourcePart::Stored(raw("b", &[2, 4])),
            SourcePart::Zeros(4),
            SourcePart::Stored(raw("c", &[4, 4])),
            SourcePart::Stored(raw("a", &[6, 4])),
        ];
        let stacked = MatrixSource::stacked(parts, 4).unwrap();
        assert_eq!(stacked.rows(), 13);
        let expected: Vec<f32> = b.iter().chain(&[0.0; 4]).chain(&c).chain(&a).copied().collect();
        check_chunks(&stacked, &expected);
        // BLOOM's per-head interleaved rows [head, (q|k|v), dim] come back as [q; k; v].
        let inter = MatrixSource::interleaved_qkv(raw("qkv", &[12, 4]), 2, 2, 4).unwrap();
        let mut expected = Vec::new();
        for part in 0..3 {
            for head in 0..2 {
                let block = (head * 3 + part) * 2 * 4;
                expected.extend_from_slice(&qkv[block..block + 8]);
            }
        }
        check_chunks(&inter, &expected);
        let made = MatrixSource::from_values(a.clone(), 6, 4).unwrap();
        check_chunks(&made, &a);
        // Shapes and dtypes are checked before any byte is read.
        assert!(st.raw("a", &[4, 6]).is_err());
        assert!(MatrixSource::single(raw("a", &[6, 4]), 5, 4).is_err());
        assert!(MatrixSource::stacked(vec![SourcePart::Zeros(5)], 4).is_err());
    }
}
