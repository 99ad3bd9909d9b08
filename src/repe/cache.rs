//! Last-token hidden states of every unique stimulus, computed once per model and template.
//!
//! Each stimulus (already wrapped in its template) is run through the model once; its
//! last-token hidden states at indices 1..=L are kept in memory and, when a cache directory is
//! given, in safetensors shards under `DIR/<model id prefix>/`. A shard holds
//! `hidden_states` (f32 `[n, L, hidden]`, row l-1 = index l) and, in its metadata, the keys
//! (hex SHA-256 of model identity, a NUL byte and the templated text), the texts, the model
//! identity and the shape. The model identity ([`model_identity`]) hashes the backend kind
//! (`cpu` or `cuda`), `config.json`, `tokenizer.json` and the safetensors headers (names, dtypes, shapes, offsets) and sizes of
//! the weight files, so a changed model never reads stale states. Shards are written
//! atomically, one per chunk of new stimuli, so an interrupted run keeps what it finished.
use crate::engine::capture::{CapturePoint, CapturePosition, CaptureSpec};
use crate::error::{Error, Result};
use crate::io::{write_safetensors, OutTensor, TensorData};
use crate::model::ModelDir;
use crate::backend::Backend;
use crate::engine::Engine;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use crate::store::hex;

const FORMAT: &str = "resid-hidden-cache-v1";
/// Stimuli per shard (and per extraction call).
const CHUNK: usize = 512;

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A content hash of the model and the backend kind that computes it (`cpu`, `cuda`; the
/// backends differ in their internal precision): config, tokenizer, and every weight file's
/// size and safetensors header. Hex SHA-256.
pub fn model_identity(model: &ModelDir, backend: &str) -> Result<String> {
    let mut h = Sha256::new();
    h.update(FORMAT.as_bytes());
    h.update(backend.as_bytes());
    h.update([0u8]);
    for name in ["config.json", "tokenizer.json"] {
        let p = model.dir.join(name);
        if p.is_file() {
            h.update(name.as_bytes());
            h.update(std::fs::read(&p).map_err(|e| Error::io(&p, e))?);
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&model.dir)
        .map_err(|e| Error::io(&model.dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
        .collect();
    files.sort();
    for p in files {
        let mut f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        let size = f.metadata().map_err(|e| Error::io(&p, e))?.len();
        h.update(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update(size.to_le_bytes());
        let mut len = [0u8; 8];
        if f.read_exact(&mut len).is_ok() {
            let n = u64::from_le_bytes(len).min(size.saturating_sub(8)).min(100 << 20);
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header).map_err(|e| Error::io(&p, e))?;
            h.update(&header);
        }
    }
    Ok(hex(&h.finalize()))
}

/// The rows of one cache shard: `keys[i]` owns `states[i * L * hidden..][..L * hidden]`.
#[derive(Debug)]
pub struct ShardRows {
    pub keys: Vec<[u8; 32]>,
    pub states: Vec<f32>,
}

/// Reads a cache shard's bytes (`file` names it in errors) for the model `model_id` with `layers`
/// decoder blocks of `hidden`: a shard of another format, model or shape, with a malformed key
/// or with NaN or Inf in its states, is an error (the caller skips it).
pub fn read_shard(bytes: &[u8], file: &str, model_id: &str, layers: usize, hidden: usize) -> Result<ShardRows> {
    let t = crate::io::f32_tensor_from_bytes(bytes, file, "hidden_states")?;
    let meta = |k: &str| t.metadata.get(k).map(String::as_str).unwrap_or_default();
    if meta("format") != FORMAT {
        return Err(Error::input(format!("{file}: not a {FORMAT} shard")));
    }
    if meta("model_id") != model_id {
        return Err(Error::input(format!("{file}: written for another model")));
    }
    let keys = meta("keys").split(',').filter(|s| !s.is_empty()).map(|k| unhex(k).ok_or_else(|| Error::input(format!("{file}: bad key `{k}`")))).collect::<Result<Vec<_>>>()?;
    if t.shape != [keys.len(), layers, hidden] {
        return Err(Error::input(format!("{file}: `hidden_states` has shape {:?}, expected [{}, {layers}, {hidden}]", t.shape, keys.len())));
    }
    // The states were finite when computed: anything else is corruption.
    if t.data.iter().any(|v| !v.is_finite()) {
        return Err(Error::input(format!("{file}: NaN or Inf in `hidden_states`")));
    }
    Ok(ShardRows { keys, states: t.data })
}

/// One stimulus to compute: the templated text and where it came from (for messages).
#[derive(Debug, Clone)]
pub struct Stimulus {
    pub text: String,
    pub origin: String,
}

/// What [`HiddenCache::ensure`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CacheStats {
    pub requested: usize,
    pub from_cache: usize,
    pub computed: usize,
    pub tokens_computed: usize,
    pub seconds: f64,
}

/// Hidden states of stimuli, in memory and optionally on disk.
pub struct HiddenCache {
    dir: Option<PathBuf>,
    model_id: String,
    /// Decoder blocks L: each entry holds indices 1..=L.
    pub layers: usize,
    pub hidden: usize,
    index: HashMap<[u8; 32], usize>,
    store: Vec<f32>,
    /// Shard files already read (another study sharing the directory may add more).
    loaded: HashSet<PathBuf>,
}

impl HiddenCache {
    /// Opens the cache for `engine`'s model under `root` (None: memory only) and loads every
    /// readable shard of this model. Unreadable shards are reported on stderr and skipped.
    pub fn open<B: Backend>(root: Option<&Path>, engine: &Engine<B>) -> Result<Self> {
        let model_id = model_identity(&engine.model, &crate::store::extract::compute_kind(&engine.backend))?;
        let (layers, hidden) = (engine.num_layers(), engine.hidden_size());
        let dir = root.map(|r| r.join(&model_id[..16]));
        let mut cache = HiddenCache { dir, model_id, layers, hidden, index: HashMap::new(), store: Vec::new(), loaded: HashSet::new() };
        cache.load_new_shards()?;
        Ok(cache)
    }

    /// Reads every shard of this model's directory not read yet. Shards appear by rename, whole,
    /// so a concurrent writer's temporary files are never seen.
    fn load_new_shards(&mut self) -> Result<()> {
        let Some(dir) = self.dir.clone() else { return Ok(()) };
        if !dir.is_dir() {
            return Ok(());
        }
        let mut shards: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && !self.loaded.contains(p))
            .collect();
        shards.sort();
        for s in shards {
            if let Err(e) = self.load_shard(&s) {
                eprintln!("warning: skipping cache shard: {e}");
            }
            self.loaded.insert(s);
        }
        Ok(())
    }

    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Number of stimuli held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn key(&self, text: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.model_id.as_bytes());
        h.update([0u8]);
        h.update(text.as_bytes());
        h.finalize().into()
    }

    fn load_shard(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let shard = read_shard(&bytes, &path.display().to_string(), &self.model_id, self.layers, self.hidden)?;
        let per = self.layers * self.hidden;
        for (i, key) in shard.keys.into_iter().enumerate() {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.index.entry(key) {
                slot.insert(self.store.len() / per);
                self.store.extend_from_slice(&shard.states[i * per..(i + 1) * per]);
            }
        }
        Ok(())
    }

    /// Hidden states of a templated text, `[L, hidden]` (row l-1 = index l), if computed.
    pub fn get(&self, text: &str) -> Option<&[f32]> {
        let per = self.layers * self.hidden;
        self.index.get(&self.key(text)).map(|&i| &self.store[i * per..(i + 1) * per])
    }

    /// Hidden states of a text that [`ensure`](Self::ensure) has computed.
    pub fn expect(&self, text: &str) -> Result<&[f32]> {
        self.get(text).ok_or_else(|| Error::input(format!("internal: stimulus not in the hidden-state cache: {text:?}")))
    }

    /// The unique stimuli of `items` not cached yet, and how many unique ones there are.
    fn missing<'s>(&self, items: &'s [Stimulus]) -> (Vec<&'s Stimulus>, usize) {
        let mut seen = HashSet::new();
        let mut missing = Vec::new();
        for it in items {
            let key = self.key(&it.text);
            if seen.insert(key) && !self.index.contains_key(&key) {
                missing.push(it);
            }
        }
        (missing, seen.len())
    }

    /// Computes every stimulus not yet cached (each unique text once) and stores it.
    ///
    /// With a cache directory, computing holds the directory's lock: a second study sharing the
    /// cache waits for it, then reads what the first one wrote instead of computing it again.
    /// The lock's holder removes the temporary files of dead runs.
    pub fn ensure<B: Backend>(&mut self, engine: &Engine<B>, items: &[Stimulus], batch_tokens: usize, quiet: bool) -> Result<CacheStats> {
        let started = std::time::Instant::now();
        let (mut missing, unique) = self.missing(items);
        let _lock = match self.dir.clone() {
            Some(dir) if !missing.is_empty() => {
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                let lock = crate::store::lock::OutputLock::dir(&dir, true)?;
                crate::store::lock::remove_stale_temp_files(&dir, None)?;
                self.load_new_shards()?;
                missing = self.missing(items).0;
                Some(lock)
            }
            _ => None,
        };
        let mut stats = CacheStats { requested: unique, from_cache: unique - missing.len(), ..Default::default() };
        if missing.is_empty() {
            return Ok(stats);
        }
        let tok = engine.model.tokenizer.as_ref().ok_or_else(|| {
            Error::model(format!("{}: no tokenizer.json; the value-concept study needs one", engine.model.dir.display()))
        })?;
        let mut seqs = Vec::with_capacity(missing.len());
        for it in &missing {
            let ids = tok.encode(&it.text).map_err(|e| Error::input(format!("{}: {e}", it.origin)))?;
            engine.check_tokens(&ids, &it.origin)?;
            seqs.push(ids);
        }
        let total_tokens: usize = seqs.iter().map(Vec::len).sum();
        let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(total_tokens as u64) };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} hidden states [{bar:30}] {pos}/{len} tokens {msg} ({elapsed} < {eta})",
            )
            .map_err(|e| Error::input(format!("progress template: {e}")))?
            .progress_chars("=> "),
        );
        let spec = CaptureSpec { points: (1..=self.layers).map(CapturePoint::Hidden).collect(), position: CapturePosition::Last };
        let per = self.layers * self.hidden;
        let mut done_seqs = 0usize;
        let mut done_tokens = 0usize;
        for (chunk_no, (chunk, items)) in seqs.chunks(CHUNK).zip(missing.chunks(CHUNK)).enumerate() {
            let none = vec![None; chunk.len()];
            let captured = engine.extract(chunk, &spec, &none, batch_tokens, |n, t| {
                done_seqs += n;
                done_tokens += t;
                bar.inc(t as u64);
                bar.set_message(format!(
                    "{done_seqs}/{} stimuli, {:.0} tok/s",
                    missing.len(),
                    done_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)
                ));
            })?;
            if let Some(i) = captured.data.iter().position(|v| !v.is_finite()) {
                return Err(Error::input(format!("{}: NaN or Inf in the hidden states", items[i / per].origin)));
            }
            let keys: Vec<[u8; 32]> = items.iter().map(|it| self.key(&it.text)).collect();
            if let Some(dir) = &self.dir {
                let meta: HashMap<String, String> = [
                    ("format", FORMAT.to_string()),
                    ("model_id", self.model_id.clone()),
                    ("model", engine.model.dir.display().to_string()),
                    ("layers", format!("1..={}", self.layers)),
                    ("keys", keys.iter().map(|k| hex(k)).collect::<Vec<_>>().join(",")),
                    ("texts", serde_json::to_string(&items.iter().map(|it| &it.text).collect::<Vec<_>>()).unwrap_or_default()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                let name = format!(
                    "{}-{}-{chunk_no}.safetensors",
                    &hex(&keys[0])[..16],
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
                );
                write_safetensors(
                    &dir.join(name),
                    &[OutTensor {
                        name: "hidden_states".into(),
                        shape: vec![chunk.len(), self.layers, self.hidden],
                        data: TensorData::F32(captured.data.clone()),
                    }],
                    meta,
                )?;
            }
            for (i, key) in keys.into_iter().enumerate() {
                self.index.insert(key, self.store.len() / per);
                self.store.extend_from_slice(&captured.data[i * per..(i + 1) * per]);
            }
        }
        bar.finish_and_clear();
        stats.computed = missing.len();
        stats.tokens_computed = total_tokens;
        stats.seconds = started.elapsed().as_secs_f64();
        if !quiet {
            eprintln!(
                "hidden states: {} stimuli computed ({} tokens, {:.1} s, {:.0} tokens/s), {} from the cache",
                stats.computed,
                total_tokens,
                stats.seconds,
                total_tokens as f64 / stats.seconds.max(1e-9),
                stats.from_cache
            );
        }
        Ok(stats)
    }
}
