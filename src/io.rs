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
    /// Statistics accumulated in f64 (`resid stats`).
    F64(Vec<f64>),
}

/// The element type of captured tensors in an output (`--dtype`): f32, or half precision for
/// half the disk. Conversion rounds to nearest, ties to even (the `half` crate, F16C on x86).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for OutputDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(OutputDtype::F32),
            "f16" | "float16" => Ok(OutputDtype::F16),
            "bf16" | "bfloat16" => Ok(OutputDtype::Bf16),
            other => Err(Error::input(format!("unknown dtype `{other}` (expected f32, f16 or bf16)"))),
        }
    }
}

impl OutputDtype {
    /// The PyTorch/numpy name recorded in metadata (`float32`, `float16`, `bfloat16`).
    pub fn name(self) -> &'static str {
        match self {
            OutputDtype::F32 => "float32",
            OutputDtype::F16 => "float16",
            OutputDtype::Bf16 => "bfloat16",
        }
    }

    pub fn stream(self) -> StreamDtype {
        match self {
            OutputDtype::F32 => StreamDtype::F32,
            OutputDtype::F16 => StreamDtype::F16,
            OutputDtype::Bf16 => StreamDtype::Bf16,
        }
    }

    /// The largest finite magnitude this type holds.
    pub fn max_finite(self) -> f32 {
        match self {
            OutputDtype::F32 => f32::MAX,
            OutputDtype::F16 => half::f16::MAX.to_f32(),
            OutputDtype::Bf16 => half::bf16::MAX.to_f32(),
        }
    }

    /// The index of the first value that is not finite once stored as this type (NaN, Inf, or
    /// a finite f32 that rounds to infinity), if any.
    pub fn first_nonfinite(self, values: &[f32]) -> Option<usize> {
        match self {
            OutputDtype::F32 => values.iter().position(|v| !v.is_finite()),
            OutputDtype::F16 => values.iter().position(|&v| !half::f16::from_f32(v).is_finite()),
            OutputDtype::Bf16 => values.iter().position(|&v| !half::bf16::from_f32(v).is_finite()),
        }
    }

    /// `values` as little-endian bytes of this type, rounded to nearest even.
    pub fn to_le_bytes(self, values: &[f32]) -> Vec<u8> {
        use half::slice::HalfFloatSliceExt;
        match self {
            OutputDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            OutputDtype::F16 => {
                let mut h = vec![half::f16::ZERO; values.len()];
                h.convert_from_f32_slice(values);
                h.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            OutputDtype::Bf16 => {
                let mut h = vec![half::bf16::ZERO; values.len()];
                h.convert_from_f32_slice(values);
                h.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        }
    }
}

pub struct OutTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// A file path that is renamed into place on `commit` and removed if dropped before.
///
/// The temporary name is `.NAME.PID.tmp` beside the destination, so a later run holding the
/// output's lock can tell temporary files of dead runs apart ([`temp_owner`]). Every live
/// temporary path is also registered, so that a second Ctrl-C, which exits at once, can
/// remove them ([`remove_live_temp_files`]).
pub struct AtomicPath {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

/// Temporary files of this process not yet committed or removed.
static LIVE_TEMP_FILES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn live_temp_files() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A panic while the lock was held leaves a valid list: keep using it.
    LIVE_TEMP_FILES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers a file for [`remove_live_temp_files`] (temporary files, lock files).
pub fn track_temp_file(path: &Path) {
    live_temp_files().push(path.to_owned());
}

/// Forgets a file registered by [`track_temp_file`] (committed, or removed by its owner).
pub fn untrack_temp_file(path: &Path) {
    let mut live = live_temp_files();
    if let Some(i) = live.iter().position(|p| p == path) {
        live.swap_remove(i);
    }
}

/// Removes every temporary file this process has open; for an exit that skips destructors.
pub fn remove_live_temp_files() {
    for p in live_temp_files().drain(..) {
        let _ = std::fs::remove_file(p);
    }
}

/// The process id in a temporary name written by [`AtomicPath`] (`.NAME.PID.tmp`, or
/// `.NAME.PID.tmp.EXT` for files whose writer needs the extension), or None for other names.
pub fn temp_owner(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?;
    let at = rest.rfind(".tmp")?;
    let tail = &rest[at + 4..];
    if !(tail.is_empty() || (tail.starts_with('.') && !tail[1..].contains('.'))) {
        return None;
    }
    let (name, pid) = rest[..at].rsplit_once('.')?;
    if name.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// The temporary name beside `dest` for this process (`.NAME.PID.tmp`, then `.EXT` if given).
pub fn temp_name(dest: &Path, ext: Option<&str>) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let ext = ext.map(|e| format!(".{e}")).unwrap_or_default();
    dest.with_file_name(format!(".{name}.{}.tmp{ext}", std::process::id()))
}

impl AtomicPath {
    pub fn new(dest: &Path) -> Self {
        Self::with_temp(dest, temp_name(dest, None))
    }

    /// As [`AtomicPath::new`] with a temporary name that keeps the extension `ext` (for
    /// writers that choose the format by it).
    pub fn with_extension(dest: &Path, ext: &str) -> Self {
        Self::with_temp(dest, temp_name(dest, Some(ext)))
    }

    fn with_temp(dest: &Path, tmp: PathBuf) -> Self {
        track_temp_file(&tmp);
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
        untrack_temp_file(&self.tmp);
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
        TensorData::I64(_) | TensorData::F64(_) => 0,
        TensorData::F32(_) => 1,
    });
    let mut entries = Vec::with_capacity(order.len());
    let mut body = Vec::new();
    for t in &order {
        let (dtype, bytes): (StreamDtype, Vec<u8>) = match &t.data {
            TensorData::F32(v) if f32_as_bf16 => (StreamDtype::Bf16, v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()),
            TensorData::F32(v) => (StreamDtype::F32, bytemuck::cast_slice(v).to_vec()),
            TensorData::I64(v) => (StreamDtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            TensorData::F64(v) => (StreamDtype::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        let elems: usize = t.shape.iter().product();
        if elems * dtype.size() != bytes.len() {
            return Err(Error::input(format!("tensor `{}`: shape {:?} does not match its {} values", t.name, t.shape, bytes.len() / dtype.size())));
        }
        entries.push(StreamTensor { name: t.name.clone(), dtype, shape: t.shape.clone() });
        body.extend_from_slice(&bytes);
    }
    let head = header_bytes(&entries, metadata)?;
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Element type of a streamed tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamDtype {
    I64,
    F64,
    F32,
    F16,
    Bf16,
}

impl StreamDtype {
    fn size(self) -> usize {
        match self {
            StreamDtype::I64 | StreamDtype::F64 => 8,
            StreamDtype::F32 => 4,
            StreamDtype::F16 | StreamDtype::Bf16 => 2,
        }
    }
    fn name(self) -> &'static str {
        match self {
            StreamDtype::I64 => "I64",
            StreamDtype::F64 => "F64",
            StreamDtype::F32 => "F32",
            StreamDtype::F16 => "F16",
            StreamDtype::Bf16 => "BF16",
        }
    }
}

/// A tensor's header entry: its values are written later, in this order.
#[derive(Debug, Clone)]
pub struct StreamTensor {
    pub name: String,
    pub dtype: StreamDtype,
    pub shape: Vec<usize>,
}

impl StreamTensor {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// The length prefix and JSON header of a file holding `tensors` in the given order, padded to
/// 8 bytes (one function for the in-memory and the streaming writer, so both give the same bytes).
fn header_bytes(tensors: &[StreamTensor], metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let sorted: std::collections::BTreeMap<&String, &String> = metadata.iter().collect();
        header.insert("__metadata__".into(), serde_json::to_value(sorted).map_err(|e| Error::input(e.to_string()))?);
    }
    let mut offset = 0usize;
    for t in tensors {
        if header.contains_key(&t.name) {
            return Err(Error::input(format!("tensor `{}` appears twice", t.name)));
        }
        let n = t.bytes();
        header.insert(t.name.clone(), serde_json::json!({ "dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + n] }));
        offset += n;
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| Error::input(e.to_string()))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    Ok(out)
}

/// Writes a safetensors file whose values arrive piece by piece (extraction output, batch after
/// batch), so that memory holds one batch instead of the whole file. The header is written
/// first from the declared shapes; values must then come in the declared order, with the
/// 8-byte tensors first. The file goes to a temporary name and is renamed into place by
/// `finish` once every declared byte has arrived; dropped before that, it is removed.
/// `finish` returns the file's SHA-256, hashed as it was written.
pub struct SafetensorsStream {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    hasher: sha2::Sha256,
    atomic: AtomicPath,
    /// Bytes still expected per tensor, in order; `current` is the one being written.
    remaining: Vec<usize>,
    current: usize,
    tensors: Vec<StreamTensor>,
}

impl SafetensorsStream {
    pub fn create(path: &Path, tensors: Vec<StreamTensor>, metadata: &HashMap<String, String>) -> Result<Self> {
        if let Some(i) = tensors.windows(2).position(|w| w[0].dtype.size() < 8 && w[1].dtype.size() == 8) {
            return Err(Error::input(format!("tensor `{}`: 8-byte tensors must come first", tensors[i + 1].name)));
        }
        use sha2::Digest;
        let head = header_bytes(&tensors, metadata)?;
        let atomic = AtomicPath::new(path);
        let file = std::fs::File::create(atomic.tmp()).map_err(|e| Error::io(path, e))?;
        let mut stream = SafetensorsStream {
            path: path.to_owned(),
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: sha2::Sha256::new(),
            atomic,
            remaining: tensors.iter().map(StreamTensor::bytes).collect(),
            current: 0,
            tensors,
        };
        stream.put(&head)?;
        stream.skip_finished();
        Ok(stream)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        use sha2::Digest;
        self.hasher.update(bytes);
        self.file.write_all(bytes).map_err(|e| Error::io(&self.path, e))
    }

    fn skip_finished(&mut self) {
        while self.current < self.remaining.len() && self.remaining[self.current] == 0 {
            self.current += 1;
        }
    }

    fn take(&mut self, dtype: StreamDtype, bytes: usize) -> Result<()> {
        let Some(t) = self.tensors.get(self.current) else {
            return Err(Error::input(format!("{}: more values than the declared tensors hold", self.path.display())));
        };
        if t.dtype != dtype || bytes > self.remaining[self.current] {
            return Err(Error::input(format!(
                "{}: tensor `{}` expects {} more bytes of {}, got {bytes} bytes of {}",
                self.path.display(),
                t.name,
                self.remaining[self.current],
                t.dtype.name(),
                dtype.name()
            )));
        }
        self.remaining[self.current] -= bytes;
        Ok(())
    }

    pub fn write_i64(&mut self, values: &[i64]) -> Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.take(StreamDtype::I64, bytes.len())?;
        self.put(&bytes)?;
        self.skip_finished();
        Ok(())
    }

    pub fn write_f32(&mut self, values: &[f32]) -> Result<()> {
        self.take(StreamDtype::F32, values.len() * 4)?;
        if cfg!(target_endian = "little") {
            self.put(bytemuck::cast_slice(values))?;
        } else {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.put(&bytes)?;
        }
        self.skip_finished();
        Ok(())
    }

    /// Writes captured values converted to `dtype` (rounded to nearest even).
    pub fn write_as(&mut self, values: &[f32], dtype: OutputDtype) -> Result<()> {
        if dtype == OutputDtype::F32 {
            return self.write_f32(values);
        }
        let bytes = dtype.to_le_bytes(values);
        self.take(dtype.stream(), bytes.len())?;
        self.put(&bytes)?;
        self.skip_finished();
        Ok(())
    }

    /// Flushes, syncs and renames the file into place; returns its SHA-256 (hex).
    pub fn finish(mut self) -> Result<String> {
        use sha2::Digest;
        if let Some(i) = (self.current..self.remaining.len()).find(|&i| self.remaining[i] > 0) {
            return Err(Error::input(format!("{}: tensor `{}` is missing {} bytes", self.path.display(), self.tensors[i].name, self.remaining[i])));
        }
        self.file.flush().map_err(|e| Error::io(&self.path, e))?;
        self.file.get_ref().sync_all().map_err(|e| Error::io(&self.path, e))?;
        let digest = std::mem::take(&mut self.hasher).finalize();
        let SafetensorsStream { atomic, file, .. } = self;
        drop(file);
        atomic.commit()?;
        Ok(crate::store::hex(&digest))
    }
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

/// The tensors of a steering file: `directions` (`[L+1, hidden]`, when present) and one vector
/// per point inside a block, named by the point (`blocks.3.hook_mlp_out`, `blocks.3.hook_z`).
#[derive(Debug, Clone, Default)]
pub struct SteeringTensors {
    pub directions: Option<Vec<f32>>,
    pub points: std::collections::BTreeMap<String, std::sync::Arc<Vec<f32>>>,
}

impl SteeringTensors {
    /// Reads a steering file's bytes; `file` names it in errors. It must hold `directions` or at
    /// least one point tensor; each point tensor is one vector of finite values.
    pub fn parse(bytes: &[u8], file: &str, num_layers: usize, hidden: usize) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::input(format!("{file}: not a valid safetensors file: {e}")))?;
        let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
        names.sort_unstable();
        let mut out = SteeringTensors::default();
        for name in names.iter().filter(|n| n.starts_with("blocks.")) {
            let t = f32_tensor_from_bytes(bytes, file, name)?;
            if t.shape.len() != 1 {
                return Err(Error::input(format!("{file}: tensor `{name}` has shape {:?}, expected one vector", t.shape)));
            }
            if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                return Err(Error::input(format!("{file}: tensor `{name}` contains NaN or Inf (value {i})")));
            }
            out.points.insert(name.clone(), std::sync::Arc::new(t.data));
        }
        if names.iter().any(|n| n == "directions") || out.points.is_empty() {
            out.directions = Some(parse_directions(bytes, file, num_layers, hidden)?.data);
        }
        Ok(out)
    }

    /// The steering `targets` name: indices use `directions`, points their tensors.
    pub fn steering(&self, targets: &[crate::engine::steer::SteerTarget], g: crate::engine::steer::SteerGeometry, file: &str) -> Result<crate::engine::steer::Steering> {
        use crate::engine::steer::{SteerTarget, Steering};
        let directions = match &self.directions {
            Some(d) => d.clone(),
            None if targets.iter().any(|t| matches!(t, SteerTarget::Index(_))) => {
                return Err(Error::input(format!("{file}: no tensor `directions` for the hidden-state indices steered")))
            }
            None => Vec::new(),
        };
        Steering::for_targets(std::sync::Arc::new(directions), targets, g, file, |name| self.points.get(name).map(|v| v.to_vec()))
    }
}

/// A steering file for `targets` ([`SteeringTensors`]).
pub fn read_steering_file(path: &Path, targets: &[crate::engine::steer::SteerTarget], g: crate::engine::steer::SteerGeometry) -> Result<crate::engine::steer::Steering> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = path.display().to_string();
    SteeringTensors::parse(&bytes, &file, g.num_layers, g.hidden)?.steering(targets, g, &file)
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
    let bytes = strip_bom(bytes);
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

/// `bytes` without a leading UTF-8 byte-order mark (Windows tools and spreadsheet exports
/// write one; JSON parsers reject it).
pub fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// Parses a JSON document, allowing a leading UTF-8 byte-order mark.
pub fn json_from_slice<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<T> {
    serde_json::from_slice(strip_bom(bytes))
}

/// How an error message names a JSON value's type ("a string", "an array", ...).
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<OutTensor> {
        vec![
            OutTensor { name: "hidden_states".into(), shape: vec![3, 2, 4], data: TensorData::F32((0..24).map(|i| i as f32 * 0.5 - 3.0).collect()) },
            OutTensor { name: "layers".into(), shape: vec![2], data: TensorData::I64(vec![0, -1]) },
            OutTensor { name: "index".into(), shape: vec![3], data: TensorData::I64(vec![7, 8, 9]) },
        ]
    }

    fn declared() -> Vec<StreamTensor> {
        vec![
            StreamTensor { name: "layers".into(), dtype: StreamDtype::I64, shape: vec![2] },
            StreamTensor { name: "index".into(), dtype: StreamDtype::I64, shape: vec![3] },
            StreamTensor { name: "hidden_states".into(), dtype: StreamDtype::F32, shape: vec![3, 2, 4] },
        ]
    }

    #[test]
    fn streamed_file_equals_the_in_memory_serialisation() {
        let dir = tempfile::tempdir().unwrap();
        let meta: HashMap<String, String> = [("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())].into();
        let expected = serialize_safetensors(&tensors(), &meta, false).unwrap();
        let path = dir.path().join("x.safetensors");
        let mut s = SafetensorsStream::create(&path, declared(), &meta).unwrap();
        s.write_i64(&[0, -1]).unwrap();
        s.write_i64(&[7, 8, 9]).unwrap();
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        // In pieces, as batches arrive.
        s.write_f32(&values[..5]).unwrap();
        s.write_f32(&values[5..16]).unwrap();
        s.write_f32(&values[16..]).unwrap();
        let sha = s.finish().unwrap();
        let written = std::fs::read(&path).unwrap();
        assert_eq!(written, expected);
        assert_eq!(sha, crate::store::sha256_hex(&expected));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn stream_rejects_wrong_order_sizes_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let mut bad_order = declared();
        bad_order.swap(1, 2);
        assert!(SafetensorsStream::create(&path, bad_order, &HashMap::new()).is_err());

        let mut s = SafetensorsStream::create(&path, declared(), &HashMap::new()).unwrap();
        assert!(s.write_f32(&[1.0]).is_err(), "values of the wrong dtype");
        s.write_i64(&[0, -1]).unwrap();
        assert!(s.write_i64(&[1, 2, 3, 4]).is_err(), "more values than declared");
        s.write_i64(&[7, 8, 9]).unwrap();
        s.write_f32(&[0.0; 10]).unwrap();
        let err = s.finish().unwrap_err().to_string();
        assert!(err.contains("hidden_states") && err.contains("missing 56 bytes"), "{err}");
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the partial file is removed");

        let s = SafetensorsStream::create(&path, declared(), &HashMap::new()).unwrap();
        drop(s);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "dropped before finish: removed");
    }
}
