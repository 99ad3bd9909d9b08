//! Recognition on a real model: SmolLM2-135M on the English demo data (data/values), mean-diff
//! concept vectors against the random-direction baseline.
//!
//! Measured on the development machine (seed 0, template "{input}", 32 train / 8 test pairs
//! per concept), English, over the 7 concepts:
//!   mean-diff: best-layer accuracy 1.00 for every concept (mean 1.00); mean over layers 0.935
//!   random (mean of 32 draws): best-layer accuracy mean 0.71 (0.61–0.77); mean over layers 0.60
//! Thresholds below leave a margin for data edits and numeric noise.
mod common;

use resid::repe::cache::HiddenCache;
use resid::repe::data;
use resid::repe::study;
use resid::repe::vectors::Method;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fetched SmolLM2-135M, or None (test skipped) under RESID_SKIP_REAL_MODEL=allow.
fn smollm2() -> Option<PathBuf> {
    let model = root().join("models/smollm2-135m");
    common::real_model_present(&model).then_some(model)
}

#[test]
fn smollm2_english_recognition_beats_random_directions() {
    let Some(model) = smollm2() else { return };
    let values = root().join("data/values");
    let engine = resid::CpuEngine::load(&model).unwrap();
    let (layers, hidden) = (engine.num_layers(), engine.hidden_size());
    let mut splits = Vec::new();
    let mut stimuli = Vec::new();
    for concept in data::PAPER_CONCEPTS {
        let pairs = data::load_mvalue(&values, concept, "en").unwrap();
        let split = data::split_pairs(pairs, 0, data::TRAIN_FRACTION);
        stimuli.extend(study::stimuli_of(&split, "{input}"));
        splits.push((concept, split));
    }
    let mut cache = HiddenCache::open(None, &engine).unwrap();
    cache.ensure(&engine, &stimuli, 2048, true).unwrap();
    let (mut md_best, mut md_mean, mut rnd_best, mut rnd_mean) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (concept, split) in &splits {
        let train = study::reps(&cache, &split.train, "{input}").unwrap();
        let test = study::reps(&cache, &split.test, "{input}").unwrap();
        let md = study::recognize(&train, &test, Method::MeanDiff, layers, hidden, 0).unwrap();
        let rnd = study::recognize(&train, &test, Method::Random, layers, hidden, 0).unwrap();
        let avg = |a: &[f64]| a.iter().sum::<f64>() / a.len() as f64;
        eprintln!(
            "{concept}: mean-diff best {:.3} @{} (mean {:.3}); random best {:.3} (mean {:.3})",
            md.best_accuracy,
            md.best_layer,
            avg(&md.accuracy),
            rnd.best_accuracy,
            avg(&rnd.accuracy)
        );
        assert!(md.best_accuracy >= 0.75, "{concept}: mean-diff best-layer accuracy {}", md.best_accuracy);
        md_best.push(md.best_accuracy);
        md_mean.push(avg(&md.accuracy));
        rnd_best.push(rnd.best_accuracy);
        rnd_mean.push(avg(&rnd.accuracy));
    }
    let m = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mdb, mdm, rb, rm) = (m(&md_best), m(&md_mean), m(&rnd_best), m(&rnd_mean));
    eprintln!("means over concepts: mean-diff best {mdb:.3}, over layers {mdm:.3}; random best {rb:.3}, over layers {rm:.3}");
    assert!(mdb >= 0.90, "mean-diff best-layer accuracy {mdb} (measured 1.00)");
    assert!(mdm >= 0.80, "mean-diff accuracy over layers {mdm} (measured 0.935)");
    assert!(rb <= 0.85, "random best-layer accuracy {rb} (measured 0.71)");
    assert!(rm <= 0.70, "random accuracy over layers {rm} (measured 0.60)");
    assert!(mdm - rm >= 0.20, "mean-diff over random, mean over layers: {mdm} vs {rm} (measured gap 0.33)");
}

/// Recognition accuracies from resid against an independent computation: the golden script
/// (scripts/make_golden.py, `recognition-smollm2`) drew its own split of data/values (7 concepts,
/// en and fr), built the stimuli, took HF transformers' `output_hidden_states` last-token rows
/// and computed the mean-diff accuracy per layer in numpy (float64). resid reads the same split
/// from the JSONL files the script wrote.
///
/// Threshold: the accuracies must be identical at every layer where the fixture's closest test
/// pair is clear of a tie (|margin| ≥ 1e-2 of the mean train separation; resid's hidden states
/// are within ~1e-5 relative of HF's, so no pair there can flip). At layers with a closer pair,
/// one pair may flip (±1/n_test). Measured: identical at every layer of all 14 cases.
#[test]
fn recognition_matches_the_hf_golden_computation() {
    let Some(model) = smollm2() else { return };
    let fixtures = root().join("tests/fixtures/golden");
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures.join("recognition-smollm2.json")).unwrap()).unwrap();
    assert_eq!(golden["method"], "mean-diff");
    assert_eq!(golden["template"], "{input}");
    let engine = resid::CpuEngine::load(&model).unwrap();
    let (layers, hidden) = (engine.num_layers(), engine.hidden_size());
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 14);
    let file = |c: &serde_json::Value, part: &str| fixtures.join(format!("recognition-smollm2/{}_{}.{part}.jsonl", c["concept"].as_str().unwrap(), c["lang"].as_str().unwrap()));
    let splits: Vec<data::Split> = cases
        .iter()
        .map(|c| data::explicit_split(data::load_jsonl(&file(c, "train")).unwrap(), data::load_jsonl(&file(c, "test")).unwrap()))
        .collect();
    let stimuli: Vec<_> = splits.iter().flat_map(|s| study::stimuli_of(s, "{input}")).collect();
    let mut cache = HiddenCache::open(None, &engine).unwrap();
    cache.ensure(&engine, &stimuli, 2048, true).unwrap();
    let (mut exact_layers, mut near_tie_flips) = (0usize, 0usize);
    for (c, split) in cases.iter().zip(&splits) {
        let name = format!("{}_{}", c["concept"].as_str().unwrap(), c["lang"].as_str().unwrap());
        assert_eq!(split.train.len() as u64, c["n_train"].as_u64().unwrap(), "{name}");
        assert_eq!(split.test.len() as u64, c["n_test"].as_u64().unwrap(), "{name}");
        let train = study::reps(&cache, &split.train, "{input}").unwrap();
        let test = study::reps(&cache, &split.test, "{input}").unwrap();
        let ours = study::recognize(&train, &test, Method::MeanDiff, layers, hidden, 0).unwrap();
        let theirs: Vec<f64> = c["accuracy"].as_array().unwrap().iter().map(|a| a.as_f64().unwrap()).collect();
        let margin: Vec<f64> = c["closest_test_margin_rel"].as_array().unwrap().iter().map(|a| a.as_f64().unwrap()).collect();
        assert_eq!(ours.accuracy.len(), theirs.len(), "{name}");
        let one_pair = 1.0 / split.test.len() as f64;
        let mut case_flips = 0;
        for l in 0..layers {
            let diff = (ours.accuracy[l] - theirs[l]).abs();
            if diff < 1e-12 {
                exact_layers += 1;
                continue;
            }
            assert!(margin[l] < 1e-2 && diff <= one_pair + 1e-12, "{name} layer {}: resid {} vs HF {} (closest margin {:.1e})", l + 1, ours.accuracy[l], theirs[l], margin[l]);
            case_flips += 1;
        }
        near_tie_flips += case_flips;
        // Identical accuracies give the same best layer; after a flip, HF's best layer must
        // still be within that one pair of ours.
        let hf_best = c["best_layer"].as_u64().unwrap() as usize;
        if case_flips == 0 {
            assert_eq!(ours.best_layer, hf_best, "{name}");
        } else {
            assert!(ours.accuracy[hf_best - 1] >= ours.best_accuracy - one_pair - 1e-12, "{name}: HF's best layer {hf_best} is more than one pair below ours ({})", ours.best_layer);
        }
    }
    eprintln!("recognition vs HF golden: {exact_layers} layer accuracies identical, {near_tie_flips} near-tie flips");
    assert!(near_tie_flips <= 3, "{near_tie_flips} near-tie flips over {} layer results", cases.len() * layers);

    // The `recognize` command reads the same files and prints the same numbers.
    let c = &cases[0];
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_resid"))
        .args(["recognize", "--model", &model.display().to_string(), "--train", &file(c, "train").display().to_string()])
        .args(["--test", &file(c, "test").display().to_string(), "--json", "--quiet"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cli: Vec<f64> = v["accuracy"].as_array().unwrap().iter().map(|a| a.as_f64().unwrap()).collect();
    let theirs: Vec<f64> = c["accuracy"].as_array().unwrap().iter().map(|a| a.as_f64().unwrap()).collect();
    assert_eq!(cli, theirs, "resid recognize on {}", file(c, "train").display());
}
