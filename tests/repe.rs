//! The value-concept study: vectors and recognition on synthetic activations, the split, data
//! errors, scoring, GGUF control vectors, and the commands end to end on a tiny random model.
mod common;

use common::study::{write_tokenizer, write_values};
use common::*;
use resid::repe::data::{self, PairKey, SplitMix64};
use resid::repe::recognition::{accuracy_by_layer, best_layer};
use resid::repe::vectors::{ConceptVectors, Method, PairReps};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

// ---------------------------------------------------------------------------------------------
// Synthetic activations.

/// Pairs whose difference carries `signal` along a planted unit direction at `planted_layer`
/// only; every other coordinate (and every other layer) is Gaussian noise shared-free.
fn synthetic(n: usize, layers: usize, hidden: usize, planted_layer: usize, signal: f64, seed: u64) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<f32>) {
    let mut rng = SplitMix64::new(seed);
    let dir: Vec<f64> = {
        let mut d = SplitMix64::new(12345);
        let v: Vec<f64> = (0..hidden).map(|_| d.gaussian()).collect();
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    };
    let (mut pos, mut neg) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (mut p, mut q) = (Vec::with_capacity(layers * hidden), Vec::with_capacity(layers * hidden));
        for l in 1..=layers {
            // A shared per-pair offset (the "topic"), plus independent noise on each side.
            let base: Vec<f64> = (0..hidden).map(|_| 3.0 * rng.gaussian()).collect();
            for (i, b) in base.iter().enumerate() {
                let plant = if l == planted_layer { signal * dir[i] } else { 0.0 };
                p.push((b + rng.gaussian() + plant) as f32);
                q.push((b + rng.gaussian() - plant) as f32);
            }
        }
        pos.push(p);
        neg.push(q);
    }
    (pos, neg, dir.iter().map(|&x| x as f32).collect())
}

fn as_reps<'a>(pos: &'a [Vec<f32>], neg: &'a [Vec<f32>]) -> PairReps<'a> {
    PairReps { pos: pos.iter().map(Vec::as_slice).collect(), neg: neg.iter().map(Vec::as_slice).collect() }
}

#[test]
fn planted_direction_is_recognised_at_its_layer() {
    let (layers, hidden) = (3, 64);
    let (tp, tn, dir) = synthetic(64, layers, hidden, 2, 3.0, 1);
    let (sp, sn, _) = synthetic(400, layers, hidden, 2, 3.0, 2);
    for method in [Method::MeanDiff, Method::Pca] {
        let v = ConceptVectors::fit(method, &as_reps(&tp, &tn), layers, hidden, 7).unwrap();
        let acc = accuracy_by_layer(&v, &as_reps(&sp, &sn));
        assert!(acc[1] > 0.97, "{method:?}: planted layer accuracy {acc:?}");
        assert!(acc[0] < 0.65 && acc[2] < 0.65, "{method:?}: noise layers should be near chance: {acc:?}");
        assert_eq!(best_layer(&acc).0, 2);
        assert!(v.train_accuracy[1] > 0.97);
        // The fitted direction points along the planted one (sign chosen on the train pairs).
        let cos: f64 = v.direction(2).iter().zip(&dir).map(|(a, b)| (*a as f64) * (*b as f64)).sum();
        assert!(cos > 0.8, "{method:?}: cosine with the planted direction {cos}");
        // Unit rows; the vector file scales them by the mean pair separation.
        let norm: f64 = v.direction(2).iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        assert!(v.scale[1] > 3.0, "separation along the planted direction: {}", v.scale[1]);
        let file = v.file_directions();
        assert_eq!(file.len(), (layers + 1) * hidden);
        assert!(file[..hidden].iter().all(|&x| x == 0.0), "row 0 (embeddings) stays zero");
    }
}

#[test]
fn random_directions_and_shuffled_labels_are_near_chance() {
    let (layers, hidden) = (2, 256);
    let (tp, tn, _) = synthetic(64, layers, hidden, 1, 3.0, 3);
    let (sp, sn, _) = synthetic(2000, layers, hidden, 1, 3.0, 4);
    // Random directions: chance even where a real direction exists.
    let mut accs = Vec::new();
    for seed in 0..8 {
        let v = ConceptVectors::fit(Method::Random, &as_reps(&tp, &tn), layers, hidden, seed).unwrap();
        accs.push(accuracy_by_layer(&v, &as_reps(&sp, &sn))[0]);
    }
    let mean = accs.iter().sum::<f64>() / accs.len() as f64;
    assert!((mean - 0.5).abs() < 0.07, "random directions: mean accuracy {mean} ({accs:?})");
    // Shuffled labels: sides swapped at random in train and test.
    let shuffle = |p: &[Vec<f32>], n: &[Vec<f32>], seed: u64| {
        let mut rng = SplitMix64::new(seed);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (x, y) in p.iter().zip(n) {
            if rng.next_u64() & 1 == 1 {
                a.push(y.clone());
                b.push(x.clone());
            } else {
                a.push(x.clone());
                b.push(y.clone());
            }
        }
        (a, b)
    };
    let (tp2, tn2) = shuffle(&tp, &tn, 5);
    let (sp2, sn2) = shuffle(&sp, &sn, 6);
    for method in [Method::MeanDiff, Method::Pca] {
        let v = ConceptVectors::fit(method, &as_reps(&tp2, &tn2), layers, hidden, 0).unwrap();
        let acc = accuracy_by_layer(&v, &as_reps(&sp2, &sn2));
        assert!((acc[0] - 0.5).abs() < 0.06, "{method:?} on shuffled labels: {acc:?}");
    }
}

#[test]
fn ties_count_as_correct() {
    let (layers, hidden) = (1, 2);
    let same = vec![vec![1.0f32, 2.0]; 3];
    let v = ConceptVectors::fit(Method::MeanDiff, &as_reps(&same, &same), layers, hidden, 0).unwrap();
    assert_eq!(accuracy_by_layer(&v, &as_reps(&same, &same)), vec![1.0]);
}

// ---------------------------------------------------------------------------------------------
// The split.

fn keys(ids: &[&str]) -> Vec<PairKey> {
    ids.iter().map(|i| PairKey { group: "demo".into(), id: i.to_string() }).collect()
}

#[test]
fn split_is_deterministic_documented_and_aligned_across_languages() {
    let ids: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    let idr: Vec<&str> = ids.iter().map(String::as_str).collect();
    let a = data::train_keys(&keys(&idr), 0, 0.8);
    assert_eq!(a.len(), 32);
    // Same keys in another order (another language's file): same split.
    let mut rev = idr.clone();
    rev.reverse();
    assert_eq!(data::train_keys(&keys(&rev), 0, 0.8), a);
    assert_ne!(data::train_keys(&keys(&idr), 1, 0.8), a, "another seed gives another split");
    // The documented algorithm, reimplemented independently: natural sort, Fisher-Yates with
    // SplitMix64(seed), first round(0.8 n).
    let mut state: u64 = 0;
    let mut next = || {
        state = state.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<u64> = (0..40).collect();
    for i in (1..order.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let expected: std::collections::BTreeSet<String> = order[..32].iter().map(|i| i.to_string()).collect();
    let got: std::collections::BTreeSet<String> = a.iter().map(|k| k.id.clone()).collect();
    assert_eq!(got, expected);

    // Files of two languages with the same ids: aligned test sets, even when one language
    // drops an identical pair.
    let pair = |id: usize, lang: &str| data::Pair {
        key: PairKey { group: "demo".into(), id: id.to_string() },
        pos: format!("{lang} good {id}"),
        neg: if lang == "fr" && id == 3 { format!("{lang} good {id}") } else { format!("{lang} bad {id}") },
        origin: format!("{lang}:{id}"),
    };
    let en = data::split_pairs((0..40).map(|i| pair(i, "en")).collect(), 0, 0.8);
    let fr = data::split_pairs((0..40).rev().map(|i| pair(i, "fr")).collect(), 0, 0.8);
    let ids = |s: &[data::Pair]| s.iter().map(|p| p.key.id.clone()).collect::<Vec<_>>();
    let mut en_test = ids(&en.test);
    let mut fr_test = ids(&fr.test);
    let mut en_train = ids(&en.train);
    let mut fr_train = ids(&fr.train);
    for v in [&mut en_test, &mut fr_test, &mut en_train, &mut fr_train] {
        v.retain(|i| i != "3");
    }
    assert_eq!(en_test, fr_test);
    assert_eq!(en_train, fr_train);
    assert_eq!(fr.dropped, vec!["fr:3".to_string()]);
    assert_eq!(en.train.len() + en.test.len(), 40);
}

// ---------------------------------------------------------------------------------------------
// Data-format errors: every one names the file and the position.

fn err_of(r: resid::Result<Vec<data::Pair>>) -> String {
    match r {
        Ok(p) => panic!("expected an error, got {} pairs", p.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn data_errors_name_file_and_position() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mv = |concept: &str, lang: &str, body: &[u8]| -> String {
        std::fs::create_dir_all(dir.join(concept)).unwrap();
        std::fs::write(dir.join(concept).join(format!("{concept}_{lang}.json")), body).unwrap();
        err_of(data::load_mvalue(dir, concept, lang))
    };
    let cases: Vec<(String, &str)> = vec![
        (mv("morality", "a", b"{\"g\": {\"1\": {\"pos\": \"x\", \"neg\": \"y\"}},\n  \"h\": }"), "line 2 column"),
        (mv("morality", "b", b"{\"g\": {\"1\": {\"pos\": \"x\"}}}"), "group `g`, id `1`: missing `neg`"),
        (mv("morality", "c", b"{\"g\": {\"7\": {\"pos\": 3, \"neg\": \"y\"}}}"), "group `g`, id `7`: `pos` must be a string, got a number"),
        (mv("morality", "d", b"{\"g\": [1, 2]}"), "group `g`: expected an object of pairs keyed by id, got an array"),
        (mv("morality", "e", b"[]"), "expected a JSON object"),
        (mv("morality", "f", b"{\"g\": {\"2\": \"text\"}}"), "group `g`, id `2`: expected an object with `pos` and `neg`"),
        (mv("deontology", "g", b"{\"g\": {\"5\": {\"pos\": \"x\", \"neg\": \"y\"}}}"), "group `g`, id `5`: missing `scenario`"),
        (mv("truthfulness", "h", b"{\"g\": {\"9\": {\"pos\": \"x\", \"neg\": \"y\", \"question\": 1}}}"), "id `9`: `question` must be a string"),
        (mv("morality", "i", b"{}"), "no pairs"),
        (mv("morality", "j", b"{\"g\": {\"1\": {\"pos\": \"x\", \"neg\": \"y\"}},\n\"h\": {\"2\": {\"pos\": \"\xff\"}}}"), "line 2: invalid UTF-8"),
        (err_of(data::load_mvalue(dir, "morality", "zz")), "no such file"),
    ];
    for (msg, needle) in &cases {
        assert!(msg.contains(needle), "expected `{needle}` in `{msg}`");
        assert!(msg.contains(&dir.display().to_string()), "no file name in `{msg}`");
    }

    let jl = |name: &str, body: &str| -> String {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        err_of(data::load_jsonl(&p))
    };
    let cases = vec![
        (jl("a.jsonl", "{\"pos\": \"a\", \"neg\": \"b\"}\n{\"pos\": \"a\"\n"), "a.jsonl: line 2: malformed JSON"),
        (jl("b.jsonl", "{\"pos\": \"a\", \"neg\": \"b\"}\n\n{\"neg\": \"b\"}\n"), "b.jsonl: line 3: missing `pos`"),
        (jl("c.jsonl", "[1]\n"), "c.jsonl: line 1: expected a JSON object"),
        (jl("d.jsonl", "{\"pos\": \"a\", \"neg\": \"b\", \"scenario\": \"s\", \"question\": \"q\"}\n"), "d.jsonl: line 1: has both"),
        (jl("e.jsonl", "{\"pos\": \"a\", \"neg\": \"b\", \"id\": 4}\n{\"pos\": \"a\", \"neg\": \"c\", \"id\": \"4\"}\n"), "e.jsonl: line 2: duplicate id `4` (first on line 1)"),
        (jl("f.jsonl", "\n\n"), "f.jsonl: no pairs"),
        (jl("g.jsonl", "{\"pos\": \"a\", \"neg\": [\"b\"]}\n"), "g.jsonl: line 1: `neg` must be a string, got an array"),
    ];
    for (msg, needle) in &cases {
        assert!(msg.contains(needle), "expected `{needle}` in `{msg}`");
    }

    // The language-similarity matrix.
    let csv = dir.join("sim.csv");
    std::fs::write(&csv, ",en,fr\nen,1,0.5\nfr,0.5,x\n").unwrap();
    let e = resid::repe::analysis::LangSimilarity::read(&csv).unwrap_err().to_string();
    assert!(e.contains("sim.csv: line 3, column 3 (`fr`): `x` is not a number"), "{e}");
    std::fs::write(&csv, ",en,fr\nen,1\n").unwrap();
    let e = resid::repe::analysis::LangSimilarity::read(&csv).unwrap_err().to_string();
    assert!(e.contains("sim.csv: line 2: 2 cells, expected 3"), "{e}");
}

#[test]
fn stimuli_follow_the_papers_construction() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("deontology")).unwrap();
    std::fs::write(d.join("deontology/deontology_en.json"), r#"{"g": {"1": {"scenario": "Walk my dog?", "pos": "I am ill.", "neg": "Dogs bore me."}}}"#).unwrap();
    std::fs::create_dir_all(d.join("truthfulness")).unwrap();
    std::fs::write(d.join("truthfulness/truthfulness_en.json"), r#"{"g": {"1": {"question": "Is ice cold?", "pos": "Yes.", "neg": "No."}}}"#).unwrap();
    let p = data::load_mvalue(d, "deontology", "en").unwrap();
    assert_eq!((p[0].pos.as_str(), p[0].neg.as_str()), ("Walk my dog? I am ill.", "Walk my dog? Dogs bore me."));
    let p = data::load_mvalue(d, "truthfulness", "en").unwrap();
    assert_eq!(p[0].pos, "Question: Is ice cold? Answer: Yes.");
    let found = data::discover(d).unwrap();
    assert_eq!(found, vec![("deontology".to_string(), vec!["en".to_string()]), ("truthfulness".to_string(), vec!["en".to_string()])]);
}

// ---------------------------------------------------------------------------------------------
// Scoring (per-token log-probabilities).

#[test]
fn score_matches_last_logits_and_ignores_batching() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny(&tmp.path().join("m"), &TinySpec::default());
    let engine = resid::CpuEngine::load(&dir).unwrap();
    let seqs: Vec<Vec<u32>> = (0..5).map(|i| random_ids(6 + 3 * i, 97, 40 + i as u64)).collect();
    let from: Vec<usize> = seqs.iter().map(|s| s.len() / 2).collect();
    let none = vec![None; seqs.len()];
    let spec = resid::CaptureSpec { points: vec![resid::CapturePoint::Hidden(2)], position: resid::CapturePosition::Last };
    let a = engine.score(&seqs, &from, &none, Some(&spec), 4096, |_, _| {}).unwrap();
    let b = engine.score(&seqs, &from, &none, Some(&spec), 7, |_, _| {}).unwrap();
    assert_eq!(a.logprobs, b.logprobs, "batching changed the log-probabilities");
    assert_eq!(a.captured.as_ref().unwrap().data, b.captured.as_ref().unwrap().data);
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(a.logprobs[i].len(), s.len() - from[i]);
        // The last token's log-probability from the logits at the position before it.
        let logits = &engine.last_logits(&[s[..s.len() - 1].to_vec()]).unwrap()[0];
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        let expected = logits[*s.last().unwrap() as usize] as f64 - lse;
        let got = *a.logprobs[i].last().unwrap() as f64;
        assert!((got - expected).abs() < 1e-4, "seq {i}: {got} vs {expected}");
        assert!(a.mean_nll(i) > 0.0);
    }
    let captured = engine.extract(&seqs, &spec, &none, 4096, |_, _| {}).unwrap();
    assert_eq!(captured.data, a.captured.unwrap().data, "capture in the scoring pass differs from extract");
}

// ---------------------------------------------------------------------------------------------
// GGUF control vectors.

#[test]
fn gguf_control_vectors_round_trip_with_llama_cpp_numbering() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("v.gguf");
    let (layers, hidden) = (5, 4);
    let dirs: Vec<f32> = (0..(layers + 1) * hidden).map(|i| i as f32).collect();
    assert_eq!(resid::repe::gguf::write_control_vector(&p, &dirs, layers, hidden, "llama").unwrap(), layers - 1);
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
    assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), (layers - 1) as u64);
    let text = String::from_utf8_lossy(&bytes);
    for k in 1..layers {
        assert!(text.contains(&format!("direction.{k}")));
    }
    assert!(!text.contains("direction.0") && !text.contains(&format!("direction.{layers}")));
    assert!(text.contains("controlvector.model_hint") && text.contains("controlvector.layer_count"));
    let back = resid::repe::gguf::read_control_vector(&p, layers, hidden).unwrap();
    // direction.k is the output of block k = hidden-state index k+1.
    assert_eq!(&back.data[2 * hidden..], &dirs[2 * hidden..]);
    assert!(back.data[..2 * hidden].iter().all(|&x| x == 0.0));
    // A model with fewer layers cannot take it; a wrong hidden size neither.
    let e = resid::repe::gguf::read_control_vector(&p, 3, hidden).err().expect("an error").to_string();
    assert!(e.contains("targets decoder block 3"), "{e}");
    let e = resid::repe::gguf::read_control_vector(&p, layers, 8).err().expect("an error").to_string();
    assert!(e.contains("expected [8]"), "{e}");
    std::fs::write(&p, b"GGUF\x03\x00\x00\x00").unwrap();
    let e = resid::repe::gguf::read_control_vector(&p, layers, hidden).err().expect("an error").to_string();
    assert!(e.contains("truncated"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// End to end on a tiny random model with a word-level tokenizer.

struct Tiny {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Tiny {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let model = write_tiny(&dir.join("model"), &TinySpec::default());
        write_tokenizer(&model);
        write_values(&dir.join("values"));
        Tiny { _tmp: tmp, dir }
    }
    fn p(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

fn resid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resid")).args(args).output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "failed ({:?}): {}", o.status.code(), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write_pairs_jsonl(path: &Path, pairs: &[data::Pair]) {
    let text: String = pairs
        .iter()
        .map(|p| serde_json::json!({"pos": p.pos, "neg": p.neg, "id": p.key.to_string()}).to_string() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

#[test]
fn study_end_to_end_on_a_tiny_model() {
    let t = Tiny::new();
    let (model, values, out) = (t.p("model"), t.p("values"), t.p("out"));
    let args = [
        "study", "--protocol", "resid", "--model", &model, "--data", &values, "--out", &out, "--quiet", "--high", "en,fr", "--low", "sw",
        "--control-sources", "en", "--control-prompts", "2", "--coefs", "-1,0,1", "--max-new-tokens", "4", "--control-layers", "1-2",
    ];
    ok(&resid(&args));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(t.dir.join("out/report.json")).unwrap()).unwrap();
    assert_eq!(report["model"]["layers"], 3);
    let concepts = report["concepts"].as_array().unwrap();
    assert_eq!(concepts.len(), 2);
    for c in concepts {
        assert_eq!(c["langs"], serde_json::json!(["en", "fr", "sw"]));
        let best = c["best_layer"].as_u64().unwrap() as usize;
        let cross = c["crosslingual_at_best_layer"].as_array().unwrap();
        assert_eq!(cross.len(), 3);
        for (a, l) in c["languages"].as_array().unwrap().iter().enumerate() {
            assert_eq!(l["n_train"].as_u64().unwrap() + l["n_test"].as_u64().unwrap(), 19, "one identical pair dropped");
            assert_eq!(l["dropped_identical"], 1);
            check_accuracies(l, 3, "llama");
            // The cross-lingual matrix's diagonal is the language's own recognition.
            assert_eq!(cross[a][a], l["methods"][0]["accuracy"][best - 1], "{} {}", c["concept"], l["lang"]);
        }
        // Consistency from the vector files themselves: mean over layers of the cosine of two
        // languages' directions (scales are positive, so the file rows have the same cosines).
        let cos = c["cosine_mean_over_layers"].as_array().unwrap();
        let concept = c["concept"].as_str().unwrap();
        let rows = |lang: &str| resid::io::read_directions(&t.dir.join(format!("out/vectors/{concept}_{lang}.safetensors")), 3, 32).unwrap().data;
        let langs = ["en", "fr", "sw"].map(rows);
        for a in 0..3 {
            for b in 0..3 {
                let want = (1..=3).map(|l| cosine(&langs[a][l * 32..(l + 1) * 32], &langs[b][l * 32..(l + 1) * 32])).sum::<f64>() / 3.0;
                let got = cos[a][b].as_f64().unwrap();
                assert!((got - want).abs() < 1e-6, "{concept}: cosine {a},{b}: report {got}, vector files {want}");
            }
        }
        assert!(c["transfer_summary"]["high_to_low"].as_f64().is_some());
    }
    // The recognize command on the study's own split of one language gives the study's numbers.
    let pairs = data::load_mvalue(&t.dir.join("values"), "morality", "en").unwrap();
    let split = data::split_pairs(pairs, 0, data::TRAIN_FRACTION);
    write_pairs_jsonl(&t.dir.join("train.jsonl"), &split.train);
    write_pairs_jsonl(&t.dir.join("test.jsonl"), &split.test);
    let v: serde_json::Value =
        serde_json::from_str(ok(&resid(&["recognize", "--model", &model, "--train", &t.p("train.jsonl"), "--test", &t.p("test.jsonl"), "--json", "--quiet"])).trim())
            .unwrap();
    let morality_en = &concepts[0]["languages"][0];
    assert_eq!((concepts[0]["concept"].as_str(), morality_en["lang"].as_str()), (Some("morality"), Some("en")));
    assert_eq!(v["accuracy"], morality_en["methods"][0]["accuracy"], "recognize vs the study's mean-diff");

    let control = report["control"]["rows"].as_array().unwrap();
    assert_eq!(control.len(), 2 * 3 * 3, "concepts × targets × coefficients");
    let gens = std::fs::read_to_string(t.dir.join("out/control_generations.jsonl")).unwrap();
    assert_eq!(gens.lines().count(), 2 * 3 * 3 * 2);
    check_control_scores(&t.dir.join("model"), &t.dir.join("out"));
    for f in ["recognition", "best_layers", "crosslingual", "cosine", "transfer", "control"] {
        let text = std::fs::read_to_string(t.dir.join(format!("out/tables/{f}.csv"))).unwrap();
        assert!(text.lines().count() > 1, "{f}.csv is empty");
    }
    for f in ["accuracy_by_layer", "crosslingual_recognition", "cosine_similarity", "control_sweep", "control_fluency"] {
        let png = std::fs::read(t.dir.join(format!("out/figures/{f}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{f}.png");
        let svg = std::fs::read_to_string(t.dir.join(format!("out/figures/{f}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("<text"), "{f}.svg has no text");
    }
    let md = std::fs::read_to_string(t.dir.join("out/report.md")).unwrap();
    assert!(md.contains("## Recognition") && md.contains("## Transfer") && md.contains("## Control"));
    let vec_file = t.dir.join("out/vectors/morality_en.safetensors");
    let d = resid::io::read_directions(&vec_file, 3, 32).unwrap();
    assert!(d.data[..32].iter().all(|&x| x == 0.0));

    // A second run reads every hidden state from the cache and gives the same numbers.
    let out2 = t.p("out2");
    let cache = t.p("out/cache");
    ok(&resid(&["study", "--protocol", "resid", "--model", &model, "--data", &values, "--out", &out2, "--cache", &cache, "--quiet", "--no-control", "--no-figures", "--batch-tokens", "5"]));
    let report2: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(t.dir.join("out2/report.json")).unwrap()).unwrap();
    assert_eq!(report2["timing"]["hidden_states"]["computed"], 0);
    assert_eq!(report2["timing"]["hidden_states"]["from_cache"], report["timing"]["hidden_states"]["requested"]);
    assert_eq!(report2["concepts"][0]["languages"], report["concepts"][0]["languages"]);
    assert_eq!(report2["concepts"][1]["crosslingual_by_layer"], report["concepts"][1]["crosslingual_by_layer"]);
}

/// One language's recognition in report.json: an accuracy per layer for each method, mean-diff
/// first; a fitted direction's accuracy counts test pairs (random ones are a mean of draws).
fn check_accuracies(lang: &serde_json::Value, layers: usize, what: &str) {
    let n_test = lang["n_test"].as_f64().unwrap();
    assert_eq!(lang["methods"][0]["method"], "mean-diff", "{what}");
    for m in lang["methods"].as_array().unwrap() {
        let acc: Vec<f64> = m["accuracy"].as_array().unwrap().iter().map(|a| a.as_f64().unwrap()).collect();
        assert_eq!(acc.len(), layers, "{what}");
        if m["method"] != "random" {
            assert!(acc.iter().all(|a| ((a * n_test).round() - a * n_test).abs() < 1e-9), "{what} {}: {acc:?} over {n_test} pairs", m["method"]);
        }
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum::<f64>();
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

/// The control sweep against a recomputation from its own outputs: every generation's concept
/// score is the unsteered last-token hidden state of prompt + generation (stop token removed)
/// at the score layer, projected on the target's unit direction from its vector file; every
/// row's shift is the mean score at its coefficient minus the mean at 0 over the same prompts;
/// and steering moves the score somewhere.
fn check_control_scores(model: &Path, out: &Path) {
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let gens: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("control_generations.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let engine = resid::CpuEngine::load(model).unwrap();
    let (layers, hidden) = (engine.num_layers(), engine.hidden_size());
    let tok = engine.model.tokenizer.as_ref().unwrap();
    let stops = resid::repe::control::stop_tokens(&engine);
    let rows = report["control"]["rows"].as_array().unwrap();
    let mut moved = 0;
    for row in rows {
        let key = |r: &serde_json::Value| (r["concept"].clone(), r["source"].clone(), r["target"].clone());
        let layer = row["score_layer"].as_u64().unwrap() as usize;
        let file = out.join(format!("vectors/{}_{}.safetensors", row["concept"].as_str().unwrap(), row["target"].as_str().unwrap()));
        let dir = resid::io::read_directions(&file, layers, hidden).unwrap().data[layer * hidden..(layer + 1) * hidden].to_vec();
        let norm = dir.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let mean_score = |coef: f64| {
            let mine: Vec<&serde_json::Value> = gens.iter().filter(|g| key(g) == key(row) && g["coef"].as_f64() == Some(coef)).collect();
            assert_eq!(mine.len(), 2, "two prompts per coefficient");
            let mut total = 0.0;
            for g in &mine {
                let mut ids = tok.encode(g["prompt"].as_str().unwrap()).unwrap();
                let mut body: Vec<u32> = g["tokens"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
                if body.last().is_some_and(|x| stops.contains(x)) {
                    body.pop();
                }
                ids.extend(body);
                let spec = resid::CaptureSpec { points: vec![resid::CapturePoint::Hidden(layer)], position: resid::CapturePosition::Last };
                let h = engine.extract(&[ids], &spec, &[None], 4096, |_, _| {}).unwrap();
                let score = h.row(0, 0).iter().zip(&dir).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / norm;
                let recorded = g["score"].as_f64().unwrap();
                assert!((score - recorded).abs() <= 1e-4 * (1.0 + score.abs()), "{:?} coef {coef}: score {recorded}, recomputed {score}", key(row));
                total += recorded;
            }
            total / mine.len() as f64
        };
        let coef = row["coef"].as_f64().unwrap();
        let want = mean_score(coef) - mean_score(0.0);
        let got = row["shift"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-9 * (1.0 + want.abs()), "{:?} coef {coef}: shift {got}, from the generations {want}", key(row));
        moved += (coef != 0.0 && want.abs() > 1e-6) as usize;
    }
    assert!(moved > 0, "no steered row moved the concept score");
}

/// The study (vectors, recognition, cross-lingual analyses, control) on a tiny random model of
/// every other family: Qwen2 (QKV bias, grouped-query heads), Qwen3 (q/k norm), Qwen-chat
/// (first-generation names and keys) and BLOOM (LayerNorm, ALiBi with 5 heads, GELU).
#[test]
fn study_end_to_end_on_a_tiny_model_of_every_family() {
    use resid::testing::{RandomLlama, TestArch};
    let base = RandomLlama {
        arch: TestArch::Llama, vocab: 97, hidden: 32, intermediate: 48, layers: 2, heads: 4, kv_heads: 2, head_dim: 8,
        bias: false, tie: false, context: 256, seed: 3,
    };
    let models = [
        ("qwen2", RandomLlama { arch: TestArch::Qwen2, ..base.clone() }),
        ("qwen3", RandomLlama { arch: TestArch::Qwen3, head_dim: 16, ..base.clone() }),
        ("qwen-chat", RandomLlama { arch: TestArch::QwenChat, kv_heads: 4, ..base.clone() }),
        ("bloom", RandomLlama { arch: TestArch::Bloom, hidden: 40, heads: 5, kv_heads: 5, intermediate: 160, ..base }),
    ];
    let t = Tiny::new();
    for (family, spec) in models {
        let model = t.dir.join(family);
        spec.write(&model).unwrap();
        write_tokenizer(&model);
        let info = ok(&resid(&["info", "--model", &model.display().to_string(), "--json"]));
        assert!(info.contains(&format!("\"{family}\"")), "{family}: {info}");
        let out = t.dir.join(format!("out-{family}"));
        let (m, o) = (model.display().to_string(), out.display().to_string());
        ok(&resid(&[
            "study", "--protocol", "resid", "--model", &m, "--data", &t.p("values"), "--out", &o, "--quiet", "--high", "en,fr", "--low", "sw", "--no-figures",
            "--control-sources", "en", "--control-prompts", "2", "--coefs", "-4,0,4", "--max-new-tokens", "3", "--control-layers", "1-2",
        ]));
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        assert_eq!(report["model"]["layers"], 2, "{family}");
        for c in report["concepts"].as_array().unwrap() {
            for l in c["languages"].as_array().unwrap() {
                check_accuracies(l, 2, family);
            }
            assert_eq!(c["crosslingual_at_best_layer"].as_array().unwrap().len(), 3, "{family}");
        }
        let rows = report["control"]["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2 * 3 * 3, "{family}: concepts × targets × coefficients");
        // Steering reaches the generations (the score is read unsteered, so it moves only when
        // the greedy tokens change; on a random model most, not all, non-zero coefficients do).
        let moved = rows.iter().filter(|r| r["coef"] != 0.0 && r["shift"].as_f64().unwrap().abs() > 1e-6).count();
        assert!(moved >= rows.len() / 3, "{family}: only {moved} steered rows moved: {rows:?}");
        check_control_scores(&model, &out);
        let d = resid::io::read_directions(&out.join("vectors/morality_en.safetensors"), 2, spec.hidden).unwrap();
        assert!(d.data[spec.hidden..].iter().any(|&x| x != 0.0), "{family}: empty vectors");
    }
}

#[test]
fn recognize_json_contract_vectors_gguf_and_steering() {
    let t = Tiny::new();
    let model = t.p("model");
    let pairs = data::load_mvalue(&t.dir.join("values"), "morality", "en").unwrap();
    let split = data::split_pairs(pairs, 0, 0.8);
    write_pairs_jsonl(&t.dir.join("train.jsonl"), &split.train);
    write_pairs_jsonl(&t.dir.join("test.jsonl"), &split.test);
    let (train, test) = (t.p("train.jsonl"), t.p("test.jsonl"));
    let mut outputs = Vec::new();
    for (method, batch) in [("mean-diff", "2048"), ("mean-diff", "3"), ("pca", "2048"), ("random", "2048")] {
        let out = ok(&resid(&[
            "recognize", "--model", &model, "--train", &train, "--test", &test, "--method", method, "--json", "--quiet", "--batch-tokens", batch,
        ]));
        assert_eq!(out.trim().lines().count(), 1, "exactly one JSON object: {out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["protocol", "layers", "accuracy", "best_layer", "best_accuracy"]);
        assert_eq!(v["protocol"], "resid", "recognize defaults to resid's protocol");
        assert_eq!(v["layers"], serde_json::json!([1, 2, 3]));
        let acc: Vec<f64> = v["accuracy"].as_array().unwrap().iter().map(|a| a.as_f64().unwrap()).collect();
        assert_eq!(acc.len(), 3);
        let best = v["best_layer"].as_u64().unwrap() as usize;
        assert_eq!(acc[best - 1], v["best_accuracy"].as_f64().unwrap());
        assert!(acc.iter().all(|&a| a <= acc[best - 1]));
        outputs.push(out);
    }
    assert_eq!(outputs[0], outputs[1], "results depend on batching");

    // Vectors: safetensors + GGUF; the GGUF steers `generate` like the safetensors rows it holds.
    let (vec_out, gguf) = (t.p("v.safetensors"), t.p("v.gguf"));
    ok(&resid(&[
        "vectors", "--model", &model, "--data", &t.p("values"), "--concept", "morality", "--lang", "en", "--out", &vec_out, "--gguf", &gguf, "--quiet",
    ]));
    let v = resid::io::read_f32_tensor(Path::new(&vec_out), "directions").unwrap();
    assert_eq!(v.shape, vec![4, 32]);
    for name in ["signs", "train_accuracy", "scale"] {
        assert_eq!(resid::io::read_f32_tensor(Path::new(&vec_out), name).unwrap().shape, vec![3]);
    }
    assert_eq!(v.metadata.get("concept").map(String::as_str), Some("morality"));
    let g = resid::repe::gguf::read_control_vector(Path::new(&gguf), 3, 32).unwrap();
    assert_eq!(&g.data[64..], &v.data[64..], "rows 2..=L survive the GGUF round trip");
    let gen = |file: &str| {
        ok(&resid(&[
            "generate", "--model", &model, "--prompt", "the old man", "--max-new-tokens", "5", "--json", "--steer", file, "--steer-layers", "2-3", "--coef", "4",
        ]))
    };
    let (from_safetensors, from_gguf) = (gen(&vec_out), gen(&gguf));
    assert_eq!(from_safetensors, from_gguf, "GGUF import steers like the safetensors file");
    let plain = ok(&resid(&["generate", "--model", &model, "--prompt", "the old man", "--max-new-tokens", "5", "--json"]));
    let tokens = |out: &str| serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["tokens"].clone();
    assert_eq!(tokens(&plain).as_array().map(Vec::len), Some(5), "{plain}");
    assert_ne!(tokens(&from_safetensors), tokens(&plain), "steering with the vectors file changed nothing");
    assert_ne!(tokens(&from_gguf), tokens(&plain), "steering with the GGUF file changed nothing");
}

#[test]
fn commands_reject_bad_input_with_one_line_errors() {
    let t = Tiny::new();
    let model = t.p("model");
    std::fs::write(t.dir.join("bad.jsonl"), "{\"pos\": \"a\", \"neg\": \"b\"}\n{\"pos\": \"a\"}\n").unwrap();
    std::fs::write(t.dir.join("good.jsonl"), "{\"pos\": \"good man\", \"neg\": \"bad man\"}\n").unwrap();
    let cases: Vec<(Vec<String>, i32, String)> = vec![
        (
            vec!["recognize".into(), "--model".into(), model.clone(), "--train".into(), t.p("bad.jsonl"), "--test".into(), t.p("good.jsonl")],
            3,
            format!("{}: line 2: missing `neg`", t.p("bad.jsonl")),
        ),
        (
            vec!["recognize".into(), "--model".into(), model.clone(), "--train".into(), t.p("good.jsonl"), "--test".into(), t.p("good.jsonl"), "--method".into(), "lda".into()],
            3,
            "unknown method `lda`".into(),
        ),
        (
            vec!["recognize".into(), "--model".into(), model.clone(), "--train".into(), t.p("good.jsonl"), "--test".into(), t.p("good.jsonl"), "--template".into(), "no placeholder".into()],
            3,
            "must contain the placeholder {input}".into(),
        ),
        (
            vec!["study".into(), "--model".into(), model.clone(), "--data".into(), t.p("values"), "--out".into(), t.p("o"), "--concepts".into(), "kindness".into()],
            3,
            "no data for concept `kindness`".into(),
        ),
        (
            vec!["study".into(), "--model".into(), model.clone(), "--data".into(), t.p("values"), "--out".into(), t.p("o"), "--langs".into(), "en,xx".into()],
            3,
            "morality_xx.json: language `xx` is not one of the paper's 16".into(),
        ),
        (
            vec!["study".into(), "--model".into(), model.clone(), "--data".into(), t.p("values"), "--out".into(), t.p("o"), "--coefs".into(), "1,x".into()],
            3,
            "`x` is not a number".into(),
        ),
        (
            vec!["study".into(), "--model".into(), t.p("nomodel"), "--data".into(), t.p("values"), "--out".into(), t.p("o"), "--no-control".into()],
            4,
            "no such model directory".into(),
        ),
        (
            vec!["generate".into(), "--model".into(), model.clone(), "--prompt".into(), "x".into(), "--steer".into(), t.p("bad.gguf"), "--steer-layers".into(), "1".into()],
            6,
            "bad.gguf".into(),
        ),
    ];
    for (args, code, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = resid(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(&needle), "{args:?}: expected `{needle}` in {err}");
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    }
    assert!(!t.dir.join("o/report.json").exists());
}
