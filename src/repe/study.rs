//! The whole study in one call: data, hidden states (cached), vectors by every method,
//! recognition, cross-lingual matrices, consistency, transfer, control, and the outputs.
use super::analysis::{
    correlate, cosine_by_layer, mean_off_diagonal, mean_over_layers, relative_transfer, summarise_transfer, Correlation,
    LangSimilarity, ResourceGroups, TransferSummary,
};
use super::cache::{CacheStats, HiddenCache, Stimulus};
use super::control::{layers_around, run_control, ControlPrompt, ControlRow, ControlSettings, ControlTask, GenerationRecord};
use super::data::{self, apply_template, derive_seed, Pair, Split};
use super::recognition::{accuracy_by_layer, best_layer, cross_matrix, mean};
use super::paper::{self, Family, PaperSplit, Protocol};
use super::vectors::{ConceptVectors, Method, PairReps, SignRule};
use crate::error::{Error, Result};
use crate::io::{write_safetensors, OutTensor, TensorData};
use crate::backend::Backend;
use crate::engine::Engine;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Templated stimuli of a split's pairs (train then test, positive then negative).
pub fn stimuli_of(split: &Split, template: &str) -> Vec<Stimulus> {
    split
        .train
        .iter()
        .chain(&split.test)
        .flat_map(|p| {
            [
                Stimulus { text: apply_template(template, &p.pos), origin: format!("{} (pos)", p.origin) },
                Stimulus { text: apply_template(template, &p.neg), origin: format!("{} (neg)", p.origin) },
            ]
        })
        .collect()
}

/// Cached hidden states of pairs.
pub fn reps<'a>(cache: &'a HiddenCache, pairs: &[Pair], template: &str) -> Result<PairReps<'a>> {
    let mut r = PairReps::default();
    for p in pairs {
        r.pos.push(cache.expect(&apply_template(template, &p.pos))?);
        r.neg.push(cache.expect(&apply_template(template, &p.neg))?);
    }
    Ok(r)
}

/// Vectors fitted on the train pairs and their test accuracy per layer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MethodResult {
    pub method: Method,
    pub accuracy: Vec<f64>,
    pub train_accuracy: Vec<f64>,
    pub best_layer: usize,
    pub best_accuracy: f64,
    #[serde(skip)]
    pub vectors: Option<ConceptVectors>,
}

/// Random directions drawn for the random baseline's accuracy curve.
pub const RANDOM_DRAWS: usize = 32;

/// Fits `method` on `train` and scores `test`. For the random baseline, train and test
/// accuracy are the means over [`RANDOM_DRAWS`] independent draws (the expected accuracy of a
/// random direction; a single draw on a small test set is too noisy to compare against), and
/// the returned vectors are the first draw.
pub fn recognize(train: &PairReps, test: &PairReps, method: Method, layers: usize, hidden: usize, seed: u64) -> Result<MethodResult> {
    recognize_with(train, test, method, layers, hidden, seed, SignRule::Resid)
}

/// [`recognize`] with a sign rule (the paper's protocol uses RepE's).
pub fn recognize_with(train: &PairReps, test: &PairReps, method: Method, layers: usize, hidden: usize, seed: u64, rule: SignRule) -> Result<MethodResult> {
    let v = ConceptVectors::fit_with(method, train, layers, hidden, seed, rule)?;
    let mut accuracy = accuracy_by_layer(&v, test);
    let mut train_accuracy = v.train_accuracy.clone();
    if method == Method::Random {
        for draw in 1..RANDOM_DRAWS {
            let d = ConceptVectors::fit_with(method, train, layers, hidden, derive_seed(seed, &format!("draw/{draw}")), rule)?;
            for (a, x) in accuracy.iter_mut().zip(accuracy_by_layer(&d, test)) {
                *a += x;
            }
            for (a, x) in train_accuracy.iter_mut().zip(&d.train_accuracy) {
                *a += x;
            }
        }
        accuracy.iter_mut().chain(train_accuracy.iter_mut()).for_each(|a| *a /= RANDOM_DRAWS as f64);
    }
    let (best_layer, best_accuracy) = best_layer(&accuracy);
    Ok(MethodResult { method, accuracy, train_accuracy, best_layer, best_accuracy, vectors: Some(v) })
}

/// Fits and scores `method` under `protocol`: RepE's sign rule for the paper's; for
/// [`Method::RandomLabels`], the train pairs are first oriented by the re-shuffled labels
/// (`flips[i]`: pair i's labels name its negative side).
#[allow(clippy::too_many_arguments)]
pub fn recognize_protocol(
    train: &PairReps,
    test: &PairReps,
    method: Method,
    layers: usize,
    hidden: usize,
    seed: u64,
    protocol: Protocol,
    flips: &[bool],
) -> Result<MethodResult> {
    let rule = match protocol {
        Protocol::Paper => SignRule::RepE,
        Protocol::Resid => SignRule::Resid,
    };
    if method != Method::RandomLabels {
        return recognize_with(train, test, method, layers, hidden, seed, rule);
    }
    if flips.len() != train.len() {
        return Err(Error::input(format!("internal: {} label swaps for {} training pairs", flips.len(), train.len())));
    }
    let mut oriented = train.clone();
    for (i, &f) in flips.iter().enumerate() {
        if f {
            std::mem::swap(&mut oriented.pos[i], &mut oriented.neg[i]);
        }
    }
    recognize_with(&oriented, test, method, layers, hidden, seed, rule)
}

/// Writes concept vectors in the foundation's vector format (plus signs, train accuracy and
/// scale) and returns the directions `[L+1, hidden]`.
pub fn write_vectors(path: &Path, v: &ConceptVectors, meta: &[(&str, String)]) -> Result<Vec<f32>> {
    let dirs = v.file_directions();
    let mut metadata: HashMap<String, String> = meta.iter().map(|(k, x)| (k.to_string(), x.clone())).collect();
    metadata.insert("method".into(), v.method.name().into());
    metadata.insert(
        "layout".into(),
        "directions[l] for hidden-state index l (HF output_hidden_states); row 0 unused (zeros); rows are signed unit directions times `scale` (mean pair separation); signs/train_accuracy/scale are per index 1..=L".into(),
    );
    metadata.insert("resid_version".into(), env!("CARGO_PKG_VERSION").into());
    write_safetensors(
        path,
        &[
            OutTensor { name: "directions".into(), shape: vec![v.layers + 1, v.hidden], data: TensorData::F32(dirs.clone()) },
            OutTensor { name: "signs".into(), shape: vec![v.layers], data: TensorData::F32(v.signs.clone()) },
            OutTensor {
                name: "train_accuracy".into(),
                shape: vec![v.layers],
                data: TensorData::F32(v.train_accuracy.iter().map(|&a| a as f32).collect()),
            },
            OutTensor { name: "scale".into(), shape: vec![v.layers], data: TensorData::F32(v.scale.clone()) },
        ],
        metadata,
    )?;
    Ok(dirs)
}

/// Which control experiments the study runs.
#[derive(Debug, Clone)]
pub struct ControlPlan {
    /// Concepts to steer (None: every concept of the study).
    pub concepts: Option<Vec<String>>,
    /// Source languages of the steering vectors.
    pub sources: Vec<String>,
    /// Target languages (None: every language of the concept).
    pub targets: Option<Vec<String>>,
    /// Steered indices (None: the concept's best layer ± `radius`).
    pub layers: Option<Vec<usize>>,
    pub radius: usize,
    /// Prompts per (concept, target): the first test pairs' negative stimuli.
    pub prompts: usize,
    pub settings: ControlSettings,
}

#[derive(Debug, Clone)]
pub struct StudyConfig {
    pub data: PathBuf,
    pub concepts: Option<Vec<String>>,
    pub langs: Option<Vec<String>>,
    pub out: PathBuf,
    /// Hidden-state cache root (default `out/cache`).
    pub cache: Option<PathBuf>,
    pub template: String,
    pub seed: u64,
    /// Method behind cross-lingual matrices, consistency, transfer and control.
    pub method: Method,
    pub groups: ResourceGroups,
    pub lang_similarity: Option<PathBuf>,
    pub control: Option<ControlPlan>,
    pub batch_tokens: usize,
    pub figures: bool,
    pub quiet: bool,
    /// Which computation: the paper's (default of `resid study`) or resid's own.
    pub protocol: Protocol,
    /// The paper's `--split F` (0.8: its default); only with the paper's protocol.
    pub split: f64,
    /// The paper's per-family settings (languages, order, high-resource set).
    pub family: Family,
    /// Where the family came from, for the report (e.g. "config.json model_type `llama`").
    pub family_source: String,
    /// lang2vec distances for Table 1 (paper protocol).
    pub lang2vec: Option<PathBuf>,
}

impl StudyConfig {
    /// A configuration with resid's defaults for everything but the paths and the template.
    pub fn new(data: PathBuf, out: PathBuf, template: String) -> Self {
        StudyConfig {
            data,
            concepts: None,
            langs: None,
            out,
            cache: None,
            template,
            seed: 0,
            method: Method::MeanDiff,
            groups: ResourceGroups::default(),
            lang_similarity: None,
            control: None,
            batch_tokens: crate::engine::DEFAULT_BATCH_TOKENS,
            figures: true,
            quiet: true,
            protocol: Protocol::Resid,
            split: data::TRAIN_FRACTION,
            family: Family::Other,
            family_source: String::new(),
            lang2vec: None,
        }
    }
}

/// The protocol-dependent settings every face resolves the same way.
#[derive(Debug, Clone)]
pub struct ProtocolSettings {
    pub protocol: Protocol,
    pub family: Family,
    pub family_source: String,
    /// `template`, else the family's with the paper's protocol, else `{input}`.
    pub template: String,
    /// `seed`, else 1 (the paper's) or 0 (resid's).
    pub seed: u64,
    /// The family's high-resource set with the paper's protocol (low: every other language),
    /// resid's defaults otherwise; `high` / `low` override.
    pub groups: ResourceGroups,
}

impl ProtocolSettings {
    pub fn resolve(
        model_dir: &Path,
        protocol: Protocol,
        family: Option<&str>,
        template: Option<&str>,
        seed: Option<u64>,
        high: Option<Vec<String>>,
        low: Option<Vec<String>>,
    ) -> Result<Self> {
        let (family, family_source) = paper::resolve_family(model_dir, family)?;
        let template = match (template, protocol) {
            (Some(t), _) => t.to_owned(),
            (None, Protocol::Paper) => family.template().to_owned(),
            (None, Protocol::Resid) => "{input}".to_owned(),
        };
        data::check_template(&template)?;
        let seed = seed.unwrap_or(if protocol == Protocol::Paper { paper::PAPER_SEED } else { 0 });
        let mut groups = ResourceGroups::default();
        if protocol == Protocol::Paper {
            groups = ResourceGroups { high: family.high(), low: Vec::new() };
        }
        if let Some(h) = high {
            groups.high = h;
        }
        if let Some(l) = low {
            groups.low = l;
        }
        Ok(ProtocolSettings { protocol, family, family_source, template, seed, groups })
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LangResult {
    pub lang: String,
    pub file: String,
    pub n_train: usize,
    pub n_test: usize,
    pub dropped_identical: usize,
    pub methods: Vec<MethodResult>,
}

impl LangResult {
    pub fn method(&self, m: Method) -> Option<&MethodResult> {
        self.methods.iter().find(|r| r.method == m)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ConceptResult {
    pub concept: String,
    pub langs: Vec<String>,
    pub languages: Vec<LangResult>,
    /// The layer with the highest mean own-language accuracy (primary method).
    pub best_layer: usize,
    pub best_layer_mean_accuracy: f64,
    /// `[layer-1][source][target]`.
    pub crosslingual_by_layer: Vec<Vec<Vec<f64>>>,
    pub crosslingual_at_best_layer: Vec<Vec<f64>>,
    /// `[layer-1][a][b]`.
    pub cosine_by_layer: Vec<Vec<Vec<f64>>>,
    pub cosine_mean_over_layers: Vec<Vec<f64>>,
    pub cosine_mean_off_diagonal: f64,
    pub cosine_correlation: Option<Correlation>,
    /// `acc[a][b] / acc[b][b]` at the best layer.
    pub transfer_relative: Vec<Vec<f64>>,
    pub transfer_summary: TransferSummary,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub dir: String,
    pub identity: String,
    pub architecture: String,
    pub layers: usize,
    pub hidden: usize,
    /// The backend kind and compute type (`cpu`, `cpu-bf16`, `cuda`).
    pub compute: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timing {
    pub hidden_states: CacheStats,
    pub analysis_seconds: f64,
    pub control_seconds: f64,
    pub total_seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ControlReport {
    pub settings: ControlSettings,
    pub rows: Vec<ControlRow>,
    pub generations_file: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Overall {
    /// Transfer summaries averaged over concepts.
    pub transfer: TransferSummary,
    /// Per language: best-layer accuracy averaged over concepts, per method.
    pub mean_best_accuracy: Vec<(String, HashMap<String, f64>)>,
    pub concepts_with_high_to_low_above_low_to_high: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StudyReport {
    pub resid_version: String,
    /// The protocol that produced every number of `concepts` and `paper`.
    pub protocol: Protocol,
    pub model: ModelInfo,
    pub data: String,
    pub template: String,
    pub seed: u64,
    pub method: Method,
    /// resid: the train fraction; paper: its `--split` (a fraction ≤ 0.8 or a train count ≥ 1).
    pub train_fraction: f64,
    pub split: String,
    pub resource_groups: ResourceGroups,
    pub lang_similarity: Option<String>,
    pub concepts: Vec<ConceptResult>,
    pub overall: Overall,
    pub control: Option<ControlReport>,
    /// The paper's aggregates (with `--protocol paper`).
    pub paper: Option<super::paper_study::PaperResult>,
    pub timing: Timing,
}

pub(crate) struct LangData {
    pub(crate) lang: String,
    pub(crate) file: PathBuf,
    pub(crate) split: Split,
    /// The paper's split (train and test in its order, the random baseline's label swaps).
    pub(crate) paper: Option<PaperSplit>,
}

fn load_data(cfg: &StudyConfig) -> Result<Vec<(String, Vec<LangData>)>> {
    let found = data::discover(&cfg.data)?;
    let concepts: Vec<String> = match &cfg.concepts {
        Some(c) => {
            for x in c {
                if !found.iter().any(|(f, _)| f == x) {
                    return Err(Error::input(format!(
                        "{}: no data for concept `{x}` (found: {})",
                        cfg.data.display(),
                        found.iter().map(|f| f.0.as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
            }
            c.clone()
        }
        None => found.iter().map(|f| f.0.clone()).collect(),
    };
    if concepts.is_empty() {
        return Err(Error::input(format!("{}: no {{concept}}/{{concept}}_{{lang}}.json files", cfg.data.display())));
    }
    let mut out = Vec::new();
    for c in concepts {
        let available = &found.iter().find(|f| f.0 == c).map(|f| f.1.clone()).unwrap_or_default();
        let langs: Vec<String> = match (&cfg.langs, cfg.protocol) {
            (Some(l), _) => l.clone(),
            (None, Protocol::Resid) => available.clone(),
            // The family's languages in its order (`utils.get_new_langs`).
            (None, Protocol::Paper) => cfg.family.order_langs(available),
        };
        let mut per = Vec::new();
        for lang in langs {
            let file = data::mvalue_path(&cfg.data, &c, &lang);
            paper::check_language(&lang, &cfg.groups.high, &cfg.groups.low, &file.display().to_string())?;
            let pairs = data::load_mvalue(&cfg.data, &c, &lang)?;
            let (split, paper_split) = match cfg.protocol {
                Protocol::Resid => (data::split_pairs(pairs, cfg.seed, data::TRAIN_FRACTION), None),
                Protocol::Paper => {
                    let p = paper::paper_split(pairs, cfg.split, cfg.seed);
                    (p.as_split(), Some(p))
                }
            };
            if split.train.is_empty() {
                return Err(Error::input(format!("{}: no training pairs left after dropping identical pairs and splitting", file.display())));
            }
            if split.test.is_empty() {
                return Err(Error::input(format!("{}: no test pairs left after dropping identical pairs", file.display())));
            }
            per.push(LangData { lang, file, split, paper: paper_split });
        }
        out.push((c, per));
    }
    Ok(out)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    let out = crate::io::AtomicPath::new(path);
    std::fs::write(out.tmp(), text.as_bytes()).map_err(|e| Error::io(path, e))?;
    out.commit()
}

/// Locks `cfg.out` for a whole study or control run: another run writing there is
/// [`Error::Locked`] at once unless `wait`. Removes the temporary files dead runs left in it.
/// Faces call it before loading the model and hold the lock until the run ends.
pub fn lock_output(cfg: &StudyConfig, wait: bool) -> Result<crate::store::lock::OutputLock> {
    crate::store::lock::lock_output_dir(&cfg.out, wait, &["tables", "figures", "vectors"])
}

const INTERRUPTED_STUDY: &str = "no report written; the hidden-state cache keeps every finished chunk, so a rerun continues from there";

/// Checks the data, template and similarity matrix before any model is loaded.
pub fn check_inputs(cfg: &StudyConfig) -> Result<()> {
    if cfg.batch_tokens == 0 {
        return Err(Error::input("--batch-tokens must be at least 1"));
    }
    data::check_template(&cfg.template)?;
    if let Some(p) = &cfg.lang_similarity {
        LangSimilarity::read(p)?;
    }
    if let Some(p) = &cfg.lang2vec {
        paper::LangDistances::read(p)?;
    }
    match cfg.protocol {
        Protocol::Paper => paper::check_split(cfg.split)?,
        Protocol::Resid if cfg.split != data::TRAIN_FRACTION => {
            return Err(Error::input(format!("--split {}: only with --protocol paper (resid's split is fixed at 80/20)", cfg.split)))
        }
        Protocol::Resid => {}
    }
    load_data(cfg)?;
    if cfg.out.exists() && !cfg.out.is_dir() {
        return Err(Error::input(format!("{}: exists and is not a directory", cfg.out.display())));
    }
    Ok(())
}

pub(crate) struct Analysis {
    pub(crate) datasets: Vec<(String, Vec<LangData>)>,
    pub(crate) concepts: Vec<ConceptResult>,
    stats: CacheStats,
    model: ModelInfo,
    seconds: f64,
}

fn analyse<B: Backend>(engine: &Engine<B>, cfg: &StudyConfig, sim: Option<&LangSimilarity>) -> Result<Analysis> {
    let datasets = load_data(cfg)?;
    for sub in ["", "vectors"] {
        let d = cfg.out.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    let (layers, hidden) = (engine.num_layers(), engine.hidden_size());

    // 1. Hidden states of every unique stimulus, once.
    let cache_root = cfg.cache.clone().unwrap_or_else(|| cfg.out.join("cache"));
    let mut cache = HiddenCache::open(Some(&cache_root), engine)?;
    let stimuli: Vec<Stimulus> = datasets.iter().flat_map(|(_, ls)| ls.iter().flat_map(|l| stimuli_of(&l.split, &cfg.template))).collect();
    let stats = cache.ensure(engine, &stimuli, cfg.batch_tokens, cfg.quiet)?;
    let analysis_started = std::time::Instant::now();

    // 2. Vectors and recognition per concept and language; cross-lingual analyses per concept.
    let mut concepts = Vec::new();
    for (concept, langs) in &datasets {
        let mut lang_results = Vec::new();
        let mut tests = Vec::new();
        for ld in langs {
            let train = reps(&cache, &ld.split.train, &cfg.template)?;
            let test = reps(&cache, &ld.split.test, &cfg.template)?;
            let mut methods = Vec::new();
            let all: &[Method] = match cfg.protocol {
                Protocol::Resid => &Method::ALL,
                Protocol::Paper => &Method::PAPER,
            };
            for &m in all {
                let seed = derive_seed(cfg.seed, &format!("{}/{concept}/{}", m.name(), ld.lang));
                let flips = match &ld.paper {
                    Some(p) => p.random_flip.clone(),
                    None => paper::explicit_flips(cfg.seed, train.len()),
                };
                methods.push(recognize_protocol(&train, &test, m, layers, hidden, seed, cfg.protocol, &flips)?);
            }
            tests.push(test);
            lang_results.push(LangResult {
                lang: ld.lang.clone(),
                file: ld.file.display().to_string(),
                n_train: ld.split.train.len(),
                n_test: ld.split.test.len(),
                dropped_identical: ld.split.dropped.len(),
                methods,
            });
        }
        let primary: Vec<&ConceptVectors> = lang_results
            .iter()
            .map(|l| l.method(cfg.method).and_then(|r| r.vectors.as_ref()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::input("internal: missing primary vectors"))?;
        let cross = cross_matrix(&primary, &tests);
        let k = langs.len();
        let diag_mean: Vec<f64> = cross.iter().map(|m| mean((0..k).map(|a| m[a][a]))).collect();
        let (best, best_acc) = best_layer(&diag_mean);
        let at_best = cross.get(best - 1).cloned().unwrap_or_default();
        let cos = cosine_by_layer(&primary);
        let cos_mean = mean_over_layers(&cos);
        let lang_names: Vec<String> = langs.iter().map(|l| l.lang.clone()).collect();
        let rel = relative_transfer(&at_best);
        concepts.push(ConceptResult {
            concept: concept.clone(),
            langs: lang_names.clone(),
            best_layer: best,
            best_layer_mean_accuracy: best_acc,
            crosslingual_at_best_layer: at_best,
            crosslingual_by_layer: cross,
            cosine_mean_off_diagonal: mean_off_diagonal(&cos_mean),
            cosine_correlation: sim.map(|s| correlate(&cos_mean, &lang_names, s)),
            cosine_by_layer: cos,
            cosine_mean_over_layers: cos_mean,
            transfer_summary: summarise_transfer(&rel, &lang_names, &cfg.groups),
            transfer_relative: rel,
            languages: lang_results,
        });
    }
    // Vector files for every concept and language (primary method).
    for c in &concepts {
        for l in &c.languages {
            if let Some(v) = l.method(cfg.method).and_then(|r| r.vectors.as_ref()) {
                write_vectors(
                    &cfg.out.join("vectors").join(format!("{}_{}.safetensors", c.concept, l.lang)),
                    v,
                    &[
                        ("concept", c.concept.clone()),
                        ("lang", l.lang.clone()),
                        ("model", engine.model.dir.display().to_string()),
                        ("template", cfg.template.clone()),
                        ("seed", cfg.seed.to_string()),
                    ],
                )?;
            }
        }
    }
    let model = ModelInfo {
        dir: engine.model.dir.display().to_string(),
        identity: cache.model_id().to_owned(),
        architecture: engine.model.config.architecture.clone(),
        layers,
        hidden,
        compute: crate::store::extract::compute_kind(&engine.backend),
    };
    Ok(Analysis { datasets, concepts, stats, model, seconds: analysis_started.elapsed().as_secs_f64() })
}

/// Runs the whole study and writes its outputs under `cfg.out`.
pub fn run_study<B: Backend>(engine: &Engine<B>, cfg: &StudyConfig) -> Result<StudyReport> {
    study_inner(engine, cfg).map_err(|e| e.interrupted_keeping(INTERRUPTED_STUDY))
}

fn study_inner<B: Backend>(engine: &Engine<B>, cfg: &StudyConfig) -> Result<StudyReport> {
    let started = std::time::Instant::now();
    data::check_template(&cfg.template)?;
    let sim = cfg.lang_similarity.as_deref().map(LangSimilarity::read).transpose()?;
    let a = analyse(engine, cfg, sim.as_ref())?;
    let paper_result = match cfg.protocol {
        Protocol::Paper => Some(super::paper_study::paper_result(cfg, &a)?),
        Protocol::Resid => None,
    };

    // 3. Control.
    let control_started = std::time::Instant::now();
    let control = match &cfg.control {
        None => None,
        Some(plan) => Some(control_study(engine, cfg, plan, &a.datasets, &a.concepts)?),
    };
    let control_seconds = control_started.elapsed().as_secs_f64();

    let overall = overall(&a.concepts);
    let mut report = StudyReport {
        resid_version: env!("CARGO_PKG_VERSION").into(),
        protocol: cfg.protocol,
        model: a.model,
        data: cfg.data.display().to_string(),
        template: cfg.template.clone(),
        seed: cfg.seed,
        method: cfg.method,
        train_fraction: if cfg.protocol == Protocol::Paper { cfg.split } else { data::TRAIN_FRACTION },
        split: match cfg.protocol {
            Protocol::Resid => SPLIT_DESCRIPTION.into(),
            Protocol::Paper => PAPER_SPLIT_DESCRIPTION.into(),
        },
        resource_groups: cfg.groups.clone(),
        lang_similarity: cfg.lang_similarity.as_ref().map(|p| p.display().to_string()),
        concepts: a.concepts,
        overall,
        control,
        paper: paper_result,
        timing: Timing { hidden_states: a.stats, analysis_seconds: a.seconds, control_seconds, total_seconds: 0.0 },
    };
    for sub in ["tables", "figures"] {
        let d = cfg.out.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    super::report::write_tables(&cfg.out.join("tables"), &report)?;
    if let Some(p) = &report.paper {
        super::paper_study::write_splits(&cfg.out.join("splits.json"), &a.datasets)?;
        super::paper_study::write_tables(&cfg.out.join("tables"), p)?;
    }
    if cfg.figures {
        super::report::recognition_figures(&cfg.out.join("figures"), &report)?;
        if let Some(p) = &report.paper {
            super::paper_study::figures(&cfg.out.join("figures"), p)?;
        }
        if let Some(c) = &report.control {
            super::report::control_figures(&cfg.out.join("figures"), c)?;
        }
    }
    report.timing.total_seconds = started.elapsed().as_secs_f64();
    write_text(&cfg.out.join("report.md"), &super::report::markdown(&report))?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::input(format!("report.json: {e}")))?;
    write_text(&cfg.out.join("report.json"), &json)?;
    Ok(report)
}

/// The control experiment alone: vectors and best layers for the needed concepts and languages,
/// then the sweep. Writes `control.json`, `control.csv`, `control_generations.jsonl`, the
/// concept vectors and (unless disabled) the control figures.
pub fn run_control_only<B: Backend>(engine: &Engine<B>, cfg: &StudyConfig) -> Result<ControlReport> {
    control_only_inner(engine, cfg).map_err(|e| e.interrupted_keeping(INTERRUPTED_STUDY))
}

fn control_only_inner<B: Backend>(engine: &Engine<B>, cfg: &StudyConfig) -> Result<ControlReport> {
    let plan = cfg.control.as_ref().ok_or_else(|| Error::input("no control plan"))?;
    let a = analyse(engine, cfg, None)?;
    let report = control_study(engine, cfg, plan, &a.datasets, &a.concepts)?;
    super::report::control_table(&cfg.out.join("control.csv"), &report)?;
    if cfg.figures {
        let d = cfg.out.join("figures");
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        super::report::control_figures(&d, &report)?;
    }
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "resid_version": env!("CARGO_PKG_VERSION"),
        "model": a.model,
        "data": cfg.data.display().to_string(),
        "template": cfg.template,
        "seed": cfg.seed,
        "method": cfg.method,
        "best_layers": a.concepts.iter().map(|c| serde_json::json!({
            "concept": c.concept,
            "langs": c.languages.iter().map(|l| serde_json::json!({
                "lang": l.lang,
                "best_layer": l.method(cfg.method).map(|m| m.best_layer),
                "best_accuracy": l.method(cfg.method).map(|m| m.best_accuracy),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "control": report,
    }))
    .map_err(|e| Error::input(format!("control.json: {e}")))?;
    write_text(&cfg.out.join("control.json"), &json)?;
    Ok(report)
}

/// How the paper's split is made (recorded in reports).
pub const PAPER_SPLIT_DESCRIPTION: &str = "the paper's utils.read_data: pairs with pos == neg dropped, keys group|id in file order, CPython random.seed(seed) and random.shuffle, first floor(0.8 n) train (or --split), last n - floor(0.8 n) test";

/// How the split is made (recorded in reports).
pub const SPLIT_DESCRIPTION: &str = "keys (group, id) sorted naturally, Fisher-Yates shuffled with SplitMix64(seed), first round(0.8 n) train; identical pairs dropped after the split";

fn overall(concepts: &[ConceptResult]) -> Overall {
    let avg = |f: &dyn Fn(&TransferSummary) -> f64| mean(concepts.iter().map(|c| f(&c.transfer_summary)));
    let sum_counts = |i: usize| concepts.iter().map(|c| c.transfer_summary.counts[i]).sum();
    let transfer = TransferSummary {
        high_to_low: avg(&|t| t.high_to_low),
        low_to_high: avg(&|t| t.low_to_high),
        high_to_high: avg(&|t| t.high_to_high),
        low_to_low: avg(&|t| t.low_to_low),
        counts: [sum_counts(0), sum_counts(1), sum_counts(2), sum_counts(3)],
    };
    let mut langs: Vec<String> = Vec::new();
    for c in concepts {
        for l in &c.langs {
            if !langs.contains(l) {
                langs.push(l.clone());
            }
        }
    }
    let mean_best_accuracy = langs
        .into_iter()
        .map(|lang| {
            let per: HashMap<String, f64> = Method::ALL
                .iter()
                .chain(&Method::PAPER)
                .map(|&m| {
                    let v = mean(
                        concepts
                            .iter()
                            .flat_map(|c| c.languages.iter().filter(|l| l.lang == lang))
                            .filter_map(|l| l.method(m).map(|r| r.best_accuracy)),
                    );
                    (m.name().to_string(), v)
                })
                .collect();
            (lang, per)
        })
        .collect();
    let above = concepts
        .iter()
        .filter(|c| c.transfer_summary.high_to_low > c.transfer_summary.low_to_high)
        .count();
    Overall { transfer, mean_best_accuracy, concepts_with_high_to_low_above_low_to_high: above }
}

fn control_study<B: Backend>(
    engine: &Engine<B>,
    cfg: &StudyConfig,
    plan: &ControlPlan,
    datasets: &[(String, Vec<LangData>)],
    concepts: &[ConceptResult],
) -> Result<ControlReport> {
    let layers = engine.num_layers();
    let mut tasks = Vec::new();
    for (ci, (concept, langs)) in datasets.iter().enumerate() {
        if plan.concepts.as_ref().is_some_and(|cs| !cs.contains(concept)) {
            continue;
        }
        let result = &concepts[ci];
        let find = |lang: &str| result.languages.iter().position(|l| l.lang == lang);
        for source in &plan.sources {
            let Some(si) = find(source) else {
                if plan.concepts.is_some() {
                    return Err(Error::input(format!("--control-sources: `{source}` has no data for concept `{concept}`")));
                }
                continue;
            };
            let sres = result.languages[si].method(cfg.method).ok_or_else(|| Error::input("internal: no source result"))?;
            let sv = sres.vectors.as_ref().ok_or_else(|| Error::input("internal: no source vectors"))?;
            let steer_layers = match &plan.layers {
                Some(l) => l.clone(),
                None => layers_around(result.best_layer, plan.radius, layers),
            };
            let targets: Vec<String> = plan.targets.clone().unwrap_or_else(|| result.langs.clone());
            for target in targets {
                let Some(ti) = find(&target) else {
                    return Err(Error::input(format!("--control-targets: `{target}` has no data for concept `{concept}`")));
                };
                let tres = result.languages[ti].method(cfg.method).ok_or_else(|| Error::input("internal: no target result"))?;
                let tv = tres.vectors.as_ref().ok_or_else(|| Error::input("internal: no target vectors"))?;
                let score_layer = result.best_layer;
                let prompts: Vec<ControlPrompt> = langs[ti]
                    .split
                    .test
                    .iter()
                    .take(plan.prompts)
                    .map(|p| ControlPrompt { id: p.key.to_string(), text: apply_template(&cfg.template, &p.neg) })
                    .collect();
                if prompts.is_empty() {
                    continue;
                }
                tasks.push(ControlTask {
                    concept: concept.clone(),
                    source: source.clone(),
                    target: target.clone(),
                    steer: Arc::new(sv.file_directions()),
                    layers: steer_layers.clone(),
                    score_dir: tv.direction(score_layer).to_vec(),
                    score_layer,
                    score_scale: tv.scale[score_layer - 1],
                    prompts,
                });
            }
        }
    }
    let (rows, records) = run_control(engine, &tasks, &plan.settings)?;
    let gen_path = cfg.out.join("control_generations.jsonl");
    write_jsonl(&gen_path, &records)?;
    Ok(ControlReport { settings: plan.settings.clone(), rows, generations_file: gen_path.display().to_string() })
}

/// Writes records as JSONL (atomically).
pub fn write_jsonl(path: &Path, records: &[GenerationRecord]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).map_err(|e| Error::input(format!("{}: {e}", path.display())))?);
        text.push('\n');
    }
    write_text(path, &text)
}
