//! The paper protocol's aggregates, tables (CSV and LaTeX), figures and report section, from the
//! per-layer results of a study ([`super::paper`] defines each number), and `resid compare`.
use super::data::sort_paper_order;
use super::paper::{self, ConceptLayers, LangDistances, Table1, DISTANCE_KINDS, SHARED_LANGS};
use super::plot::{bar_figure, heat_figure, line_figure, BarPanel, HeatPanel, LinePanel, Series};
use super::recognition::mean;
use super::report::write_csv;
use super::study::{Analysis, LangData, StudyConfig};
use super::vectors::Method;
use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One cell of the paper's recognition table: the max over layers and the first layer reaching it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PaperCell {
    pub concept: String,
    pub method: Method,
    pub source: String,
    pub target: String,
    pub accuracy: f64,
    pub layer: usize,
}

/// Own-language accuracy of one language, mean over concepts of the max over layers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OwnAccuracy {
    pub lang: String,
    pub cluster_mean: f64,
    /// The paper's random baseline (labels shuffled within each training pair).
    pub random_labels: f64,
    /// resid's extra baseline: Gaussian random directions (mean accuracy of 32 draws per layer).
    pub gaussian_random: f64,
}

/// Everything the paper reports for one model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PaperResult {
    pub family: paper::Family,
    pub family_source: String,
    pub seed: u64,
    pub split: f64,
    /// Languages of the aggregates, in the family's order.
    pub langs: Vec<String>,
    pub high: Vec<String>,
    /// Every (concept, source, target) cell of the cluster-mean vectors and the own-language
    /// cells of the baselines.
    pub recognition: Vec<PaperCell>,
    pub own: Vec<OwnAccuracy>,
    /// `M[s][t]`: mean over concepts of the max over layers.
    pub transfer_mean: Vec<Vec<f64>>,
    /// `M[s][t] − M[t][t]`.
    pub transfer_difference: Vec<Vec<f64>>,
    /// Per target: the share of other sources with a difference ≥ 0.
    pub transfer_rate: Vec<f64>,
    /// Mean over concepts of the max over layers of the cosine; 1 on the diagonal.
    pub consistency: Vec<Vec<f64>>,
    /// The shared languages present, behind the depth curve.
    pub depth_langs: Vec<String>,
    /// `(layer / L, mean cosine)` per layer.
    pub depth: Vec<(f64, f64)>,
    pub table1: Option<Table1>,
}

/// Computes the paper's aggregates from a study's per-layer results.
pub(crate) fn paper_result(cfg: &StudyConfig, a: &Analysis) -> Result<PaperResult> {
    let mut langs: Vec<String> = Vec::new();
    for c in &a.concepts {
        for l in &c.langs {
            if !langs.contains(l) {
                langs.push(l.clone());
            }
        }
    }
    if cfg.langs.is_none() {
        langs = cfg.family.order_langs(&langs);
    }
    let mut recognition = Vec::new();
    for c in &a.concepts {
        for (s, ls) in c.langs.iter().enumerate() {
            for (t, lt) in c.langs.iter().enumerate() {
                let per: Vec<f64> = c.crosslingual_by_layer.iter().map(|m| m[s][t]).collect();
                let (accuracy, layer) = paper::max_over_layers(&per);
                recognition.push(PaperCell { concept: c.concept.clone(), method: Method::MeanDiff, source: ls.clone(), target: lt.clone(), accuracy, layer });
            }
        }
        for l in &c.languages {
            for m in [Method::RandomLabels, Method::Random] {
                if let Some(r) = l.method(m) {
                    let (accuracy, layer) = paper::max_over_layers(&r.accuracy);
                    recognition.push(PaperCell { concept: c.concept.clone(), method: m, source: l.lang.clone(), target: l.lang.clone(), accuracy, layer });
                }
            }
        }
    }
    let own_of = |lang: &str, m: Method| {
        mean(recognition.iter().filter(|x| x.method == m && x.source == lang && x.target == lang).map(|x| x.accuracy))
    };
    let own = langs
        .iter()
        .map(|l| OwnAccuracy {
            lang: l.clone(),
            cluster_mean: own_of(l, Method::MeanDiff),
            random_labels: own_of(l, Method::RandomLabels),
            gaussian_random: own_of(l, Method::Random),
        })
        .collect();
    let acc: Vec<ConceptLayers> = a.concepts.iter().map(|c| ConceptLayers { langs: &c.langs, by_layer: &c.crosslingual_by_layer }).collect();
    let cos: Vec<ConceptLayers> = a.concepts.iter().map(|c| ConceptLayers { langs: &c.langs, by_layer: &c.cosine_by_layer }).collect();
    let transfer_mean = paper::mean_of_max(&acc, &langs);
    let transfer_difference = paper::transfer_difference(&transfer_mean);
    let transfer_rate = paper::transfer_rate(&transfer_difference);
    let consistency = paper::consistency_heatmap(&cos, &langs);
    let depth_langs: Vec<String> = SHARED_LANGS.iter().filter(|s| langs.iter().any(|l| l == *s)).map(|s| s.to_string()).collect();
    let depth = paper::depth_curve(&cos, &SHARED_LANGS);
    let table1 = match &cfg.lang2vec {
        Some(p) => Some(paper::table1(&consistency, &langs, &cfg.groups.high, &LangDistances::read(p)?)),
        None => None,
    };
    Ok(PaperResult {
        family: cfg.family,
        family_source: cfg.family_source.clone(),
        seed: cfg.seed,
        split: cfg.split,
        langs,
        high: cfg.groups.high.clone(),
        recognition,
        own,
        transfer_mean,
        transfer_difference,
        transfer_rate,
        consistency,
        depth_langs,
        depth,
        table1,
    })
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    let out = crate::io::AtomicPath::new(path);
    std::fs::write(out.tmp(), text.as_bytes()).map_err(|e| Error::io(path, e))?;
    out.commit()
}

/// `splits.json`: `{concept: {lang: {"train": [keys], "test": [keys]}}}` with the paper's keys
/// `group|id`, in the paper's order.
pub(crate) fn write_splits(path: &Path, datasets: &[(String, Vec<LangData>)]) -> Result<()> {
    let mut root = serde_json::Map::new();
    for (concept, langs) in datasets {
        let mut per = serde_json::Map::new();
        for l in langs {
            if let Some(p) = &l.paper {
                per.insert(
                    l.lang.clone(),
                    serde_json::json!({
                        "train": p.train.iter().map(paper::paper_key).collect::<Vec<_>>(),
                        "test": p.test.iter().map(paper::paper_key).collect::<Vec<_>>(),
                    }),
                );
            }
        }
        root.insert(concept.clone(), serde_json::Value::Object(per));
    }
    let text = serde_json::to_string_pretty(&root).map_err(|e| Error::input(format!("{}: {e}", path.display())))?;
    write_text(path, &text)
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6}")
    } else {
        String::new()
    }
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}", x * 100.0)
    } else {
        "--".into()
    }
}

/// Writes a CSV table and its LaTeX twin (`.tex`, booktabs; accuracies in percent).
fn table(dir: &Path, stem: &str, caption: &str, header: &[&str], rows: &[Vec<String>], tex_rows: &[Vec<String>]) -> Result<()> {
    write_csv(&dir.join(format!("{stem}.csv")), header, rows)?;
    let h: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    write_text(&dir.join(format!("{stem}.tex")), &paper::latex_table(caption, &h, tex_rows))
}

/// `paper_recognition`, `paper_own_accuracy`, `paper_transfer`, `paper_transfer_rate`,
/// `paper_consistency` (+ `paper_consistency_depth`, `paper_table1`), CSV and `.tex`.
pub fn write_tables(dir: &Path, p: &PaperResult) -> Result<()> {
    let note = "(paper protocol: max over layers of the test accuracy; the layer is chosen on the test set)";
    let rec: Vec<&PaperCell> = p.recognition.iter().filter(|x| x.method == Method::MeanDiff).collect();
    let rows: Vec<Vec<String>> =
        rec.iter().map(|x| vec![x.concept.clone(), x.source.clone(), x.target.clone(), num(x.accuracy), x.layer.to_string()]).collect();
    let tex: Vec<Vec<String>> =
        rec.iter().map(|x| vec![x.concept.clone(), x.source.clone(), x.target.clone(), pct(x.accuracy), x.layer.to_string()]).collect();
    table(dir, "paper_recognition", &format!("Concept recognition accuracy (\\%), cluster-mean vectors of the source on the target's test pairs {note}"), &["concept", "source", "target", "accuracy", "layer"], &rows, &tex)?;

    let rows: Vec<Vec<String>> = p.own.iter().map(|o| vec![o.lang.clone(), num(o.cluster_mean), num(o.random_labels), num(o.gaussian_random)]).collect();
    let tex: Vec<Vec<String>> = p.own.iter().map(|o| vec![o.lang.clone(), pct(o.cluster_mean), pct(o.random_labels), pct(o.gaussian_random)]).collect();
    table(dir, "paper_own_accuracy", &format!("Own-language recognition accuracy (\\%), mean over concepts {note}; random labels: the paper's baseline; Gaussian: resid's extra"), &["lang", "cluster_mean", "random_labels", "gaussian_random"], &rows, &tex)?;

    let k = p.langs.len();
    let pairs = || (0..k).flat_map(|s| (0..k).map(move |t| (s, t)));
    let rows: Vec<Vec<String>> = pairs()
        .map(|(s, t)| vec![p.langs[s].clone(), p.langs[t].clone(), num(p.transfer_mean[s][t]), num(p.transfer_difference[s][t])])
        .collect();
    let tex: Vec<Vec<String>> = pairs()
        .map(|(s, t)| vec![p.langs[s].clone(), p.langs[t].clone(), pct(p.transfer_mean[s][t]), pct(p.transfer_difference[s][t])])
        .collect();
    table(dir, "paper_transfer", &format!("Cross-lingual transfer: mean over concepts of the max over layers, and its difference to the target's own {note}"), &["source", "target", "mean_accuracy", "difference"], &rows, &tex)?;

    let sources = k.saturating_sub(1).to_string();
    let rows: Vec<Vec<String>> = p.langs.iter().zip(&p.transfer_rate).map(|(l, r)| vec![l.clone(), sources.clone(), num(*r)]).collect();
    let tex: Vec<Vec<String>> = p.langs.iter().zip(&p.transfer_rate).map(|(l, r)| vec![l.clone(), sources.clone(), pct(*r)]).collect();
    table(dir, "paper_transfer_rate", "Transfer rate: per target, the share (\\%) of the other source languages whose difference is at least 0", &["target", "sources", "rate"], &rows, &tex)?;

    let rows: Vec<Vec<String>> = pairs().map(|(a, b)| vec![p.langs[a].clone(), p.langs[b].clone(), num(p.consistency[a][b])]).collect();
    let tex: Vec<Vec<String>> = pairs().map(|(a, b)| vec![p.langs[a].clone(), p.langs[b].clone(), format!("{:.2}", p.consistency[a][b])]).collect();
    table(dir, "paper_consistency", "Cross-lingual consistency: cosine of the sign-corrected concept vectors, max over layers, mean over concepts", &["lang_a", "lang_b", "cosine"], &rows, &tex)?;

    let rows: Vec<Vec<String>> = p.depth.iter().enumerate().map(|(i, (x, v))| vec![(i + 1).to_string(), num(*x), num(*v)]).collect();
    let tex: Vec<Vec<String>> = p.depth.iter().enumerate().map(|(i, (x, v))| vec![(i + 1).to_string(), format!("{x:.3}"), format!("{v:.3}")]).collect();
    table(dir, "paper_consistency_depth", &format!("Mean cosine over the shared languages ({}) by relative depth", p.depth_langs.join(", ")), &["layer", "relative_depth", "cosine"], &rows, &tex)?;

    if let Some(t) = &p.table1 {
        let rows: Vec<Vec<String>> = DISTANCE_KINDS.iter().enumerate().map(|(i, k)| vec![k.to_string(), num(t.direct[i]), num(t.split[i])]).collect();
        let tex: Vec<Vec<String>> = DISTANCE_KINDS.iter().enumerate().map(|(i, k)| vec![k.to_string(), format!("{:.2}", t.direct[i]), format!("{:.2}", t.split[i])]).collect();
        table(dir, "paper_table1", "Pearson correlation of the consistency with 1 - lang2vec distance: direct (all pairs) and split (mean of pairs with a high-resource language and pairs of two low-resource languages)", &["distance", "direct", "split"], &rows, &tex)?;
    }
    Ok(())
}

/// The paper's figures (PNG and SVG): own-language bars, cross-lingual and transfer heatmaps,
/// consistency heatmap and depth curve.
pub fn figures(dir: &Path, p: &PaperResult) -> Result<()> {
    let bars = BarPanel {
        title: "mean over concepts of the max over layers".into(),
        categories: p.langs.clone(),
        series: vec![
            ("cluster mean".into(), p.own.iter().map(|o| o.cluster_mean).collect()),
            ("random labels (paper's baseline)".into(), p.own.iter().map(|o| o.random_labels).collect()),
            ("Gaussian directions (extra)".into(), p.own.iter().map(|o| o.gaussian_random).collect()),
        ],
        y_desc: "accuracy".into(),
        y_range: (0.0, 1.0),
    };
    bar_figure(&dir.join("paper_own_accuracy"), "Own-language recognition accuracy (paper protocol)", &bars)?;
    let heat = |title: &str, values: &[Vec<f64>], x: &str, y: &str, diverging: bool| HeatPanel {
        title: title.into(),
        labels: p.langs.clone(),
        values: values.to_vec(),
        vmin: 0.0,
        vmax: 1.0,
        x_desc: x.into(),
        y_desc: y.into(),
        diverging,
    };
    let mut concepts: Vec<&str> = Vec::new();
    for x in &p.recognition {
        if !concepts.contains(&x.concept.as_str()) {
            concepts.push(&x.concept);
        }
    }
    let mut panels: Vec<HeatPanel> = concepts
        .iter()
        .map(|&c| {
            let values: Vec<Vec<f64>> = p
                .langs
                .iter()
                .map(|s| {
                    p.langs
                        .iter()
                        .map(|t| {
                            p.recognition
                                .iter()
                                .find(|x| x.method == Method::MeanDiff && x.concept == c && &x.source == s && &x.target == t)
                                .map_or(f64::NAN, |x| x.accuracy)
                        })
                        .collect()
                })
                .collect();
            heat(c, &values, "target (test pairs)", "source (vectors)", false)
        })
        .collect();
    panels.push(heat("mean over concepts", &p.transfer_mean, "target (test pairs)", "source (vectors)", false));
    heat_figure(&dir.join("paper_crosslingual"), "Cross-lingual recognition, max over layers (paper protocol)", &panels, (0.0, 1.0))?;
    let span = p.transfer_difference.iter().flatten().filter(|v| v.is_finite()).fold(0.01f64, |m, v| m.max(v.abs()));
    heat_figure(
        &dir.join("paper_transfer"),
        "Transfer: M[s][t] - M[t][t] (red: at least as good as own)",
        &[heat("difference", &p.transfer_difference, "target", "source", true)],
        (-span, span),
    )?;
    let lo = p.consistency.iter().flatten().filter(|v| v.is_finite()).fold(1.0f64, |m, &v| m.min(v));
    heat_figure(
        &dir.join("paper_consistency"),
        "Consistency: cosine of concept vectors, max over layers, mean over concepts",
        &[heat("cosine", &p.consistency, "language", "language", true)],
        ((lo * 10.0).floor() / 10.0, 1.0),
    )?;
    let pts: Vec<(f64, f64)> = p.depth.clone();
    let (ylo, yhi) = pts.iter().filter(|q| q.1.is_finite()).fold((0.0f64, 1.0f64), |(a, b), q| (a.min(q.1), b.max(q.1)));
    let series = vec![Series { label: format!("mean over {} and concepts", p.depth_langs.join(" ")), points: pts, color: 0, dashed: false }];
    line_figure(
        &dir.join("paper_consistency_depth"),
        "Cross-lingual similarity of concept vectors across layers (paper protocol)",
        &[LinePanel {
            title: "shared languages".into(),
            x_desc: "layer (relative to network depth)".into(),
            y_desc: "cosine similarity".into(),
            x_range: (0.0, 1.0),
            y_range: (ylo, yhi),
            series: series.clone(),
            reference: None,
            log2_x: false,
        }],
        &series,
    )
}

fn f2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "–".into()
    }
}

/// The report's section on the paper protocol.
pub fn markdown(p: &PaperResult, resid_best: &[(String, usize)]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## The paper's protocol\n");
    let _ = writeln!(
        s,
        "Every number in this section comes from `--protocol paper`, the computation of the paper's code: split by `utils.read_data` (CPython `random.seed({})`, `--split {}`), RepE cluster-mean vectors with RepE's signs, and **every cell the max over layers of the test accuracy: the paper chooses the layer on the test set**, which flatters every number. resid's own choice (`--protocol resid`'s report) is one layer per concept, the same for every language and pair: {}.\n",
        p.seed,
        p.split,
        resid_best.iter().map(|(c, l)| format!("{c} {l}")).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(
        s,
        "Family settings: `{}` ({}); languages in its order: {}; high-resource: {}.\n",
        p.family.name(),
        p.family_source,
        p.langs.join(" "),
        p.high.join(" ")
    );
    let _ = writeln!(s, "Own-language accuracy (mean over concepts of the max over layers):\n");
    let _ = writeln!(s, "| | {} |", p.langs.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(p.langs.len()));
    for (name, f) in [
        ("cluster mean", &(|o: &OwnAccuracy| o.cluster_mean) as &dyn Fn(&OwnAccuracy) -> f64),
        ("random labels (paper's baseline)", &|o: &OwnAccuracy| o.random_labels),
        ("Gaussian directions (resid's extra)", &|o: &OwnAccuracy| o.gaussian_random),
    ] {
        let _ = writeln!(s, "| {name} | {} |", p.own.iter().map(|o| f2(f(o))).collect::<Vec<_>>().join(" | "));
    }
    let _ = writeln!(s, "\nTransfer rate (share of the other sources whose M[s][t] − M[t][t] ≥ 0):\n");
    let _ = writeln!(s, "| target | {} |", p.langs.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(p.langs.len()));
    let _ = writeln!(s, "| rate | {} |", p.transfer_rate.iter().map(|&r| f2(r)).collect::<Vec<_>>().join(" | "));
    let k = p.langs.len();
    let off = mean((0..k).flat_map(|a| (0..k).filter(move |&b| b != a).map(move |b| (a, b))).map(|(a, b)| p.consistency[a][b]));
    let _ = writeln!(s, "\nConsistency (max over layers of the cosine, mean over concepts): mean over language pairs {}.", f2(off));
    if let Some(t) = &p.table1 {
        let _ = writeln!(s, "\nTable 1 (Pearson with 1 − lang2vec distance; direct over {} ordered pairs, split: the mean of {} pairs with a high-resource language and {} low–low pairs; the paper's code fills the direct correlation one cell late, this is the correlation its text describes):\n", t.pairs[0], t.pairs[1], t.pairs[2]);
        let _ = writeln!(s, "| | {} |", DISTANCE_KINDS.join(" | "));
        let _ = writeln!(s, "|---|---|---|---|---|");
        let _ = writeln!(s, "| direct | {} |", t.direct.iter().map(|&x| f2(x)).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(s, "| split | {} |", t.split.iter().map(|&x| f2(x)).collect::<Vec<_>>().join(" | "));
        if !t.missing.is_empty() {
            let _ = writeln!(s, "\nLanguage pairs without a distance (left out): {}.", t.missing.join(", "));
        }
    }
    let _ = writeln!(s, "\nTables: `tables/paper_*.csv` and `.tex`; split: `splits.json`; figures: `figures/paper_*.png` (`.svg`).\n");
    for (f, what) in [
        ("paper_own_accuracy", "Own-language accuracy per language"),
        ("paper_crosslingual", "Cross-lingual recognition, max over layers"),
        ("paper_transfer", "Transfer difference M[s][t] − M[t][t]"),
        ("paper_consistency", "Consistency heatmap"),
        ("paper_consistency_depth", "Consistency by relative depth"),
    ] {
        let _ = writeln!(s, "![{what}](figures/{f}.png)\n");
    }
    s
}

/// One finished study for `resid compare`: its label and own-language accuracy per (concept, lang).
struct Finished {
    label: String,
    cells: Vec<(String, String, f64)>,
}

fn read_finished(dir: &Path) -> Result<Finished> {
    let report = dir.join("report.json");
    let text = std::fs::read_to_string(&report).map_err(|e| Error::io(&report, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::input(format!("{}: malformed JSON: {e}", report.display())))?;
    if v.get("protocol").and_then(|p| p.as_str()) != Some("paper") {
        return Err(Error::input(format!("{}: not a study run with --protocol paper (no `\"protocol\": \"paper\"`)", report.display())));
    }
    let label = v
        .pointer("/model/dir")
        .and_then(|d| d.as_str())
        .and_then(|d| Path::new(d).file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    let csv = dir.join("tables").join("paper_recognition.csv");
    let text = std::fs::read_to_string(&csv).map_err(|e| Error::io(&csv, e))?;
    let mut lines = text.lines();
    if lines.next() != Some("concept,source,target,accuracy,layer") {
        return Err(Error::input(format!("{}: line 1: expected the header concept,source,target,accuracy,layer", csv.display())));
    }
    let mut cells = Vec::new();
    for (i, line) in lines.enumerate() {
        let c: Vec<&str> = line.split(',').collect();
        if c.len() != 5 {
            return Err(Error::input(format!("{}: line {}: {} cells, expected 5", csv.display(), i + 2, c.len())));
        }
        if c[1] == c[2] {
            let acc = if c[3].is_empty() {
                f64::NAN
            } else {
                c[3].parse().map_err(|_| Error::input(format!("{}: line {}: accuracy `{}` is not a number", csv.display(), i + 2, c[3])))?
            };
            cells.push((c[0].to_owned(), c[1].to_owned(), acc));
        }
    }
    Ok(Finished { label, cells })
}

/// `resid compare`: reads finished paper-protocol study directories (`report.json`,
/// `tables/paper_recognition.csv`) and writes the cross-model own-language accuracy (the
/// paper's Fig. 2 and Table 6) under `out`: `compare.csv` (model, concept, lang, accuracy;
/// concept `mean` is the mean over concepts), one `compare_{concept}.tex` per concept and
/// `compare_mean.tex` (models × languages + Avg), and `compare.png`/`.svg`. Reruns no model.
pub fn compare(dirs: &[PathBuf], out: &Path, figures: bool) -> Result<Vec<String>> {
    if dirs.is_empty() {
        return Err(Error::input("resid compare: give at least one finished study directory"));
    }
    let runs = dirs.iter().map(|d| read_finished(d)).collect::<Result<Vec<_>>>()?;
    let mut labels: Vec<String> = Vec::new();
    for r in &runs {
        let mut l = r.label.clone();
        let mut n = 2;
        while labels.contains(&l) {
            l = format!("{} ({n})", r.label);
            n += 1;
        }
        labels.push(l);
    }
    let mut langs: Vec<String> = Vec::new();
    let mut concepts: Vec<String> = Vec::new();
    for r in &runs {
        for (c, l, _) in &r.cells {
            if !langs.contains(l) {
                langs.push(l.clone());
            }
            if !concepts.contains(c) {
                concepts.push(c.clone());
            }
        }
    }
    sort_paper_order(&mut langs, &super::data::PAPER_LANGS);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let get = |r: &Finished, c: &str, l: &str| {
        if c == "mean" {
            mean(r.cells.iter().filter(|x| x.1 == l).map(|x| x.2))
        } else {
            r.cells.iter().find(|x| x.0 == c && x.1 == l).map_or(f64::NAN, |x| x.2)
        }
    };
    let mut rows = Vec::new();
    let mut all_concepts = concepts.clone();
    all_concepts.push("mean".into());
    let mut written = Vec::new();
    for c in &all_concepts {
        let mut tex = Vec::new();
        for (r, label) in runs.iter().zip(&labels) {
            let vals: Vec<f64> = langs.iter().map(|l| get(r, c, l)).collect();
            for (l, &v) in langs.iter().zip(&vals) {
                rows.push(vec![label.clone(), c.clone(), l.clone(), num(v)]);
            }
            let mut row = vec![label.clone()];
            row.extend(vals.iter().map(|&v| pct(v)));
            row.push(pct(mean(vals.iter().copied())));
            tex.push(row);
        }
        let mut header = vec!["model".to_string()];
        header.extend(langs.iter().cloned());
        header.push("Avg".into());
        let path = out.join(format!("compare_{c}.tex"));
        write_text(
            &path,
            &paper::latex_table(&format!("Own-language recognition accuracy (\\%) for {c} (paper protocol: max over layers on the test set)"), &header, &tex),
        )?;
        written.push(path.display().to_string());
    }
    let csv = out.join("compare.csv");
    write_csv(&csv, &["model", "concept", "lang", "accuracy"], &rows)?;
    written.insert(0, csv.display().to_string());
    if figures {
        let panel = BarPanel {
            title: "mean over concepts of the max over layers".into(),
            categories: langs.clone(),
            series: runs.iter().zip(&labels).map(|(r, label)| (label.clone(), langs.iter().map(|l| get(r, "mean", l)).collect())).collect(),
            y_desc: "accuracy".into(),
            y_range: (0.0, 1.0),
        };
        bar_figure(&out.join("compare"), "Own-language recognition accuracy by model (paper protocol)", &panel)?;
        written.push(out.join("compare.png").display().to_string());
    }
    Ok(written)
}
