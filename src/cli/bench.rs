//! `resid bench`: throughput of the three workloads on seeded random token ids, measured against
//! limits the command measures itself in the same run (GEMM rate at the model's shapes through
//! the backend, copy bandwidth), so the ratios mean the same on any machine and backend.
//!
//! * `extract`: last-token hidden states at every index for `--sequences` sequences of
//!   `--min-len`..=`--max-len` tokens, packed into batches of `--batch` tokens (default 2,048).
//!   Reports tokens/s, model GFLOP per token (2 · the decoder blocks' matrix parameters, plus
//!   attention), achieved GFLOP/s and its fraction of the GEMM peak.
//! * `decode`: `--batch` sequences (default 1) decode `--steps` tokens (default 64) greedily,
//!   unsteered and steered at every layer, steps interleaved. Reports tokens/s, weight bytes per
//!   step, copy bandwidth, the bandwidth-limited tokens/s and the fraction reached.
//! * `steer`: the cost of steering (every layer) and of capture (every index, last position)
//!   relative to a plain pass, in prefill (`--batch` sequences, default 16) and in decode (the
//!   same sequences, one step), over `--steps` interleaved repeats (default 20); medians.
//! * `scaling`: extract throughput against threads, sequence length and batch size, one child
//!   process per point; writes `scaling.json` and a figure into `--plot-dir` (src/cli/scaling.rs).
use super::{with_engine, ModelArgs};
use anyhow::{anyhow, bail, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use resid::backend::{ActKind, Backend, KV_SLOT_ALIGN};
use resid::engine::capture::{CapturePoint, CapturePosition, CaptureSink, CaptureSpec, Captured};
use resid::engine::plan::BatchPlan;
use resid::engine::sample::SampleParams;
use resid::engine::{Pass, Phase};
use resid::model::weights::MatrixSource;
use resid::{Engine, SteerOp, SteerPositions, Steering};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// extract, decode, steer or scaling.
    #[arg(long, default_value = "extract")]
    workload: String,
    /// extract: the captured points, as `resid extract --layers` takes them (default: every
    /// hidden-state index).
    #[arg(long)]
    layers: Option<String>,
    /// scaling: directory for scaling.json, scaling.png and scaling.svg.
    #[arg(long, default_value = "bench-scaling")]
    plot_dir: std::path::PathBuf,
    #[command(flatten)]
    lock: super::LockArgs,
    /// Sequences of the extract workload.
    #[arg(long, default_value_t = 256)]
    sequences: usize,
    /// Shortest sequence (tokens; prompts for decode and steer).
    #[arg(long, default_value_t = 12)]
    min_len: usize,
    /// Longest sequence (tokens).
    #[arg(long, default_value_t = 60)]
    max_len: usize,
    /// extract: token budget of one packed batch (default 2048); decode and steer: sequences
    /// decoded together (default 1 for decode, 16 for steer).
    #[arg(long)]
    batch: Option<usize>,
    /// decode: tokens generated per sequence (default 64); steer: interleaved repeats (default 20).
    #[arg(long)]
    steps: Option<usize>,
    /// Seed of the random token ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// extract and decode: after the timed run, run it again with the time of each forward-pass
    /// operation recorded (device events on CUDA), and report the breakdown.
    #[arg(long)]
    profile: bool,
}

pub(crate) fn run(a: BenchArgs) -> Result<()> {
    if !["extract", "decode", "steer", "scaling"].contains(&a.workload.as_str()) {
        bail!(resid::Error::input(format!("--workload `{}`: expected extract, decode, steer or scaling", a.workload)));
    }
    if a.min_len == 0 || a.max_len < a.min_len {
        bail!(resid::Error::input(format!("--min-len {} --max-len {}: need 1 ≤ min ≤ max", a.min_len, a.max_len)));
    }
    if a.profile && !["extract", "decode"].contains(&a.workload.as_str()) {
        bail!(resid::Error::input("--profile applies to the extract and decode workloads"));
    }
    if a.sequences == 0 || a.batch == Some(0) || a.steps == Some(0) {
        bail!(resid::Error::input("--sequences, --batch and --steps must be at least 1"));
    }
    let on_cpu = resid::backend::cuda::parse_device(&a.model.device)?.is_none();
    a.model.apply_compute()?;
    let compute = a.model.compute.unwrap_or(resid::backend::cpu::Compute::F32);
    if a.workload == "scaling" {
        // Checks the model loads before starting the sweep's child processes.
        resid::model::ModelDir::open(&a.model.model)?;
        let args = super::scaling::ScalingArgs {
            model: &a.model.model,
            device: &a.model.device,
            compute: compute.name(),
            seed: a.seed,
            plot_dir: &a.plot_dir,
            wait_lock: a.lock.wait_lock,
            quiet: a.quiet,
            on_cpu,
        };
        let mut report = super::scaling::run(&args)?;
        if let Some(obj) = report.as_object_mut() {
            obj.insert("machine".into(), machine(on_cpu));
        }
        if a.json {
            println!("{report}");
        } else {
            println!("{report:#}");
        }
        return Ok(());
    }
    let load_start = loadavg();
    let t = Instant::now();
    let any = super::load(&a.model)?;
    let load_seconds = t.elapsed().as_secs_f64();
    let mut report = with_engine!(&any, e => run_on(e, &a, on_cpu))?;
    let obj = report.as_object_mut().ok_or_else(|| anyhow!("report"))?;
    obj.insert("load_seconds".into(), json!(round(load_seconds, 3)));
    obj.insert("machine".into(), machine(on_cpu));
    obj.insert("load_average".into(), json!({ "start": load_start, "end": loadavg() }));
    if a.json {
        println!("{report}");
    } else {
        print_human(&report, "");
        if let Some(p) = report.get("profile").filter(|p| !p.is_null()) {
            print_profile(p);
        }
    }
    Ok(())
}

/// Runs `work` with operation marks on and returns the breakdown.
fn profiled<B: Backend>(e: &Engine<B>, quiet: bool, work: impl FnOnce() -> Result<()>) -> Result<Value> {
    note(quiet, "profiled run (operation marks on)");
    e.backend.set_profiling(true)?;
    let t = Instant::now();
    let r = work();
    let times = e.backend.take_profile();
    let wall = t.elapsed().as_secs_f64();
    e.backend.set_profiling(false)?;
    r?;
    let times = times?;
    Ok(json!({
        "wall_seconds": round(wall, 4),
        "marked_seconds": round(times.total(), 4),
        "note": "each operation is charged the time since the previous mark (device events on CUDA: idle gaps waiting for the host count against the operation that was late; host_seconds: the host's time between the same marks); a separate run after the timed one",
        "ops": times.to_json(),
    }))
}

fn print_profile(p: &Value) {
    println!("\n{:<40} {:>10} {:>7} {:>8} {:>12}", "operation", "seconds", "share", "marks", "host seconds");
    for op in p["ops"].as_array().into_iter().flatten() {
        let host = op["host_seconds"].as_f64().map_or(String::from("-"), |h| format!("{h:.4}"));
        println!(
            "{:<40} {:>10.4} {:>6.1}% {:>8} {host:>12}",
            op["op"].as_str().unwrap_or_default(),
            op["seconds"].as_f64().unwrap_or(f64::NAN),
            op["share"].as_f64().unwrap_or(f64::NAN) * 100.0,
            op["marks"].as_u64().unwrap_or(0)
        );
    }
    println!("{:<40} {:>10.4} (wall {:.4})", "total", p["marked_seconds"].as_f64().unwrap_or(f64::NAN), p["wall_seconds"].as_f64().unwrap_or(f64::NAN));
}

fn print_human(v: &Value, prefix: &str) {
    if let Some(o) = v.as_object() {
        for (k, v) in o {
            match v {
                Value::Object(_) => print_human(v, &format!("{prefix}{k}.")),
                Value::String(s) => println!("{:>40}: {s}", format!("{prefix}{k}")),
                other => println!("{:>40}: {other}", format!("{prefix}{k}")),
            }
        }
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// Progress lines on stderr, at most one a second (a live line on a terminal).
struct Progress {
    label: String,
    total: usize,
    unit: &'static str,
    started: Instant,
    last: Instant,
    tty: bool,
    quiet: bool,
}

impl Progress {
    fn new(label: &str, total: usize, unit: &'static str, quiet: bool) -> Self {
        let now = Instant::now();
        Progress { label: label.into(), total, unit, started: now, last: now, tty: std::io::stderr().is_terminal(), quiet }
    }

    fn update(&mut self, done: usize, extra: &str) {
        if self.quiet || (self.last.elapsed().as_secs_f64() < 1.0 && done < self.total) {
            return;
        }
        self.last = Instant::now();
        let el = self.started.elapsed().as_secs_f64();
        let eta = if done > 0 { el / done as f64 * (self.total - done.min(self.total)) as f64 } else { f64::NAN };
        let line = format!("bench: {} {done}/{} {}{extra}, {el:.1} s elapsed, ETA {eta:.0} s", self.label, self.total, self.unit);
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            if done >= self.total {
                eprintln!();
            }
        } else {
            eprintln!("{line}");
        }
    }
}

fn note(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("bench: {msg}");
    }
}

fn random_seqs(seed: u64, n: usize, min: usize, max: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(min..=max);
            (0..len).map(|_| rng.random_range(0..vocab as u32)).collect()
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// FLOPs of the decoder blocks' matrices per token (2 · their parameters).
fn matrix_flops_per_token<B: Backend>(e: &Engine<B>) -> f64 {
    let m = &e.model;
    2.0 * (m.spec.layer_matrix_elements(&m.config) * m.config.num_layers) as f64
}

/// Attention FLOPs of a token at position `pos` (QKᵀ and PV over pos + 1 keys, every layer).
fn attention_flops<B: Backend>(e: &Engine<B>, pos: usize) -> f64 {
    let c = &e.model.config;
    4.0 * ((pos + 1) * c.head_dim * c.num_heads * c.num_layers) as f64
}

/// FLOPs an extraction at the last position performs: `depth` layers for every token, except
/// that where the backend narrows the last of them to the rows read (the CPU), only each
/// sequence's last token goes through that layer's attention, o projection and MLP.
fn extract_flops<B: Backend>(e: &Engine<B>, seqs: &[Vec<u32>], depth: usize, narrowed: bool) -> f64 {
    let c = &e.model.config;
    let (layers, h, qd, kvd) = (c.num_layers as f64, c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let qkv = 2.0 * ((qd + 2 * kvd) * h) as f64;
    let rest = matrix_flops_per_token(e) / layers - qkv;
    let attention = |pos: usize| attention_flops(e, pos) / layers;
    let depth = depth as f64;
    let mut total = 0.0;
    for s in seqs {
        for pos in 0..s.len() {
            let tail = if narrowed && pos + 1 < s.len() { 0.0 } else { 1.0 };
            total += depth * qkv + (depth - 1.0 + tail) * (rest + attention(pos));
        }
    }
    total
}

fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
        })
        .collect()
}

/// The GEMM rate through `Backend::linear` at the model's four projections, `rows` tokens each,
/// as the forward pass calls them (o and down accumulate into the f32 residual): per projection
/// the best of at least `reps` timed calls (more, up to 50, until 0.3 s have been spent on it), so
/// that a burst of other work on the machine does not lower the peak.
///
/// `PeakWeights::Model` (the in-pass peak): the calls go through the model's own matrices, layer
/// after layer from the first, so each call's weights come from where the pass finds them (memory,
/// for a model larger than the last-level cache). `PeakWeights::OneMatrix`: one random matrix per
/// shape, called again and again, so its weights stay cached; the peak `resid bench` reported
/// before 2026-12-06, kept for comparison (and the only one of a model without layers).
fn gemm_peak<B: Backend>(e: &Engine<B>, rows: usize, reps: usize, weights: PeakWeights, quiet: bool) -> Result<Value> {
    let weights = if e.weights.layers.is_empty() { PeakWeights::OneMatrix } else { weights };
    let be = &e.backend;
    let (c, spec) = (&e.model.config, &e.model.spec);
    let (h, qd, kvd, inter) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    type Pick<B> = fn(&resid::model::LayerWeights<B>) -> &<B as Backend>::Matrix;
    let shapes: [(&str, usize, usize, bool, Pick<B>); 4] = [
        ("qkv", qd + 2 * kvd, h, false, |l| &l.qkv),
        ("o", h, qd, true, |l| &l.o),
        ("gate_up", spec.mlp_input_rows(c), h, false, |l| &l.gate_up),
        ("down", h, inter, true, |l| &l.down),
    ];
    let mut total_flops = 0.0;
    let mut total_best = 0.0;
    let mut per_shape = serde_json::Map::new();
    for (i, &(name, n, k, acc, pick)) in shapes.iter().enumerate() {
        note(quiet, &format!("GEMM peak ({}): {name} [{rows} x {k}] x [{k} x {n}]ᵀ", weights.label()));
        let one = match weights {
            PeakWeights::OneMatrix => Some(be.matrix(&MatrixSource::from_values(pseudo(n * k, i as u64 + 1), n, k)?)?),
            PeakWeights::Model => None,
        };
        let layers = &e.weights.layers;
        let matrix = |call: usize| one.as_ref().unwrap_or_else(|| pick(&layers[call % layers.len()]));
        // Random inputs: zeros run faster on some matrix units and would inflate the peak.
        let x = be.act_from(&pseudo(rows * k, 100 + i as u64).iter().map(|v| v * 50.0).collect::<Vec<_>>(), rows, k, ActKind::Hidden)?;
        let mut y = be.act(rows, n, if acc { ActKind::Residual } else { ActKind::Hidden })?;
        // Untimed: sizes the scratch buffers. The last layer's matrix, so that the timed calls'
        // first matrices were last read a whole pass ago.
        be.linear(&x, matrix(layers.len().saturating_sub(1)), None, &mut y, acc)?;
        be.synchronize()?;
        let mut best = f64::MAX;
        let (spent, mut done) = (Instant::now(), 0);
        while done < reps || (done < 50 && spent.elapsed().as_secs_f64() < 0.3) {
            let t = Instant::now();
            be.linear(&x, matrix(done), None, &mut y, acc)?;
            be.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64());
            done += 1;
        }
        let flops = 2.0 * (rows * n * k) as f64;
        total_flops += flops;
        total_best += best;
        per_shape.insert(name.into(), json!({ "n": n, "k": k, "gflop_per_s": round(flops / best / 1e9, 2) }));
    }
    Ok(json!({
        "gflop_per_s": round(total_flops / total_best / 1e9, 2),
        "rows": rows,
        "min_repeats": reps,
        "weights": weights.label(),
        "shapes": per_shape,
    }))
}

/// Whose weights [`gemm_peak`] multiplies by.
#[derive(Clone, Copy)]
enum PeakWeights {
    Model,
    OneMatrix,
}

impl PeakWeights {
    fn label(self) -> &'static str {
        match self {
            PeakWeights::Model => "the model's, layer after layer",
            PeakWeights::OneMatrix => "one random matrix per shape, reused",
        }
    }
}

/// The better of two measurements of a peak (before and after the timed run: the less disturbed).
fn better_peak(before: Value, after: Value) -> (Value, f64) {
    let rate = |v: &Value| v["gflop_per_s"].as_f64().unwrap_or(f64::NAN);
    let (b, a) = (rate(&before), rate(&after));
    if a > b {
        (after, a)
    } else {
        (before, b)
    }
}

fn run_on<B: Backend>(e: &Engine<B>, a: &BenchArgs, on_cpu: bool) -> Result<Value> {
    let c = &e.model.config;
    let mut report = json!({
        "workload": a.workload,
        "model": e.model.dir.display().to_string(),
        "architecture": c.architecture,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "device": e.backend.name(),
        "compute": if on_cpu { resid::backend::cpu::kernel_description() } else { "bf16 weights and sub-layer activations, f32 residual (cuda)".into() },
        "threads": if on_cpu { rayon::current_num_threads() } else { 0 },
        "seed": a.seed,
    });
    let body = match a.workload.as_str() {
        "extract" => extract(e, a, on_cpu)?,
        "decode" => decode(e, a)?,
        _ => steer(e, a)?,
    };
    let obj = report.as_object_mut().unwrap();
    for (k, v) in body.as_object().into_iter().flatten() {
        obj.insert(k.clone(), v.clone());
    }
    Ok(report)
}

fn extract<B: Backend>(e: &Engine<B>, a: &BenchArgs, on_cpu: bool) -> Result<Value> {
    let c = &e.model.config;
    let batch_tokens = a.batch.unwrap_or(resid::engine::DEFAULT_BATCH_TOKENS);
    // Lengths beyond the model's context are clamped to it.
    let max_len = a.max_len.min(c.max_position_embeddings).max(1);
    let seqs = random_seqs(a.seed, a.sequences, a.min_len.min(max_len), max_len, c.vocab_size);
    let tokens: usize = seqs.iter().map(Vec::len).sum();
    let points = match &a.layers {
        Some(list) => resid::engine::capture::parse_points(list, e.num_layers())?,
        None => (0..=e.num_layers()).map(CapturePoint::Hidden).collect(),
    };
    let spec = CaptureSpec { points, position: CapturePosition::Last };
    e.capture_width(&spec)?;

    // Warm-up (weight packing, first-touch of buffers); not timed.
    note(a.quiet, "warm-up pass");
    let warm: Vec<Vec<u32>> = seqs.iter().take(8).cloned().collect();
    e.extract(&warm, &spec, &vec![None; warm.len()], batch_tokens, |_, _| {})?;

    let fma = if on_cpu {
        note(a.quiet, "FMA peak (register-only FMA chains)");
        Some(resid::backend::cpu::gemm::fma_peak_gflops(0.5))
    } else {
        None
    };
    let peak_rows = batch_tokens.min(tokens).clamp(1, 2048);
    let peaks = |e: &Engine<B>| -> Result<[Value; 2]> { Ok([gemm_peak(e, peak_rows, 5, PeakWeights::Model, a.quiet)?, gemm_peak(e, peak_rows, 5, PeakWeights::OneMatrix, a.quiet)?]) };
    let [peak, one_matrix] = peaks(e)?;

    let flops = extract_flops(e, &seqs, spec.deepest_index(e.num_layers()), on_cpu);
    let fma_before = fma;
    let mut progress = Progress::new("extract", seqs.len(), "sequences", a.quiet);
    let mut done = (0usize, 0usize);
    let none = vec![None; seqs.len()];
    let t = Instant::now();
    e.extract(&seqs, &spec, &none, batch_tokens, |n, tk| {
        done.0 += n;
        done.1 += tk;
        let rate = done.1 as f64 / t.elapsed().as_secs_f64().max(1e-9);
        progress.update(done.0, &format!(", {rate:.0} tokens/s"));
    })?;
    e.backend.synchronize()?;
    let seconds = t.elapsed().as_secs_f64();
    let gflops = flops / seconds / 1e9;
    // The peaks again after the run; the better of the two is the machine's (less disturbed).
    note(a.quiet, "GEMM peaks again");
    let [peak_after, one_matrix_after] = peaks(e)?;
    let (peak, peak_gflops) = better_peak(peak, peak_after);
    let (one_matrix, one_matrix_gflops) = better_peak(one_matrix, one_matrix_after);
    let fma = fma_before.map(|f| f.max(resid::backend::cpu::gemm::fma_peak_gflops(0.5)));
    let mut v = json!({
        "sequences": seqs.len(),
        "tokens": tokens,
        "batch_tokens": batch_tokens,
        "captured_indices": spec.points.len(),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens as f64 / seconds, 1),
        "gflop_per_token": round(flops / tokens as f64 / 1e9, 4),
        "matrix_gflop_per_token": round(matrix_flops_per_token(e) / 1e9, 4),
        "gflop_per_s": round(gflops, 2),
        "gemm_peak": peak,
        "gemm_peak_gflop_per_s": round(peak_gflops, 2),
        "fraction_of_gemm_peak": round(gflops / peak_gflops, 3),
        "gemm_peak_limited_tokens_per_s": round(peak_gflops * 1e9 / (flops / tokens as f64), 1),
        "one_matrix_gemm_peak": one_matrix,
        "fraction_of_one_matrix_gemm_peak": round(gflops / one_matrix_gflops, 3),
    });
    if let Some(f) = fma {
        let o = v.as_object_mut().unwrap();
        o.insert("fma_peak_gflop_per_s".into(), json!(round(f, 2)));
        o.insert("fraction_of_fma_peak".into(), json!(round(gflops / f, 3)));
    }
    if a.profile {
        let p = profiled(e, a.quiet, || e.extract(&seqs, &spec, &none, batch_tokens, |_, _| {}).map(|_| ()).map_err(Into::into))?;
        v.as_object_mut().unwrap().insert("profile".into(), p);
    }
    Ok(v)
}

fn all_layer_steering<B: Backend>(e: &Engine<B>) -> Arc<Steering> {
    let (l, h) = (e.num_layers(), e.hidden_size());
    Arc::new(Steering {
        directions: Arc::new(pseudo((l + 1) * h, 77)),
        hidden: h,
        layers: (0..=l).collect(),
        sites: Vec::new(),
        coef: 1.0,
        op: SteerOp::Add,
        preserve_norm: false,
        positions: SteerPositions::All,
    })
}

/// Weight bytes one decode step reads: every decoder matrix and the LM head.
fn weight_bytes_per_step<B: Backend>(e: &Engine<B>) -> usize {
    let be = &e.backend;
    let w = &e.weights;
    let layers: usize = w.layers.iter().map(|l| be.matrix_bytes(&l.qkv) + be.matrix_bytes(&l.o) + be.matrix_bytes(&l.gate_up) + be.matrix_bytes(&l.down)).sum();
    layers + be.matrix_bytes(w.lm_head())
}

/// A batch of prompts prefilled into their own KV arena, ready to decode.
struct Decoder<B: Backend> {
    kv: B::Kv,
    lens: Vec<usize>,
    starts: Vec<usize>,
    next: Vec<u32>,
    steering: Vec<Option<Arc<Steering>>>,
}

impl<B: Backend> Decoder<B> {
    fn new(e: &Engine<B>, prompts: &[Vec<u32>], room: usize, steering: Option<Arc<Steering>>) -> Result<Self> {
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let mut starts = Vec::new();
        let mut slots = 0;
        // Each sequence from an aligned slot, as the scheduler places them (`KV_SLOT_ALIGN`).
        for l in &lens {
            starts.push(slots);
            slots = (slots + l + room).next_multiple_of(KV_SLOT_ALIGN);
        }
        let mut kv = e.backend.kv(e.num_layers(), slots, e.kv_dim())?;
        let plan = BatchPlan::new(&lens, &vec![0; lens.len()], &starts);
        let ids: Vec<u32> = prompts.iter().flatten().copied().collect();
        let steering = vec![steering; prompts.len()];
        let greedy = vec![SampleParams::GREEDY; prompts.len()];
        let pass = Pass { ids: &ids, plan: &plan, phase: Phase::Prompt, steering: &steering, capture: None, logits_rows: &plan.last_rows() };
        let next = e.forward_sample(&mut kv, pass, &greedy)?;
        Ok(Decoder { kv, lens, starts, next, steering })
    }

    /// One decode step at past length `lens[i] + step` for every sequence (a step may be
    /// repeated at the same position: it rewrites the same cache slot), with greedy picks made
    /// on the backend as `generate` makes them. Returns its seconds.
    fn step(&mut self, e: &Engine<B>, step: usize, capture: Option<(&CaptureSpec, &mut Captured)>, advance: bool) -> Result<f64> {
        let n = self.lens.len();
        let past: Vec<usize> = self.lens.iter().map(|l| l + step).collect();
        let plan = BatchPlan::new(&vec![1; n], &past, &self.starts);
        let sink = capture.map(|(spec, out)| CaptureSink { spec, out, seq_row: (0..n).collect() });
        let t = Instant::now();
        let greedy = vec![SampleParams::GREEDY; n];
        let next = e.forward_sample(
            &mut self.kv,
            Pass { ids: &self.next, plan: &plan, phase: Phase::Generated, steering: &self.steering, capture: sink, logits_rows: &plan.last_rows() },
            &greedy,
        )?;
        let secs = t.elapsed().as_secs_f64();
        if advance {
            self.next = next;
        }
        Ok(secs)
    }
}

fn decode<B: Backend>(e: &Engine<B>, a: &BenchArgs) -> Result<Value> {
    let c = &e.model.config;
    let batch = a.batch.unwrap_or(1);
    let steps = a.steps.unwrap_or(64);
    let max_len = a.max_len.min(c.max_position_embeddings.saturating_sub(steps + 1)).max(1);
    let prompts = random_seqs(a.seed, batch, a.min_len.min(max_len), max_len, c.vocab_size);
    note(a.quiet, "copy bandwidth");
    let bandwidth = e.backend.copy_bandwidth(1 << 28, 5)?;
    note(a.quiet, &format!("prefill {batch} prompts (x2: unsteered and steered)"));
    let steer = all_layer_steering(e);
    let mut plain = Decoder::new(e, &prompts, steps + 1, None)?;
    let mut steered = Decoder::new(e, &prompts, steps + 1, Some(steer))?;
    // Warm-up step each (not timed, not advanced).
    plain.step(e, 0, None, false)?;
    steered.step(e, 0, None, false)?;
    let (mut tp, mut ts) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    let mut progress = Progress::new("decode", steps, "steps", a.quiet);
    for s in 0..steps {
        tp.push(plain.step(e, s, None, true)?);
        ts.push(steered.step(e, s, None, true)?);
        progress.update(s + 1, "");
    }
    let profile = if a.profile {
        // A fresh plain decoder; its prefill is not profiled.
        let mut p = Decoder::new(e, &prompts, steps + 1, None)?;
        Some(profiled(e, a.quiet, || (0..steps).try_for_each(|s| p.step(e, s, None, true).map(|_| ())))?)
    } else {
        None
    };
    let (sum_p, sum_s): (f64, f64) = (tp.iter().sum(), ts.iter().sum());
    let bytes = weight_bytes_per_step(e);
    let limit = batch as f64 * bandwidth / bytes as f64;
    let tps = (batch * steps) as f64 / sum_p;
    Ok(json!({
        "batch": batch,
        "steps": steps,
        "prompt_tokens": prompts.iter().map(Vec::len).sum::<usize>(),
        "tokens_per_s": round(tps, 2),
        "tokens_per_s_steered": round((batch * steps) as f64 / sum_s, 2),
        "step_ms_median": round(median(&mut tp.clone()) * 1e3, 3),
        "step_ms_median_steered": round(median(&mut ts.clone()) * 1e3, 3),
        "steering": "add at every hidden-state index 0..=L, all positions",
        "weight_bytes_per_step": bytes,
        "weight_bytes_per_token": bytes / batch,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "copy_bandwidth_note": "bytes read + bytes written per second (STREAM convention), best of 5 copies of 256 MiB",
        "bandwidth_limited_tokens_per_s": round(limit, 2),
        "fraction_of_bandwidth_limit": round(tps / limit, 3),
        "fraction_of_bandwidth_limit_steered": round((batch * steps) as f64 / sum_s / limit, 3),
        "profile": profile,
    }))
}

/// 95% bootstrap interval of the median over repeats of `variant[i] / plain[i] - 1` (repeats
/// resampled with replacement, seeded: the interval is reproducible for the same timings).
fn ci95(variant: &[f64], plain: &[f64]) -> Value {
    let ratios: Vec<f64> = variant.iter().zip(plain).map(|(x, b)| x / b - 1.0).collect();
    if ratios.len() < 2 {
        return Value::Null;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC195);
    let mut medians: Vec<f64> = (0..2000)
        .map(|_| median(&mut (0..ratios.len()).map(|_| ratios[rng.random_range(0..ratios.len())]).collect::<Vec<_>>()))
        .collect();
    medians.sort_by(|a, b| a.total_cmp(b));
    json!([round(medians[50], 4), round(medians[1949], 4)])
}

fn steer<B: Backend>(e: &Engine<B>, a: &BenchArgs) -> Result<Value> {
    let c = &e.model.config;
    let batch = a.batch.unwrap_or(16);
    let reps = a.steps.unwrap_or(20);
    let max_len = a.max_len.min(c.max_position_embeddings.saturating_sub(2)).max(1);
    let seqs = random_seqs(a.seed, batch, a.min_len.min(max_len), max_len, c.vocab_size);
    let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let rows: usize = lens.iter().sum();
    let mut starts = Vec::new();
    let mut acc = 0;
    for l in &lens {
        starts.push(acc);
        acc += l;
    }
    let plan = BatchPlan::new(&lens, &vec![0; batch], &starts);
    let ids: Vec<u32> = seqs.iter().flatten().copied().collect();
    let steer = Some(all_layer_steering(e));
    let steered = vec![steer.clone(); batch];
    let none: Vec<Option<Arc<Steering>>> = vec![None; batch];
    let spec = CaptureSpec { points: (0..=e.num_layers()).map(CapturePoint::Hidden).collect(), position: CapturePosition::Last };
    let mut out = Captured::new(batch, spec.points.len(), e.hidden_size(), Vec::new());
    let mut kv = e.backend.kv(1, rows, e.kv_dim())?;

    // Prefill: plain (no capture, no steering, no logits), steered, captured.
    let prefill = |variant: usize, kv: &mut B::Kv, out: &mut Captured| -> Result<f64> {
        let capture = (variant == 2).then(|| CaptureSink { spec: &spec, out, seq_row: (0..batch).collect() });
        let steering = if variant == 1 { &steered } else { &none };
        let t = Instant::now();
        e.forward(kv, Pass { ids: &ids, plan: &plan, phase: Phase::Prompt, steering, capture, logits_rows: &[] })?;
        e.backend.synchronize()?;
        Ok(t.elapsed().as_secs_f64())
    };
    note(a.quiet, &format!("prefill overheads: {batch} sequences, {rows} tokens, {reps} repeats x 3 variants"));
    for v in 0..3 {
        prefill(v, &mut kv, &mut out)?;
    }
    let mut pre = [Vec::new(), Vec::new(), Vec::new()];
    let mut progress = Progress::new("steer prefill", reps, "repeats", a.quiet);
    for r in 0..reps {
        // Rotate the order so no variant always runs first.
        for i in 0..3 {
            let v = (r + i) % 3;
            pre[v].push(prefill(v, &mut kv, &mut out)?);
        }
        progress.update(r + 1, "");
    }
    drop(kv);

    note(a.quiet, &format!("decode overheads: batch {batch}, {reps} repeats x 3 variants"));
    let mut plain = Decoder::new(e, &seqs, 2, None)?;
    let mut with_steer = Decoder::new(e, &seqs, 2, steer)?;
    let mut dec = [Vec::new(), Vec::new(), Vec::new()];
    let mut one_step = |v: usize, out: &mut Captured| -> Result<f64> {
        match v {
            0 => plain.step(e, 0, None, false),
            1 => with_steer.step(e, 0, None, false),
            _ => plain.step(e, 0, Some((&spec, out)), false),
        }
    };
    for v in 0..3 {
        one_step(v, &mut out)?;
    }
    let mut progress = Progress::new("steer decode", reps, "repeats", a.quiet);
    for r in 0..reps {
        for i in 0..3 {
            let v = (r + i) % 3;
            dec[v].push(one_step(v, &mut out)?);
        }
        progress.update(r + 1, "");
    }

    let summarize = |t: &[Vec<f64>; 3]| -> Value {
        let med = |v: &[f64]| median(&mut v.to_vec());
        let paired = |v: usize| median(&mut t[v].iter().zip(&t[0]).map(|(x, b)| x / b - 1.0).collect::<Vec<_>>());
        json!({
            "plain_ms_median": round(med(&t[0]) * 1e3, 3),
            "steered_ms_median": round(med(&t[1]) * 1e3, 3),
            "captured_ms_median": round(med(&t[2]) * 1e3, 3),
            "steering_overhead": round(med(&t[1]) / med(&t[0]) - 1.0, 4),
            "capture_overhead": round(med(&t[2]) / med(&t[0]) - 1.0, 4),
            "steering_overhead_paired_median": round(paired(1), 4),
            "capture_overhead_paired_median": round(paired(2), 4),
            "steering_overhead_paired_ci95": ci95(&t[1], &t[0]),
            "capture_overhead_paired_ci95": ci95(&t[2], &t[0]),
        })
    };
    Ok(json!({
        "batch": batch,
        "prefill_tokens": rows,
        "repeats": reps,
        "steering": "add at every hidden-state index 0..=L, all positions",
        "capture": format!("every hidden-state index 0..={} at the last position", e.num_layers()),
        "prefill": summarize(&pre),
        "decode": summarize(&dec),
        "note": "overhead = median(variant) / median(plain) - 1; paired = median over repeats of variant/plain - 1 (same repeat, adjacent in time); ci95 = 2.5 and 97.5 percentiles of the paired median over 2,000 bootstrap resamples of the repeats",
    }))
}

fn loadavg() -> Value {
    match std::fs::read_to_string("/proc/loadavg") {
        Ok(s) => {
            let v: Vec<f64> = s.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect();
            json!(v)
        }
        Err(_) => Value::Null,
    }
}

fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! check {
            ($($name:tt),*) => { $( if std::is_x86_feature_detected!($name) { f.push($name); } )* };
        }
        check!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16", "avx512fp16");
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            f.push("neon");
        }
    }
    f
}

fn machine(on_cpu: bool) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo.lines().find(|l| l.starts_with(name)).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string())
    };
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
        .map(|kb| round(kb / (1u64 << 20) as f64, 1));
    let caches: Vec<String> = resid::backend::cpu::gemm::cpu0_caches().iter().map(|c| format!("L{} {} {}", c.level, c.kind, c.size)).collect();
    json!({
        "cpu": field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string()),
        "cpu_family_model": format!("{}/{}", field("cpu family").unwrap_or_default(), field("model\t").or_else(|| field("model ")).unwrap_or_default()),
        "logical_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "isa": cpu_features(),
        "f32_kernels": resid::backend::cpu::gemm::isa().name(),
        "bf16_kernels": resid::backend::cpu::gemm::has_bf16(),
        "decode_prefetch_rows": resid::backend::cpu::gemm::decode_prefetch_rows(),
        "panel_prefetch_rows": resid::backend::cpu::gemm::panel_prefetch_rows(),
        "k_chunks": resid::backend::cpu::gemm::k_chunks(),
        "next_unit_prefetch": resid::backend::cpu::gemm::next_unit_prefetch(),
        "caches_cpu0": caches,
        "memory_gib": mem_gib,
        "os": std::env::consts::OS,
        "backend_is_cpu": on_cpu,
    })
}
