//! Crash-safe, resumable, sharded extraction: killing the process at any point and rerunning
//! gives byte-identical shards; parts of a data-parallel run merge into the single-run result.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn resid() -> Command {
    Command::new(env!("CARGO_BIN_EXE_resid"))
}

use common::{extract_setup as setup, ExtractSetup as Setup};

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

/// Shards the manifest lists (0 before the first one).
fn listed_shards(dir: &Path) -> usize {
    resid::store::Manifest::load(dir).ok().flatten().map_or(0, |m| m.shards.len())
}

/// (inode, modification time) of a file: a shard a resumed run kept has the same.
fn identity(path: &Path) -> (u64, std::time::SystemTime) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.ino(), m.modified().unwrap())
}

/// A small seeded generator for the kill points (the seed is printed, and RESID_KILL_SEED
/// replays a failing run).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

#[test]
fn killed_runs_resume_to_byte_identical_output() {
    const SHARDS: usize = 10;
    let s = setup(160);
    let clean = s.root.join("clean");
    let started = std::time::Instant::now();
    let o = extract(&s, &clean, &[]);
    let run_ms = started.elapsed().as_millis() as u64;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = shard_bytes(&clean);
    assert_eq!(want.len(), SHARDS);
    let v = resid().args(["verify", &clean.display().to_string()]).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));

    let seed: u64 = std::env::var("RESID_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261201);
    eprintln!("kill points from RESID_KILL_SEED={seed}");
    let mut rng = Rng(seed);
    let resumed = s.root.join("resumed");
    let out = resumed.display().to_string();
    // Each round waits until the manifest lists a random number of shards in 1..N-1 (beyond
    // what is there, up to 3 more), then a random part of a shard's time more, then SIGKILLs. Round 0 kills
    // at a random moment before any shard.
    let (mut kills, mut left_temp) = (Vec::new(), 0);
    for round in 0..6 {
        let have = listed_shards(&resumed);
        if have + 1 >= SHARDS {
            break;
        }
        // Up to 3 shards further, so that several kills land before the end.
        let target = if round == 0 { 0 } else { have + 1 + rng.below((SHARDS - 1 - have).min(3) as u64) as usize };
        let mut child = resid()
            .args(["extract", "--model", &s.model, "--input", &s.input, "--out", &out, "--quiet", "--shard-sequences", "16", "--position", "mean"])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while listed_shards(&resumed) < target && child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis(rng.below(run_ms / SHARDS as u64 + 1)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            kills.push(listed_shards(&resumed));
            left_temp += std::fs::read_dir(&resumed).map_or(0, |d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).count());
        } else {
            child.wait().unwrap();
        }
    }
    eprintln!("killed with {kills:?} shards complete; {left_temp} temporary shards left by the kills");
    assert!(kills.iter().any(|&k| (1..SHARDS).contains(&k)), "no kill landed after 1..{} shards: {kills:?}", SHARDS - 1);
    assert!(left_temp > 0, "no kill left a temporary shard, so the clean-up went untested: {kills:?}");

    // The last run resumes: shards already listed are kept as they are, not recomputed.
    let kept = listed_shards(&resumed);
    let before: Vec<_> = (0..kept).map(|i| identity(&resumed.join(format!("shard-{i:05}.safetensors")))).collect();
    let o = extract(&s, &resumed, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after: Vec<_> = (0..kept).map(|i| identity(&resumed.join(format!("shard-{i:05}.safetensors")))).collect();
    assert_eq!(before, after, "the resumed run rewrote shards that were already complete");
    let got = shard_bytes(&resumed);
    assert_eq!(got.len(), want.len());
    for ((fa, a), (fb, b)) in got.iter().zip(&want) {
        assert_eq!(fa, fb);
        assert!(a == b, "{fa} differs from the uninterrupted run");
    }
    // Nothing but the manifest and the shards: no temporary file, no lock file.
    let mut listing: Vec<String> = std::fs::read_dir(&resumed).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    listing.sort();
    let mut expected: Vec<String> = want.iter().map(|(f, _)| f.clone()).collect();
    expected.push("manifest.json".into());
    expected.sort();
    assert_eq!(listing, expected);
    let v = resid().args(["verify", &resumed.display().to_string()]).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));

    // verify reports files the manifest does not list (a dead run's temporary shard).
    std::fs::write(resumed.join(".shard-00003.safetensors.4000000.tmp"), b"partial").unwrap();
    let v = resid().args(["verify", &resumed.display().to_string()]).output().unwrap();
    assert_eq!(v.status.code(), Some(3));
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(err.contains("not listed in the manifest: .shard-00003.safetensors.4000000.tmp"), "{err}");
}

#[test]
fn reruns_with_other_input_or_options_refuse_to_mix() {
    let s = setup(40);
    let dir = s.root.join("out");
    assert!(extract(&s, &dir, &[]).status.success());
    let o = extract(&s, &dir, &["--layers", "1,2"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to mix results"), "{}", String::from_utf8_lossy(&o.stderr));
    let original = std::fs::read_to_string(&s.input).unwrap();
    let mut text = original.clone();
    text.push_str("{\"ids\": [1, 2, 3]}\n");
    std::fs::write(&s.input, text).unwrap();
    let o = extract(&s, &dir, &[]);
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("the input changed"));
    std::fs::write(&s.input, &original).unwrap();
    // Another model (here: another MLP width) is refused too.
    let other = TinySpec { vocab: 97, hidden: 128, inter: 192, layers: 4, heads: 4, kv_heads: 2, bias: false, tie: true };
    write_tiny(&s.root.join("other-model"), &other);
    let o = resid()
        .args(["extract", "--model", &s.root.join("other-model").display().to_string(), "--input", &s.input, "--out", &dir.display().to_string()])
        .args(["--quiet", "--shard-sequences", "16", "--position", "mean"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refusing to mix results") && err.contains("the model or options differ"), "{err}");
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
