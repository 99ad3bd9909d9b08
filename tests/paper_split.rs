//! The paper's split against CPython itself.
//!
//! `scripts/paper_split.py` is the paper's `utils.read_data` (reduced to what decides the split)
//! on CPython's own `random`. Two checks:
//! * a committed fixture (`tests/fixtures/paper_split.json`, written by that script): MT19937
//!   outputs across the 624-word regeneration, `getrandbits` up to 64 bits, `randrange` up to
//!   2^53, shuffles of many lengths, for seeds of one, two and three 32-bit words; and the
//!   splits (0.8, 0.5, 10) of generated files (nested groups in unsorted order, unsorted and
//!   non-numeric ids, identical pairs, a group left empty, 998 pairs) and demo files;
//! * live: the same script run by the `python3` on this machine over every demo file and the
//!   generated ones, at --split 0.8, 0.5, 10 (skipped, loudly, only when python3 is missing).
//!
//! Everything must be identical: the keys of train and test in order, and the random baseline's
//! label swaps.
use resid::repe::data::{load_mvalue_file, StimulusKind};
use resid::repe::paper::{paper_key, paper_split};
use resid::repe::pyrandom::PyRandom;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn check_random(cases: &Value) -> usize {
    let mut n = 0;
    for case in cases.as_array().unwrap() {
        let seed = case["seed"].as_u64().unwrap();
        let mut r = PyRandom::new(seed);
        let u32s: Vec<u64> = (0..case["u32"].as_array().unwrap().len()).map(|_| r.getrandbits(32)).collect();
        assert_eq!(u32s, u64s(&case["u32"]), "seed {seed}: getrandbits(32) stream");
        for kv in case["bits"].as_array().unwrap() {
            let (k, want) = (kv[0].as_u64().unwrap() as u32, kv[1].as_u64().unwrap());
            assert_eq!(r.getrandbits(k), want, "seed {seed}: getrandbits({k})");
        }
        for nv in case["below"].as_array().unwrap() {
            let (m, want) = (nv[0].as_u64().unwrap(), nv[1].as_u64().unwrap());
            assert_eq!(r.randbelow(m), want, "seed {seed}: randrange({m})");
        }
        for want in case["shuffles"].as_array().unwrap() {
            let want = u64s(want);
            let mut x: Vec<u64> = (0..want.len() as u64).collect();
            r.shuffle(&mut x);
            assert_eq!(x, want, "seed {seed}: shuffle of {}", want.len());
        }
        for want in case["random"].as_array().unwrap() {
            // As an exact integer: random() * 2^53.
            assert_eq!((r.random() * 9_007_199_254_740_992.0) as u64, want.as_u64().unwrap(), "seed {seed}: random()");
        }
        n += 1;
    }
    n
}

fn kind_of(file: &Path) -> StimulusKind {
    let concept = file.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    StimulusKind::for_concept(&concept)
}

fn check_splits(splits: &Value) -> usize {
    let mut n = 0;
    for s in splits.as_array().unwrap() {
        let file = root().join(s["file"].as_str().unwrap());
        let f = s["split"].as_f64().unwrap();
        let seed = s["seed"].as_u64().unwrap();
        let pairs = load_mvalue_file(&file, kind_of(&file)).unwrap();
        let ours = paper_split(pairs, f, seed);
        let keys = |ps: &[resid::repe::data::Pair]| ps.iter().map(paper_key).collect::<Vec<_>>();
        let want = |k: &str| s[k].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect::<Vec<_>>();
        assert_eq!(keys(&ours.train), want("train"), "{} --split {f}: train keys", file.display());
        assert_eq!(keys(&ours.test), want("test"), "{} --split {f}: test keys", file.display());
        let flips: Vec<bool> = s["flips"].as_array().unwrap().iter().map(|x| x.as_bool().unwrap()).collect();
        assert_eq!(ours.random_flip, flips, "{} --split {f}: label swaps", file.display());
        n += 1;
    }
    n
}

#[test]
fn split_matches_the_committed_cpython_fixture() {
    let text = std::fs::read_to_string(root().join("tests/fixtures/paper_split.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = check_random(&v["random"]);
    let splits = check_splits(&v["splits"]);
    eprintln!("fixture (CPython {}): {cases} generator cases, {splits} splits identical", v["python"]);
    assert!(cases >= 9 && splits >= 15);
}

#[test]
fn split_matches_live_cpython() {
    let Ok(out) = Command::new("python3").arg("--version").output() else {
        eprintln!("SKIPPED: python3 not found; only the committed fixture was checked");
        return;
    };
    assert!(out.status.success());
    let script = root().join("scripts/paper_split.py");
    let out = Command::new("python3").arg(&script).arg("--random-cases").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cases: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_random(&cases);
    let mut files: Vec<String> = Vec::new();
    for dir in ["data/values", "tests/fixtures/paper_split"] {
        let mut stack = vec![root().join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "json") {
                    files.push(p.strip_prefix(root()).unwrap().display().to_string());
                }
            }
        }
    }
    files.sort();
    let tmp = std::env::temp_dir().join(format!("resid-paper-split-{}.json", std::process::id()));
    let out = Command::new("python3").current_dir(root()).arg(&script).arg("--fixture").arg(&tmp).args(&files).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&tmp).unwrap()).unwrap();
    let _ = std::fs::remove_file(&tmp);
    let n = check_splits(&v["splits"]);
    eprintln!("live CPython {}: {} files, {n} splits identical", v["python"], files.len());
    assert!(files.len() >= 56, "expected every demo file, got {}", files.len());
}
