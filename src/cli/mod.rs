//! The `resid` command line.
mod bench;
mod scaling;
mod selftest;
mod selftest_ops;
mod study;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use resid::engine::capture::{parse_points, CapturePoint, CapturePosition, CaptureSpec};
use resid::engine::steer::{parse_steer_targets, SteerOp, SteerPositions, Steering};
use resid::io::InputItem;

use resid::store::extract::{ExtractJob, ExtractOutput};
use resid::backend::Backend;
use resid::{Engine, GenerateOptions, Sampling};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "resid", version, about = "Read and steer the residual stream of language models")]
struct Cli {
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model directory and check its tensors.
    Info(InfoArgs),
    /// Capture hidden states for every line of a JSONL file.
    Extract(ExtractArgs),
    /// Generate text, optionally with steering.
    Generate(GenerateArgs),
    /// Per-point count, mean, covariance or Gram matrix, min and max over a whole input,
    /// without storing rows (resumable).
    Stats(StatsArgs),
    /// Check a sharded extraction directory against its manifest.
    Verify(VerifyArgs),
    /// Join the outputs of `extract --shard i/N` runs into one directory.
    Merge(MergeArgs),
    /// Check a device backend against the CPU backend on random models.
    Selftest(selftest::SelftestArgs),
    /// Measure extraction, decode and steering throughput against the machine's own limits.
    Bench(bench::BenchArgs),
    /// Concept vectors for one concept and language (vector file, optional llama.cpp GGUF).
    Vectors(study::VectorsArgs),
    /// Per-layer recognition accuracy of concept vectors on JSONL train/test pairs.
    Recognize(study::RecognizeArgs),
    /// The whole multilingual value-concept study: report, tables, figures.
    Study(study::StudyArgs),
    /// The cross-lingual control (steering) experiment on its own.
    Control(study::ControlOnlyArgs),
    /// Own-language accuracy of several finished paper-protocol studies (the paper's Fig. 2, Table 6).
    Compare(study::CompareArgs),
    /// An OpenAI-compatible HTTP server with per-request steering, probes and extraction.
    Serve(ServeArgs),
    /// Token ids and tokens of texts, as the model sees them (needs no weights).
    Tokenize(TokenizeArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["text", "input"])))]
struct TokenizeArgs {
    /// Model directory with config.json and tokenizer.json or qwen.tiktoken (weights are not read).
    #[arg(long)]
    model: PathBuf,
    /// Text to tokenize; repeat for several.
    #[arg(long)]
    text: Vec<String>,
    /// JSONL input as for `extract`: one object per line with `text` (or `ids`, shown as tokens).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Wrap each text in the model's chat template as `generate --chat` does (Qwen-chat:
    /// `make_context`'s ChatML).
    #[arg(long)]
    chat: bool,
    /// Print one JSON object per input, `{"ids": [...], "tokens": [...]}`.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to bind (loopback unless told otherwise).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to bind (0: any free port; the bound address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health (default: $RESID_API_KEY).
    #[arg(long, env = "RESID_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Load every .safetensors and .gguf vector file of DIR at start, named by its file stem.
    #[arg(long)]
    vectors: Option<PathBuf>,
    /// Rows (tokens) of one forward pass: decode steps, prefill chunks and extraction inputs.
    #[arg(long, default_value_t = 2048)]
    max_batch_tokens: usize,
    /// Sequences generating at once.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Requests waiting for admission beyond which the answer is 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Memory for the KV cache, which bounds the tokens of all running sequences together.
    #[arg(long, default_value_t = 1024)]
    kv_budget_mib: usize,
    /// Free each finished sequence's KV slots at once, instead of keeping its keys and values
    /// until the slots are needed for a prompt that begins with its tokens.
    #[arg(long)]
    no_prefix_cache: bool,
    /// The model's name in the API (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Largest request body in MiB (413 beyond).
    #[arg(long, default_value_t = 32)]
    max_body_mib: usize,
    /// Largest `n` (choices per prompt).
    #[arg(long, default_value_t = 16)]
    max_n: usize,
    /// Seconds a request may take at most (504 beyond); a request's `timeout` may ask for less.
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    /// Seconds a client has to send its request headers, and then its body.
    #[arg(long, default_value_t = 30.0)]
    client_timeout: f64,
    /// Seconds SIGTERM waits for running requests before stopping them.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Hugging Face model directory (config.json, tokenizer.json, *.safetensors).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// CPU arithmetic: f32 (default: HF parity within 1e-4) or bf16 (bf16 GEMM inputs, f32
    /// accumulation; used only where it is faster than f32 on this CPU, see `resid info`).
    /// Recorded in every output's metadata. CUDA always computes in bf16.
    #[arg(long, env = "RESID_CPU_COMPUTE", value_parser = parse_compute)]
    pub(crate) compute: Option<resid::backend::cpu::Compute>,
}

fn parse_compute(s: &str) -> std::result::Result<resid::backend::cpu::Compute, String> {
    s.parse()
}

impl ModelArgs {
    /// Sets the CPU compute type before a model is loaded (it is chosen per process), and says
    /// on stderr when bf16 was asked for where it does not run.
    pub(crate) fn apply_compute(&self) -> Result<()> {
        if let Some(note) = resid::backend::any::choose_compute(&self.device, self.compute)? {
            eprintln!("note: {note}");
        }
        Ok(())
    }
}

/// How a run treats an output that another run is writing.
#[derive(Args)]
pub(crate) struct LockArgs {
    /// If another run holds the output, wait for it to finish instead of failing at once (exit 6).
    #[arg(long)]
    pub(crate) wait_lock: bool,
}

#[derive(Args)]
struct VerifyArgs {
    /// Directory written by `resid extract --out DIR`.
    dir: PathBuf,
}

#[derive(Args)]
struct MergeArgs {
    /// New directory for the merged output.
    #[arg(long)]
    out: PathBuf,
    /// The part directories (any order).
    #[arg(required = true)]
    parts: Vec<PathBuf>,
    #[command(flatten)]
    lock: LockArgs,
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SteerArgs {
    /// Steering vector file: safetensors with f32 `directions` [L+1, hidden].
    #[arg(long)]
    steer: Option<PathBuf>,
    /// Steering coefficient.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    coef: f32,
    /// Hidden-state indices to steer (steering at l changes the output of block l-1), e.g. 10-15.
    #[arg(long)]
    steer_layers: Option<String>,
    /// add (h + c·v) or piecewise (RepE: h + c·v·sign(⟨h,c·v⟩) = h + |c|·v·sign(⟨h,v⟩)).
    #[arg(long, default_value = "add")]
    steer_op: String,
    /// Rescale each steered row back to its norm before steering.
    #[arg(long)]
    steer_preserve_norm: bool,
    /// Which tokens to steer: all, prompt or generated.
    #[arg(long, default_value = "all")]
    steer_positions: String,
}

#[derive(Args)]
struct ExtractArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL input: one object per line with `text` (or `ids`).
    #[arg(long)]
    input: PathBuf,
    /// Output: a `.safetensors` file, or a directory for crash-safe, resumable output in
    /// numbered shards with a manifest (rerun the same command to resume).
    #[arg(long)]
    out: PathBuf,
    /// Process only part i of N of the input (contiguous, deterministic), e.g. 0/4; join the
    /// parts with `resid merge`. Needs a directory output.
    #[arg(long)]
    shard: Option<String>,
    /// Sequences per output shard (directory output).
    #[arg(long, default_value_t = 1024)]
    shard_sequences: usize,
    /// Token position to capture: last, mean or all.
    #[arg(long, default_value = "last")]
    position: String,
    /// Hidden-state indices (HF output_hidden_states), e.g. 0,5,10-20; `raw` adds the last block's
    /// pre-norm output (recorded as -1). Default: all, 0..=L.
    #[arg(long)]
    layers: Option<String>,
    /// Token budget of one packed batch.
    #[arg(long, default_value_t = resid::engine::DEFAULT_BATCH_TOKENS)]
    batch_tokens: usize,
    /// Element type of the captured tensor: f32, f16 or bf16 (half the disk; rounded to
    /// nearest even; a value beyond f16's range is an error naming its line and layer).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    steer: SteerArgs,
    #[command(flatten)]
    lock: LockArgs,
}

#[derive(Args)]
struct StatsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL input: `text` (or `ids`) per line; with --pairs, `pos` and `neg` per line.
    #[arg(long)]
    input: PathBuf,
    /// Output `.safetensors`: `count`, `mean`, `cov`, `gram`, `min`, `max`, each with a
    /// leading points axis, in f64. The resumable state lives beside it in `OUT.state`.
    #[arg(long)]
    out: PathBuf,
    /// Capture points, as for `extract` (default: all, 0..=L).
    #[arg(long)]
    layers: Option<String>,
    /// Rows: every token (all), the last token or the mean over tokens of each sequence.
    #[arg(long, default_value = "all")]
    position: String,
    /// Statistics besides count, min and max: mean, cov (n − 1, as numpy.cov), gram (Σ x xᵀ).
    #[arg(long, default_value = "mean,cov")]
    stats: String,
    /// Rows are the differences pos − neg of each pair's rows (for `vectors --from-stats`).
    #[arg(long)]
    pairs: bool,
    /// Token budget of one packed batch (the results do not depend on it).
    #[arg(long, default_value_t = resid::engine::DEFAULT_BATCH_TOKENS)]
    batch_tokens: usize,
    /// Seconds between checkpoints of the state.
    #[arg(long, default_value_t = 60.0)]
    checkpoint_seconds: f64,
    /// Stop after this many input sequences (pairs count two), checkpointed; rerun to go on.
    #[arg(long)]
    stop_after: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    lock: LockArgs,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt text; repeat to generate several prompts as one batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sample with this temperature.
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[arg(long)]
    top_p: Option<f32>,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Wrap the prompt in the model's own chat template.
    #[arg(long)]
    chat: bool,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object per prompt with `tokens` and `text`.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    steer: SteerArgs,
}

/// Runs the CLI; returns the process exit code.
pub fn run() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    if let Some(n) = cli.threads {
        if n == 0 {
            eprintln!("error: --threads must be at least 1");
            return 2;
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
            eprintln!("error: cannot start {n} threads: {e}");
            return 1;
        }
    }
    // The server drains on SIGTERM itself; every other command stops between batches.
    if !matches!(cli.command, Command::Serve(_)) {
        if let Err(e) = resid::interrupt::install_handlers() {
            eprintln!("error: {e}");
            return 1;
        }
    }
    let result = match cli.command {
        Command::Info(a) => info(a),
        Command::Extract(a) => extract(a),
        Command::Generate(a) => generate(a),
        Command::Selftest(a) => selftest::run(a),
        Command::Stats(a) => stats(a),
        Command::Verify(a) => verify(a),
        Command::Merge(a) => merge(a),
        Command::Bench(a) => bench::run(a),
        Command::Vectors(a) => study::vectors(a),
        Command::Recognize(a) => study::recognize(a),
        Command::Study(a) => study::study(a),
        Command::Control(a) => study::control(a),
        Command::Compare(a) => study::compare(a),
        Command::Serve(a) => serve(a),
        Command::Tokenize(a) => tokenize(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            e.chain().find_map(|c| c.downcast_ref::<resid::Error>()).map_or(1, resid::Error::exit_code)
        }
    }
}

pub(crate) use resid::backend::any::AnyEngine;
pub(crate) use resid::with_engine;

pub(crate) fn load(args: &ModelArgs) -> Result<AnyEngine> {
    args.apply_compute()?;
    load_backend_engine(&args.device, &args.model)
}

/// Loads the model in `dir` on the backend `device` names.
pub(crate) fn load_backend_engine(device: &str, dir: &Path) -> Result<AnyEngine> {
    let (engine, load) = AnyEngine::load(device, dir)?;
    if let Some(l) = load {
        eprintln!(
            "{}: weights uploaded in {:.1} s; device memory in use {:.2} GiB",
            l.backend,
            l.seconds,
            l.memory_used as f64 / (1u64 << 30) as f64
        );
    }
    Ok(engine)
}

fn steering<B: Backend>(engine: &Engine<B>, a: &SteerArgs) -> Result<Option<Arc<Steering>>> {
    let Some(path) = &a.steer else {
        if a.steer_layers.is_some() {
            bail!(resid::Error::input("--steer-layers needs --steer FILE"));
        }
        return Ok(None);
    };
    let layers = a
        .steer_layers
        .as_deref()
        .ok_or_else(|| resid::Error::input("--steer needs --steer-layers (e.g. --steer-layers 10-15)"))?;
    let g = engine.steer_geometry();
    let targets = parse_steer_targets(layers, g).context("--steer-layers")?;
    let s = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let t = resid::repe::gguf::read_control_vector(path, g.num_layers, g.hidden)?;
        Steering::for_targets(Arc::new(t.data), &targets, g, &path.display().to_string(), |_| None)?
    } else {
        resid::io::read_steering_file(path, &targets, g)?
    };
    let s = Steering {
        coef: a.coef,
        op: a.steer_op.parse::<SteerOp>()?,
        preserve_norm: a.steer_preserve_norm,
        positions: a.steer_positions.parse::<SteerPositions>()?,
        ..s
    };
    s.validate_for(g).map_err(|e| anyhow!(e).context(format!("{}", path.display())))?;
    Ok(Some(Arc::new(s)))
}

fn info(a: InfoArgs) -> Result<()> {
    let any = load(&a.model)?;
    with_engine!(&any, engine => info_on(engine, &a))
}

fn info_on<B: Backend>(engine: &Engine<B>, a: &InfoArgs) -> Result<()> {
    let summary = engine.summary();
    if a.json {
        println!("{summary}");
    } else {
        for (k, v) in summary.as_object().into_iter().flatten() {
            println!("{k:>20}: {}", v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()));
        }
    }
    Ok(())
}

fn extract(a: ExtractArgs) -> Result<()> {
    let position: CapturePosition = a.position.parse()?;
    let dtype: resid::io::OutputDtype = a.dtype.parse()?;
    let part = a.shard.as_deref().map(resid::store::parse_part).transpose()?;
    let is_file = a.out.extension().is_some_and(|e| e == "safetensors");
    if is_file && part.is_some() {
        bail!(resid::Error::input("--shard needs a directory output (--out DIR), not a single .safetensors file"));
    }
    let input_bytes = std::fs::read(&a.input).map_err(|e| resid::Error::io(&a.input, e))?;
    let items = resid::io::parse_jsonl(&input_bytes, &a.input.display().to_string())?;
    // Locked before the model loads, so that a second writer fails at once.
    let out = ExtractOutput::open(&a.out, a.lock.wait_lock)?;
    let any = load(&a.model)?;
    with_engine!(&any, engine => extract_on(engine, &a, position, dtype, part, items, &input_bytes, &out))
}

/// A progress bar over input sequences, with tokens/s in its message (hidden when `quiet`).
fn sequence_bar(quiet: bool, label: &str) -> Result<ProgressBar> {
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    bar.set_style(
        ProgressStyle::with_template(&format!("{{spinner}} {label} [{{bar:30}}] {{pos}}/{{len}} seqs {{msg}} ({{elapsed}} < {{eta}})"))
            .map_err(|e| anyhow!("progress template: {e}"))?
            .progress_chars("=> "),
    );
    Ok(bar)
}

/// The capture points `--layers` names (default: every hidden-state index 0..=L).
pub(crate) fn capture_points(layers: Option<&str>, n_layers: usize) -> Result<Vec<CapturePoint>> {
    Ok(match layers {
        None => (0..=n_layers).map(CapturePoint::Hidden).collect(),
        Some(list) => parse_points(list, n_layers).context("--layers")?,
    })
}

#[allow(clippy::too_many_arguments)]
fn extract_on<B: Backend>(
    engine: &Engine<B>,
    a: &ExtractArgs,
    position: CapturePosition,
    dtype: resid::io::OutputDtype,
    part: Option<(usize, usize)>,
    items: Vec<InputItem>,
    input_bytes: &[u8],
    out: &ExtractOutput,
) -> Result<()> {
    let n_layers = engine.num_layers();
    let points = capture_points(a.layers.as_deref(), n_layers)?;
    let spec = CaptureSpec { points, position };
    spec.validate(n_layers)?;
    engine.capture_width(&spec).context("--layers")?;
    let steer = steering(engine, &a.steer)?;
    let seqs = engine.input_ids(items, |i| format!("{}: line {}", a.input.display(), i + 1))?;
    let job = ExtractJob {
        seqs: &seqs,
        spec: &spec,
        steering_description: Steering::describe(steer.as_deref(), a.steer.steer.as_deref()),
        steering: steer,
        steering_file_sha256: a.steer.steer.as_ref().map(|p| resid::store::sha256_file(p)).transpose()?,
        batch_tokens: a.batch_tokens,
        input_name: a.input.display().to_string(),
        input_sha256: resid::store::sha256_hex(input_bytes),
        part,
        shard_sequences: a.shard_sequences,
        dtype,
    };
    let bar = sequence_bar(a.quiet, "extract")?;
    let s = out.write(engine, &job, &mut |p| {
        bar.set_length(p.total_sequences as u64);
        bar.set_position(p.done_sequences as u64);
        bar.set_message(format!("{:.0} tok/s", p.tokens as f64 / p.seconds.max(1e-9)));
    });
    bar.finish_and_clear();
    let s = s?;
    if a.quiet {
        return Ok(());
    }
    if !out.is_sharded() {
        // Writing is streamed between batches; the extraction time leaves it out.
        let extract_seconds = (s.seconds - s.write_seconds).max(1e-9);
        eprintln!(
            "wrote {} ({} sequences, {} tokens; extraction {:.2} s, {:.0} tokens/s; with writing {:.1} s)",
            a.out.display(),
            s.sequences,
            s.tokens,
            extract_seconds,
            s.tokens as f64 / extract_seconds,
            s.seconds,
        );
    } else if s.already_complete {
        eprintln!("{}: already complete ({} shards); nothing to do", a.out.display(), s.shards);
    } else {
        let kept = if s.shards_kept > 0 { format!("; {} complete shards kept from an earlier run", s.shards_kept) } else { String::new() };
        eprintln!(
            "wrote {} ({} shards, sequences {}..{} of {}, {} tokens; {:.1} s{kept})",
            a.out.display(),
            s.shards,
            s.range_start,
            s.range_end,
            seqs.len(),
            s.tokens,
            s.seconds
        );
    }
    Ok(())
}

fn stats(a: StatsArgs) -> Result<()> {
    use resid::store::stats::StatsSelection;
    let position: CapturePosition = a.position.parse()?;
    let selection: StatsSelection = a.stats.parse()?;
    if !(a.checkpoint_seconds.is_finite() && a.checkpoint_seconds >= 0.0) {
        bail!(resid::Error::input(format!("--checkpoint-seconds {}: must be a non-negative number", a.checkpoint_seconds)));
    }
    if a.out.extension().is_none_or(|e| e != "safetensors") {
        bail!(resid::Error::input(format!("--out {}: expected a .safetensors file", a.out.display())));
    }
    resid::io::check_writable(&a.out)?;
    let input_bytes = std::fs::read(&a.input).map_err(|e| resid::Error::io(&a.input, e))?;
    let name = a.input.display().to_string();
    // With pairs: the sequences pos, neg of every pair in turn, named by the pair's line.
    let (items, origins): (Vec<InputItem>, Vec<String>) = if a.pairs {
        let pairs = resid::repe::data::load_jsonl(&a.input)?;
        pairs.into_iter().flat_map(|p| [(InputItem::Text(p.pos), p.origin.clone()), (InputItem::Text(p.neg), p.origin)]).unzip()
    } else {
        let items = resid::io::parse_jsonl(&input_bytes, &name)?;
        let origins = (0..items.len()).map(|i| format!("{name}: line {}", i + 1)).collect();
        (items, origins)
    };
    let any = load(&a.model)?;
    with_engine!(&any, engine => stats_on(engine, &a, position, selection, items, &origins, &input_bytes))
}

fn stats_on<B: Backend>(
    engine: &Engine<B>,
    a: &StatsArgs,
    position: CapturePosition,
    stats: resid::store::stats::StatsSelection,
    items: Vec<InputItem>,
    origins: &[String],
    input_bytes: &[u8],
) -> Result<()> {
    let spec = CaptureSpec { points: capture_points(a.layers.as_deref(), engine.num_layers())?, position };
    spec.validate(engine.num_layers())?;
    let seqs = engine.input_ids(items, |i| origins[i].clone())?;
    let origin = |i: usize| origins.get(if a.pairs { 2 * i } else { i }).cloned().unwrap_or_default();
    let job = resid::store::stats::StatsJob {
        seqs: &seqs,
        spec: &spec,
        stats,
        pairs: a.pairs,
        batch_tokens: a.batch_tokens,
        input_name: a.input.display().to_string(),
        input_sha256: resid::store::sha256_hex(input_bytes),
        origin: &origin,
        checkpoint_seconds: a.checkpoint_seconds,
        stop_after: a.stop_after,
    };
    let bar = sequence_bar(a.quiet, "stats")?;
    let s = resid::store::stats::run(engine, &job, &a.out, a.lock.wait_lock, &mut |p| {
        bar.set_length(p.total_sequences as u64);
        bar.set_position(p.done_sequences as u64);
        bar.set_message(format!("{:.0} tok/s", p.tokens as f64 / p.seconds.max(1e-9)));
    });
    bar.finish_and_clear();
    let s = s?;
    if a.quiet {
        return Ok(());
    }
    let resumed = if s.resumed_from > 0 { format!("; resumed at sequence {}", s.resumed_from) } else { String::new() };
    if s.complete {
        eprintln!("wrote {} ({} rows per point over {} sequences, {} tokens computed in {:.1} s{resumed})", a.out.display(), s.rows, s.sequences, s.tokens_computed, s.seconds);
    } else {
        eprintln!(
            "stopped after {} rows per point; state checkpointed in {} (rerun the same command to go on{resumed})",
            s.rows,
            resid::store::stats::state_path(&a.out).display()
        );
    }
    Ok(())
}

fn verify(a: VerifyArgs) -> Result<()> {
    let m = resid::store::verify(&a.dir)?;
    println!(
        "{}: ok ({} shards, sequences {}..{} of {}, all checksums match)",
        a.dir.display(),
        m.shards.len(),
        m.range_start,
        m.range_end,
        m.input_sequences
    );
    Ok(())
}

fn merge(a: MergeArgs) -> Result<()> {
    let m = resid::store::merge(&a.out, &a.parts, a.lock.wait_lock)?;
    println!("{}: merged {} parts into {} shards covering all {} sequences", a.out.display(), a.parts.len(), m.shards.len(), m.input_sequences);
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    let sampling = match (a.greedy, a.temperature) {
        (false, Some(t)) => {
            if !(t.is_finite() && t >= 0.0) {
                bail!(resid::Error::input(format!("--temperature {t}: must be a non-negative number")));
            }
            let top_p = a.top_p.unwrap_or(1.0);
            if !(top_p > 0.0 && top_p <= 1.0) {
                bail!(resid::Error::input(format!("--top-p {top_p}: must be in (0, 1]")));
            }
            Sampling::Sample { temperature: t, top_k: a.top_k.unwrap_or(0), top_p, seed: a.seed }
        }
        (false, None) if a.top_p.is_some() || a.top_k.is_some() => {
            bail!(resid::Error::input("--top-p and --top-k need --temperature"))
        }
        _ => Sampling::Greedy,
    };
    let any = load(&a.model)?;
    with_engine!(&any, engine => generate_on(engine, &a, sampling))
}

fn generate_on<B: Backend>(engine: &Engine<B>, a: &GenerateArgs, sampling: Sampling) -> Result<()> {
    let tok = engine
        .model
        .tokenizer
        .as_ref()
        .ok_or_else(|| resid::Error::model(format!("{}: no tokenizer.json; generate needs one", a.model.model.display())))?;
    let steer = steering(engine, &a.steer)?;
    let mut prompts = Vec::with_capacity(a.prompt.len());
    for (i, p) in a.prompt.iter().enumerate() {
        let ids = if a.chat { tok.encode_chat(&[("user", p)]) } else { tok.encode(p) }.with_context(|| format!("prompt {}", i + 1))?;
        prompts.push(ids);
    }
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_tokens: if a.ignore_eos { Vec::new() } else { resid::repe::control::stop_tokens(engine) },
    };
    let out = engine.generate(&prompts, &vec![steer; prompts.len()], &opts)?;
    for (g, p) in out.iter().zip(&prompts) {
        let shown: Vec<u32> = g.tokens.iter().copied().filter(|t| !opts.stop_tokens.contains(t)).collect();
        let text = tok.decode(&shown)?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "tokens": g.tokens,
                    "text": text,
                    "prompt_tokens": p.len(),
                    "finish_reason": match g.finish { resid::FinishReason::Stop => "stop", resid::FinishReason::Length => "length" },
                })
            );
        } else {
            println!("{text}");
        }
    }
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let (items, origin): (Vec<InputItem>, String) = match &a.input {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| resid::Error::io(path, e))?;
            (resid::io::parse_jsonl(&bytes, &path.display().to_string())?, format!("{}: line", path.display()))
        }
        None => (a.text.iter().cloned().map(InputItem::Text).collect(), "--text".to_owned()),
    };
    let (_, tok) = resid::model::open_tokenizer(&a.model)?;
    // Everything is tokenized before anything is printed: an error leaves no partial output.
    let results = items
        .iter()
        .enumerate()
        .map(|(i, item)| tok.tokenize(item, a.chat, &format!("{origin} {}", i + 1)))
        .collect::<resid::Result<Vec<_>>>()?;
    let mut out = String::new();
    for (i, t) in results.iter().enumerate() {
        if a.json {
            out += &serde_json::to_string(t)?;
            out.push('\n');
            continue;
        }
        out += &format!("{origin} {}: {} tokens\n", i + 1, t.ids.len());
        for (id, token) in t.ids.iter().zip(&t.tokens) {
            // Special tokens decode to nothing: they show as themselves.
            let text = Some(tok.decode(&[*id])?).filter(|t| !t.is_empty()).unwrap_or_else(|| token.clone());
            out += &format!("{id:>8}  {:<24} {}\n", serde_json::to_string(token)?, serde_json::to_string(&text)?);
        }
    }
    use std::io::Write;
    std::io::stdout().lock().write_all(out.as_bytes()).context("writing to stdout")?;
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    for (flag, v) in [("--request-timeout", a.request_timeout), ("--client-timeout", a.client_timeout), ("--drain-timeout", a.drain_timeout)] {
        if !(v.is_finite() && v > 0.0 && v <= 1e6) {
            bail!(resid::Error::input(format!("{flag} {v}: must be a positive number of seconds")));
        }
    }
    let name = match &a.served_model_name {
        Some(n) => n.clone(),
        None => a.model.model.file_name().map_or_else(|| a.model.model.display().to_string(), |n| n.to_string_lossy().into_owned()),
    };
    let mut cfg = resid::server::ServeConfig::new(name);
    cfg.host = a.host.clone();
    cfg.port = a.port;
    cfg.api_key = a.api_key.clone().filter(|k| !k.is_empty());
    cfg.vectors_dir = a.vectors.clone();
    cfg.max_batch_tokens = a.max_batch_tokens;
    cfg.max_running = a.max_running;
    cfg.max_queue = a.max_queue;
    cfg.kv_budget_mib = a.kv_budget_mib;
    cfg.prefix_cache = !a.no_prefix_cache;
    cfg.max_body_bytes = a.max_body_mib.saturating_mul(1 << 20);
    cfg.max_n = a.max_n;
    cfg.request_timeout = a.request_timeout;
    cfg.client_timeout = a.client_timeout;
    cfg.drain_timeout = a.drain_timeout;
    let served = cfg.served_model_name.clone();
    cfg.on_ready = Some(Box::new(move |addr| eprintln!("resid serve: `{served}` listening on http://{addr}")));
    match load(&a.model)? {
        AnyEngine::Cpu(e) => resid::server::serve(e, cfg)?,
        AnyEngine::Cuda(e) => resid::server::serve(*e, cfg)?,
    }
    eprintln!("resid serve: stopped");
    Ok(())
}
