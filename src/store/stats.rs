//! `resid stats`: per-point statistics over a whole dataset without storing its rows.
//!
//! Each captured row (a token for `all`, a sequence for `last`/`mean`, or with `pairs` the
//! difference `pos − neg` of a pair's rows) is folded into f64 accumulators as it comes out of
//! the pass: the count, the minimum and maximum, and shifted sums `Σ (x − k)` and
//! `Σ (x − k)(x − k)ᵀ` with `k` the point's first row (shifting by a typical value keeps the
//! covariance free of the cancellation of raw sums; Chan et al. 1983). Every element is summed
//! in input order, row after row, so the result is bit-identical whatever the batching and the
//! thread count (threads split the matrix into tiles, never the rows).
//!
//! A backend may keep the accumulators where the rows are ([`Backend::stats_accumulators`]):
//! CUDA folds each pass's captured rows on the device (kernels/stats_accumulate.cu, with the
//! same operations in the same order as [`PointMoments::add_rows`]) and no row is copied out;
//! the CPU folds on the host ([`crate::backend::moments`]).
//!
//! The state is checkpointed atomically beside the output (`OUT.state`, safetensors with its
//! options and the next input sequence in the metadata) every `checkpoint_seconds`, on
//! interruption and at `stop_after`; a rerun with the same input and options resumes from it
//! and gives the result an uninterrupted run gives. The output is written (atomically) only at
//! the end, and the state is then removed.
use super::lock::lock_output_file;
use crate::backend::Backend;
pub use crate::backend::moments::PointMoments;
use crate::engine::capture::{row_offsets, CapturePosition, CaptureSpec, Captured};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::io::{OutTensor, OutputDtype, TensorData};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "resid-stats-v1";
const STATE_FORMAT: &str = "resid-stats-state-v1";
/// Which of the optional statistics to write (`--stats`); count, min and max always are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSelection {
    pub mean: bool,
    pub cov: bool,
    pub gram: bool,
}

impl std::str::FromStr for StatsSelection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut sel = StatsSelection { mean: false, cov: false, gram: false };
        for part in s.split(',').map(str::trim) {
            match part {
                "mean" => sel.mean = true,
                "cov" => sel.cov = true,
                "gram" => sel.gram = true,
                "count" | "min" | "max" => {}
                other => return Err(Error::input(format!("--stats: unknown statistic `{other}` (expected mean, cov, gram; count, min and max are always written)"))),
            }
        }
        Ok(sel)
    }
}

impl StatsSelection {
    /// Whether the second moments are accumulated (the H² part of the cost).
    pub fn second_moments(self) -> bool {
        self.cov || self.gram
    }

    pub fn names(self) -> Vec<&'static str> {
        let mut v = vec!["count"];
        if self.mean {
            v.push("mean");
        }
        if self.cov {
            v.push("cov");
        }
        if self.gram {
            v.push("gram");
        }
        v.extend(["min", "max"]);
        v
    }
}

/// What to compute.
pub struct StatsJob<'a> {
    /// Token ids of every input sequence; with `pairs`, `pos` and `neg` of pair i are
    /// sequences 2i and 2i + 1.
    pub seqs: &'a [Vec<u32>],
    pub spec: &'a CaptureSpec,
    pub stats: StatsSelection,
    pub pairs: bool,
    pub batch_tokens: usize,
    /// The input's name in messages and metadata, and SHA-256 of its bytes.
    pub input_name: String,
    pub input_sha256: String,
    /// How sequence i is named in errors (`FILE: line N`).
    pub origin: &'a (dyn Fn(usize) -> String + Sync),
    /// Seconds between checkpoints of the state.
    pub checkpoint_seconds: f64,
    /// Stop (checkpointed, with [`Error::Interrupted`]-free success) once this many input
    /// sequences are done in all: a run split over time slots, and tests of resumption.
    pub stop_after: Option<usize>,
}

/// Where a run stands, for progress bars.
#[derive(Debug, Clone, Copy)]
pub struct StatsProgress {
    pub total_sequences: usize,
    pub done_sequences: usize,
    /// Tokens computed by this run, and its seconds so far.
    pub tokens: usize,
    pub seconds: f64,
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatsSummary {
    /// Rows counted per point (tokens, sequences or pairs).
    pub rows: u64,
    pub sequences: usize,
    /// Sequences a resumed run found done.
    pub resumed_from: usize,
    /// False when the run stopped at `stop_after`: the state is checkpointed, no output yet.
    pub complete: bool,
    pub tokens_computed: usize,
    pub seconds: f64,
}

/// The checkpoint path of an output: `OUT.state`.
pub fn state_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".state");
    out.with_file_name(name)
}

/// Runs `job` into the safetensors file `out` (locked for the whole run; `wait` for the lock).
pub fn run<B: Backend>(engine: &Engine<B>, job: &StatsJob, out: &Path, wait: bool, progress: &mut dyn FnMut(StatsProgress)) -> Result<StatsSummary> {
    job.spec.validate(engine.num_layers())?;
    if job.pairs {
        if job.spec.position == CapturePosition::All {
            return Err(Error::input("--pairs needs --position last or mean (a pair's two texts have different lengths)"));
        }
        if !job.seqs.len().is_multiple_of(2) {
            return Err(Error::input("--pairs: internal: an odd number of sequences"));
        }
    }
    if job.batch_tokens == 0 {
        return Err(Error::input("--batch-tokens must be at least 1"));
    }
    let _lock = lock_output_file(out, wait)?;
    let state_file = state_path(out);
    let options = options(engine, job)?;
    let hidden = engine.capture_width(job.spec)?;
    let points = job.spec.points.len();
    let (mut moments, resumed_from) = match load_state(&state_file, &options, points, hidden)? {
        Some(s) => s,
        None => ((0..points).map(|_| PointMoments::new(hidden, job.stats.second_moments())).collect(), 0),
    };
    let total = job.seqs.len();
    let stop = job.stop_after.unwrap_or(total).clamp(resumed_from, total);
    let started = std::time::Instant::now();
    let mut last_checkpoint = std::time::Instant::now();
    let mut done = resumed_from;
    let mut tokens = 0usize;
    progress(StatsProgress { total_sequences: total, done_sequences: done, tokens, seconds: 0.0 });
    // With pairs, the rows of a pair whose `neg` is in the next batch wait here (on the host), or
    // in the device accumulators (`half_pair`).
    let mut pending: Option<Vec<f32>> = None;
    let mut half_pair = false;
    // Progress after each batch, and the next sequence of a checkpoint when one is due.
    let mut batch_done = |range: std::ops::Range<usize>, half_pair: bool| -> Option<usize> {
        let first = resumed_from + range.start;
        done = resumed_from + range.end;
        tokens += job.seqs[first..done].iter().map(Vec::len).sum::<usize>();
        progress(StatsProgress { total_sequences: total, done_sequences: done, tokens, seconds: started.elapsed().as_secs_f64() });
        // A half pair is not in the state: the resumed run recomputes it.
        let due = last_checkpoint.elapsed().as_secs_f64() >= job.checkpoint_seconds && done < stop;
        due.then(|| {
            last_checkpoint = std::time::Instant::now();
            done - usize::from(half_pair)
        })
    };
    let seqs = &job.seqs[resumed_from..stop];
    // On a device that accumulates where the rows are (CUDA), the rows never leave it.
    let mut device = engine.backend.stats_accumulators(&moments, job.pairs)?;
    let result = match device.as_mut() {
        None => engine.extract_batches(seqs, job.spec, &vec![None; seqs.len()], job.batch_tokens, |range, captured| {
            check_rows(captured, job, resumed_from + range.start)?;
            fold(&mut moments, captured, job.pairs, &mut pending);
            if let Some(next) = batch_done(range, pending.is_some()) {
                save_state(&state_file, &moments, &options, next)?;
            }
            Ok(())
        }),
        Some(acc) => engine.stats_batches(seqs, job.spec, job.batch_tokens, acc, |range, acc, bad| {
            let first = resumed_from + range.start;
            if let Some(bad) = bad {
                let lens: Vec<usize> = job.seqs[first..resumed_from + range.end].iter().map(Vec::len).collect();
                return Err(nonfinite_error(job, first, &row_offsets(&lens), bad.row, bad.slot));
            }
            // With pairs a row is a sequence (last/mean).
            half_pair ^= job.pairs && range.len() % 2 == 1;
            if let Some(next) = batch_done(range, half_pair) {
                save_state(&state_file, &engine.backend.stats_moments(acc)?, &options, next)?;
            }
            Ok(())
        }),
    };
    let consumed = done - usize::from(pending.is_some() || half_pair);
    if let Some(acc) = &device {
        if result.as_ref().is_ok() || matches!(result, Err(Error::Interrupted { .. })) {
            moments = engine.backend.stats_moments(acc)?;
        }
    }
    if let Err(e) = result {
        if matches!(e, Error::Interrupted { .. }) && consumed > resumed_from {
            save_state(&state_file, &moments, &options, consumed)?;
        }
        let kept = if state_file.exists() {
            format!("state checkpointed in {} after {consumed} of {total} sequences; rerun the same command to resume", state_file.display())
        } else {
            format!("nothing written to {}", out.display())
        };
        return Err(e.interrupted_keeping(kept));
    }
    let summary = |complete| StatsSummary {
        rows: moments.first().map_or(0, |m| m.count),
        sequences: total,
        resumed_from,
        complete,
        tokens_computed: tokens,
        seconds: started.elapsed().as_secs_f64(),
    };
    if consumed < total {
        save_state(&state_file, &moments, &options, consumed)?;
        return Ok(summary(false));
    }
    write_output(engine, job, out, &moments)?;
    if state_file.exists() {
        std::fs::remove_file(&state_file).map_err(|e| Error::io(&state_file, e))?;
    }
    Ok(summary(true))
}

/// Refuses a batch with a value that is not finite, naming its input line and point.
fn check_rows(captured: &Captured, job: &StatsJob, first_seq: usize) -> Result<()> {
    let Some(i) = OutputDtype::F32.first_nonfinite(&captured.data) else {
        return Ok(());
    };
    let row = i / (captured.points * captured.hidden);
    Err(nonfinite_error(job, first_seq, &captured.offsets, row, (i / captured.hidden) % captured.points))
}

/// The error for a NaN or Inf in the batch's captured `row` (a sequence, or with position all a
/// token: `offsets` are its sequences' first rows) at capture `slot`.
fn nonfinite_error(job: &StatsJob, first_seq: usize, offsets: &[usize], row: usize, slot: usize) -> Error {
    let seq = if job.spec.position == CapturePosition::All { offsets.iter().rposition(|&o| o <= row).unwrap_or(0) } else { row };
    let point = job.spec.points[slot];
    let seq = first_seq + seq;
    let at = if job.pairs { format!("{} ({})", (job.origin)(seq / 2), if seq.is_multiple_of(2) { "pos" } else { "neg" }) } else { (job.origin)(seq) };
    Error::input(format!("{at}: NaN or Inf in captured activations at layer {point:?}; no statistics written"))
}

/// Folds a batch's rows (or with `pairs`, its pair differences) into `moments`, in order.
fn fold(moments: &mut [PointMoments], captured: &Captured, pairs: bool, pending: &mut Option<Vec<f32>>) {
    let (p, h) = (captured.points, captured.hidden);
    if pairs {
        // Rows alternate pos, neg; a pos left over by the last batch pairs with row 0.
        let mut diffs = Vec::new();
        let mut all: Vec<&[f32]> = Vec::new();
        if let Some(pos) = pending.as_deref() {
            all.push(pos);
        }
        all.extend((0..captured.rows).map(|r| &captured.data[r * p * h..(r + 1) * p * h]));
        let whole = all.len() / 2 * 2;
        for pair in all[..whole].chunks_exact(2) {
            diffs.push(pair[0].iter().zip(pair[1]).map(|(a, b)| a - b).collect::<Vec<f32>>());
        }
        *pending = (whole < all.len()).then(|| all[whole].to_vec());
        for (slot, m) in moments.iter_mut().enumerate() {
            let r: Vec<&[f32]> = diffs.iter().map(|d| &d[slot * h..(slot + 1) * h]).collect();
            m.add_rows(&r);
        }
        return;
    }
    for (slot, m) in moments.iter_mut().enumerate() {
        let r: Vec<&[f32]> = (0..captured.rows).map(|row| captured.row(row, slot)).collect();
        m.add_rows(&r);
    }
}

/// The model identity and options a state and an output record; a state is only resumed
/// when they agree.
fn options<B: Backend>(engine: &Engine<B>, job: &StatsJob) -> Result<serde_json::Value> {
    let config = engine.model.dir.join("config.json");
    let config_bytes = std::fs::read(&config).map_err(|e| Error::io(&config, e))?;
    Ok(serde_json::json!({
        "format": FORMAT,
        "model_config_sha256": super::sha256_hex(&config_bytes),
        "architecture": engine.model.config.architecture,
        "hidden_size": engine.capture_width(job.spec)?,
        "weights_dtype": engine.model.store.dominant_dtype(),
        "device": super::extract::device_kind(&engine.backend),
        "compute": engine.backend.compute_type(),
        "input_sha256": job.input_sha256,
        "input_sequences": job.seqs.len(),
        "position": job.spec.position.name(),
        "points": job.spec.point_names(engine.num_layers()),
        "second_moments": job.stats.second_moments(),
        "pairs": job.pairs,
    }))
}

fn f64_tensor(name: &str, shape: Vec<usize>, data: Vec<f64>) -> OutTensor {
    OutTensor { name: name.into(), shape, data: TensorData::F64(data) }
}

fn save_state(path: &Path, moments: &[PointMoments], options: &serde_json::Value, next_sequence: usize) -> Result<()> {
    let (p, h) = (moments.len(), moments.first().map_or(0, |m| m.hidden));
    let cat = |f: &dyn Fn(&PointMoments) -> Vec<f64>| moments.iter().flat_map(f).collect::<Vec<f64>>();
    let mut tensors = vec![
        OutTensor { name: "count".into(), shape: vec![p], data: TensorData::I64(moments.iter().map(|m| m.count as i64).collect()) },
        // Before any row the shift is unset: zeros, with count 0.
        f64_tensor("shift", vec![p, h], cat(&|m| if m.shift.is_empty() { vec![0.0; h] } else { m.shift.clone() })),
        f64_tensor("sum", vec![p, h], cat(&|m| m.sum.clone())),
        f64_tensor("min", vec![p, h], cat(&|m| m.min.clone())),
        f64_tensor("max", vec![p, h], cat(&|m| m.max.clone())),
    ];
    if moments.iter().all(|m| !m.sq.is_empty()) && p > 0 {
        tensors.push(f64_tensor("sq", vec![p, h, h], cat(&|m| m.sq.clone())));
    }
    let meta: HashMap<String, String> = [
        ("format".to_string(), STATE_FORMAT.to_string()),
        ("options".to_string(), options.to_string()),
        ("next_sequence".to_string(), next_sequence.to_string()),
    ]
    .into();
    crate::io::write_safetensors(path, &tensors, meta)
}

/// The state at `path` if there is one for these options: the moments and the next sequence.
fn load_state(path: &Path, options: &serde_json::Value, points: usize, hidden: usize) -> Result<Option<(Vec<PointMoments>, usize)>> {
    if !path.exists() {
        return Ok(None);
    }
    let name = path.display().to_string();
    let bad = |why: String| Error::input(format!("{name}: not a resid stats state ({why}); delete it to start afresh"));
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(STATE_FORMAT) {
        return Err(bad("no format metadata".into()));
    }
    let on_disk: serde_json::Value = meta.get("options").and_then(|o| serde_json::from_str(o).ok()).ok_or_else(|| bad("no options".into()))?;
    if &on_disk != options {
        return Err(Error::input(format!(
            "{name}: refusing to resume a run with other input, model or options (on disk: {on_disk}; now: {options}); delete it to start afresh"
        )));
    }
    let next: usize = meta.get("next_sequence").and_then(|n| n.parse().ok()).ok_or_else(|| bad("no next_sequence".into()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let f64s = |t: &str, len: usize| -> Result<Vec<f64>> {
        let v = st.tensor(t).map_err(|_| bad(format!("no `{t}`")))?;
        let d: Vec<f64> = v.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect();
        if v.dtype() != safetensors::Dtype::F64 || d.len() != len {
            return Err(bad(format!("`{t}` is not {len} f64 values")));
        }
        Ok(d)
    };
    let count = st.tensor("count").map_err(|_| bad("no `count`".into()))?;
    let counts: Vec<u64> = count.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as u64).collect();
    if counts.len() != points {
        return Err(bad(format!("{} points, expected {points}", counts.len())));
    }
    let (shift, sum, min, max) = (f64s("shift", points * hidden)?, f64s("sum", points * hidden)?, f64s("min", points * hidden)?, f64s("max", points * hidden)?);
    let second = options["second_moments"].as_bool().unwrap_or(false);
    let sq = if second { f64s("sq", points * hidden * hidden)? } else { Vec::new() };
    let moments = (0..points)
        .map(|p| {
            let row = |v: &[f64]| v[p * hidden..(p + 1) * hidden].to_vec();
            PointMoments {
                hidden,
                count: counts[p],
                shift: if counts[p] == 0 { Vec::new() } else { row(&shift) },
                sum: row(&sum),
                sq: if second { sq[p * hidden * hidden..(p + 1) * hidden * hidden].to_vec() } else { Vec::new() },
                min: row(&min),
                max: row(&max),
            }
        })
        .collect();
    Ok(Some((moments, next)))
}

fn write_output<B: Backend>(engine: &Engine<B>, job: &StatsJob, out: &Path, moments: &[PointMoments]) -> Result<()> {
    let (p, h) = (moments.len(), engine.capture_width(job.spec)?);
    let n = moments.first().map_or(0, |m| m.count);
    if n == 0 {
        return Err(Error::input(format!("{}: no rows to compute statistics over", job.input_name)));
    }
    if job.stats.cov && n < 2 {
        return Err(Error::input(format!("{}: cov needs at least 2 rows per point, got {n} (n − 1 normalisation)", job.input_name)));
    }
    let cat = |f: &dyn Fn(&PointMoments) -> Vec<f64>| moments.iter().flat_map(f).collect::<Vec<f64>>();
    let mut tensors = vec![
        OutTensor { name: "count".into(), shape: vec![p], data: TensorData::I64(moments.iter().map(|m| m.count as i64).collect()) },
        OutTensor { name: "layers".into(), shape: vec![p], data: TensorData::I64(super::extract::layer_ids(job.spec)) },
    ];
    if job.stats.mean {
        tensors.push(f64_tensor("mean", vec![p, h], cat(&PointMoments::mean)));
    }
    if job.stats.cov {
        tensors.push(f64_tensor("cov", vec![p, h, h], cat(&PointMoments::cov)));
    }
    if job.stats.gram {
        tensors.push(f64_tensor("gram", vec![p, h, h], cat(&PointMoments::gram)));
    }
    tensors.push(f64_tensor("min", vec![p, h], cat(&|m| m.min.clone())));
    tensors.push(f64_tensor("max", vec![p, h], cat(&|m| m.max.clone())));
    let config = engine.model.dir.join("config.json");
    let config_bytes = std::fs::read(&config).map_err(|e| Error::io(&config, e))?;
    let points: Vec<String> = job.spec.point_names(engine.num_layers());
    let meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("points", serde_json::to_string(&points).unwrap_or_default()),
        ("position", job.spec.position.name().to_string()),
        ("pairs", job.pairs.to_string()),
        ("rows", if job.pairs { "pair differences pos - neg" } else if job.spec.position == CapturePosition::All { "tokens" } else { "sequences" }.to_string()),
        ("stats", job.stats.names().join(",")),
        ("cov_normalisation", "n - 1 (numpy.cov)".to_string()),
        ("gram", "sum over rows of x x^T (unnormalised)".to_string()),
        ("model", engine.model.dir.display().to_string()),
        ("model_config_sha256", super::sha256_hex(&config_bytes)),
        ("compute", engine.backend.compute_type().to_string()),
        ("architecture", engine.model.config.architecture.clone()),
        ("hidden_size", h.to_string()),
        ("weights_dtype", engine.model.store.dominant_dtype()),
        ("input", job.input_name.clone()),
        ("input_sha256", job.input_sha256.clone()),
        ("sequences", job.seqs.len().to_string()),
        ("layers_note", "HF output_hidden_states indices; -1 = raw pre-norm output of the last block".to_string()),
        ("resid_version", env!("CARGO_PKG_VERSION").to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    crate::io::write_safetensors(out, &tensors, meta)
}

/// A statistics file read back: per point, its hidden-state index (-1 for raw), count, mean and
/// the uncentred second moment `Σ x xᵀ / n` (from `gram`, or from `cov` and `mean`).
pub struct StatsFile {
    pub layers: Vec<i64>,
    pub hidden: usize,
    pub count: Vec<u64>,
    pub mean: Vec<f64>,
    pub second_moment: Vec<f64>,
    pub metadata: HashMap<String, String>,
}

impl StatsFile {
    /// Reads `path`, with the second moment when the file has `gram` or `cov`; `need_second`
    /// makes its absence an error (PCA).
    pub fn read(path: &Path, need_second: bool) -> Result<StatsFile> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |why: String| Error::input(format!("{name}: {why}"));
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        if metadata.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(bad("not a `resid stats` output (no format metadata)".into()));
        }
        let tensor = |t: &str| st.tensor(t).map_err(|_| bad(format!("no tensor `{t}`")));
        let i64s = |t: &str| -> Result<Vec<i64>> { Ok(tensor(t)?.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect()) };
        let f64s = |t: &str| -> Result<(Vec<f64>, Vec<usize>)> {
            let v = tensor(t)?;
            if v.dtype() != safetensors::Dtype::F64 {
                return Err(bad(format!("`{t}` is {:?}, expected F64", v.dtype())));
            }
            Ok((v.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).collect(), v.shape().to_vec()))
        };
        let layers = i64s("layers")?;
        let count: Vec<u64> = i64s("count")?.into_iter().map(|c| c.max(0) as u64).collect();
        let (mean, shape) = f64s("mean").map_err(|e| Error::input(format!("{e} (compute it with --stats mean,...)")))?;
        let p = layers.len();
        if shape.len() != 2 || shape[0] != p || count.len() != p {
            return Err(bad(format!("`mean` has shape {shape:?} for {p} points")));
        }
        let hidden = shape[1];
        let second_moment = if st.names().contains(&"gram") {
            let (g, _) = f64s("gram")?;
            g.chunks_exact(hidden * hidden).zip(&count).flat_map(|(g, &n)| g.iter().map(move |v| v / n as f64)).collect()
        } else if st.names().contains(&"cov") {
            let (c, _) = f64s("cov")?;
            let mut out = Vec::with_capacity(c.len());
            for (pt, c) in c.chunks_exact(hidden * hidden).enumerate() {
                let (n, m) = (count[pt] as f64, &mean[pt * hidden..(pt + 1) * hidden]);
                for i in 0..hidden {
                    for j in 0..hidden {
                        out.push(c[i * hidden + j] * (n - 1.0) / n + m[i] * m[j]);
                    }
                }
            }
            out
        } else if need_second {
            return Err(bad("PCA needs `gram` or `cov` (compute it with --stats mean,cov or mean,gram)".into()));
        } else {
            Vec::new()
        };
        if !second_moment.is_empty() && second_moment.len() != p * hidden * hidden {
            return Err(bad("second-moment tensor has the wrong shape".into()));
        }
        Ok(StatsFile { layers, hidden, count, mean, second_moment, metadata })
    }
}
