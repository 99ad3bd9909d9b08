//! Extraction into files, for every face: one safetensors file, or a directory of numbered
//! shards with a manifest that a rerun resumes.
//!
//! [`ExtractOutput::open`] locks the output (and cleans what dead runs left in it) before any
//! compute, so that a second writer fails at once; [`ExtractOutput::write`] then streams each
//! batch's captured rows to disk, so memory holds one batch however long the input.
use super::lock::{lock_output_dir, lock_output_file, OutputLock};
use super::{Manifest, ShardEntry};
use crate::backend::Backend;
use crate::engine::capture::{row_offsets, CapturePoint, CapturePosition, CaptureSpec, Captured};
use crate::engine::steer::Steering;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::io::{OutputDtype, SafetensorsStream, StreamDtype, StreamTensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What to extract.
pub struct ExtractJob<'a> {
    /// Token ids of every input sequence (the whole input, also for a `part`).
    pub seqs: &'a [Vec<u32>],
    pub spec: &'a CaptureSpec,
    /// The same steering for every sequence, or none.
    pub steering: Option<Arc<Steering>>,
    /// How the steering is described in metadata and the manifest (`none` without).
    pub steering_description: String,
    /// SHA-256 of the steering file, if any (a rerun with a changed file refuses to resume).
    pub steering_file_sha256: Option<String>,
    pub batch_tokens: usize,
    /// The input's name in error messages (`NAME: line N: ...`) and in the manifest.
    pub input_name: String,
    /// SHA-256 of the input's bytes (a rerun with another input refuses to resume).
    pub input_sha256: String,
    /// Process only part `i` of `n` (contiguous); directory outputs only.
    pub part: Option<(usize, usize)>,
    /// Sequences per shard (directory outputs).
    pub shard_sequences: usize,
    /// Element type of the captured tensor (`hidden_states`).
    pub dtype: OutputDtype,
}

/// Where a run stands, for progress bars.
#[derive(Debug, Clone, Copy)]
pub struct ExtractProgress {
    /// Sequences this run covers (its part of the input) and how many of them are done,
    /// counting those a resumed run found done.
    pub total_sequences: usize,
    pub done_sequences: usize,
    /// Tokens computed by this run so far.
    pub tokens: usize,
    pub seconds: f64,
}

/// What a finished run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExtractSummary {
    /// Sequences and tokens of this run's range, and the range itself.
    pub sequences: usize,
    pub tokens: usize,
    pub range_start: usize,
    pub range_end: usize,
    /// Shards in the directory (0 for a single file).
    pub shards: usize,
    /// Shards a resumed run found complete and kept.
    pub shards_kept: usize,
    /// The directory was already complete: nothing was computed.
    pub already_complete: bool,
    /// Seconds in all, and of that the time spent writing files.
    pub seconds: f64,
    pub write_seconds: f64,
    /// Tokens computed by this run.
    pub tokens_computed: usize,
}

/// A locked extraction output: a `.safetensors` file, or a directory (any other path).
#[derive(Debug)]
pub struct ExtractOutput {
    path: PathBuf,
    sharded: bool,
    _lock: OutputLock,
}

impl ExtractOutput {
    /// Locks `path` for this run (see [`super::lock`]): [`Error::Locked`] at once if another run
    /// holds it, unless `wait`. Creates a directory output and removes the temporary files that
    /// dead runs left there; checks that a file output can be created.
    pub fn open(path: &Path, wait: bool) -> Result<Self> {
        let sharded = path.extension().is_none_or(|e| e != "safetensors");
        let lock = if sharded { lock_output_dir(path, wait, &[])? } else { lock_output_file(path, wait)? };
        Ok(ExtractOutput { path: path.to_owned(), sharded, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for a directory output.
    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// Runs the extraction into this output. `progress` is called after every batch. On
    /// SIGINT/SIGTERM ([`crate::interrupt`]) it stops between batches with
    /// [`Error::Interrupted`]: a file output leaves nothing, a directory keeps its complete shards.
    pub fn write<B: Backend>(&self, engine: &Engine<B>, job: &ExtractJob, progress: &mut dyn FnMut(ExtractProgress)) -> Result<ExtractSummary> {
        job.spec.validate(engine.num_layers())?;
        if !self.sharded && job.part.is_some() {
            return Err(Error::input("--shard needs a directory output (--out DIR), not a single .safetensors file"));
        }
        let result = if self.sharded { self.write_dir(engine, job, progress) } else { self.write_file(engine, job, progress) };
        result.map_err(|e| {
            let kept = if self.sharded {
                format!("complete shards kept in {}; rerun the same command to resume", self.path.display())
            } else {
                format!("nothing written to {}", self.path.display())
            };
            e.interrupted_keeping(kept)
        })
    }

    fn write_file<B: Backend>(&self, engine: &Engine<B>, job: &ExtractJob, progress: &mut dyn FnMut(ExtractProgress)) -> Result<ExtractSummary> {
        let mut w = Writer::new(engine, job, job.seqs.len(), progress);
        w.report(0);
        w.file(0..job.seqs.len(), &self.path, false)?;
        Ok(w.summary(0, job.seqs.len(), 0, 0))
    }

    fn write_dir<B: Backend>(&self, engine: &Engine<B>, job: &ExtractJob, progress: &mut dyn FnMut(ExtractProgress)) -> Result<ExtractSummary> {
        let dir = &self.path;
        let n = job.seqs.len();
        let (range_start, range_end) = match job.part {
            Some((i, parts)) => {
                if parts == 0 || i >= parts {
                    return Err(Error::input(format!("--shard {i}/{parts}: expected i/N with 0 <= i < N")));
                }
                super::part_range(n, i, parts)
            }
            None => (0, n),
        };
        let wanted = Manifest {
            format: "resid-extract-v1".into(),
            input: job.input_name.clone(),
            input_sha256: job.input_sha256.clone(),
            input_sequences: n,
            range_start,
            range_end,
            part: job.part.map(|(i, parts)| format!("{i}/{parts}")),
            options: manifest_options(engine, job)?,
            shard_sequences: job.shard_sequences.max(1),
            shards: Vec::new(),
            complete: false,
        };
        let mut manifest = match Manifest::load(dir)? {
            None => wanted,
            Some(existing) => {
                if let Some(why) = existing.incompatibility(&wanted) {
                    return Err(Error::input(format!("{}: refusing to mix results with the extraction already there: {why}", dir.display())));
                }
                existing
            }
        };
        let kept = manifest.shards.len();
        let mut w = Writer::new(engine, job, range_end - range_start, progress);
        if manifest.complete {
            let mut s = w.summary(range_start, range_end, kept, kept);
            s.already_complete = true;
            return Ok(s);
        }
        let mut start = manifest.resume_point();
        w.report(start - range_start);
        while start < range_end {
            crate::interrupt::check()?;
            let end = (start + manifest.shard_sequences).min(range_end);
            let file = format!("shard-{:05}.safetensors", manifest.shards.len());
            let sha256 = w.file(start..end, &dir.join(&file), true)?;
            manifest.shards.push(ShardEntry { file, start, end, sha256 });
            manifest.complete = end == range_end;
            let t = std::time::Instant::now();
            manifest.save(dir)?;
            w.write_seconds += t.elapsed().as_secs_f64();
            start = end;
        }
        if range_end == range_start {
            manifest.complete = true;
            manifest.save(dir)?;
        }
        Ok(w.summary(range_start, range_end, manifest.shards.len(), kept))
    }
}

/// The model identity and options a manifest records; results are only mixed when they agree.
fn manifest_options<B: Backend>(engine: &Engine<B>, job: &ExtractJob) -> Result<serde_json::Value> {
    let config = engine.model.dir.join("config.json");
    let config_bytes = std::fs::read(&config).map_err(|e| Error::io(&config, e))?;
    let mut options = serde_json::json!({
        "model_config_sha256": super::sha256_hex(&config_bytes),
        "architecture": engine.model.config.architecture,
        "parameters": engine.model.parameter_count(),
        "weights_dtype": engine.model.store.dominant_dtype(),
        "device": device_kind(&engine.backend),
        "compute": engine.backend.compute_type(),
        "position": job.spec.position.name(),
        "layers": layer_ids(job.spec),
        "points": job.spec.point_names(engine.num_layers()),
        "steering": job.steering_description,
        "steering_file_sha256": job.steering_file_sha256,
    });
    // Recorded only when not f32, so that directories written before `--dtype` existed resume.
    if job.dtype != OutputDtype::F32 {
        options["dtype"] = job.dtype.name().into();
    }
    Ok(options)
}

/// The kind of a backend (`cpu`, `cuda`), without its device number or details.
pub fn device_kind<B: Backend>(backend: &B) -> String {
    Backend::name(backend).split([' ', ':']).next().unwrap_or("").to_owned()
}

/// The backend kind and, where it is not the backend's only one, its compute type: `cpu`
/// (f32), `cpu-bf16`, `cuda`. Cached results are only reused under the same.
pub fn compute_kind<B: Backend>(backend: &B) -> String {
    match (device_kind(backend).as_str(), backend.compute_type()) {
        ("cpu", "bf16") => "cpu-bf16".into(),
        (kind, _) => kind.into(),
    }
}

/// The `layers` tensor of an output: hidden-state indices, -1 for the raw last-block output,
/// -2 for a point inside a block (the `points` metadata names every point).
pub fn layer_ids(spec: &CaptureSpec) -> Vec<i64> {
    spec.points
        .iter()
        .map(|p| match p {
            CapturePoint::Hidden(l) => *l as i64,
            CapturePoint::LastBlockRaw => -1,
            CapturePoint::Block(..) => -2,
        })
        .collect()
}

/// Refuses a batch holding a value that is not finite once stored as `dtype` (NaN, Inf, or a
/// magnitude beyond the type's range), naming the input line (`first_seq` is the batch's first
/// sequence, 0-based in the whole input) and the capture point.
pub fn check_finite(captured: &Captured, spec: &CaptureSpec, dtype: OutputDtype, input_name: &str, first_seq: usize) -> Result<()> {
    let Some(i) = dtype.first_nonfinite(&captured.data) else {
        return Ok(());
    };
    let row = i / (captured.points * captured.hidden);
    let seq = if spec.position == CapturePosition::All { captured.offsets.iter().rposition(|&o| o <= row).unwrap_or(0) } else { row };
    let point = spec.points[(i / captured.hidden) % captured.points];
    let v = captured.data[i];
    let what = if v.is_finite() {
        format!("value {v:e} overflows {} (largest finite {})", dtype.name(), dtype.max_finite())
    } else {
        "NaN or Inf".to_string()
    };
    Err(Error::input(format!("{input_name}: line {}: {what} in captured activations at layer {point:?}; nothing written for it", first_seq + seq + 1)))
}

/// Streams ranges of sequences into safetensors files and keeps the run's counts.
struct Writer<'a, 'p, B: Backend> {
    engine: &'a Engine<B>,
    job: &'a ExtractJob<'a>,
    progress: &'p mut dyn FnMut(ExtractProgress),
    total: usize,
    done: usize,
    tokens: usize,
    started: std::time::Instant,
    write_seconds: f64,
}

impl<'a, 'p, B: Backend> Writer<'a, 'p, B> {
    fn new(engine: &'a Engine<B>, job: &'a ExtractJob<'a>, total: usize, progress: &'p mut dyn FnMut(ExtractProgress)) -> Self {
        Writer { engine, job, progress, total, done: 0, tokens: 0, started: std::time::Instant::now(), write_seconds: 0.0 }
    }

    fn report(&mut self, done: usize) {
        self.done = done;
        (self.progress)(ExtractProgress { total_sequences: self.total, done_sequences: done, tokens: self.tokens, seconds: self.started.elapsed().as_secs_f64() });
    }

    fn summary(&self, range_start: usize, range_end: usize, shards: usize, shards_kept: usize) -> ExtractSummary {
        ExtractSummary {
            sequences: range_end - range_start,
            tokens: self.job.seqs[range_start..range_end].iter().map(Vec::len).sum(),
            range_start,
            range_end,
            shards,
            shards_kept,
            already_complete: false,
            seconds: self.started.elapsed().as_secs_f64(),
            write_seconds: self.write_seconds,
            tokens_computed: self.tokens,
        }
    }

    fn metadata(&self, sequences: usize, tokens: usize) -> HashMap<String, String> {
        let e = self.engine;
        [
            ("model", e.model.dir.display().to_string()),
            ("architecture", e.model.config.architecture.clone()),
            ("position", self.job.spec.position.name().to_string()),
            ("dtype", self.job.dtype.name().to_string()),
            ("compute", e.backend.compute_type().to_string()),
            ("weights_dtype", e.model.store.dominant_dtype()),
            ("steering", self.job.steering_description.clone()),
            ("layers_note", "HF output_hidden_states indices; -1 = raw pre-norm output of the last block; -2 = a point inside a block (see points)".to_string()),
            ("points", serde_json::to_string(&self.job.spec.point_names(e.num_layers())).unwrap_or_default()),
            ("sequences", sequences.to_string()),
            ("tokens", tokens.to_string()),
            ("resid_version", env!("CARGO_PKG_VERSION").to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Writes sequences `range` into one safetensors file at `path`, batch after batch; returns
    /// its SHA-256. On any error (or an interruption) the partial file is removed.
    fn file(&mut self, range: std::ops::Range<usize>, path: &Path, index: bool) -> Result<String> {
        let (job, engine) = (self.job, self.engine);
        let position = job.spec.position;
        let seqs = &job.seqs[range.clone()];
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        let tokens: usize = lens.iter().sum();
        let rows = if position == CapturePosition::All { tokens } else { seqs.len() };
        let ids = layer_ids(job.spec);
        let mut declared = vec![StreamTensor { name: "layers".into(), dtype: StreamDtype::I64, shape: vec![ids.len()] }];
        let offsets: Vec<i64> = row_offsets(&lens).into_iter().map(|o| o as i64).collect();
        if position == CapturePosition::All {
            declared.push(StreamTensor { name: "offsets".into(), dtype: StreamDtype::I64, shape: vec![offsets.len()] });
        }
        if index {
            declared.push(StreamTensor { name: "index".into(), dtype: StreamDtype::I64, shape: vec![range.len()] });
        }
        declared.push(StreamTensor { name: "hidden_states".into(), dtype: job.dtype.stream(), shape: vec![rows, job.spec.points.len(), engine.capture_width(job.spec)?] });
        let mut file = SafetensorsStream::create(path, declared, &self.metadata(range.len(), tokens))?;
        file.write_i64(&ids)?;
        if position == CapturePosition::All {
            file.write_i64(&offsets)?;
        }
        if index {
            file.write_i64(&range.clone().map(|i| i as i64).collect::<Vec<_>>())?;
        }
        let steering = vec![job.steering.clone(); seqs.len()];
        let base_done = self.done;
        engine.extract_batches(seqs, job.spec, &steering, job.batch_tokens, |batch, captured| {
            check_finite(captured, job.spec, job.dtype, &job.input_name, range.start + batch.start)?;
            let t = std::time::Instant::now();
            file.write_as(&captured.data, job.dtype)?;
            self.write_seconds += t.elapsed().as_secs_f64();
            self.tokens += lens[batch.clone()].iter().sum::<usize>();
            self.report(base_done + batch.end);
            Ok(())
        })?;
        let t = std::time::Instant::now();
        let sha256 = file.finish()?;
        self.write_seconds += t.elapsed().as_secs_f64();
        Ok(sha256)
    }
}
