//! `resid.repe` and `resid.study`: the study's library code (`resid::repe`) on numpy arrays.
use crate::model::Model;
use crate::run::run;
use crate::{input_err, to_py};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use resid::repe::control::ControlSettings;
use resid::repe::study::{self as rstudy, ControlPlan, StudyConfig};
use resid::repe::vectors::{ConceptVectors, Method, PairReps};
use resid::with_engine;
use std::path::PathBuf;

/// Pairs of `[N, L+1, hidden]` representations as the library's `[L, hidden]` rows (indices 1..=L).
fn pair_reps<'a>(pos: &'a [f32], neg: &'a [f32], n: usize, rows: usize, hidden: usize) -> PairReps<'a> {
    let stride = rows * hidden;
    PairReps {
        pos: (0..n).map(|i| &pos[i * stride + hidden..(i + 1) * stride]).collect(),
        neg: (0..n).map(|i| &neg[i * stride + hidden..(i + 1) * stride]).collect(),
    }
}

/// Checks a pair of arrays: the same shape `[N, L+1, hidden]`, N ≥ 1, L ≥ 1, finite.
fn shape(what: &str, pos: &PyReadonlyArray3<'_, f32>, neg: &PyReadonlyArray3<'_, f32>) -> PyResult<(usize, usize, usize)> {
    let (p, n) = (pos.shape(), neg.shape());
    if p != n {
        return Err(input_err(format!("{what}: positive {p:?} and negative {n:?} representations differ in shape")));
    }
    if p[0] == 0 {
        return Err(input_err(format!("{what}: no pairs")));
    }
    if p[1] < 2 || p[2] == 0 {
        return Err(input_err(format!(
            "{what}: shape {p:?}: expected [pairs, L+1, hidden] with every hidden-state index 0..=L (model.extract(..., layers=None))"
        )));
    }
    for (side, a) in [("positive", pos), ("negative", neg)] {
        if a.as_slice().map_err(|_| input_err(format!("{what}: not contiguous")))?.iter().any(|v| !v.is_finite()) {
            return Err(input_err(format!("{what}: {side} representations contain NaN or Inf")));
        }
    }
    Ok((p[0], p[1], p[2]))
}

fn method(m: &str) -> PyResult<Method> {
    m.parse().map_err(to_py)
}

fn f32_array<'py>(py: Python<'py>, v: Vec<f32>, shape: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, v).reshape(shape.to_vec())?.into_any())
}

/// Concept vectors from pairs (as `resid vectors`): a dict of numpy arrays.
#[pyfunction]
#[pyo3(signature = (pos, neg, method = "mean-diff", seed = 0, protocol = "resid"))]
pub fn concept_vectors<'py>(py: Python<'py>, pos: PyReadonlyArray3<'py, f32>, neg: PyReadonlyArray3<'py, f32>, method: &str, seed: u64, protocol: &str) -> PyResult<Bound<'py, PyDict>> {
    let m = self::method(method)?;
    let rule = match protocol.parse::<resid::repe::paper::Protocol>().map_err(to_py)? {
        resid::repe::paper::Protocol::Paper => resid::repe::vectors::SignRule::RepE,
        resid::repe::paper::Protocol::Resid => resid::repe::vectors::SignRule::Resid,
    };
    let (n, rows, hidden) = shape("concept_vectors", &pos, &neg)?;
    let (p, q) = (pos.as_slice()?, neg.as_slice()?);
    let v = py
        .detach(|| {
            let mut reps = pair_reps(p, q, n, rows, hidden);
            if m == Method::RandomLabels {
                // The paper's baseline: pairs oriented by labels shuffled within each pair.
                for (i, f) in resid::repe::paper::explicit_flips(seed, n).into_iter().enumerate() {
                    if f {
                        std::mem::swap(&mut reps.pos[i], &mut reps.neg[i]);
                    }
                }
            }
            ConceptVectors::fit_with(m, &reps, rows - 1, hidden, seed, rule)
        })
        .map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("method", m.name())?;
    d.set_item("directions", f32_array(py, v.file_directions(), &[rows, hidden])?)?;
    let mut unit = vec![0.0f32; hidden];
    unit.extend_from_slice(&v.directions);
    d.set_item("unit", f32_array(py, unit, &[rows, hidden])?)?;
    d.set_item("signs", PyArray1::from_vec(py, v.signs.clone()))?;
    d.set_item("scale", PyArray1::from_vec(py, v.scale.clone()))?;
    d.set_item("train_accuracy", PyArray1::from_vec(py, v.train_accuracy.clone()))?;
    Ok(d)
}

/// Per-layer recognition accuracy (as `resid recognize --json`).
#[pyfunction]
#[pyo3(signature = (train_pos, train_neg, test_pos, test_neg, method = "mean-diff", seed = 0, protocol = "resid"))]
#[allow(clippy::too_many_arguments)]
pub fn recognize<'py>(
    py: Python<'py>,
    train_pos: PyReadonlyArray3<'py, f32>,
    train_neg: PyReadonlyArray3<'py, f32>,
    test_pos: PyReadonlyArray3<'py, f32>,
    test_neg: PyReadonlyArray3<'py, f32>,
    method: &str,
    seed: u64,
    protocol: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let m = self::method(method)?;
    let protocol: resid::repe::paper::Protocol = protocol.parse().map_err(to_py)?;
    let (n, rows, hidden) = shape("recognize: train", &train_pos, &train_neg)?;
    let (tn, trows, thidden) = shape("recognize: test", &test_pos, &test_neg)?;
    if (trows, thidden) != (rows, hidden) {
        return Err(input_err(format!("recognize: train has [{rows}, {hidden}] per pair, test [{trows}, {thidden}]")));
    }
    let (a, b, c, e) = (train_pos.as_slice()?, train_neg.as_slice()?, test_pos.as_slice()?, test_neg.as_slice()?);
    let r = py
        .detach(|| {
            let flips = resid::repe::paper::explicit_flips(seed, n);
            rstudy::recognize_protocol(&pair_reps(a, b, n, rows, hidden), &pair_reps(c, e, tn, rows, hidden), m, rows - 1, hidden, seed, protocol, &flips)
        })
        .map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("method", m.name())?;
    d.set_item("layers", (1..rows).collect::<Vec<_>>())?;
    d.set_item("accuracy", r.accuracy)?;
    d.set_item("train_accuracy", r.train_accuracy)?;
    d.set_item("best_layer", r.best_layer)?;
    d.set_item("best_accuracy", r.best_accuracy)?;
    Ok(d)
}

/// The whole study (as `resid study`); returns report.json's text.
#[pyfunction]
#[pyo3(signature = (model, data, out, concepts, langs, method, cache, template, seed, batch_tokens, high, low, lang_similarity,
    control, figures, quiet, wait_lock, control_concepts, control_sources, control_targets, control_layers, control_radius,
    control_prompts, coefs, steer_op, steer_positions, steer_preserve_norm, max_new_tokens, protocol, split, family, lang2vec))]
#[allow(clippy::too_many_arguments)]
pub fn study(
    py: Python<'_>,
    model: &Model,
    data: PathBuf,
    out: PathBuf,
    concepts: Option<Vec<String>>,
    langs: Option<Vec<String>>,
    method: &str,
    cache: Option<PathBuf>,
    template: Option<String>,
    seed: Option<u64>,
    batch_tokens: usize,
    high: Option<Vec<String>>,
    low: Option<Vec<String>>,
    lang_similarity: Option<PathBuf>,
    control: bool,
    figures: bool,
    quiet: bool,
    wait_lock: bool,
    control_concepts: Option<Vec<String>>,
    control_sources: Vec<String>,
    control_targets: Option<Vec<String>>,
    control_layers: Option<Vec<usize>>,
    control_radius: usize,
    control_prompts: usize,
    coefs: Vec<f32>,
    steer_op: &str,
    steer_positions: &str,
    steer_preserve_norm: bool,
    max_new_tokens: usize,
    protocol: &str,
    split: f64,
    family: Option<String>,
    lang2vec: Option<PathBuf>,
) -> PyResult<String> {
    let method = self::method(method)?;
    let protocol: resid::repe::paper::Protocol = protocol.parse().map_err(to_py)?;
    let model_dir = with_engine!(model.engine(), e => e.model.dir.clone());
    let st = rstudy::ProtocolSettings::resolve(&model_dir, protocol, family.as_deref(), template.as_deref(), seed, high, low).map_err(to_py)?;
    let control = if control {
        if control_sources.is_empty() {
            return Err(input_err("control_sources: no languages"));
        }
        let settings = ControlSettings::new(coefs, steer_op, steer_positions, steer_preserve_norm, max_new_tokens, batch_tokens, quiet).map_err(to_py)?;
        Some(ControlPlan {
            concepts: control_concepts,
            sources: control_sources,
            targets: control_targets,
            layers: control_layers,
            radius: control_radius,
            prompts: control_prompts,
            settings,
        })
    } else {
        None
    };
    let cfg = StudyConfig {
        data,
        concepts,
        langs,
        out,
        cache,
        template: st.template,
        seed: st.seed,
        method,
        groups: st.groups,
        lang_similarity,
        control,
        batch_tokens,
        figures,
        quiet,
        protocol,
        split,
        family: st.family,
        family_source: st.family_source,
        lang2vec,
    };
    let engine = model.engine();
    run(py, None, |_| {
        rstudy::check_inputs(&cfg)?;
        let _lock = rstudy::lock_output(&cfg, wait_lock)?;
        let report = with_engine!(engine, e => rstudy::run_study(e, &cfg))?;
        serde_json::to_string(&report).map_err(|e| resid::Error::input(format!("report: {e}")))
    })
}
