//! The study's tables (CSV), figures and readable summary (Markdown).
use super::plot::{heat_figure, line_figure, HeatPanel, LinePanel, Series, BASELINE};
use super::recognition::mean;
use super::study::StudyReport;
use super::vectors::Method;
use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::Path;

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6}")
    } else {
        String::new()
    }
}

fn cell(s: &str) -> String {
    if s.contains(',') || s.contains('"') || s.contains('\n') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Writes a CSV file atomically.
pub fn write_csv(path: &Path, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut text = header.join(",");
    text.push('\n');
    for r in rows {
        text.push_str(&r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(","));
        text.push('\n');
    }
    let out = crate::io::AtomicPath::new(path);
    std::fs::write(out.tmp(), text.as_bytes()).map_err(|e| Error::io(path, e))?;
    out.commit()
}

/// recognition.csv, best_layers.csv, crosslingual.csv, cosine.csv, transfer.csv, control.csv.
pub fn write_tables(dir: &Path, r: &StudyReport) -> Result<()> {
    let mut rec = Vec::new();
    let mut best = Vec::new();
    let mut cross = Vec::new();
    let mut cos = Vec::new();
    let mut transfer = Vec::new();
    for c in &r.concepts {
        for l in &c.languages {
            for m in &l.methods {
                for (i, (&acc, &tr)) in m.accuracy.iter().zip(&m.train_accuracy).enumerate() {
                    rec.push(vec![
                        c.concept.clone(),
                        l.lang.clone(),
                        m.method.name().into(),
                        (i + 1).to_string(),
                        num(tr),
                        num(acc),
                        l.n_train.to_string(),
                        l.n_test.to_string(),
                    ]);
                }
                best.push(vec![c.concept.clone(), l.lang.clone(), m.method.name().into(), m.best_layer.to_string(), num(m.best_accuracy)]);
            }
        }
        for (li, m) in c.crosslingual_by_layer.iter().enumerate() {
            for (a, la) in c.langs.iter().enumerate() {
                for (b, lb) in c.langs.iter().enumerate() {
                    cross.push(vec![c.concept.clone(), (li + 1).to_string(), la.clone(), lb.clone(), num(m[a][b])]);
                }
            }
        }
        for (a, la) in c.langs.iter().enumerate() {
            for (b, lb) in c.langs.iter().enumerate() {
                if a < b {
                    for (li, m) in c.cosine_by_layer.iter().enumerate() {
                        cos.push(vec![c.concept.clone(), (li + 1).to_string(), la.clone(), lb.clone(), num(m[a][b])]);
                    }
                    cos.push(vec![c.concept.clone(), "mean".into(), la.clone(), lb.clone(), num(c.cosine_mean_over_layers[a][b])]);
                }
                transfer.push(vec![
                    c.concept.clone(),
                    c.best_layer.to_string(),
                    la.clone(),
                    lb.clone(),
                    num(c.crosslingual_at_best_layer[a][b]),
                    num(c.crosslingual_at_best_layer[b][b]),
                    num(c.transfer_relative[a][b]),
                ]);
            }
        }
    }
    write_csv(&dir.join("recognition.csv"), &["concept", "lang", "method", "layer", "train_accuracy", "test_accuracy", "n_train", "n_test"], &rec)?;
    write_csv(&dir.join("best_layers.csv"), &["concept", "lang", "method", "best_layer", "best_accuracy"], &best)?;
    write_csv(&dir.join("crosslingual.csv"), &["concept", "layer", "source", "target", "accuracy"], &cross)?;
    write_csv(&dir.join("cosine.csv"), &["concept", "layer", "lang_a", "lang_b", "cosine"], &cos)?;
    write_csv(
        &dir.join("transfer.csv"),
        &["concept", "layer", "source", "target", "accuracy", "target_own_accuracy", "relative"],
        &transfer,
    )?;
    if let Some(ctrl) = &r.control {
        control_table(&dir.join("control.csv"), ctrl)?;
    }
    Ok(())
}

/// control.csv: one row per (concept, source, target, coefficient).
pub fn control_table(path: &Path, ctrl: &super::study::ControlReport) -> Result<()> {
    {
        let rows: Vec<Vec<String>> = ctrl
            .rows
            .iter()
            .map(|x| {
                vec![
                    x.concept.clone(),
                    x.source.clone(),
                    x.target.clone(),
                    format!("{}", x.coef),
                    x.layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(" "),
                    x.score_layer.to_string(),
                    x.prompts.to_string(),
                    num(x.score_mean),
                    num(x.shift),
                    num(x.shift_rel),
                    num(x.nll_mean),
                    num(x.nll_delta),
                    num(x.mean_generated_tokens),
                ]
            })
            .collect();
        write_csv(
            path,
            &[
                "concept", "source", "target", "coef", "layers", "score_layer", "prompts", "score_mean", "shift", "shift_rel", "nll_mean",
                "nll_delta", "mean_generated_tokens",
            ],
            &rows,
        )?;
    }
    Ok(())
}

/// A heatmap panel's title and values from a concept's results.
type PanelOf = dyn Fn(&super::study::ConceptResult) -> (String, Vec<Vec<f64>>);

/// accuracy_by_layer, crosslingual_recognition and cosine_similarity (PNG and SVG).
pub fn recognition_figures(dir: &Path, r: &StudyReport) -> Result<()> {
    let l = r.model.layers as f64;
    let all_langs = study_langs(r);
    let color = |lang: &str| all_langs.iter().position(|x| x == lang).unwrap_or(0);
    let mut acc_panels = Vec::new();
    for c in &r.concepts {
        let mut series: Vec<Series> = c
            .languages
            .iter()
            .filter_map(|lang| {
                lang.method(r.method).map(|m| Series {
                    label: lang.lang.clone(),
                    points: m.accuracy.iter().enumerate().map(|(j, &a)| ((j + 1) as f64, a)).collect(),
                    color: color(&lang.lang),
                    dashed: false,
                })
            })
            .collect();
        let layers = r.model.layers;
        let random: Vec<(f64, f64)> = (0..layers)
            .map(|j| {
                let v = mean(c.languages.iter().filter_map(|lang| lang.method(Method::Random).map(|m| m.accuracy[j])));
                ((j + 1) as f64, v)
            })
            .collect();
        series.push(Series { label: "random".into(), points: random, color: BASELINE, dashed: true });
        acc_panels.push(LinePanel {
            title: c.concept.clone(),
            x_desc: "layer".into(),
            y_desc: "test accuracy".into(),
            x_range: (1.0, l.max(2.0)),
            y_range: (0.0, 1.02),
            series,
            reference: Some(0.5),
            log2_x: false,
        });
    }
    let mut legend: Vec<Series> =
        all_langs.iter().map(|x| Series { label: x.clone(), points: Vec::new(), color: color(x), dashed: false }).collect();
    legend.push(Series {
        label: format!("random directions (mean of {} draws and of the languages)", super::study::RANDOM_DRAWS),
        points: Vec::new(),
        color: BASELINE,
        dashed: true,
    });
    line_figure(
        &dir.join("accuracy_by_layer"),
        &format!("Recognition accuracy by layer ({} vectors, test pairs)", r.method.name()),
        &acc_panels,
        &legend,
    )?;

    let heat = |f: &PanelOf| -> Vec<HeatPanel> {
        r.concepts
            .iter()
            .map(|c| {
                let (title, values) = f(c);
                HeatPanel {
                    title,
                    labels: c.langs.clone(),
                    values,
                    vmin: 0.0,
                    vmax: 1.0,
                    x_desc: "target (test pairs)".into(),
                    y_desc: "source (vectors)".into(),
                    diverging: false,
                }
            })
            .collect()
    };
    let cross = heat(&|c| (format!("{} (layer {})", c.concept, c.best_layer), c.crosslingual_at_best_layer.clone()));
    heat_figure(
        &dir.join("crosslingual_recognition"),
        "Cross-lingual recognition accuracy at each concept's best layer",
        &cross,
        (0.0, 1.0),
    )?;
    let mut cos = heat(&|c| (c.concept.clone(), c.cosine_mean_over_layers.clone()));
    for p in cos.iter_mut() {
        p.x_desc = "language".into();
        p.y_desc = "language".into();
    }
    let lo = cos.iter().flat_map(|p| p.values.iter().flatten().copied()).filter(|v| v.is_finite()).fold(0.0, f64::min);
    heat_figure(&dir.join("cosine_similarity"), "Cosine similarity of concept vectors (mean over layers)", &cos, ((lo * 10.0).floor() / 10.0, 1.0))
}

/// Every language of the study, in the order first seen.
fn study_langs(r: &StudyReport) -> Vec<String> {
    let mut langs: Vec<String> = Vec::new();
    for c in &r.concepts {
        for l in &c.langs {
            if !langs.contains(l) {
                langs.push(l.clone());
            }
        }
    }
    langs
}

/// control_sweep and control_fluency (PNG and SVG).
pub fn control_figures(dir: &Path, ctrl: &super::study::ControlReport) -> Result<()> {
    let coefs: Vec<f64> = ctrl.settings.coefs.iter().map(|&c| c as f64).collect();
    let (cmin, cmax) = coefs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &c| (a.min(c), b.max(c)));
    let (cmin, cmax) = if cmin < cmax { (cmin, cmax) } else { (cmin - 1.0, cmax + 1.0) };
    let mut concepts: Vec<&str> = Vec::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    for x in &ctrl.rows {
        if !concepts.contains(&x.concept.as_str()) {
            concepts.push(&x.concept);
        }
        let k = (x.source.clone(), x.target.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let sources: std::collections::BTreeSet<&str> = ctrl.rows.iter().map(|x| x.source.as_str()).collect();
    let label = |s: &str, t: &str| if sources.len() > 1 { format!("{s}→{t}") } else { t.to_owned() };
    let src = sources.iter().copied().collect::<Vec<_>>().join(",");
    let pad = |lo: f64, hi: f64| {
        if !lo.is_finite() || !hi.is_finite() {
            (-1.0, 1.0)
        } else {
            let m = ((hi - lo) * 0.08).max(1e-3);
            (lo - m, hi + m)
        }
    };
    let panels = |f: &dyn Fn(&super::control::ControlRow) -> f64, y_desc: &str, zero: bool| -> Vec<LinePanel> {
        concepts
            .iter()
            .map(|&concept| {
                let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
                let series = keys
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (s, t))| {
                        let mut pts: Vec<(f64, f64)> = ctrl
                            .rows
                            .iter()
                            .filter(|x| x.concept == concept && &x.source == s && &x.target == t)
                            .map(|x| (x.coef as f64, f(x)))
                            .collect();
                        if pts.is_empty() {
                            return None;
                        }
                        pts.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
                        for p in pts.iter().filter(|p| p.1.is_finite()) {
                            lo = lo.min(p.1);
                            hi = hi.max(p.1);
                        }
                        Some(Series { label: label(s, t), points: pts, color: i, dashed: false })
                    })
                    .collect();
                let (lo, hi) = if zero { (lo.min(0.0), hi.max(0.0)) } else { (lo, hi) };
                LinePanel {
                    title: concept.to_string(),
                    x_desc: "coefficient".into(),
                    y_desc: y_desc.into(),
                    x_range: (cmin, cmax),
                    y_range: pad(lo, hi),
                    series,
                    reference: zero.then_some(0.0),
                    log2_x: false,
                }
            })
            .collect()
    };
    if concepts.is_empty() {
        return Ok(());
    }
    let legend: Vec<Series> =
        keys.iter().enumerate().map(|(i, (s, t))| Series { label: label(s, t), points: Vec::new(), color: i, dashed: false }).collect();
    line_figure(
        &dir.join("control_sweep"),
        &format!("Cross-lingual control with {src} vectors: target concept-score shift (in pair separations)"),
        &panels(&|x| x.shift_rel, "score shift (separations)", true),
        &legend,
    )?;
    line_figure(
        &dir.join("control_fluency"),
        &format!("Cross-lingual control with {src} vectors: NLL of the generated tokens (unsteered model)"),
        &panels(&|x| x.nll_mean, "NLL (nats/token)", false),
        &legend,
    )
}

fn f2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "–".into()
    }
}

/// The readable summary.
pub fn markdown(r: &StudyReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Multilingual value-concept study\n");
    let _ = writeln!(
        s,
        "Following Xu et al. (Findings of EMNLP 2024), *Exploring Multilingual Concepts of Human Values in Large Language Models*.\n"
    );
    let _ = writeln!(
        s,
        "* Protocol: `{}` ({}); every number below comes from it",
        r.protocol.name(),
        match r.protocol {
            super::paper::Protocol::Paper => "the paper's code: its split, RepE's signs, the max over layers on the test set; resid's per-concept layer is reported beside it",
            super::paper::Protocol::Resid => "resid's own: SplitMix64 split, one layer per concept for every cell",
        }
    );
    let _ = writeln!(s, "* Model: `{}` ({}, {} layers, hidden size {})", r.model.dir, r.model.architecture, r.model.layers, r.model.hidden);
    let _ = writeln!(s, "* Data: `{}`; template `{}`; seed {}", r.data, r.template.replace('\n', "\\n"), r.seed);
    match r.protocol {
        super::paper::Protocol::Resid => {
            let _ = writeln!(s, "* Split: {} ({}% train)", r.split, (r.train_fraction * 100.0).round());
        }
        super::paper::Protocol::Paper => {
            let _ = writeln!(s, "* Split: {} (--split {}; keys in `splits.json`)", r.split, r.train_fraction);
        }
    }
    let _ = writeln!(
        s,
        "* Representations: last-token hidden states at indices 1..={} (Hugging Face `output_hidden_states`); primary method `{}`; baselines {}",
        r.model.layers,
        r.method.name(),
        match r.protocol {
            super::paper::Protocol::Paper => "`random-labels` (the paper's) and `random` (Gaussian directions, resid's extra)",
            super::paper::Protocol::Resid => "`pca` and `random`",
        }
    );
    let hs = &r.timing.hidden_states;
    let _ = writeln!(
        s,
        "* Runtime: {:.1} s in all; hidden states of {} unique stimuli ({} computed, {} tokens, {:.1} s; {} from the cache); analyses {:.1} s; control {:.1} s\n",
        r.timing.total_seconds,
        hs.requested,
        hs.computed,
        hs.tokens_computed,
        hs.seconds,
        hs.from_cache,
        r.timing.analysis_seconds,
        r.timing.control_seconds
    );

    let mut langs: Vec<String> = Vec::new();
    for c in &r.concepts {
        for l in &c.langs {
            if !langs.contains(l) {
                langs.push(l.clone());
            }
        }
    }
    if let Some(p) = &r.paper {
        let best: Vec<(String, usize)> = r.concepts.iter().map(|c| (c.concept.clone(), c.best_layer)).collect();
        s.push_str(&super::paper_study::markdown(p, &best));
        let _ = writeln!(s, "## resid's per-concept view of the same run\n");
        let _ = writeln!(s, "The sections below use the same split and vectors (protocol `{}`), reported at one layer per concept instead of the max over layers.\n", r.protocol.name());
    }
    let _ = writeln!(s, "## Recognition\n");
    let _ = writeln!(
        s,
        "Best-layer test accuracy per language with `{}` vectors (in parentheses: the random-direction baseline's best layer). A pair counts as recognised when its positive side projects at least as high as its negative side.\n",
        r.method.name()
    );
    let _ = writeln!(s, "| concept | {} |", langs.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(langs.len()));
    for c in &r.concepts {
        let cells: Vec<String> = langs
            .iter()
            .map(|lang| match c.languages.iter().find(|l| &l.lang == lang) {
                Some(l) => {
                    let m = l.method(r.method);
                    let rnd = l.method(Method::Random);
                    format!(
                        "{} @{} ({})",
                        m.map(|m| f2(m.best_accuracy)).unwrap_or_default(),
                        m.map(|m| m.best_layer).unwrap_or(0),
                        rnd.map(|m| f2(m.best_accuracy)).unwrap_or_default()
                    )
                }
                None => "".into(),
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", c.concept, cells.join(" | "));
    }
    let _ = writeln!(s, "\nMean over concepts of the best-layer accuracy:\n");
    let _ = writeln!(s, "| method | {} |", langs.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(langs.len()));
    let methods: Vec<Method> = Method::ALL.iter().chain(&Method::PAPER).copied().filter(|m| r.overall.mean_best_accuracy.iter().any(|(_, v)| v.get(m.name()).is_some_and(|x| x.is_finite()))).fold(Vec::new(), |mut acc, m| { if !acc.contains(&m) { acc.push(m) } acc });
    for m in methods {
        let cells: Vec<String> = langs
            .iter()
            .map(|lang| {
                r.overall
                    .mean_best_accuracy
                    .iter()
                    .find(|(l, _)| l == lang)
                    .and_then(|(_, v)| v.get(m.name()))
                    .map(|&x| f2(x))
                    .unwrap_or_default()
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", m.name(), cells.join(" | "));
    }

    let _ = writeln!(s, "\n## Cross-lingual recognition\n");
    let _ = writeln!(
        s,
        "Vectors of a source language scored on the test pairs of a target language, at each concept's best layer (the layer with the highest mean own-language accuracy). Full matrices per layer: `tables/crosslingual.csv`.\n"
    );
    let _ = writeln!(s, "| concept | layer | own-language mean | cross-lingual mean | worst pair |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for c in &r.concepts {
        let k = c.langs.len();
        let m = &c.crosslingual_at_best_layer;
        let own = mean((0..k).map(|a| m[a][a]));
        let off = mean((0..k).flat_map(|a| (0..k).filter(move |&b| b != a).map(move |b| (a, b))).map(|(a, b)| m[a][b]));
        let worst = (0..k)
            .flat_map(|a| (0..k).filter(move |&b| b != a).map(move |b| (a, b)))
            .filter(|&(a, b)| m[a][b].is_finite())
            .min_by(|&(a, b), &(c2, d)| m[a][b].partial_cmp(&m[c2][d]).unwrap_or(std::cmp::Ordering::Equal))
            .map(|(a, b)| format!("{}→{} {}", c.langs[a], c.langs[b], f2(m[a][b])))
            .unwrap_or_default();
        let _ = writeln!(s, "| {} | {} | {} | {} | {} |", c.concept, c.best_layer, f2(own), f2(off), worst);
    }

    let _ = writeln!(s, "\n## Consistency\n");
    let _ = writeln!(s, "Cosine similarity between the concept vectors of two languages, averaged over layers 1..={}.\n", r.model.layers);
    let has_corr = r.concepts.iter().any(|c| c.cosine_correlation.is_some());
    if has_corr {
        let _ = writeln!(s, "| concept | mean over language pairs | most similar | least similar | Pearson / Spearman with language similarity |");
        let _ = writeln!(s, "|---|---|---|---|---|");
    } else {
        let _ = writeln!(s, "| concept | mean over language pairs | most similar | least similar |");
        let _ = writeln!(s, "|---|---|---|---|");
    }
    for c in &r.concepts {
        let k = c.langs.len();
        let m = &c.cosine_mean_over_layers;
        let pairs: Vec<(usize, usize)> = (0..k).flat_map(|a| (a + 1..k).map(move |b| (a, b))).collect();
        let cmp = |x: &&(usize, usize), y: &&(usize, usize)| m[x.0][x.1].partial_cmp(&m[y.0][y.1]).unwrap_or(std::cmp::Ordering::Equal);
        let show = |p: Option<&(usize, usize)>| p.map(|&(a, b)| format!("{}–{} {}", c.langs[a], c.langs[b], f2(m[a][b]))).unwrap_or_default();
        let mut line = format!(
            "| {} | {} | {} | {} |",
            c.concept,
            f2(c.cosine_mean_off_diagonal),
            show(pairs.iter().max_by(cmp)),
            show(pairs.iter().min_by(cmp))
        );
        if has_corr {
            let corr = c
                .cosine_correlation
                .as_ref()
                .map(|x| format!("{} / {} ({} pairs)", f2(x.pearson), f2(x.spearman), x.pairs))
                .unwrap_or_default();
            line.push_str(&format!(" {corr} |"));
        }
        let _ = writeln!(s, "{line}");
    }

    let _ = writeln!(s, "\n## Transfer\n");
    let _ = writeln!(
        s,
        "Relative accuracy acc(source vectors → target tests) / acc(target's own vectors → target tests) at the best layer, averaged over language pairs of each resource direction. High: {}; low: {}.\n",
        r.resource_groups.high.join(", "),
        r.resource_groups.low.join(", ")
    );
    let _ = writeln!(s, "| concept | high→low | low→high | high→high | low→low |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for c in &r.concepts {
        let t = &c.transfer_summary;
        let _ = writeln!(s, "| {} | {} | {} | {} | {} |", c.concept, f2(t.high_to_low), f2(t.low_to_high), f2(t.high_to_high), f2(t.low_to_low));
    }
    let t = &r.overall.transfer;
    let _ = writeln!(s, "| **mean** | {} | {} | {} | {} |", f2(t.high_to_low), f2(t.low_to_high), f2(t.high_to_high), f2(t.low_to_low));
    let _ = writeln!(
        s,
        "\nHigh→low transfer exceeds low→high transfer in {} of {} concepts (the paper reports that transfer is unidirectional, from high- to low-resource languages).",
        r.overall.concepts_with_high_to_low_above_low_to_high,
        r.concepts.len()
    );

    if let Some(ctrl) = &r.control {
        let _ = writeln!(s, "\n## Control\n");
        let _ = writeln!(
            s,
            "Steering with the source language's concept vector (operator `{}`, positions `{}`, coefficients {:?} in units of the source's mean pair separation per layer) while the model continues the negative stimuli of the target language's test pairs ({} new tokens, greedy). Score: projection of the unsteered last-token hidden state of prompt + generation on the target language's vector at the concept's best layer (the score layer), shift against coefficient 0 in units of the target's mean pair separation there; steered layers: the concept's best layer ± the control radius unless given. Fluency guard: mean NLL of the generated tokens under the unsteered model. Generations: `{}`.\n",
            ctrl.settings.op,
            ctrl.settings.positions,
            ctrl.settings.coefs,
            ctrl.settings.max_new_tokens,
            Path::new(&ctrl.generations_file).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
        );
        let _ = writeln!(s, "| concept | source→target | steered layers | score layer | coef | shift (separations) | NLL | NLL Δ |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for x in &ctrl.rows {
            let layers = match (x.layers.first(), x.layers.last()) {
                (Some(a), Some(b)) if a != b => format!("{a}–{b}"),
                (Some(a), _) => a.to_string(),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "| {} | {}→{} | {} | {} | {} | {} | {} | {} |",
                x.concept,
                x.source,
                x.target,
                layers,
                x.score_layer,
                x.coef,
                f2(x.shift_rel),
                f2(x.nll_mean),
                f2(x.nll_delta)
            );
        }
    }

    let _ = writeln!(s, "\n## Figures\n");
    for (f, what) in [
        ("accuracy_by_layer", "Recognition accuracy by layer, per language (dashed: random directions)"),
        ("crosslingual_recognition", "Cross-lingual recognition at each concept's best layer"),
        ("cosine_similarity", "Cosine similarity of concept vectors across languages"),
        ("control_sweep", "Control: concept-score shift against the steering coefficient"),
        ("control_fluency", "Control: NLL of the generated tokens"),
    ] {
        if f.starts_with("control") && r.control.is_none() {
            continue;
        }
        let _ = writeln!(s, "* {what}: `figures/{f}.png` (`.svg`)\n\n  ![{what}](figures/{f}.png)\n");
    }
    let _ = writeln!(
        s,
        "## Files\n\n* `report.json`: every number above and per-layer matrices\n* `tables/recognition.csv`, `best_layers.csv`, `crosslingual.csv`, `cosine.csv`, `transfer.csv`{}\n* `vectors/{{concept}}_{{lang}}.safetensors`: concept vectors (`directions` [L+1, hidden], `signs`, `train_accuracy`, `scale`), usable with `resid generate --steer`",
        if r.control.is_some() { ", `control.csv`\n* `control_generations.jsonl`: every generation of the control sweep" } else { "" }
    );
    s
}
