//! The `resid` binary on good and bad input: every bad input is a one-line error with a
//! non-zero exit and no output file.
mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn resid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resid")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        write_tiny(&dir.join("model"), &TinySpec::default());
        Fixture { _tmp: tmp, dir }
    }
    fn p(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
    fn write(&self, name: &str, content: &[u8]) -> String {
        std::fs::write(self.dir.join(name), content).unwrap();
        self.p(name)
    }
}

/// Runs an extract expected to fail and checks code, message and that no output appeared.
fn expect_failure(f: &Fixture, args: &[&str], code: i32, needle: &str) {
    let out = f.p("out.safetensors");
    let mut all = vec!["extract", "--out", &out];
    all.extend_from_slice(args);
    let o = resid(&all);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "args {args:?}: {err}");
    assert!(err.contains(needle), "args {args:?}: expected `{needle}` in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(!Path::new(&out).exists(), "partial output left behind");
    let leftovers: Vec<_> = std::fs::read_dir(&f.dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains(".tmp")).collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn extract_ids_writes_hf_shaped_output() {
    let f = Fixture::new();
    let input = f.write("in.jsonl", b"{\"ids\": [3, 4, 5]}\n{\"ids\": [7]}\n");
    let out = f.p("out.safetensors");
    let o = resid(&["extract", "--model", &f.p("model"), "--input", &input, "--out", &out, "--layers", "0,2-3,raw"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = resid::io::read_f32_tensor(Path::new(&out), "hidden_states").unwrap();
    assert_eq!(t.shape, vec![2, 4, 32]);
    assert_eq!(t.metadata.get("position").map(String::as_str), Some("last"));
    assert_eq!(t.metadata.get("steering").map(String::as_str), Some("none"));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let layers: Vec<i64> = st.tensor("layers").unwrap().data().chunks(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(layers, vec![0, 2, 3, -1]);

    let o = resid(&["extract", "--model", &f.p("model"), "--input", &input, "--out", &out, "--position", "all"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("hidden_states").unwrap().shape(), &[4, 4, 32]);
    assert_eq!(st.tensor("offsets").unwrap().shape(), &[3]);
}

#[test]
fn bad_inputs_fail_cleanly() {
    let f = Fixture::new();
    let model = f.p("model");
    let good = f.write("good.jsonl", b"{\"ids\": [3, 4, 5]}\n");
    // Model problems (exit 4).
    expect_failure(&f, &["--model", &f.p("nope"), "--input", &good], 4, "no such model directory");
    std::fs::create_dir_all(f.dir.join("empty")).unwrap();
    expect_failure(&f, &["--model", &f.p("empty"), "--input", &good], 4, "no config.json");
    let bad_model = f.dir.join("bad_model");
    write_tiny(&bad_model, &TinySpec::default());
    let full = std::fs::read(bad_model.join("model.safetensors")).unwrap();
    std::fs::write(bad_model.join("model.safetensors"), &full[..full.len() / 2]).unwrap();
    expect_failure(&f, &["--model", &bad_model.display().to_string(), "--input", &good], 4, "not a valid safetensors file");
    std::fs::write(bad_model.join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\xff{}").unwrap();
    expect_failure(&f, &["--model", &bad_model.display().to_string(), "--input", &good], 4, "not a valid safetensors file");
    let spec = TinySpec::default();
    let mut tensors = tensors(&spec);
    tensors.retain(|t| t.name != "model.layers.1.mlp.up_proj.weight");
    resid::io::write_safetensors(&bad_model.join("model.safetensors"), &tensors, Default::default()).unwrap();
    expect_failure(&f, &["--model", &bad_model.display().to_string(), "--input", &good], 4, "missing tensor `model.layers.1.mlp.up_proj.weight`");
    let mut tensors = common::tensors(&spec);
    for t in tensors.iter_mut().filter(|t| t.name == "model.layers.0.self_attn.k_proj.weight") {
        t.shape = vec![32, 16];
    }
    resid::io::write_safetensors(&bad_model.join("model.safetensors"), &tensors, Default::default()).unwrap();
    expect_failure(&f, &["--model", &bad_model.display().to_string(), "--input", &good], 4, "has shape [32, 16], expected [16, 32]");
    write_tiny(&bad_model, &spec);
    std::fs::write(bad_model.join("config.json"), config_json(&spec).replace("LlamaForCausalLM", "GPT2LMHeadModel")).unwrap();
    expect_failure(&f, &["--model", &bad_model.display().to_string(), "--input", &good], 4, "unsupported architecture `GPT2LMHeadModel`");

    // Input problems (exit 3).
    expect_failure(&f, &["--model", &model, "--input", &f.p("missing.jsonl")], 6, "missing.jsonl: No such file");
    let bad = f.write("bad.jsonl", b"{\"ids\": [1]}\n{\"text\": oops}\n");
    expect_failure(&f, &["--model", &model, "--input", &bad], 3, "line 2: malformed JSON");
    let blank = f.write("blank.jsonl", b"{\"ids\": [1]}\n\n{\"ids\": [1]}\n");
    expect_failure(&f, &["--model", &model, "--input", &blank], 3, "line 2: empty line");
    let no_text = f.write("notext.jsonl", b"{\"words\": \"hi\"}\n");
    expect_failure(&f, &["--model", &model, "--input", &no_text], 3, "line 1: no `text` field");
    let utf = f.write("utf.jsonl", b"{\"ids\": [1]}\n{\"text\": \"\xff\"}\n");
    expect_failure(&f, &["--model", &model, "--input", &utf], 3, "line 2: invalid UTF-8");
    let empty = f.write("empty.jsonl", b"");
    expect_failure(&f, &["--model", &model, "--input", &empty], 3, "no input lines");
    let text = f.write("text.jsonl", b"{\"text\": \"hello\"}\n");
    expect_failure(&f, &["--model", &model, "--input", &text], 3, "no tokenizer.json");
    let long = f.write("long.jsonl", format!("{{\"ids\": {:?}}}\n", vec![3u32; 300]).as_bytes());
    expect_failure(&f, &["--model", &model, "--input", &long], 3, "exceed the model's context of 256");
    let oov = f.write("oov.jsonl", b"{\"ids\": [3, 500]}\n");
    expect_failure(&f, &["--model", &model, "--input", &oov], 3, "outside the vocabulary");
    expect_failure(&f, &["--model", &model, "--input", &good, "--layers", "0-4"], 3, "capture layer 4 is out of range");
    expect_failure(&f, &["--model", &model, "--input", &good, "--position", "first"], 3, "unknown position `first`");

    // Steering files.
    let h = 32;
    let write_vec = |name: &str, rows: usize, cols: usize, poison: bool| {
        let mut data = vec![0.5f32; rows * cols];
        if poison {
            data[cols + 1] = f32::NAN;
        }
        let t = resid::io::OutTensor { name: "directions".into(), shape: vec![rows, cols], data: resid::io::TensorData::F32(data) };
        resid::io::write_safetensors(&f.dir.join(name), &[t], Default::default()).unwrap();
        f.p(name)
    };
    let wrong_h = write_vec("wrong_h.safetensors", 4, 16, false);
    expect_failure(&f, &["--model", &model, "--input", &good, "--steer", &wrong_h, "--steer-layers", "1"], 3, "expected [4, 32]");
    let nan = write_vec("nan.safetensors", 4, h, true);
    expect_failure(&f, &["--model", &model, "--input", &good, "--steer", &nan, "--steer-layers", "1"], 3, "NaN or Inf");
    let ok_vec = write_vec("ok.safetensors", 4, h, false);
    expect_failure(&f, &["--model", &model, "--input", &good, "--steer", &ok_vec, "--steer-layers", "2-9"], 3, "steering layer 4 is out of range");
    expect_failure(&f, &["--model", &model, "--input", &good, "--steer", &ok_vec], 3, "--steer needs --steer-layers");

    // Device and output problems.
    // No GPU stack on a CI machine: a clear device error naming what is missing, never a panic.
    if !Path::new("/dev/nvidia0").exists() {
        expect_failure(&f, &["--model", &model, "--input", &good, "--device", "cuda"], 5, "not found");
        expect_failure(&f, &["--model", &model, "--input", &good, "--device", "cuda:1"], 5, "not found");
    }
    expect_failure(&f, &["--model", &model, "--input", &good, "--device", "tpu"], 3, "expected cpu, cuda or cuda:N");
    let o = resid(&["extract", "--model", &model, "--input", &good, "--out", &f.p("no/such/dir/out.safetensors")]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
}

#[test]
fn generate_and_info_work_on_ids_model_and_reject_bad_flags() {
    let f = Fixture::new();
    let o = resid(&["info", "--model", &f.p("model"), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["layers"], 3);
    assert_eq!(v["family"], "llama");
    let o = resid(&["generate", "--model", &f.p("model"), "--prompt", "hi"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("no tokenizer.json"));
    let o = resid(&["generate", "--model", &f.p("model"), "--prompt", "hi", "--greedy", "--temperature", "1"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn bench_reports_overheads_with_intervals_and_rejects_bad_options() {
    let f = Fixture::new();
    let model = f.p("model");
    let out = resid(&["bench", "--model", &model, "--workload", "steer", "--batch", "3", "--steps", "4", "--min-len", "2", "--max-len", "8", "--json", "--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for phase in ["prefill", "decode"] {
        for key in ["steering_overhead_paired_median", "capture_overhead_paired_median"] {
            assert!(v[phase][key].as_f64().is_some(), "{phase}.{key}: {v}");
        }
        for key in ["steering_overhead_paired_ci95", "capture_overhead_paired_ci95"] {
            let ci = v[phase][key].as_array().unwrap_or_else(|| panic!("{phase}.{key}: {v}"));
            assert!(ci[0].as_f64().unwrap() <= ci[1].as_f64().unwrap(), "{phase}.{key}: {ci:?}");
        }
    }
    let bad = resid(&["bench", "--model", &model, "--workload", "nope"]);
    assert_eq!(bad.status.code(), Some(3), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("expected extract, decode, steer or scaling"), "{}", stderr(&bad));
    // The scaling sweep checks its output directory before measuring anything.
    let blocker = f.write("not-a-dir", b"x");
    let bad = resid(&["bench", "--model", &model, "--workload", "scaling", "--plot-dir", &format!("{blocker}/sub")]);
    assert_eq!(bad.status.code(), Some(6), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("not-a-dir"), "{}", stderr(&bad));
}

/// `--compute` on every command that loads a model, recorded in the output's metadata as what
/// ran (bf16 only where this CPU runs it: `effective_compute`); f32 on CUDA is refused.
#[test]
fn every_model_command_takes_compute_and_outputs_record_it() {
    use resid::backend::cpu::{gemm, Compute};
    for cmd in ["info", "extract", "stats", "generate", "serve", "bench", "vectors", "recognize", "study", "control"] {
        let o = resid(&[cmd, "--help"]);
        assert!(String::from_utf8_lossy(&o.stdout).contains("--compute <COMPUTE>"), "`resid {cmd}` has no --compute");
    }
    let f = Fixture::new();
    let input = f.write("in.jsonl", b"{\"ids\": [3, 4, 5]}\n");
    let out = f.p("out.safetensors");
    for (asked, ran) in [("f32", Compute::F32), ("bf16", gemm::effective_compute(Compute::Bf16))] {
        let o = resid(&["extract", "--model", &f.p("model"), "--input", &input, "--out", &out, "--compute", asked]);
        assert!(o.status.success(), "{}", stderr(&o));
        let t = resid::io::read_f32_tensor(Path::new(&out), "hidden_states").unwrap();
        assert_eq!(t.metadata.get("compute").map(String::as_str), Some(ran.name()), "--compute {asked}");
        let stats = f.p(&format!("stats-{asked}.safetensors"));
        let o = resid(&["stats", "--model", &f.p("model"), "--input", &input, "--out", &stats, "--layers", "1", "--quiet", "--compute", asked]);
        assert!(o.status.success(), "{}", stderr(&o));
        let bytes = std::fs::read(&stats).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().and_then(|m| m.get("compute")).map(String::as_str), Some(ran.name()), "stats --compute {asked}");
        let o = resid(&["info", "--model", &f.p("model"), "--json", "--compute", asked]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["compute"], ran.name(), "info --compute {asked}");
        assert!(v["compute_note"].as_str().is_some_and(|n| n.contains("--compute bf16")), "{v}");
    }
    let o = resid(&["info", "--model", &f.p("model"), "--device", "cuda", "--compute", "f32"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("--compute f32") && stderr(&o).trim().lines().count() == 1, "{}", stderr(&o));
    let o = resid(&["info", "--model", &f.p("model"), "--compute", "f64"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown compute type `f64`"), "{}", stderr(&o));
}
