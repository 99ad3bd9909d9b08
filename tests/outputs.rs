//! Outputs that nobody loses: one writer per output (a lock), clean stops on SIGINT and SIGTERM,
//! no temporary files outliving their run, and inputs with a UTF-8 byte-order mark. Real
//! processes, real signals, directories shared by concurrent runs.
mod common;

use common::study::{write_tokenizer, write_values};
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{extract_setup as setup, ExtractSetup as Setup};

fn resid() -> Command {
    Command::new(env!("CARGO_BIN_EXE_resid"))
}

/// Runs `resid extract` into an output of the shared setup.
trait Runs {
    fn args(&self, out: &Path, extra: &[&str]) -> Vec<String>;
    fn spawn(&self, out: &Path, extra: &[&str]) -> Child;
    fn run(&self, out: &Path, extra: &[&str]) -> Output;
}

impl Runs for Setup {
    fn args(&self, out: &Path, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["extract", "--model", &self.model, "--input", &self.input, "--out", &out.display().to_string(), "--quiet", "--shard-sequences", "64", "--position", "mean"]
            .map(String::from)
            .into();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn spawn(&self, out: &Path, extra: &[&str]) -> Child {
        resid().args(self.args(out, extra)).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    fn run(&self, out: &Path, extra: &[&str]) -> Output {
        resid().args(self.args(out, extra)).output().unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir).map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    n.sort();
    n
}

fn temp_files(dir: &Path) -> Vec<String> {
    names(dir).into_iter().filter(|n| n.contains(".tmp")).collect()
}

/// Polls `cond` every 2 ms for at most 60 s; false if `child` exited first.
fn wait_for(child: &mut Child, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return cond();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("timed out");
}

fn listed_shards(dir: &Path) -> usize {
    std::fs::read(dir.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| m["shards"].as_array().map(Vec::len))
        .unwrap_or(0)
}

fn signal(child: &Child, sig: i32) {
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn lock_holder(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn a_second_writer_fails_at_once_naming_the_holder_or_waits_with_wait_lock() {
    let s = setup(300);
    let out = s.root.join("out");
    let mut first = s.spawn(&out, &[]);
    let lock = out.join(".resid.lock");
    let pid = first.id();
    assert!(wait_for(&mut first, || lock_holder(&lock) == Some(pid)), "the first run never took the lock");
    // Frozen while it holds the lock, so that what follows cannot race its end.
    signal(&first, libc::SIGSTOP);

    let o = s.run(&out, &["--layers", "1,2"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains(&out.display().to_string()) && err.contains(&format!("pid {}", first.id())), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // With --wait-lock: the same options wait, then find the work done and compute nothing.
    let mut same_args = s.args(&out, &["--wait-lock"]);
    same_args.retain(|a| a != "--quiet");
    let mut waiter = resid().args(same_args).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(waiter.try_wait().unwrap().is_none(), "--wait-lock must wait while the lock is held");
    signal(&first, libc::SIGCONT);
    let o = first.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = waiter.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("in use by resid pid") && err.contains("waiting"), "{err}");
    assert!(err.contains("already complete") && err.contains("nothing to do"), "{err}");

    // Different options with --wait-lock: refused once the lock is free, never mixed.
    let o = s.run(&out, &["--layers", "1,2", "--wait-lock"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("refusing to mix results"), "{}", stderr(&o));
    assert_eq!(names(&out).iter().filter(|n| n.starts_with('.')).count(), 0, "no lock or temporary file left: {:?}", names(&out));
    let v = resid().args(["verify", &out.display().to_string()]).output().unwrap();
    assert!(v.status.success(), "{}", stderr(&v));
}

#[test]
fn concurrent_writers_started_together_never_both_succeed() {
    let s = setup(200);
    for (i, out) in [s.root.join("dir"), s.root.join("one.safetensors")].into_iter().enumerate() {
        let a = s.spawn(&out, &[]);
        let b = s.spawn(&out, &["--layers", "1,2"]);
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let codes = [a.status.code(), b.status.code()];
        if i == 0 {
            // A directory: the loser is locked out (6) or, if it came after the end, refuses to mix (3).
            assert!(codes.contains(&Some(0)) && (codes.contains(&Some(6)) || codes.contains(&Some(3))), "{codes:?}: {} / {}", stderr(&a), stderr(&b));
        } else {
            // A file: both may succeed only one after the other; overlapping runs are refused.
            assert!(codes.iter().all(|c| *c == Some(0) || *c == Some(6)), "{codes:?}");
            assert!(codes.contains(&Some(0)));
        }
        let loser = if a.status.success() { &b } else { &a };
        if !loser.status.success() {
            assert_eq!(stderr(loser).trim().lines().count(), 1, "{}", stderr(loser));
        }
    }
    assert!(temp_files(&s.root).is_empty() && !s.root.join(".one.safetensors.lock").exists(), "{:?}", names(&s.root));
}

#[test]
fn sigterm_and_sigint_stop_a_single_file_extraction_and_leave_nothing() {
    let s = setup(3000);
    for (sig, code, name) in [(libc::SIGTERM, 143, "SIGTERM"), (libc::SIGINT, 130, "SIGINT")] {
        let out = s.root.join("one.safetensors");
        let before = names(&s.root);
        let mut child = s.spawn(&out, &["--batch-tokens", "256"]);
        assert!(wait_for(&mut child, || !temp_files(&s.root).is_empty()), "the run never started writing");
        let sent = Instant::now();
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(code), "{}", stderr(&o));
        assert!(sent.elapsed() < Duration::from_secs(20), "stopping took {:?}", sent.elapsed());
        let err = stderr(&o);
        let last = err.trim().lines().last().unwrap_or("").to_string();
        assert!(last.starts_with(&format!("error: interrupted by {name}: nothing written to")), "{err}");
        assert_eq!(names(&s.root), before, "files left behind");
    }
}

#[test]
fn sigint_keeps_complete_shards_and_a_rerun_resumes() {
    let s = setup(320);
    let out = s.root.join("out");
    let mut child = s.spawn(&out, &["--batch-tokens", "256"]);
    assert!(wait_for(&mut child, || listed_shards(&out) >= 1), "no shard was written");
    signal(&child, libc::SIGINT);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("complete shards kept"), "{}", stderr(&o));
    let kept = listed_shards(&out);
    assert!((1..5).contains(&kept), "{kept} shards");
    assert!(names(&out).iter().all(|n| n == "manifest.json" || n.starts_with("shard-")), "left behind: {:?}", names(&out));
    let o = s.run(&out, &["--batch-tokens", "256"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(listed_shards(&out), 5);
    let v = resid().args(["verify", &out.display().to_string()]).output().unwrap();
    assert!(v.status.success(), "{}", stderr(&v));
}

#[test]
fn a_second_ctrl_c_exits_at_once_without_a_partial_file() {
    // Enough work that the one batch (about 480,000 tokens, under --batch-tokens) outlasts the
    // 400 ms of the two signals below.
    let s = setup(5000);
    let out = s.root.join("one.safetensors");
    let before = names(&s.root);
    // One batch of everything: a clean stop would have to wait for the whole extraction.
    let mut child = s.spawn(&out, &["--batch-tokens", "1000000"]);
    assert!(wait_for(&mut child, || !temp_files(&s.root).is_empty()));
    // The temporary file appears before the batch starts, and a first Ctrl-C that arrives
    // before the batch's interruption check stops the run cleanly at once (a race that a loaded
    // machine lost): let the batch (about 2 s) start first.
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(100));
    let sent = Instant::now();
    signal(&child, libc::SIGINT);
    let o = child.wait_with_output().unwrap();
    assert!(sent.elapsed() < Duration::from_secs(2), "the second Ctrl-C took {:?}", sent.elapsed());
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("exiting at once"), "{}", stderr(&o));
    assert_eq!(names(&s.root), before, "files left behind");
}

#[test]
fn temporary_files_of_dead_runs_are_removed_by_the_next_run() {
    let s = setup(200);
    let out = s.root.join("out");
    let mut child = s.spawn(&out, &["--batch-tokens", "256"]);
    assert!(wait_for(&mut child, || listed_shards(&out) >= 1 && !temp_files(&out).is_empty()));
    child.kill().unwrap();
    child.wait().unwrap();
    let stale = temp_files(&out);
    assert_eq!(stale.len(), 1, "kill -9 mid-shard leaves its temporary shard: {:?}", names(&out));
    let o = s.run(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(temp_files(&out).is_empty(), "{:?}", names(&out));
    assert!(resid().args(["verify", &out.display().to_string()]).output().unwrap().status.success());

    // A single-file output removes its own name's leftovers and no other output's.
    let theirs = s.root.join(".other.safetensors.4000000.tmp");
    let ours = s.root.join(".one.safetensors.4000000.tmp");
    std::fs::write(&theirs, b"x").unwrap();
    std::fs::write(&ours, b"x").unwrap();
    let o = s.run(&s.root.join("one.safetensors"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!ours.exists() && theirs.exists());
}

#[test]
fn inputs_may_start_with_a_utf8_byte_order_mark() {
    let s = setup(5);
    let plain = s.root.join("plain.safetensors");
    assert!(s.run(&plain, &[]).status.success());
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(std::fs::read(&s.input).unwrap());
    std::fs::write(&s.input, bytes).unwrap();
    // config.json and tokenizer.json too, as Windows editors save them.
    let model = PathBuf::from(&s.model);
    write_tokenizer(&model);
    for f in ["config.json", "tokenizer.json"] {
        let mut b = b"\xEF\xBB\xBF".to_vec();
        b.extend(std::fs::read(model.join(f)).unwrap());
        std::fs::write(model.join(f), b).unwrap();
    }
    let bom = s.root.join("bom.safetensors");
    let o = s.run(&bom, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |p: &Path| resid::io::read_f32_tensor(p, "hidden_states").unwrap().data;
    assert_eq!(read(&bom), read(&plain));
}

#[test]
fn concurrent_studies_sharing_a_cache_are_safe_and_compute_each_state_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let model = write_tiny(&dir.join("model"), &TinySpec::default());
    write_tokenizer(&model);
    write_values(&dir.join("values"));
    // One MVALUE file with a byte-order mark.
    let f = dir.join("values/morality/morality_fr.json");
    let mut b = b"\xEF\xBB\xBF".to_vec();
    b.extend(std::fs::read(&f).unwrap());
    std::fs::write(&f, b).unwrap();
    let cache = dir.join("cache");
    let study = |out: &str| {
        resid()
            .args(["study", "--model", &model.display().to_string(), "--data", &dir.join("values").display().to_string()])
            .args(["--out", &dir.join(out).display().to_string(), "--cache", &cache.display().to_string()])
            .args(["--quiet", "--no-control", "--no-figures", "--batch-tokens", "8"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let runs: Vec<Child> = ["a", "b", "c"].into_iter().map(study).collect();
    for r in runs {
        let o = r.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let report = |out: &str| -> serde_json::Value { serde_json::from_slice(&std::fs::read(dir.join(out).join("report.json")).unwrap()).unwrap() };
    let (a, b, c) = (report("a"), report("b"), report("c"));
    let computed: u64 = [&a, &b, &c].iter().map(|r| r["timing"]["hidden_states"]["computed"].as_u64().unwrap()).sum();
    let requested = a["timing"]["hidden_states"]["requested"].as_u64().unwrap();
    assert!(requested > 0);
    assert_eq!(computed, requested, "each hidden state computed exactly once over the three studies");
    assert_eq!(a["concepts"], b["concepts"]);
    assert_eq!(a["concepts"], c["concepts"]);
    let model_dir = std::fs::read_dir(&cache).unwrap().flatten().next().unwrap().path();
    assert!(names(&model_dir).iter().all(|n| n.ends_with(".safetensors")), "{:?}", names(&model_dir));
}
