//! The `resid` command line.
mod bench;
mod input;
mod scaling;
mod selftest;
mod selftest_ops;
mod study;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use resid::engine::capture::{CapturePoint, CapturePosition, CaptureSpec};
use resid::engine::steer::{parse_layer_list, SteerOp, SteerPositions, Steering};
use resid::io::{check_writable, read_directions, SafetensorsStream, StreamDtype, StreamTensor};
use resid::backend::cuda::{parse_device, CudaBackend};
use resid::backend::Backend;
use resid::{CpuBackend, Engine, GenerateOptions, Sampling};
use std::collections::HashMap;
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
}

#[derive(Args)]
pub(crate) struct ModelArgs {
    /// Hugging Face model directory (config.json, tokenizer.json, *.safetensors).
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
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
    /// add (h + c·v) or piecewise (h + c·v·sign(⟨h,v⟩)).
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
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    steer: SteerArgs,
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
    let result = match cli.command {
        Command::Info(a) => info(a),
        Command::Extract(a) => extract(a),
        Command::Generate(a) => generate(a),
        Command::Selftest(a) => selftest::run(a),
        Command::Verify(a) => verify(a),
        Command::Merge(a) => merge(a),
        Command::Bench(a) => bench::run(a),
        Command::Vectors(a) => study::vectors(a),
        Command::Recognize(a) => study::recognize(a),
        Command::Study(a) => study::study(a),
        Command::Control(a) => study::control(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            e.chain().find_map(|c| c.downcast_ref::<resid::Error>()).map_or(1, resid::Error::exit_code)
        }
    }
}

/// A loaded model on whichever backend `--device` named.
// One per process: boxing the CPU engine would only add an indirection to every pass.
#[allow(clippy::large_enum_variant)]
pub(crate) enum AnyEngine {
    Cpu(Engine<CpuBackend>),
    Cuda(Box<Engine<CudaBackend>>),
}

/// Runs `$body` with `$e` bound to the engine, whatever its backend.
macro_rules! with_engine {
    ($any:expr, $e:ident => $body:expr) => {
        match $any {
            $crate::cli::AnyEngine::Cpu($e) => $body,
            $crate::cli::AnyEngine::Cuda($e) => {
                let $e = &**$e;
                $body
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use with_engine;

pub(crate) fn load(args: &ModelArgs) -> Result<AnyEngine> {
    load_backend_engine(&args.device, &args.model)
}

/// Loads the model in `dir` on the backend `device` names.
pub(crate) fn load_backend_engine(device: &str, dir: &Path) -> Result<AnyEngine> {
    let device = parse_device(device)?;
    let model = resid::model::ModelDir::open(dir)?;
    Ok(match device {
        None => AnyEngine::Cpu(Engine::new(CpuBackend, model)?),
        Some(ordinal) => {
            let started = std::time::Instant::now();
            let backend = CudaBackend::new(ordinal)?;
            let engine = Engine::new(backend, model)?;
            engine.backend.synchronize()?;
            eprintln!(
                "{}: weights uploaded in {:.1} s; device memory in use {:.2} GiB",
                Backend::name(&engine.backend),
                started.elapsed().as_secs_f64(),
                engine.backend.memory_used()? as f64 / (1u64 << 30) as f64
            );
            AnyEngine::Cuda(Box::new(engine))
        }
    })
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
    let layers = parse_layer_list(layers)?;
    let (n_layers, hidden) = (engine.num_layers(), engine.hidden_size());
    let t = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        resid::repe::gguf::read_control_vector(path, n_layers, hidden)?
    } else {
        read_directions(path, n_layers, hidden)?
    };
    let s = Steering {
        directions: Arc::new(t.data),
        hidden,
        layers,
        coef: a.coef,
        op: a.steer_op.parse::<SteerOp>()?,
        preserve_norm: a.steer_preserve_norm,
        positions: a.steer_positions.parse::<SteerPositions>()?,
    };
    s.validate(n_layers, hidden).map_err(|e| anyhow!(e).context(format!("{}", path.display())))?;
    Ok(Some(Arc::new(s)))
}

fn steering_description(s: &Option<Arc<Steering>>, a: &SteerArgs) -> String {
    match s {
        None => "none".into(),
        Some(s) => serde_json::json!({
            "file": a.steer.as_ref().map(|p| p.display().to_string()),
            "coef": s.coef,
            "layers": s.layers,
            "op": s.op.name(),
            "preserve_norm": s.preserve_norm,
            "positions": s.positions.name(),
        })
        .to_string(),
    }
}

fn info(a: InfoArgs) -> Result<()> {
    let any = load(&a.model)?;
    with_engine!(&any, engine => info_on(engine, &a))
}

fn info_on<B: Backend>(engine: &Engine<B>, a: &InfoArgs) -> Result<()> {
    let m = &engine.model;
    let c = &m.config;
    let summary = serde_json::json!({
        "model": m.dir.display().to_string(),
        "architecture": c.architecture,
        "family": c.family.name(),
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "context": c.max_position_embeddings,
        "dtype": m.store.dominant_dtype(),
        "parameters": m.parameter_count(),
        "tie_word_embeddings": c.tie_word_embeddings,
        "tensor_check": format!("ok: all {} expected tensors present with expected dtypes and shapes", m.spec.expected_tensors(c).len()),
        "tokenizer": m.tokenizer.is_some(),
        "backend": engine.backend.name(),
    });
    if a.json {
        println!("{summary}");
    } else {
        for (k, v) in summary.as_object().into_iter().flatten() {
            println!("{k:>20}: {}", v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()));
        }
    }
    Ok(())
}

fn tokenize_items<B: Backend>(engine: &Engine<B>, items: Vec<input::InputItem>, input: &Path) -> Result<Vec<Vec<u32>>> {
    let mut seqs = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("{}: line {}", input.display(), i + 1);
        let ids = match item {
            input::InputItem::Ids(ids) => ids,
            input::InputItem::Text(text) => engine
                .model
                .tokenizer
                .as_ref()
                .ok_or_else(|| resid::Error::input(format!("{at}: the model has no tokenizer.json; give `ids` instead of `text`")))?
                .encode(&text)
                .map_err(|e| resid::Error::input(format!("{at}: {e}")))?,
        };
        engine.check_tokens(&ids, &at)?;
        seqs.push(ids);
    }
    Ok(seqs)
}

fn extract(a: ExtractArgs) -> Result<()> {
    let position: CapturePosition = a.position.parse()?;
    let items = input::read_jsonl(&a.input)?;
    if a.out.extension().is_some_and(|e| e == "safetensors") {
        check_writable(&a.out)?;
    } else {
        std::fs::create_dir_all(&a.out).map_err(|e| resid::Error::io(&a.out, e))?;
    }
    let any = load(&a.model)?;
    with_engine!(&any, engine => extract_on(engine, &a, position, items))
}

fn extract_on<B: Backend>(engine: &Engine<B>, a: &ExtractArgs, position: CapturePosition, items: Vec<input::InputItem>) -> Result<()> {
    let n_layers = engine.num_layers();
    let points: Vec<CapturePoint> = match &a.layers {
        None => (0..=n_layers).map(CapturePoint::Hidden).collect(),
        Some(list) => {
            let mut points = Vec::new();
            let raw = list.split(',').any(|p| p.trim() == "raw");
            let rest: Vec<&str> = list.split(',').filter(|p| p.trim() != "raw").collect();
            if !rest.is_empty() {
                points.extend(parse_layer_list(&rest.join(","))?.into_iter().map(CapturePoint::Hidden));
            }
            if raw {
                points.push(CapturePoint::LastBlockRaw);
            }
            points
        }
    };
    let spec = CaptureSpec { points, position };
    spec.validate(n_layers)?;
    let steer = steering(engine, &a.steer)?;
    let seqs = tokenize_items(engine, items, &a.input)?;
    let total_tokens: usize = seqs.iter().map(Vec::len).sum();

    let sharded = a.out.extension().is_none_or(|e| e != "safetensors");
    if !sharded && a.shard.is_some() {
        bail!(resid::Error::input("--shard needs a directory output (--out DIR), not a single .safetensors file"));
    }
    let (range_start, range_end) = match &a.shard {
        Some(p) => {
            let (i, n) = resid::store::parse_part(p)?;
            resid::store::part_range(seqs.len(), i, n)
        }
        None => (0, seqs.len()),
    };
    let part_tokens: usize = seqs[range_start..range_end].iter().map(Vec::len).sum();
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new((range_end - range_start) as u64) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} extract [{bar:30}] {pos}/{len} seqs {msg} ({elapsed} < {eta})")
            .map_err(|e| anyhow!("progress template: {e}"))?
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let mut done_tokens = 0usize;
    let mut write_seconds = 0.0f64;
    let per_seq = vec![steer.clone(); seqs.len()];
    let meta = |sequences: usize, tokens: usize| -> HashMap<String, String> {
        [
            ("model", engine.model.dir.display().to_string()),
            ("architecture", engine.model.config.architecture.clone()),
            ("position", position.name().to_string()),
            ("dtype", "float32".to_string()),
            ("weights_dtype", engine.model.store.dominant_dtype()),
            ("steering", steering_description(&steer, &a.steer)),
            ("layers_note", "HF output_hidden_states indices; -1 = raw pre-norm output of the last block".to_string()),
            ("sequences", sequences.to_string()),
            ("tokens", tokens.to_string()),
            ("resid_version", env!("CARGO_PKG_VERSION").to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    // Writes sequences `range` into one safetensors file, batch after batch (memory holds one
    // batch); returns the file's SHA-256. On any error the partial file is removed.
    let mut run = |range: std::ops::Range<usize>, path: &Path, index: bool| -> Result<String> {
        let seqs_here = &seqs[range.clone()];
        let lens: Vec<usize> = seqs_here.iter().map(Vec::len).collect();
        let tokens: usize = lens.iter().sum();
        let rows = if position == CapturePosition::All { tokens } else { seqs_here.len() };
        let ids = layer_ids(&spec);
        let mut declared = vec![StreamTensor { name: "layers".into(), dtype: StreamDtype::I64, shape: vec![ids.len()] }];
        let offsets: Vec<i64> = resid::engine::capture::row_offsets(&lens).into_iter().map(|o| o as i64).collect();
        if position == CapturePosition::All {
            declared.push(StreamTensor { name: "offsets".into(), dtype: StreamDtype::I64, shape: vec![offsets.len()] });
        }
        if index {
            declared.push(StreamTensor { name: "index".into(), dtype: StreamDtype::I64, shape: vec![range.len()] });
        }
        declared.push(StreamTensor { name: "hidden_states".into(), dtype: StreamDtype::F32, shape: vec![rows, spec.points.len(), engine.hidden_size()] });
        let mut file = SafetensorsStream::create(path, declared, &meta(range.len(), tokens))?;
        file.write_i64(&ids)?;
        if position == CapturePosition::All {
            file.write_i64(&offsets)?;
        }
        if index {
            file.write_i64(&range.clone().map(|i| i as i64).collect::<Vec<_>>())?;
        }
        engine.extract_batches(seqs_here, &spec, &per_seq[range.clone()], a.batch_tokens, |batch, captured| {
            if let Some(i) = captured.data.iter().position(|v| !v.is_finite()) {
                let row = i / (captured.points * captured.hidden);
                let seq = if position == CapturePosition::All { captured.offsets.iter().rposition(|&o| o <= row).unwrap_or(0) } else { row };
                return Err(resid::Error::input(format!(
                    "{}: line {}: NaN or Inf in captured activations at layer {:?}; nothing written for it",
                    a.input.display(),
                    range.start + batch.start + seq + 1,
                    spec.points[(i / captured.hidden) % captured.points]
                )));
            }
            let write_start = std::time::Instant::now();
            file.write_f32(&captured.data)?;
            write_seconds += write_start.elapsed().as_secs_f64();
            let t: usize = lens[batch.clone()].iter().sum();
            done_tokens += t;
            bar.inc(batch.len() as u64);
            bar.set_message(format!("{:.0} tok/s", done_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)));
            Ok(())
        })?;
        let finish_start = std::time::Instant::now();
        let sha256 = file.finish()?;
        write_seconds += finish_start.elapsed().as_secs_f64();
        Ok(sha256)
    };

    if !sharded {
        run(0..seqs.len(), &a.out, false)?;
        bar.finish_and_clear();
        if !a.quiet {
            // Writing is streamed between batches; the extraction time leaves it out.
            let total = started.elapsed().as_secs_f64();
            let extract_seconds = (total - write_seconds).max(1e-9);
            eprintln!(
                "wrote {} ({} sequences, {} tokens; extraction {:.2} s, {:.0} tokens/s; with writing {:.1} s)",
                a.out.display(),
                seqs.len(),
                total_tokens,
                extract_seconds,
                total_tokens as f64 / extract_seconds,
                total,
            );
        }
        return Ok(());
    }

    // Directory output: numbered shards plus a manifest, resumable after any interruption.
    let dir = &a.out;
    std::fs::create_dir_all(dir).map_err(|e| resid::Error::io(dir, e))?;
    let input_bytes = std::fs::read(&a.input).map_err(|e| resid::Error::io(&a.input, e))?;
    let config_bytes = std::fs::read(engine.model.dir.join("config.json")).unwrap_or_default();
    let options = serde_json::json!({
        "model_config_sha256": resid::store::sha256_hex(&config_bytes),
        "architecture": engine.model.config.architecture,
        "parameters": engine.model.parameter_count(),
        "weights_dtype": engine.model.store.dominant_dtype(),
        "device": if a.model.device == "cpu" { "cpu" } else { "cuda" },
        "position": position.name(),
        "layers": layer_ids(&spec),
        "steering": steering_description(&steer, &a.steer),
        "steering_file_sha256": a.steer.steer.as_ref().map(|p| resid::store::sha256_file(p)).transpose()?,
    });
    let wanted = resid::store::Manifest {
        format: "resid-extract-v1".into(),
        input: a.input.display().to_string(),
        input_sha256: resid::store::sha256_hex(&input_bytes),
        input_sequences: seqs.len(),
        range_start,
        range_end,
        part: a.shard.clone(),
        options,
        shard_sequences: a.shard_sequences.max(1),
        shards: Vec::new(),
        complete: false,
    };
    let mut manifest = match resid::store::Manifest::load(dir)? {
        None => wanted,
        Some(existing) => {
            if let Some(why) = existing.incompatibility(&wanted) {
                bail!(resid::Error::input(format!("{}: refusing to mix results with the extraction already there: {why}", dir.display())));
            }
            existing
        }
    };
    if manifest.complete {
        if !a.quiet {
            eprintln!("{}: already complete ({} shards); nothing to do", dir.display(), manifest.shards.len());
        }
        return Ok(());
    }
    let resume = manifest.resume_point();
    bar.inc((resume - range_start) as u64);
    let mut start = resume;
    while start < range_end {
        let end = (start + manifest.shard_sequences).min(range_end);
        let file = format!("shard-{:05}.safetensors", manifest.shards.len());
        let sha256 = run(start..end, &dir.join(&file), true)?;
        manifest.shards.push(resid::store::ShardEntry { file, start, end, sha256 });
        manifest.complete = end == range_end;
        manifest.save(dir)?;
        start = end;
    }
    if range_end == range_start {
        manifest.complete = true;
        manifest.save(dir)?;
    }
    bar.finish_and_clear();
    if !a.quiet {
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "wrote {} ({} shards, sequences {range_start}..{range_end} of {}, {part_tokens} tokens; {:.1} s)",
            dir.display(),
            manifest.shards.len(),
            seqs.len(),
            secs
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
    let m = resid::store::merge(&a.out, &a.parts)?;
    println!("{}: merged {} parts into {} shards covering all {} sequences", a.out.display(), a.parts.len(), m.shards.len(), m.input_sequences);
    Ok(())
}

fn layer_ids(spec: &CaptureSpec) -> Vec<i64> {
    spec.points
        .iter()
        .map(|p| match p {
            CapturePoint::Hidden(l) => *l as i64,
            CapturePoint::LastBlockRaw => -1,
        })
        .collect()
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
        let text = if a.chat { tok.render_chat(p)? } else { p.clone() };
        // A rendered chat template already carries its special tokens.
        let ids = tok.encode_with(&text, !a.chat).with_context(|| format!("prompt {}", i + 1))?;
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
