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
//! the CPU folds here, on the host.
//!
//! The state is checkpointed atomically beside the output (`OUT.state`, safetensors with its
//! options and the next input sequence in the metadata) every `checkpoint_seconds`, on
//! interruption and at `stop_after`; a rerun with the same input and options resumes from it
//! and gives the result an uninterrupted run gives. The output is written (atomically) only at
//! the end, and the state is then removed.
use super::lock::lock_output_file;
use crate::backend::Backend;
use crate::engine::capture::{row_offsets, CapturePosition, CaptureSpec, Captured};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::io::{OutTensor, OutputDtype, TensorData};
use rayon::prelude::*;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "resid-stats-v1";
const STATE_FORMAT: &str = "resid-stats-state-v1";
/// Rows folded into an accumulator between its load and store (the block of shifted rows,
/// 256 × hidden f64, packed, stays in the L2 cache: 1.2 MB at hidden 576).
const ROW_BLOCK: usize = 256;

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

/// The running statistics of one capture point.
#[derive(Debug, Clone, PartialEq)]
pub struct PointMoments {
    pub hidden: usize,
    pub count: u64,
    /// The first row (the shift `k`); empty before any row.
    pub shift: Vec<f64>,
    /// `Σ (x − k)`.
    pub sum: Vec<f64>,
    /// `Σ (x − k)(x − k)ᵀ`, `[hidden, hidden]` row-major, upper triangle only (empty when
    /// second moments are not wanted).
    pub sq: Vec<f64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
}

impl PointMoments {
    pub fn new(hidden: usize, second_moments: bool) -> Self {
        PointMoments {
            hidden,
            count: 0,
            shift: Vec::new(),
            sum: vec![0.0; hidden],
            sq: if second_moments { vec![0.0; hidden * hidden] } else { Vec::new() },
            min: vec![f64::INFINITY; hidden],
            max: vec![f64::NEG_INFINITY; hidden],
        }
    }

    /// Folds `rows` (each `hidden` long, in input order) into the statistics.
    pub fn add_rows(&mut self, rows: &[&[f32]]) {
        let h = self.hidden;
        if rows.is_empty() {
            return;
        }
        if self.shift.is_empty() {
            self.shift = rows[0].iter().map(|&v| v as f64).collect();
        }
        // The shifted rows, `[n, h]` in f64, in a buffer reused from batch to batch (fresh
        // pages for every point and batch cost page faults comparable to the fold).
        let mut y = SHIFTED.with(|b| std::mem::take(&mut *b.borrow_mut()));
        y.clear();
        y.resize(rows.len() * h, 0.0);
        for (yr, r) in y.chunks_exact_mut(h).zip(rows) {
            for (j, (o, &v)) in yr.iter_mut().zip(r.iter()).enumerate() {
                let v = v as f64;
                *o = v - self.shift[j];
                self.sum[j] += *o;
                self.min[j] = self.min[j].min(v);
                self.max[j] = self.max[j].max(v);
            }
        }
        self.count += rows.len() as u64;
        if !self.sq.is_empty() {
            accumulate_outer(&mut self.sq, &y, rows.len(), h);
        }
        SHIFTED.with(|b| *b.borrow_mut() = y);
    }

    /// The mean `k + Σ(x − k)/n`.
    pub fn mean(&self) -> Vec<f64> {
        let n = self.count as f64;
        self.sum.iter().zip(&self.shift).map(|(s, k)| k + s / n).collect()
    }

    /// The covariance with n − 1 normalisation (numpy.cov), full symmetric.
    pub fn cov(&self) -> Vec<f64> {
        let (h, n) = (self.hidden, self.count as f64);
        let mut c = vec![0.0; h * h];
        for i in 0..h {
            for j in i..h {
                let v = (self.sq[i * h + j] - self.sum[i] * self.sum[j] / n) / (n - 1.0);
                c[i * h + j] = v;
                c[j * h + i] = v;
            }
        }
        c
    }

    /// The Gram matrix `Σ x xᵀ`, full symmetric.
    pub fn gram(&self) -> Vec<f64> {
        let (h, n) = (self.hidden, self.count as f64);
        let (k, s) = (&self.shift, &self.sum);
        let mut g = vec![0.0; h * h];
        for i in 0..h {
            for j in i..h {
                let v = self.sq[i * h + j] + k[i] * s[j] + s[i] * k[j] + n * k[i] * k[j];
                g[i * h + j] = v;
                g[j * h + i] = v;
            }
        }
        g
    }
}

/// `sq[i, j] += Σ_r y[r, i]·y[r, j]` for j ≥ i (and a few elements left of the diagonal),
/// each element one fused multiply-add chain over the rows in order,
/// `acc = fma(y[r, i], y[r, j], acc)`, so the result does not depend on how the rows were
/// batched or on the threads, and every instruction set gives the same bits.
///
/// Blocked like a GEMM: a block of [`ROW_BLOCK`] rows is packed into panels of
/// [`PANEL`] columns (`[rows][24]`, contiguous, in L2); threads take bands of [`TILE_ROWS`]
/// rows of `sq`, and each 8 × 24 tile of a band keeps its accumulators in registers over the
/// block's rows, broadcasting the band's own eight columns from their panel.
fn accumulate_outer(sq: &mut [f64], y: &[f64], n: usize, h: usize) {
    #[cfg(target_arch = "x86_64")]
    if h >= TILE_ROWS && std::arch::is_x86_feature_detected!("avx512f") {
        let panels = h.div_ceil(PANEL);
        let mut packed = PACKED.with(|b| std::mem::take(&mut *b.borrow_mut()));
        // Zeros in the last panel's padding columns (never stored, but multiplied).
        packed.clear();
        packed.resize(panels * ROW_BLOCK * PANEL, 0.0);
        for r0 in (0..n).step_by(ROW_BLOCK) {
            let kc = (n - r0).min(ROW_BLOCK);
            let block = &y[r0 * h..(r0 + kc) * h];
            packed.par_chunks_mut(ROW_BLOCK * PANEL).enumerate().for_each(|(p, panel)| {
                let (c0, w) = (p * PANEL, (h - p * PANEL).min(PANEL));
                for (dst, yr) in panel.chunks_exact_mut(PANEL).zip(block.chunks_exact(h)) {
                    dst[..w].copy_from_slice(&yr[c0..c0 + w]);
                }
            });
            let packed = &packed;
            sq.par_chunks_mut(TILE_ROWS * h).enumerate().for_each(|(bi, band)| {
                let i0 = bi * TILE_ROWS;
                if band.len() < TILE_ROWS * h {
                    columns_any(band, i0, block, h, i0);
                    return;
                }
                let a = &packed[i0 / PANEL * ROW_BLOCK * PANEL + i0 % PANEL..];
                for p in i0 / PANEL..panels {
                    let b = &packed[p * ROW_BLOCK * PANEL..];
                    // SAFETY: AVX-512F is present (checked above); the tile's columns
                    // p·24..p·24 + w and the band's eight rows lie inside `band`, and `a`, `b`
                    // hold kc rows of 24.
                    unsafe { outer512::tile(band.as_mut_ptr().add(p * PANEL), h, a.as_ptr(), b.as_ptr(), kc, (h - p * PANEL).min(PANEL)) };
                }
            });
        }
        PACKED.with(|b| *b.borrow_mut() = packed);
        return;
    }
    sq.par_chunks_mut(TILE_ROWS * h).enumerate().for_each(|(bi, band)| {
        let i0 = bi * TILE_ROWS;
        for r0 in (0..n).step_by(ROW_BLOCK) {
            columns_any(band, i0, &y[r0 * h..(r0 + ROW_BLOCK).min(n) * h], h, i0);
        }
    });
}

thread_local! {
    /// [`PointMoments::add_rows`]' shifted rows and [`accumulate_outer`]'s packed panels.
    static SHIFTED: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
    static PACKED: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows of `sq` per band (and per register tile).
const TILE_ROWS: usize = 8;
/// Columns of a register tile and of a packed panel: three vectors of eight f64.
const PANEL: usize = 24;

/// [`columns`], with hardware FMA where the CPU has it.
fn columns_any(band: &mut [f64], i0: usize, block: &[f64], h: usize, j0: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA (checked just above).
        unsafe { columns_fma(band, i0, block, h, j0) };
        return;
    }
    columns(band, i0, block, h, j0)
}

/// [`columns`] compiled with hardware FMA (the same operations, so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_fma(band: &mut [f64], i0: usize, block: &[f64], h: usize, j: usize) {
    columns(band, i0, block, h, j)
}

/// The portable path (and a last band of fewer than eight rows): from column `j0`, eight
/// columns at a time (eight independent chains per row), then one.
#[inline(always)]
fn columns(band: &mut [f64], i0: usize, block: &[f64], h: usize, j0: usize) {
    for (di, row) in band.chunks_exact_mut(h).enumerate() {
        let i = i0 + di;
        let mut j = j0;
        while j < h {
            let w = if j + 8 <= h { 8 } else { 1 };
            let mut acc = [0.0f64; 8];
            acc[..w].copy_from_slice(&row[j..j + w]);
            for yr in block.chunks_exact(h) {
                let a = yr[i];
                for (s, &b) in acc[..w].iter_mut().zip(&yr[j..j + w]) {
                    *s = a.mul_add(b, *s);
                }
            }
            row[j..j + w].copy_from_slice(&acc[..w]);
            j += w;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod outer512 {
    use super::{PANEL, TILE_ROWS};
    use std::arch::x86_64::*;

    /// `band[ii, 0..w] += Σ_r a[r, ii]·b[r, 0..w]` for the [`TILE_ROWS`] rows of the band
    /// (`band` at the tile's first column, rows `h` apart; `a` and `b` rows 24 apart, `a` at the
    /// band's own columns in their panel): 24 accumulators in registers over the `kc` rows, one
    /// FMA chain per element, rows in order. Columns past `w` (the last panel's padding) are
    /// neither read nor written.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(band: *mut f64, h: usize, a: *const f64, b: *const f64, kc: usize, w: usize) {
        let mask = |v: usize| -> __mmask8 { (((1u32 << w.saturating_sub(8 * v).min(8)) - 1) & 0xff) as u8 };
        let m = [mask(0), mask(1), mask(2)];
        let mut acc = [[_mm512_setzero_pd(); 3]; TILE_ROWS];
        for (ii, row) in acc.iter_mut().enumerate() {
            for (v, c) in row.iter_mut().enumerate() {
                *c = _mm512_maskz_loadu_pd(m[v], band.add(ii * h + 8 * v));
            }
        }
        for r in 0..kc {
            let (ar, br) = (a.add(r * PANEL), b.add(r * PANEL));
            let bv = [_mm512_loadu_pd(br), _mm512_loadu_pd(br.add(8)), _mm512_loadu_pd(br.add(16))];
            for (ii, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_pd(*ar.add(ii));
                for (c, &bb) in row.iter_mut().zip(&bv) {
                    *c = _mm512_fmadd_pd(x, bb, *c);
                }
            }
        }
        for (ii, row) in acc.iter().enumerate() {
            for (v, &c) in row.iter().enumerate() {
                _mm512_mask_storeu_pd(band.add(ii * h + 8 * v), m[v], c);
            }
        }
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


#[cfg(test)]
mod tests {
    use super::*;

    /// The register tiles, their column tails and the portable path against the plain triple
    /// loop with the same FMA chain: bit-identical on every element j ≥ i, whatever the
    /// blocking of the rows.
    #[test]
    fn folding_outer_products_is_the_plain_fma_chain() {
        let mut seed = 12345u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        for h in [1, 5, 8, 13, 24, 40, 64, 77, 100] {
            for n in [1, 3, 130, 300] {
                let y: Vec<f64> = (0..n * h).map(|_| next()).collect();
                let start: Vec<f64> = (0..h * h).map(|_| next()).collect();
                let mut want = start.clone();
                for r in 0..n {
                    for i in 0..h {
                        for j in i..h {
                            want[i * h + j] = y[r * h + i].mul_add(y[r * h + j], want[i * h + j]);
                        }
                    }
                }
                // All rows at once, then the same rows in uneven batches.
                let mut once = start.clone();
                accumulate_outer(&mut once, &y, n, h);
                let mut batched = start.clone();
                let mut r = 0;
                for step in [1, 7, 129].iter().cycle() {
                    if r >= n {
                        break;
                    }
                    let e = (r + step).min(n);
                    accumulate_outer(&mut batched, &y[r * h..e * h], e - r, h);
                    r = e;
                }
                for i in 0..h {
                    for j in i..h {
                        let (w, a, b) = (want[i * h + j], once[i * h + j], batched[i * h + j]);
                        assert!(w.to_bits() == a.to_bits() && w.to_bits() == b.to_bits(), "h {h} n {n} [{i},{j}]: {w} vs {a} / {b}");
                    }
                }
            }
        }
    }
}
