//! `resid vectors`, `resid recognize`, `resid study` and `resid control`: the multilingual
//! value-concept study (see `resid::repe`).
use super::{load, with_engine, ModelArgs};
use anyhow::{bail, Result};
use clap::Args;
use resid::engine::steer::parse_layer_list;
use resid::repe::cache::HiddenCache;
use resid::repe::control::ControlSettings;
use resid::repe::data::{self, parse_list, Split};
use resid::repe::study::{self, ControlPlan, ProtocolSettings, StudyConfig};
use resid::repe::paper::{self, Protocol};
use resid::repe::vectors::Method;
use resid::backend::Backend;
use resid::Engine;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct PairArgs {
    /// Prompt template wrapping every stimulus; `{input}` is replaced by it (default: the
    /// family's with --protocol paper, "[INST] {input} [/INST] " for LLaMA-2-chat; `{input}` with
    /// --protocol resid).
    #[arg(long)]
    template: Option<String>,
    /// Seed (default: 1, the paper's `random.seed(1)`, with --protocol paper; 0 with resid).
    #[arg(long)]
    seed: Option<u64>,
    /// paper (the paper's code exactly) or resid (resid's own protocol). Default: paper for
    /// `study`, resid for `recognize`, `vectors` and `control`.
    #[arg(long)]
    protocol: Option<String>,
    /// The paper's model family for its settings (llama, qwen, bloomz, other); default: from
    /// config.json's model_type.
    #[arg(long)]
    family: Option<String>,
    /// Hidden-state cache directory (safetensors shards keyed by model, template and text).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Token budget of one packed batch.
    #[arg(long, default_value_t = resid::engine::DEFAULT_BATCH_TOKENS)]
    batch_tokens: usize,
    /// No progress bars or summaries on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
pub struct VectorsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// MVALUE data directory (DIR/{concept}/{concept}_{lang}.json); needs --concept and --lang.
    #[arg(long, conflicts_with = "train")]
    data: Option<PathBuf>,
    /// Build the vectors from `resid stats --pairs` statistics instead of rows (O(L·hidden²)
    /// memory however many pairs); --model names the model they came from (checked).
    #[arg(long, conflicts_with_all = ["data", "train", "gguf"])]
    from_stats: Option<PathBuf>,
    #[arg(long, requires = "data")]
    concept: Option<String>,
    #[arg(long, requires = "data")]
    lang: Option<String>,
    /// With --data: `train` uses the training split, `all` every pair; with --protocol paper
    /// also a number F (the paper's --split: a train fraction ≤ 0.8, or a train count ≥ 1).
    #[arg(long, default_value = "train")]
    split: String,
    /// JSONL pairs ({"pos", "neg"} per line) to fit on, instead of --data.
    #[arg(long)]
    train: Option<PathBuf>,
    /// JSONL pairs to report test accuracy on (with --train).
    #[arg(long, requires = "train")]
    test: Option<PathBuf>,
    /// mean-diff (default), pca or random.
    #[arg(long, default_value = "mean-diff")]
    method: String,
    /// Output vector file: safetensors `directions` [L+1, hidden], `signs`, `train_accuracy`, `scale`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write a llama.cpp control-vector GGUF (direction.k = hidden-state index k+1).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pairs: PairArgs,
    #[command(flatten)]
    lock: super::LockArgs,
}

#[derive(Args)]
pub struct RecognizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSONL training pairs ({"pos", "neg"} per line, optional "scenario" or "question").
    #[arg(long)]
    train: PathBuf,
    /// JSONL test pairs.
    #[arg(long)]
    test: PathBuf,
    /// mean-diff (default), pca or random.
    #[arg(long, default_value = "mean-diff")]
    method: String,
    /// Print one JSON object: layers, accuracy, best_layer, best_accuracy.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pairs: PairArgs,
}

#[derive(Args)]
pub struct ControlArgs {
    /// Concepts to steer (default: every concept of the study; `resid control`: required).
    /// Its own id: under the field's name it would share the id of `resid study --concepts`, and
    /// clap would fill both from either flag.
    #[arg(long = "control-concepts", id = "control_concepts")]
    concepts: Option<String>,
    /// Source languages of the steering vectors.
    #[arg(long = "control-sources", default_value = "en")]
    sources: String,
    /// Target languages (default: every language of the concept).
    #[arg(long = "control-targets")]
    targets: Option<String>,
    /// Steered hidden-state indices, e.g. 8-12 (default: the source's best layer ± radius).
    #[arg(long = "control-layers")]
    layers: Option<String>,
    #[arg(long = "control-radius", default_value_t = 2)]
    radius: usize,
    /// Prompts per concept and target language (the first test pairs' negative stimuli).
    #[arg(long = "control-prompts", default_value_t = 2)]
    prompts: usize,
    /// Steering coefficients, in units of the source's mean pair separation per layer.
    #[arg(long, default_value = "-2,0,2", allow_hyphen_values = true)]
    coefs: String,
    /// add or piecewise.
    #[arg(long, default_value = "add")]
    steer_op: String,
    /// all, prompt or generated.
    #[arg(long, default_value = "all")]
    steer_positions: String,
    #[arg(long)]
    steer_preserve_norm: bool,
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
}

#[derive(Args)]
pub struct StudyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// MVALUE data directory: DIR/{concept}/{concept}_{lang}.json.
    #[arg(long)]
    data: PathBuf,
    /// Comma-separated concepts (default: all found).
    #[arg(long)]
    concepts: Option<String>,
    /// Comma-separated languages (default: all found per concept).
    #[arg(long)]
    langs: Option<String>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Method behind cross-lingual matrices, consistency, transfer and control.
    #[arg(long, default_value = "mean-diff")]
    method: String,
    /// High-resource languages (default with --protocol paper: the family's, e.g. en for
    /// LLaMA; with resid: en,fr,zh,es,pt,ja). A language outside the paper's 16 needs a group.
    #[arg(long)]
    high: Option<String>,
    /// Low-resource languages (default: every other language).
    #[arg(long)]
    low: Option<String>,
    /// The paper's --split: a train fraction ≤ 0.8 (same test set) or a train count ≥ 1
    /// (--protocol paper only; default 0.8).
    #[arg(long)]
    split: Option<String>,
    /// lang2vec distances for the paper's Table 1: CSV `lang_a,lang_b,genetic,syntactic,
    /// geographic,phonological` (scripts/lang_sim_to_csv.py converts the paper's lang_sim.pt).
    #[arg(long)]
    lang2vec: Option<PathBuf>,
    /// Language-similarity matrix (CSV with a header row of languages) to correlate with the
    /// cosine similarities.
    #[arg(long)]
    lang_similarity: Option<PathBuf>,
    /// Skip the control experiment.
    #[arg(long)]
    no_control: bool,
    /// Skip the figures.
    #[arg(long)]
    no_figures: bool,
    #[command(flatten)]
    control: ControlArgs,
    #[command(flatten)]
    pairs: PairArgs,
    #[command(flatten)]
    lock: super::LockArgs,
}

#[derive(Args)]
pub struct ControlOnlyArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// MVALUE data directory.
    #[arg(long)]
    data: PathBuf,
    /// Output directory (control.json, control.csv, control_generations.jsonl, figures).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "mean-diff")]
    method: String,
    /// The paper's --split (with --protocol paper).
    #[arg(long)]
    split: Option<String>,
    #[arg(long)]
    no_figures: bool,
    #[command(flatten)]
    control: ControlArgs,
    #[command(flatten)]
    pairs: PairArgs,
    #[command(flatten)]
    lock: super::LockArgs,
}

type Setup = ProtocolSettings;

fn setup_groups(p: &PairArgs, model: &Path, default: Protocol, high: Option<&str>, low: Option<&str>) -> Result<Setup> {
    if p.batch_tokens == 0 {
        bail!(resid::Error::input("--batch-tokens must be at least 1"));
    }
    let protocol: Protocol = match &p.protocol {
        Some(x) => x.parse()?,
        None => default,
    };
    Ok(ProtocolSettings::resolve(model, protocol, p.family.as_deref(), p.template.as_deref(), p.seed, high.map(parse_list), low.map(parse_list))?)
}

fn setup(p: &PairArgs, model: &Path, default: Protocol) -> Result<Setup> {
    setup_groups(p, model, default, None, None)
}

/// `--split`: the paper's train fraction or count (study, control).
fn parse_split(s: Option<&str>) -> Result<f64> {
    match s {
        None => Ok(data::TRAIN_FRACTION),
        Some(x) => {
            let f: f64 = x.parse().map_err(|_| resid::Error::input(format!("--split `{x}`: expected a number (train fraction ≤ 0.8 or train count ≥ 1)")))?;
            paper::check_split(f)?;
            Ok(f)
        }
    }
}

fn stimuli(split: &Split, template: &str) -> Vec<resid::repe::cache::Stimulus> {
    study::stimuli_of(split, template)
}

fn nonempty(split: &Split, train: &Path, test: Option<&Path>) -> Result<()> {
    if split.train.is_empty() {
        bail!(resid::Error::input(format!("{}: no training pairs left after dropping identical pairs", train.display())));
    }
    if let Some(test) = test {
        if split.test.is_empty() {
            bail!(resid::Error::input(format!("{}: no test pairs left after dropping identical pairs", test.display())));
        }
    }
    Ok(())
}

pub fn recognize(a: RecognizeArgs) -> Result<()> {
    let st = setup(&a.pairs, &a.model.model, Protocol::Resid)?;
    let method: Method = a.method.parse()?;
    let split = data::explicit_split(data::load_jsonl(&a.train)?, data::load_jsonl(&a.test)?);
    nonempty(&split, &a.train, Some(&a.test))?;
    let any = load(&a.model)?;
    with_engine!(&any, engine => recognize_on(engine, &a, &st, &split, method))
}

fn recognize_on<B: Backend>(engine: &Engine<B>, a: &RecognizeArgs, st: &Setup, split: &Split, method: Method) -> Result<()> {
    let mut cache = HiddenCache::open(a.pairs.cache.as_deref(), engine)?;
    cache.ensure(engine, &stimuli(split, &st.template), a.pairs.batch_tokens, a.pairs.quiet)?;
    let train = study::reps(&cache, &split.train, &st.template)?;
    let test = study::reps(&cache, &split.test, &st.template)?;
    let flips = paper::explicit_flips(st.seed, train.len());
    let r = study::recognize_protocol(&train, &test, method, engine.num_layers(), engine.hidden_size(), st.seed, st.protocol, &flips)?;
    if a.json {
        // With the paper's protocol, best_layer is the max over layers of the test accuracy
        // (chosen on the test set), as the paper reports it.
        println!(
            "{}",
            serde_json::json!({
                "protocol": st.protocol.name(),
                "layers": (1..=engine.num_layers()).collect::<Vec<_>>(),
                "accuracy": r.accuracy,
                "best_layer": r.best_layer,
                "best_accuracy": r.best_accuracy,
            })
        );
    } else {
        println!("{:>5}  {:>8}  {:>8}", "layer", "train", "test");
        for (i, (te, tr)) in r.accuracy.iter().zip(&r.train_accuracy).enumerate() {
            println!("{:>5}  {:>8.4}  {:>8.4}", i + 1, tr, te);
        }
        println!(
            "best layer {} accuracy {:.4} ({} method, {} train / {} test pairs, protocol {}: the layer is chosen on the test set)",
            r.best_layer,
            r.best_accuracy,
            method.name(),
            split.train.len(),
            split.test.len(),
            st.protocol.name()
        );
    }
    Ok(())
}

fn model_hint<B: Backend>(engine: &Engine<B>) -> String {
    std::fs::read_to_string(engine.model.dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("model_type").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| engine.model.config.family.name().to_string())
}

pub fn vectors(a: VectorsArgs) -> Result<()> {
    let st = setup(&a.pairs, &a.model.model, Protocol::Resid)?;
    let method: Method = a.method.parse()?;
    if a.out.is_none() && a.gguf.is_none() {
        bail!(resid::Error::input("give --out FILE.safetensors and/or --gguf FILE.gguf"));
    }
    if let Some(stats) = &a.from_stats {
        return vectors_from_stats(&a, stats, method);
    }
    let (split, source, label, flips) = match (&a.data, &a.train) {
        (Some(dir), None) => {
            let (Some(concept), Some(lang)) = (&a.concept, &a.lang) else {
                bail!(resid::Error::input("--data needs --concept and --lang"));
            };
            let pairs = data::load_mvalue(dir, concept, lang)?;
            let file = data::mvalue_path(dir, concept, lang);
            paper::check_language(lang, &[], &[], "--lang")?;
            let (split, flips) = match (a.split.as_str(), st.protocol) {
                ("all", _) => (data::explicit_split(pairs, Vec::new()), None),
                ("train", Protocol::Resid) => (data::split_pairs(pairs, st.seed, data::TRAIN_FRACTION), None),
                (f, Protocol::Paper) => {
                    let f = if f == "train" { data::TRAIN_FRACTION } else { parse_split(Some(f))? };
                    let p = paper::paper_split(pairs, f, st.seed);
                    (p.as_split(), Some(p.random_flip))
                }
                (other, Protocol::Resid) => bail!(resid::Error::input(format!("--split `{other}`: expected train or all (a number needs --protocol paper)"))),
            };
            (split, file, vec![("concept", concept.clone()), ("lang", lang.clone())], flips)
        }
        (None, Some(train)) => {
            let test = match &a.test {
                Some(t) => data::load_jsonl(t)?,
                None => Vec::new(),
            };
            (data::explicit_split(data::load_jsonl(train)?, test), train.clone(), Vec::new(), None)
        }
        _ => bail!(resid::Error::input("give --data DIR --concept C --lang L, or --train FILE.jsonl")),
    };
    nonempty(&split, &source, None)?;
    if a.out.is_some() && a.out == a.gguf {
        bail!(resid::Error::input("--out and --gguf name the same file"));
    }
    // Held until the files are written; taken before the model loads, to fail at once.
    let _locks = [&a.out, &a.gguf]
        .into_iter()
        .flatten()
        .map(|p| resid::store::lock::lock_output_file(p, a.lock.wait_lock))
        .collect::<resid::Result<Vec<_>>>()?;
    let any = load(&a.model)?;
    let flips = flips.unwrap_or_else(|| paper::explicit_flips(st.seed, split.train.len()));
    with_engine!(&any, engine => vectors_on(engine, &a, &st, &split, &flips, method, &source, label.clone()))
}

/// `resid vectors --from-stats`: concept vectors from the statistics of pair differences.
fn vectors_from_stats(a: &VectorsArgs, stats: &Path, method: Method) -> Result<()> {
    use resid::store::stats::StatsFile;
    let out = a.out.as_ref().ok_or_else(|| resid::Error::input("--from-stats needs --out FILE.safetensors"))?;
    let _lock = resid::store::lock::lock_output_file(out, a.lock.wait_lock)?;
    let config_path = a.model.model.join("config.json");
    let config = resid::model::config::ModelConfig::from_file(&config_path)?;
    let f = StatsFile::read(stats, method == Method::Pca)?;
    let name = stats.display();
    let config_sha = resid::store::sha256_file(&config_path)?;
    if f.metadata.get("model_config_sha256") != Some(&config_sha) {
        bail!(resid::Error::input(format!("{name}: computed with another model than {} (config.json differs)", a.model.model.display())));
    }
    if f.metadata.get("pairs").map(String::as_str) != Some("true") {
        bail!(resid::Error::input(format!("{name}: not statistics of pair differences (compute them with `resid stats --pairs`)")));
    }
    let (layers, hidden) = (config.num_layers, config.hidden_size);
    if f.hidden != hidden {
        bail!(resid::Error::input(format!("{name}: hidden size {}, the model has {hidden}", f.hidden)));
    }
    let mut mean: Vec<Option<&[f64]>> = vec![None; layers + 1];
    let mut second: Vec<Option<&[f64]>> = vec![None; layers + 1];
    for (p, &l) in f.layers.iter().enumerate() {
        if (1..=layers as i64).contains(&l) {
            mean[l as usize] = Some(&f.mean[p * hidden..(p + 1) * hidden]);
            if !f.second_moment.is_empty() {
                second[l as usize] = Some(&f.second_moment[p * hidden * hidden..(p + 1) * hidden * hidden]);
            }
        }
    }
    if mean.iter().all(Option::is_none) {
        bail!(resid::Error::input(format!("{name}: no hidden-state index 1..={layers} among its points")));
    }
    // Only the random and PCA starts use the seed: resid's default, as without --protocol paper.
    let seed = a.pairs.seed.unwrap_or(0);
    let v = resid::repe::vectors::from_moments(method, layers, hidden, &mean, &second, seed)?;
    let pairs = f.count.first().copied().unwrap_or(0);
    let meta = vec![
        ("source", name.to_string()),
        ("model", a.model.model.display().to_string()),
        ("seed", seed.to_string()),
        ("train_pairs", pairs.to_string()),
        ("from_stats", "sign of the summed separation; scale = root-mean-square pair separation (mean separation without cov or gram); no train accuracy".to_string()),
    ];
    study::write_vectors(out, &v, &meta)?;
    if a.json {
        println!("{}", serde_json::json!({ "out": out.display().to_string(), "method": method.name(), "train_pairs": pairs, "from_stats": name.to_string() }));
    }
    if !a.pairs.quiet {
        eprintln!("{} vectors from the statistics of {pairs} pairs in {name}: wrote {}", method.name(), out.display());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn vectors_on<B: Backend>(engine: &Engine<B>, a: &VectorsArgs, st: &Setup, split: &Split, flips: &[bool], method: Method, source: &Path, label: Vec<(&'static str, String)>) -> Result<()> {
    let mut cache = HiddenCache::open(a.pairs.cache.as_deref(), engine)?;
    cache.ensure(engine, &stimuli(split, &st.template), a.pairs.batch_tokens, a.pairs.quiet)?;
    let train = study::reps(&cache, &split.train, &st.template)?;
    let test = study::reps(&cache, &split.test, &st.template)?;
    let r = study::recognize_protocol(&train, &test, method, engine.num_layers(), engine.hidden_size(), st.seed, st.protocol, flips)?;
    let v = r.vectors.as_ref().ok_or_else(|| anyhow::anyhow!("internal: no vectors"))?;
    let mut meta: Vec<(&str, String)> = label;
    meta.push(("source", source.display().to_string()));
    meta.push(("model", engine.model.dir.display().to_string()));
    meta.push(("compute", engine.backend.compute_type().to_string()));
    meta.push(("template", st.template.clone()));
    meta.push(("seed", st.seed.to_string()));
    meta.push(("protocol", st.protocol.name().to_string()));
    meta.push(("train_pairs", split.train.len().to_string()));
    let dirs = match &a.out {
        Some(out) => study::write_vectors(out, v, &meta)?,
        None => v.file_directions(),
    };
    let mut gguf_tensors = None;
    if let Some(g) = &a.gguf {
        gguf_tensors = Some(resid::repe::gguf::write_control_vector(g, &dirs, engine.num_layers(), engine.hidden_size(), &model_hint(engine))?);
    }
    let (best_train_layer, best_train) = resid::repe::recognition::best_layer(&v.train_accuracy);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "out": a.out.as_ref().map(|p| p.display().to_string()),
                "gguf": a.gguf.as_ref().map(|p| p.display().to_string()),
                "method": method.name(),
                "protocol": st.protocol.name(),
                "train_pairs": split.train.len(),
                "test_pairs": split.test.len(),
                "layers": (1..=engine.num_layers()).collect::<Vec<_>>(),
                "train_accuracy": v.train_accuracy,
                "test_accuracy": if split.test.is_empty() { serde_json::Value::Null } else { serde_json::json!(r.accuracy) },
                "best_layer": if split.test.is_empty() { best_train_layer } else { r.best_layer },
            })
        );
    }
    if !a.pairs.quiet {
        let mut msg = format!(
            "{} vectors from {} training pairs: best train accuracy {:.3} at layer {}",
            method.name(),
            split.train.len(),
            best_train,
            best_train_layer
        );
        if !split.test.is_empty() {
            msg.push_str(&format!("; test accuracy {:.3} at layer {} ({} pairs)", r.best_accuracy, r.best_layer, split.test.len()));
        }
        eprintln!("{msg}");
        if let Some(out) = &a.out {
            eprintln!("wrote {}", out.display());
        }
        if let (Some(g), Some(n)) = (&a.gguf, gguf_tensors) {
            eprintln!("wrote {} ({n} direction tensors, direction.k = hidden-state index k+1)", g.display());
        }
    }
    Ok(())
}

fn control_plan(c: &ControlArgs, quiet: bool, batch_tokens: usize) -> Result<ControlPlan> {
    let mut coefs = Vec::new();
    for part in parse_list(&c.coefs) {
        let v: f32 = part
            .parse()
            .map_err(|_| resid::Error::input(format!("--coefs `{}`: `{part}` is not a number", c.coefs)))?;
        coefs.push(v);
    }
    let settings = ControlSettings::new(coefs, &c.steer_op, &c.steer_positions, c.steer_preserve_norm, c.max_new_tokens, batch_tokens, quiet)?;
    let sources = parse_list(&c.sources);
    if sources.is_empty() {
        bail!(resid::Error::input("--control-sources: no languages"));
    }
    Ok(ControlPlan {
        concepts: c.concepts.as_deref().map(parse_list),
        sources,
        targets: c.targets.as_deref().map(parse_list),
        layers: c.layers.as_deref().map(parse_layer_list).transpose()?,
        radius: c.radius,
        prompts: c.prompts,
        settings,
    })
}

pub fn study(a: StudyArgs) -> Result<()> {
    let st = setup_groups(&a.pairs, &a.model.model, Protocol::Paper, a.high.as_deref(), a.low.as_deref())?;
    let method: Method = a.method.parse()?;
    let groups = st.groups.clone();
    let control = if a.no_control { None } else { Some(control_plan(&a.control, a.pairs.quiet, a.pairs.batch_tokens)?) };
    let cfg = StudyConfig {
        data: a.data.clone(),
        concepts: a.concepts.as_deref().map(parse_list),
        langs: a.langs.as_deref().map(parse_list),
        out: a.out.clone(),
        cache: a.pairs.cache.clone(),
        template: st.template.clone(),
        seed: st.seed,
        method,
        groups,
        lang_similarity: a.lang_similarity.clone(),
        control,
        batch_tokens: a.pairs.batch_tokens,
        figures: !a.no_figures,
        quiet: a.pairs.quiet,
        protocol: st.protocol,
        split: parse_split(a.split.as_deref())?,
        family: st.family,
        family_source: st.family_source.clone(),
        lang2vec: a.lang2vec.clone(),
    };
    study::check_inputs(&cfg)?;
    let _lock = study::lock_output(&cfg, a.lock.wait_lock)?;
    let any = load(&a.model)?;
    let report = with_engine!(&any, engine => study::run_study(engine, &cfg))?;
    if !a.pairs.quiet {
        eprintln!(
            "study ({} protocol): {} concepts, {:.1} s; wrote {}/report.md, report.json, tables/, figures/, vectors/",
            report.protocol.name(),
            report.concepts.len(),
            report.timing.total_seconds,
            a.out.display()
        );
    }
    Ok(())
}

pub fn control(a: ControlOnlyArgs) -> Result<()> {
    let st = setup(&a.pairs, &a.model.model, Protocol::Resid)?;
    let method: Method = a.method.parse()?;
    let Some(concepts) = a.control.concepts.as_deref().map(parse_list) else {
        bail!(resid::Error::input("resid control needs --control-concepts (e.g. --control-concepts morality)"));
    };
    let plan = control_plan(&a.control, a.pairs.quiet, a.pairs.batch_tokens)?;
    // Only the languages the experiment needs: sources and targets.
    let langs = match &plan.targets {
        Some(t) => {
            let mut l = plan.sources.clone();
            for x in t {
                if !l.contains(x) {
                    l.push(x.clone());
                }
            }
            Some(l)
        }
        None => None,
    };
    let cfg = StudyConfig {
        data: a.data.clone(),
        concepts: Some(concepts),
        langs,
        out: a.out.clone(),
        cache: a.pairs.cache.clone(),
        template: st.template.clone(),
        seed: st.seed,
        method,
        groups: st.groups.clone(),
        lang_similarity: None,
        control: Some(plan),
        batch_tokens: a.pairs.batch_tokens,
        figures: !a.no_figures,
        quiet: a.pairs.quiet,
        protocol: st.protocol,
        split: parse_split(a.split.as_deref())?,
        family: st.family,
        family_source: st.family_source.clone(),
        lang2vec: None,
    };
    study::check_inputs(&cfg)?;
    let _lock = study::lock_output(&cfg, a.lock.wait_lock)?;
    let any = load(&a.model)?;
    let report = with_engine!(&any, engine => study::run_control_only(engine, &cfg))?;
    if !a.pairs.quiet {
        eprintln!("control: {} rows; wrote {}/control.json, control.csv, control_generations.jsonl", report.rows.len(), a.out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Command, FromArgMatches};

    /// Flattened argument groups must not share an argument id: clap would then fill both
    /// fields from one flag (`resid study --control-concepts x` restricted the whole study to x).
    /// clap only checks this with debug assertions, which release test builds lack.
    #[test]
    fn argument_ids_are_unique_and_control_concepts_stays_apart() {
        for cmd in [StudyArgs::augment_args(Command::new("study")), ControlOnlyArgs::augment_args(Command::new("control"))] {
            let mut ids: Vec<&str> = cmd.get_arguments().map(|a| a.get_id().as_str()).collect();
            let n = ids.len();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), n, "{}: duplicate argument ids", cmd.get_name());
        }
        let m = StudyArgs::augment_args(Command::new("study"))
            .try_get_matches_from(["study", "--model", "m", "--data", "d", "--out", "o", "--control-concepts", "morality"])
            .unwrap();
        let a = StudyArgs::from_arg_matches(&m).unwrap();
        assert_eq!((a.concepts.as_deref(), a.control.concepts.as_deref()), (None, Some("morality")));
    }
}

#[derive(Args)]
pub struct CompareArgs {
    /// Finished study directories (run with --protocol paper), one per model.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Output directory for compare.csv, compare_{concept}.tex and the figure.
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    no_figures: bool,
}

pub fn compare(a: CompareArgs) -> Result<()> {
    let written = resid::repe::paper_study::compare(&a.dirs, &a.out, !a.no_figures)?;
    eprintln!("compare: {} models; wrote {}", a.dirs.len(), written.join(", "));
    Ok(())
}
