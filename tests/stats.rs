//! `--dtype` outputs against rounding of the f32 output, and `resid stats` against an f64
//! two-pass reference over an all-token extraction; its invariance to batching, threads and
//! interruption; and `vectors --from-stats` against vectors built from the rows.
mod common;

use common::study::{sentence, write_tokenizer, WORDS};
use common::*;
use resid::repe::data::SplitMix64;
use safetensors::SafeTensors;
use std::path::Path;
use std::process::{Command, Output};

fn resid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resid")).args(args).output().unwrap()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A failed run with exactly one line on stderr, which is returned.
fn one_line_error(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure");
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "expected one line: {err}");
    err
}

/// A tensor of a safetensors file as (dtype, shape, raw bytes).
fn raw(path: &Path, name: &str) -> (safetensors::Dtype, Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.dtype(), t.shape().to_vec(), t.data().to_vec())
}

fn f64s(path: &Path, name: &str) -> Vec<f64> {
    let (dtype, _, b) = raw(path, name);
    assert_eq!(dtype, safetensors::Dtype::F64, "{name}");
    b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn u16s(bytes: &[u8]) -> Vec<u16> {
    bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

fn metadata(path: &Path) -> std::collections::HashMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    SafeTensors::read_metadata(&bytes).unwrap().1.metadata().clone().unwrap_or_default()
}

/// Checks that `h` (f16 bits) is `x` rounded to nearest, ties to even, from the definition:
/// no neighbouring f16 is nearer, and on a tie the mantissa is even. Independent of how the
/// conversion is computed.
fn is_f16_rounding(x: f32, h: u16) -> bool {
    let hv = half::f16::from_bits(h);
    if !hv.is_finite() {
        return false;
    }
    let err = (x as f64 - hv.to_f64()).abs();
    // Neighbours in magnitude on the same side of zero (bits ± 1 within the sign's range).
    let mag = h & 0x7fff;
    let sign = h & 0x8000;
    for n in [mag.wrapping_sub(1), mag + 1] {
        if n > 0x7bff {
            continue;
        }
        let nv = half::f16::from_bits(sign | n).to_f64();
        let e = (x as f64 - nv).abs();
        if e < err || (e == err && n % 2 == 0 && mag % 2 == 1) {
            return false;
        }
    }
    // Across zero: -0 and +0 are both nearest for 0 only.
    true
}

/// bf16 by the integer definition of round-to-nearest-even on the f32 bits.
fn bf16_reference(x: f32) -> u16 {
    let b = x.to_bits();
    let lsb = (b >> 16) & 1;
    ((b + 0x7fff + lsb) >> 16) as u16
}

#[test]
fn half_precision_outputs_are_the_rounded_f32_output() {
    let s = extract_setup(12);
    let run = |dtype: &str, out: &Path| {
        let out = out.display().to_string();
        resid(&["extract", "--model", &s.model, "--input", &s.input, "--out", &out, "--position", "all", "--layers", "0,2,4,raw", "--dtype", dtype, "--quiet"])
    };
    let (f32p, f16p, bf16p) = (s.root.join("f32.safetensors"), s.root.join("f16.safetensors"), s.root.join("bf16.safetensors"));
    ok(&run("f32", &f32p));
    ok(&run("f16", &f16p));
    ok(&run("bf16", &bf16p));
    let reference = resid::io::read_f32_tensor(&f32p, "hidden_states").unwrap().data;
    let (dt, shape16, b16) = raw(&f16p, "hidden_states");
    assert_eq!(dt, safetensors::Dtype::F16);
    let (dtb, shapeb, bb) = raw(&bf16p, "hidden_states");
    assert_eq!(dtb, safetensors::Dtype::BF16);
    assert_eq!(shape16, raw(&f32p, "hidden_states").1);
    assert_eq!(shapeb, shape16);
    let (h16, hb) = (u16s(&b16), u16s(&bb));
    assert_eq!(h16.len(), reference.len());
    for (i, &x) in reference.iter().enumerate() {
        assert!(is_f16_rounding(x, h16[i]), "value {i}: {x} -> f16 {:?}", half::f16::from_bits(h16[i]));
        assert_eq!(hb[i], bf16_reference(x), "value {i}: {x} -> bf16");
    }
    assert_eq!(metadata(&f16p)["dtype"], "float16");
    assert_eq!(metadata(&bf16p)["dtype"], "bfloat16");
    assert_eq!(metadata(&f32p)["dtype"], "float32");
    // Half the disk: the all-token dump is dominated by hidden_states.
    let (big, small) = (std::fs::metadata(&f32p).unwrap().len(), std::fs::metadata(&f16p).unwrap().len());
    assert!(small as f64 <= 0.51 * big as f64, "f16 file {small} bytes vs f32 {big}");

    // Sharded output: verify passes, and a rerun with another dtype refuses to mix results.
    let dir = s.root.join("shards");
    let d = dir.display().to_string();
    let shards = |dtype: &str| resid(&["extract", "--model", &s.model, "--input", &s.input, "--out", &d, "--position", "all", "--layers", "0,2,4,raw", "--dtype", dtype, "--shard-sequences", "5", "--quiet"]);
    ok(&shards("f16"));
    ok(&resid(&["verify", &d]));
    let mut joined = Vec::new();
    for i in 0..3 {
        joined.extend(u16s(&raw(&dir.join(format!("shard-{i:05}.safetensors")), "hidden_states").2));
    }
    assert_eq!(joined, h16, "shards hold the single file's values");
    let err = one_line_error(&shards("bf16"));
    assert!(err.contains("refusing to mix"), "{err}");
    ok(&shards("f16"));
    let err = one_line_error(&resid(&["extract", "--model", &s.model, "--input", &s.input, "--out", &d, "--dtype", "f8"]));
    assert!(err.contains("unknown dtype `f8`"), "{err}");
}

#[test]
fn overflow_to_f16_infinity_names_the_line_and_the_point() {
    let s = extract_setup(3);
    // A steering vector large enough that the steered residual leaves f16's range.
    let steer = s.root.join("big.safetensors");
    let hidden = 128;
    let dirs: Vec<f32> = (0..5 * hidden).map(|i| if i % hidden == 7 { 1.0e5 } else { 0.0 }).collect();
    resid::io::write_safetensors(
        &steer,
        &[resid::io::OutTensor { name: "directions".into(), shape: vec![5, hidden], data: resid::io::TensorData::F32(dirs) }],
        Default::default(),
    )
    .unwrap();
    let out = s.root.join("o.safetensors");
    let args = |dtype: &'static str| {
        vec![
            "extract".to_string(), "--model".into(), s.model.clone(), "--input".into(), s.input.clone(), "--out".into(), out.display().to_string(),
            "--layers".into(), "1,3".into(), "--steer".into(), steer.display().to_string(), "--steer-layers".into(), "3".into(), "--dtype".into(), dtype.into(), "--quiet".into(),
        ]
    };
    let run = |dtype| Command::new(env!("CARGO_BIN_EXE_resid")).args(args(dtype)).output().unwrap();
    let err = one_line_error(&run("f16"));
    assert!(err.contains("line 1: value") && err.contains("overflows float16") && err.contains("Hidden(3)"), "{err}");
    assert!(!out.exists(), "no output after an error");
    // bf16 and f32 hold it.
    ok(&run("bf16"));
    ok(&run("f32"));
}

/// Naive two-pass f64 statistics of rows `[n, h]`: (mean, cov with n − 1, gram, min, max).
#[allow(clippy::type_complexity)]
fn reference_stats(rows: &[Vec<f64>], h: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = rows.len() as f64;
    let mut mean = vec![0.0; h];
    for r in rows {
        for j in 0..h {
            mean[j] += r[j];
        }
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let (mut cov, mut gram) = (vec![0.0; h * h], vec![0.0; h * h]);
    for r in rows {
        for i in 0..h {
            for j in 0..h {
                cov[i * h + j] += (r[i] - mean[i]) * (r[j] - mean[j]);
                gram[i * h + j] += r[i] * r[j];
            }
        }
    }
    cov.iter_mut().for_each(|c| *c /= n - 1.0);
    let min = (0..h).map(|j| rows.iter().map(|r| r[j]).fold(f64::INFINITY, f64::min)).collect();
    let max = (0..h).map(|j| rows.iter().map(|r| r[j]).fold(f64::NEG_INFINITY, f64::max)).collect();
    (mean, cov, gram, min, max)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().map(|x| x.abs()).fold(0.0, f64::max)
}

#[test]
fn stats_match_a_two_pass_reference_over_an_all_token_extraction() {
    let s = extract_setup(24);
    let layers = "1,3,raw";
    let dump = s.root.join("all.safetensors");
    ok(&resid(&["extract", "--model", &s.model, "--input", &s.input, "--out", &dump.display().to_string(), "--position", "all", "--layers", layers, "--quiet"]));
    let hs = resid::io::read_f32_tensor(&dump, "hidden_states").unwrap();
    let (t, p, h) = (hs.shape[0], hs.shape[1], hs.shape[2]);
    let stats = s.root.join("stats.safetensors");
    let st = stats.display().to_string();
    ok(&resid(&["stats", "--model", &s.model, "--input", &s.input, "--out", &st, "--layers", layers, "--stats", "mean,cov,gram", "--quiet"]));
    let meta = metadata(&stats);
    // TransformerLens names, as extraction outputs name their points (index L has none).
    assert_eq!(meta["points"], r#"["blocks.1.hook_resid_pre","blocks.3.hook_resid_pre","blocks.3.hook_resid_post"]"#);
    assert_eq!(meta["position"], "all");
    let (count, mean, cov, gram, min, max) = (raw(&stats, "count").2, f64s(&stats, "mean"), f64s(&stats, "cov"), f64s(&stats, "gram"), f64s(&stats, "min"), f64s(&stats, "max"));
    assert_eq!(raw(&stats, "cov").1, vec![p, h, h]);
    for pt in 0..p {
        assert_eq!(i64::from_le_bytes(count[pt * 8..pt * 8 + 8].try_into().unwrap()), t as i64);
        let rows: Vec<Vec<f64>> = (0..t).map(|r| hs.data[(r * p + pt) * h..(r * p + pt + 1) * h].iter().map(|&v| v as f64).collect()).collect();
        let (m, c, g, lo, hi) = reference_stats(&rows, h);
        let (v, m2) = (h, h * h);
        // Both sides sum the same f32 rows in f64: they agree to f64 rounding, far below 1e-9
        // of the values' scale.
        assert!(max_abs_diff(&mean[pt * v..(pt + 1) * v], &m) <= 1e-9 * max_abs(&m).max(1.0), "mean, point {pt}");
        assert!(max_abs_diff(&cov[pt * m2..(pt + 1) * m2], &c) <= 1e-9 * max_abs(&c).max(1.0), "cov, point {pt}");
        assert!(max_abs_diff(&gram[pt * m2..(pt + 1) * m2], &g) <= 1e-9 * max_abs(&g).max(1.0), "gram, point {pt}");
        assert_eq!(&min[pt * v..(pt + 1) * v], &lo[..], "min, point {pt}");
        assert_eq!(&max[pt * v..(pt + 1) * v], &hi[..], "max, point {pt}");
    }

    // The last and mean rows as well (one row per sequence).
    for position in ["last", "mean"] {
        let dump = s.root.join(format!("{position}.safetensors"));
        ok(&resid(&["extract", "--model", &s.model, "--input", &s.input, "--out", &dump.display().to_string(), "--position", position, "--layers", "2", "--quiet"]));
        let hs = resid::io::read_f32_tensor(&dump, "hidden_states").unwrap();
        let out = s.root.join(format!("stats-{position}.safetensors"));
        ok(&resid(&["stats", "--model", &s.model, "--input", &s.input, "--out", &out.display().to_string(), "--layers", "2", "--position", position, "--quiet"]));
        let rows: Vec<Vec<f64>> = hs.data.chunks_exact(h).map(|r| r.iter().map(|&v| v as f64).collect()).collect();
        let (m, c, ..) = reference_stats(&rows, h);
        assert!(max_abs_diff(&f64s(&out, "mean"), &m) <= 1e-9 * max_abs(&m).max(1.0), "{position} mean");
        assert!(max_abs_diff(&f64s(&out, "cov"), &c) <= 1e-9 * max_abs(&c).max(1.0), "{position} cov");
    }
}

#[test]
fn stats_are_identical_whatever_the_batching_threads_and_interruptions() {
    let s = extract_setup(40);
    let run = |out: &Path, extra: &[&str]| {
        let out = out.display().to_string();
        let mut args = vec!["stats", "--model", &s.model, "--input", &s.input, "--out", &out, "--layers", "0,2,4", "--stats", "mean,cov,gram", "--quiet"];
        args.extend_from_slice(extra);
        resid(&args)
    };
    let base = s.root.join("base.safetensors");
    ok(&run(&base, &[]));
    let want = std::fs::read(&base).unwrap();
    for (i, extra) in [&["--batch-tokens", "64"][..], &["--batch-tokens", "700", "--threads", "1"], &["--threads", "2", "--batch-tokens", "150"]].iter().enumerate() {
        let out = s.root.join(format!("b{i}.safetensors"));
        ok(&run(&out, extra));
        assert!(std::fs::read(&out).unwrap() == want, "{extra:?}: not byte-identical");
    }
    // Interrupted twice at odd places (with different batching), then finished.
    let out = s.root.join("resumed.safetensors");
    let state = resid::store::stats::state_path(&out);
    ok(&run(&out, &["--stop-after", "7", "--batch-tokens", "300"]));
    assert!(state.exists() && !out.exists(), "a stopped run leaves its state and no output");
    ok(&run(&out, &["--stop-after", "23", "--batch-tokens", "90"]));
    // Another layer selection refuses to resume that state.
    let err = one_line_error(&resid(&["stats", "--model", &s.model, "--input", &s.input, "--out", &out.display().to_string(), "--layers", "1", "--quiet"]));
    assert!(err.contains("refusing to resume"), "{err}");
    ok(&run(&out, &[]));
    assert!(!state.exists(), "the state is removed once the output is written");
    assert!(std::fs::read(&out).unwrap() == want, "the resumed run differs from the uninterrupted one");
}

/// A tiny model with a word tokenizer and `n` JSONL pairs whose pos and neg differ in a few words.
fn pairs_setup(n: usize) -> (tempfile::TempDir, String, String, Vec<(String, String)>) {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec { vocab: 64, hidden: 48, inter: 96, layers: 3, heads: 4, kv_heads: 2, bias: true, tie: false };
    let model = write_tiny(&tmp.path().join("model"), &spec);
    write_tokenizer(&model);
    let mut rng = SplitMix64::new(5);
    let mut pairs = Vec::new();
    let mut text = String::new();
    for _ in 0..n {
        let len = 3 + (rng.next_u64() % 4) as usize;
        let common = sentence(&mut rng, &WORDS[..20], len);
        let pos = format!("{common} {}", sentence(&mut rng, &["good", "kindly", "helped", "honest", "fair"], 2));
        let neg = format!("{common} {}", sentence(&mut rng, &["bad", "cruelly", "hurt", "lied", "unfair"], 2));
        text.push_str(&serde_json::json!({ "pos": pos, "neg": neg }).to_string());
        text.push('\n');
        pairs.push((pos, neg));
    }
    let input = tmp.path().join("pairs.jsonl");
    std::fs::write(&input, text).unwrap();
    (tmp, model.display().to_string(), input.display().to_string(), pairs)
}

#[test]
fn vectors_from_statistics_equal_vectors_from_the_rows() {
    let (tmp, model, input, pairs) = pairs_setup(60);
    let root = tmp.path();
    let (layers, h) = (3usize, 48usize);
    // The rows: last-token hidden states of every pos and neg text at indices 1..=L.
    let texts = root.join("texts.jsonl");
    let lines: String = pairs.iter().flat_map(|(p, n)| [p, n]).map(|t| serde_json::json!({ "text": t }).to_string() + "\n").collect();
    std::fs::write(&texts, lines).unwrap();
    let rows_file = root.join("rows.safetensors");
    ok(&resid(&["extract", "--model", &model, "--input", &texts.display().to_string(), "--out", &rows_file.display().to_string(), "--layers", "1-3", "--quiet"]));
    let hs = resid::io::read_f32_tensor(&rows_file, "hidden_states").unwrap().data;
    let rep = |i: usize| &hs[i * layers * h..(i + 1) * layers * h];
    let reps = resid::repe::vectors::PairReps { pos: (0..pairs.len()).map(|i| rep(2 * i)).collect(), neg: (0..pairs.len()).map(|i| rep(2 * i + 1)).collect() };

    let stats = root.join("pairs-stats.safetensors");
    let st = stats.display().to_string();
    ok(&resid(&["stats", "--model", &model, "--input", &input, "--out", &st, "--layers", "1-3", "--position", "last", "--pairs", "--stats", "mean,gram", "--batch-tokens", "37", "--quiet"]));
    assert_eq!(metadata(&stats)["pairs"], "true");
    let vec_file = |method: &str| {
        let out = root.join(format!("{method}.safetensors"));
        ok(&resid(&["vectors", "--model", &model, "--from-stats", &st, "--method", method, "--out", &out.display().to_string(), "--quiet"]));
        resid::io::read_f32_tensor(&out, "directions").unwrap().data
    };
    let diffs = |l: usize| -> Vec<Vec<f64>> {
        (0..pairs.len()).map(|i| (0..h).map(|j| reps.pos[i][(l - 1) * h + j] as f64 - reps.neg[i][(l - 1) * h + j] as f64).collect()).collect()
    };
    let rms = |d: &[Vec<f64>], u: &[f64]| (d.iter().map(|r| r.iter().zip(u).map(|(a, b)| a * b).sum::<f64>().powi(2)).sum::<f64>() / d.len() as f64).sqrt();
    let unit_and_norm = |row: &[f32]| {
        let n = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        (row.iter().map(|&v| v as f64 / n).collect::<Vec<f64>>(), n)
    };

    // mean-diff: the direction of ConceptVectors::fit on the rows, signed by the summed
    // separation, scaled by the RMS separation. Tolerance 1e-6: the sides differ by f32
    // subtraction (pos − neg) and summation order only.
    let fitted = resid::repe::vectors::ConceptVectors::fit(resid::repe::vectors::Method::MeanDiff, &reps, layers, h, 0).unwrap();
    let md = vec_file("mean-diff");
    assert!(md[..h].iter().all(|&v| v == 0.0), "row 0 (embeddings) stays zero");
    for l in 1..=layers {
        let (u, norm) = unit_and_norm(&md[l * h..(l + 1) * h]);
        let want = fitted.direction(l);
        let d = diffs(l);
        let summed: f64 = d.iter().map(|r| r.iter().zip(want).map(|(a, &b)| a * b as f64).sum::<f64>()).sum();
        let sign = if summed < 0.0 { -1.0 } else { 1.0 };
        for j in 0..h {
            assert!((u[j] - sign * want[j] as f64).abs() < 1e-6, "mean-diff index {l}, {j}: {} vs {}", u[j], want[j]);
        }
        let scale = rms(&d, &u);
        assert!((norm - scale).abs() <= 1e-6 * scale, "mean-diff scale at {l}: {norm} vs {scale}");
    }

    // pca: the leading eigenvector of the rows' Σ d dᵀ, found here by plain power iteration
    // from another start (10000 steps), up to sign. Tolerance 1e-5 on each element.
    let pca = vec_file("pca");
    for l in 1..=layers {
        let d = diffs(l);
        let mut v: Vec<f64> = (0..h).map(|j| 1.0 + j as f64 / h as f64).collect();
        for _ in 0..10000 {
            let proj: Vec<f64> = d.iter().map(|r| r.iter().zip(&v).map(|(a, b)| a * b).sum()).collect();
            let mut next = vec![0.0; h];
            for (r, p) in d.iter().zip(&proj) {
                for j in 0..h {
                    next[j] += p * r[j];
                }
            }
            let n = next.iter().map(|x| x * x).sum::<f64>().sqrt();
            v = next.iter().map(|x| x / n).collect();
        }
        let (u, norm) = unit_and_norm(&pca[l * h..(l + 1) * h]);
        let dotp: f64 = u.iter().zip(&v).map(|(a, b)| a * b).sum();
        let sign = dotp.signum();
        for j in 0..h {
            assert!((u[j] - sign * v[j]).abs() < 1e-5, "pca index {l}, {j}: {} vs {}", u[j], sign * v[j]);
        }
        let mean_sep: f64 = d.iter().map(|r| r.iter().zip(&u).map(|(a, b)| a * b).sum::<f64>()).sum();
        assert!(mean_sep >= 0.0, "pca sign at {l}: the summed separation is positive");
        let scale = rms(&d, &u);
        assert!((norm - scale).abs() <= 1e-6 * scale, "pca scale at {l}: {norm} vs {scale}");
    }

    // Resumed half-way through a pair (an odd sequence count), the statistics are the same.
    let resumed = root.join("resumed.safetensors");
    let r = resumed.display().to_string();
    let args = |extra: &[&'static str]| {
        let mut a = vec!["stats", "--model", &model, "--input", &input, "--out", &r, "--layers", "1-3", "--position", "last", "--pairs", "--stats", "mean,gram", "--quiet"];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let run = |extra: &[&'static str]| Command::new(env!("CARGO_BIN_EXE_resid")).args(args(extra)).output().unwrap();
    ok(&run(&["--stop-after", "51", "--batch-tokens", "20"]));
    ok(&run(&["--batch-tokens", "500"]));
    assert!(std::fs::read(&resumed).unwrap() == std::fs::read(&stats).unwrap(), "resumed pair statistics differ");
}

#[test]
fn bad_stats_inputs_give_one_line_errors() {
    let (tmp, model, input, _) = pairs_setup(4);
    let root = tmp.path();
    let out = root.join("s.safetensors").display().to_string();
    let texts = root.join("t.jsonl");
    std::fs::write(&texts, "{\"text\": \"the old man\"}\n{\"text\": \"a young woman\"}\n").unwrap();
    let t = texts.display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["stats", "--model", &model, "--input", &t, "--out", &out, "--stats", "mean,median"], "unknown statistic `median`"),
        (vec!["stats", "--model", &model, "--input", &t, "--out", &out, "--layers", "9"], "capture layer 9 is out of range"),
        (vec!["stats", "--model", &model, "--input", &input, "--out", &out, "--pairs", "--position", "all"], "--pairs needs --position last or mean"),
        (vec!["stats", "--model", &model, "--input", &t, "--out", &out, "--pairs"], "line 1"),
        (vec!["stats", "--model", &model, "--input", &t, "--out", "x.bin"], "expected a .safetensors file"),
    ];
    for (args, want) in &cases {
        let err = one_line_error(&resid(args));
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // One row: cov (n − 1) is refused, naming the count.
    let one = root.join("one.jsonl");
    std::fs::write(&one, "{\"text\": \"the old man\"}\n").unwrap();
    let err = one_line_error(&resid(&["stats", "--model", &model, "--input", &one.display().to_string(), "--out", &out, "--position", "last", "--layers", "1"]));
    assert!(err.contains("cov needs at least 2 rows per point, got 1"), "{err}");
    assert!(!Path::new(&out).exists());
    // Statistics without pairs cannot make vectors.
    let plain = root.join("plain.safetensors").display().to_string();
    ok(&resid(&["stats", "--model", &model, "--input", &t, "--out", &plain, "--layers", "1-3", "--quiet"]));
    let vec_out = root.join("v.safetensors").display().to_string();
    let err = one_line_error(&resid(&["vectors", "--model", &model, "--from-stats", &plain, "--out", &vec_out, "--quiet"]));
    assert!(err.contains("not statistics of pair differences"), "{err}");
    // Not a stats file at all.
    let err = one_line_error(&resid(&["vectors", "--model", &model, "--from-stats", &t, "--out", &vec_out, "--quiet"]));
    assert!(err.contains("not a valid safetensors file"), "{err}");
    assert!(!Path::new(&vec_out).exists());
}
