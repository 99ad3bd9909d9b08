//! Crash-safe, resumable, sharded extraction: killing the process at any point and rerunning
//! gives byte-identical shards; parts of a data-parallel run merge into the single-run result.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn resid() -> Command {
    Command::new(env!("CARGO_BIN_EXE_resid"))
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: String,
    input: String,
}

fn setup(sequences: usize) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    // Big enough that an extraction takes long enough to be killed half-way.
    let spec = TinySpec { vocab: 97, hidden: 128, inter: 256, layers: 4, heads: 4, kv_heads: 2, bias: false, tie: true };
    write_tiny(&root.join("model"), &spec);
    let mut text = String::new();
    for i in 0..sequences {
        let ids = random_ids(20 + (i * 37) % 150, spec.vocab, i as u64);
        text.push_str(&serde_json::json!({ "ids": ids }).to_string());
        text.push('\n');
    }
    std::fs::write(root.join("in.jsonl"), text).unwrap();
    let model = root.join("model").display().to_string();
    let input = root.join("in.jsonl").display().to_string();
    Setup { _tmp: tmp, root, model, input }
}

fn extract(s: &Setup, out: &Path, extra: &[&str]) -> std::process::Output {
    let out = out.display().to_string();
    let mut args = vec!["extract", "--model", &s.model, "--input", &s.input, "--out", &out, "--quiet", "--shard-sequences", "16", "--position", "mean"];
    args.extend_from_slice(extra);
    resid().args(&args).output().unwrap()
}

fn shard_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("shard-") && n.ends_with(".safetensors"))
        .collect();
    files.sort();
    files.into_iter().map(|f| (f.clone(), std::fs::read(dir.join(&f)).unwrap())).collect()
}

fn hidden(path: &Path) -> Vec<f32> {
    resid::io::read_f32_tensor(path, "hidden_states").unwrap().data
}

#[test]
fn killed_runs_resume_to_byte_identical_output() {
    let s = setup(160);
    let clean = s.root.join("clean");
    let o = extract(&s, &clean, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = shard_bytes(&clean);
    assert_eq!(want.len(), 10);
    let v = resid().args(["verify", &clean.display().to_string()]).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));

    let resumed = s.root.join("resumed");
    // SIGKILL at a spread of moments, then let the last run finish.
    let mut kills = 0;
    for delay_ms in [5u64, 40, 90, 150, 230, 320, 450] {
        let out = resumed.display().to_string();
        let mut child = resid()
            .args(["extract", "--model", &s.model, "--input", &s.input, "--out", &out, "--quiet", "--shard-sequences", "16", "--position", "mean"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    let o = extract(&s, &resumed, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = shard_bytes(&resumed);
    assert_eq!(got.len(), want.len());
    for ((fa, a), (fb, b)) in got.iter().zip(&want) {
        assert_eq!(fa, fb);
        assert!(a == b, "{fa} differs from the uninterrupted run");
    }
    assert!(kills > 0, "no run was interrupted: make the workload longer");
    // No temporary files survive.
    let leftovers: Vec<_> = std::fs::read_dir(&resumed).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).collect();
    assert!(leftovers.is_empty() || kills > 0, "{leftovers:?}");
    let v = resid().args(["verify", &resumed.display().to_string()]).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
fn reruns_with_other_input_or_options_refuse_to_mix() {
    let s = setup(40);
    let dir = s.root.join("out");
    assert!(extract(&s, &dir, &[]).status.success());
    let o = extract(&s, &dir, &["--layers", "1,2"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to mix results"), "{}", String::from_utf8_lossy(&o.stderr));
    let mut text = std::fs::read_to_string(&s.input).unwrap();
    text.push_str("{\"ids\": [1, 2, 3]}\n");
    std::fs::write(&s.input, text).unwrap();
    let o = extract(&s, &dir, &[]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("the input changed"));
    // A corrupted shard is caught by verify.
    let shard = dir.join("shard-00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let v = resid().args(["verify", &dir.display().to_string()]).output().unwrap();
    assert_eq!(v.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&v.stderr).contains("checksum mismatch"));
}

#[test]
fn split_and_merge_equals_a_single_run() {
    let s = setup(50);
    let single = s.root.join("single.safetensors");
    let o = resid()
        .args(["extract", "--model", &s.model, "--input", &s.input, "--out", &single.display().to_string(), "--quiet", "--position", "mean"])
        .output()
        .unwrap();
    assert!(o.status.success());
    // Three processes at once, one part each.
    let parts: Vec<PathBuf> = (0..3).map(|i| s.root.join(format!("part{i}"))).collect();
    let children: Vec<_> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            resid()
                .args(["extract", "--model", &s.model, "--input", &s.input, "--out", &p.display().to_string(), "--quiet", "--shard-sequences", "16", "--position", "mean", "--shard", &format!("{i}/3")])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let merged = s.root.join("merged");
    let mut args = vec!["merge".to_string(), "--out".into(), merged.display().to_string()];
    args.extend(parts.iter().rev().map(|p| p.display().to_string()));
    let o = resid().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut joined = Vec::new();
    for (name, _) in shard_bytes(&merged) {
        joined.extend(hidden(&merged.join(name)));
    }
    assert_eq!(joined, hidden(&single), "merged parts differ from the single run");
    // A missing part is refused.
    let o = resid().args(["merge", "--out", &s.root.join("m2").display().to_string(), &parts[0].display().to_string(), &parts[2].display().to_string()]).output().unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing or overlaps"), "{}", String::from_utf8_lossy(&o.stderr));
}
