//! Engine properties on tiny random models: packing, batch and thread invariance, KV-cache
//! decoding against full recomputation, capture and steering semantics.
mod common;

use common::*;
use resid::engine::sample::argmax;
use resid::{CapturePoint, CapturePosition, CaptureSpec, CpuEngine, GenerateOptions, Sampling, SteerOp, SteerPositions, Steering};
use std::sync::Arc;

fn engine(spec: &TinySpec) -> (tempfile::TempDir, CpuEngine) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_tiny(&tmp.path().join("m"), spec);
    let e = CpuEngine::load(&dir).unwrap();
    (tmp, e)
}

fn all_points(e: &CpuEngine) -> Vec<CapturePoint> {
    let mut p: Vec<CapturePoint> = (0..=e.num_layers()).map(CapturePoint::Hidden).collect();
    p.push(CapturePoint::LastBlockRaw);
    p
}

fn seqs() -> Vec<Vec<u32>> {
    [5usize, 1, 17, 9, 33, 2].iter().enumerate().map(|(i, &n)| random_ids(n, 97, i as u64 + 10)).collect()
}

#[test]
fn packed_batches_equal_one_at_a_time_bit_for_bit() {
    let (_t, e) = engine(&TinySpec::default());
    let seqs = seqs();
    for position in [CapturePosition::Last, CapturePosition::Mean, CapturePosition::All] {
        let spec = CaptureSpec { points: all_points(&e), position };
        let none = vec![None; seqs.len()];
        let packed = e.extract(&seqs, &spec, &none, 4096, |_, _| {}).unwrap();
        let small_batches = e.extract(&seqs, &spec, &none, 10, |_, _| {}).unwrap();
        assert_eq!(packed.data, small_batches.data, "{position:?}: batching changed results");
        let mut alone = Vec::new();
        for s in &seqs {
            alone.extend(e.extract(std::slice::from_ref(s), &spec, &[None], 4096, |_, _| {}).unwrap().data);
        }
        assert_eq!(packed.data, alone, "{position:?}: packed differs from one at a time");
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let (_t, e) = engine(&TinySpec::default());
    let seqs = seqs();
    let spec = CaptureSpec { points: all_points(&e), position: CapturePosition::Mean };
    let none = vec![None; seqs.len()];
    let run = |n| {
        rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(|| e.extract(&seqs, &spec, &none, 4096, |_, _| {}).unwrap().data)
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn capture_layout_and_hf_indexing() {
    let (_t, e) = engine(&TinySpec::default());
    let seqs = seqs();
    let none = vec![None; seqs.len()];
    let all = e.extract(&seqs, &CaptureSpec { points: all_points(&e), position: CapturePosition::All }, &none, 4096, |_, _| {}).unwrap();
    let last = e.extract(&seqs, &CaptureSpec { points: all_points(&e), position: CapturePosition::Last }, &none, 4096, |_, _| {}).unwrap();
    let mean = e.extract(&seqs, &CaptureSpec { points: all_points(&e), position: CapturePosition::Mean }, &none, 4096, |_, _| {}).unwrap();
    assert_eq!(all.rows, seqs.iter().map(Vec::len).sum::<usize>());
    assert_eq!(all.offsets.len(), seqs.len() + 1);
    let h = e.hidden_size();
    for (i, s) in seqs.iter().enumerate() {
        let end = all.offsets[i + 1];
        assert_eq!(end - all.offsets[i], s.len());
        for slot in 0..all.points {
            assert_eq!(all.row(end - 1, slot), last.row(i, slot));
            let mut m = vec![0f64; h];
            for r in all.offsets[i]..end {
                for (a, v) in m.iter_mut().zip(all.row(r, slot)) {
                    *a += *v as f64;
                }
            }
            let m: Vec<f32> = m.iter().map(|v| (*v / s.len() as f64) as f32).collect();
            assert!(rel_err(mean.row(i, slot), &m) < 1e-6);
        }
    }
    // Index 0 is the embedding row of the token itself.
    let emb = &e.model.store.f32("model.embed_tokens.weight", &[97, h]).unwrap();
    let t = seqs[0][4] as usize;
    assert_eq!(last.row(0, 0), &emb[t * h..(t + 1) * h]);
    // Index L is the final norm of the raw last-block output.
    let raw = last.row(0, e.num_layers() + 1);
    let w = e.model.store.f32("model.norm.weight", &[h]).unwrap();
    let ms = raw.iter().map(|v| v * v).sum::<f32>() / h as f32;
    let normed: Vec<f32> = raw.iter().zip(w.iter()).map(|(v, g)| g * (v / (ms + 1e-5).sqrt())).collect();
    assert!(rel_err(last.row(0, e.num_layers()), &normed) < 1e-5);
}

#[test]
fn capturing_shallow_layers_only_is_identical_and_skips_nothing_needed() {
    let (_t, e) = engine(&TinySpec::default());
    let seqs = seqs();
    let none = vec![None; seqs.len()];
    let full = e.extract(&seqs, &CaptureSpec { points: all_points(&e), position: CapturePosition::Last }, &none, 4096, |_, _| {}).unwrap();
    let shallow = e.extract(&seqs, &CaptureSpec { points: vec![CapturePoint::Hidden(1)], position: CapturePosition::Last }, &none, 4096, |_, _| {}).unwrap();
    for i in 0..seqs.len() {
        assert_eq!(shallow.row(i, 0), full.row(i, 1));
    }
}

fn steering(e: &CpuEngine, layers: Vec<usize>, coef: f32, op: SteerOp, positions: SteerPositions) -> Arc<Steering> {
    let h = e.hidden_size();
    Arc::new(Steering {
        directions: Arc::new(pseudo_random((e.num_layers() + 1) * h, 99, 1.0)),
        hidden: h,
        layers,
        sites: Vec::new(),
        coef,
        op,
        preserve_norm: false,
        positions,
    })
}

#[test]
fn steering_at_l_changes_hidden_state_l_and_not_before() {
    let (_t, e) = engine(&TinySpec::default());
    let seqs = seqs();
    let spec = CaptureSpec { points: all_points(&e), position: CapturePosition::All };
    let none = vec![None; seqs.len()];
    let base = e.extract(&seqs, &spec, &none, 4096, |_, _| {}).unwrap();
    let s = steering(&e, vec![2], 3.0, SteerOp::Add, SteerPositions::All);
    let steered = e.extract(&seqs, &spec, &vec![Some(s.clone()); seqs.len()], 4096, |_, _| {}).unwrap();
    for r in 0..base.rows {
        for l in 0..2 {
            assert_eq!(base.row(r, l), steered.row(r, l), "layer {l} changed");
        }
        let want: Vec<f32> = base.row(r, 2).iter().zip(s.direction(2)).map(|(h, v)| h + 3.0 * v).collect();
        assert!(rel_err(steered.row(r, 2), &want) < 1e-6, "index 2 is not the block output plus c·v");
    }
    // Zero coefficient and no steering are the same computation.
    let zero = steering(&e, vec![1, 2, 3], 0.0, SteerOp::Add, SteerPositions::All);
    let z = e.extract(&seqs, &spec, &vec![Some(zero); seqs.len()], 4096, |_, _| {}).unwrap();
    assert_eq!(z.data, base.data);
}

/// RepE's `piecewise_linear` (repe/rep_control_reading_vec.py) adds `controller * sign` with
/// `controller = coef * v` and `sign = torch.sign((output * controller).sum(-1))`: with coef < 0
/// the row moves along |coef|·sign(⟨h, v⟩)·v. CPython computes that literally from the unsteered
/// rows (in f64), and resid's steered rows must match it to 1e-6 relative per row, for both signs
/// of the coefficient.
#[test]
fn piecewise_matches_repe_formula_computed_by_cpython() {
    let (_t, e) = engine(&TinySpec::default());
    let seqs = seqs();
    let spec = CaptureSpec { points: vec![CapturePoint::Hidden(2)], position: CapturePosition::All };
    let none = vec![None; seqs.len()];
    let base = e.extract(&seqs, &spec, &none, 4096, |_, _| {}).unwrap();
    for coef in [-1.5f32, 1.5] {
        let s = steering(&e, vec![2], coef, SteerOp::SignAware, SteerPositions::All);
        let steered = e.extract(&seqs, &spec, &vec![Some(s.clone()); seqs.len()], 4096, |_, _| {}).unwrap();
        let script = r#"
import json, sys
d = json.load(sys.stdin)
c, v = d["coef"], d["v"]
out = []
for h in d["rows"]:
    controller = [c * x for x in v]
    dot = sum(a * b for a, b in zip(h, controller))
    sign = (dot > 0) - (dot < 0)
    out.append([a + b * sign for a, b in zip(h, controller)])
json.dump(out, sys.stdout)
"#;
        let rows: Vec<&[f32]> = (0..base.rows).map(|r| base.row(r, 0)).collect();
        let input = serde_json::json!({"coef": coef, "v": s.direction(2), "rows": rows}).to_string();
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let want: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();
        let mut moved = 0;
        for (r, w) in want.iter().enumerate() {
            assert!(rel_err(steered.row(r, 0), w) < 1e-6, "coef {coef}, row {r}: resid's piecewise is not RepE's");
            moved += (steered.row(r, 0) != base.row(r, 0)) as usize;
        }
        assert_eq!(moved, base.rows, "every row is steered");
    }
}

#[test]
fn per_sequence_steering_within_one_batch() {
    let (_t, e) = engine(&TinySpec::default());
    let seqs = seqs();
    let spec = CaptureSpec { points: all_points(&e), position: CapturePosition::Last };
    let a = steering(&e, vec![1, 3], 2.0, SteerOp::Add, SteerPositions::All);
    let b = steering(&e, vec![2], -1.5, SteerOp::SignAware, SteerPositions::All);
    let mixed: Vec<_> = (0..seqs.len()).map(|i| [Some(a.clone()), None, Some(b.clone())][i % 3].clone()).collect();
    let together = e.extract(&seqs, &spec, &mixed, 4096, |_, _| {}).unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let alone = e.extract(std::slice::from_ref(s), &spec, &mixed[i..i + 1], 4096, |_, _| {}).unwrap();
        for slot in 0..spec.points.len() {
            assert_eq!(together.row(i, slot), alone.row(0, slot), "sequence {i}");
        }
    }
}

#[test]
fn cached_decoding_matches_full_recomputation() {
    let (_t, e) = engine(&TinySpec { tie: true, ..TinySpec::default() });
    let prompts: Vec<Vec<u32>> = vec![random_ids(7, 97, 1), random_ids(1, 97, 2), random_ids(20, 97, 3)];
    let opts = GenerateOptions { max_new_tokens: 8, sampling: Sampling::Greedy, stop_tokens: vec![] };
    let out = e.generate(&prompts, &[None, None, None], &opts).unwrap();
    for (p, g) in prompts.iter().zip(&out) {
        assert_eq!(g.tokens.len(), 8);
        let mut seq = p.clone();
        for &t in &g.tokens {
            let logits = e.last_logits(std::slice::from_ref(&seq)).unwrap();
            assert_eq!(argmax(&logits[0]), t);
            seq.push(t);
        }
    }
    // Generating one prompt alone gives the same tokens as in the batch.
    let alone = e.generate(&prompts[2..], &[None], &opts).unwrap();
    assert_eq!(alone[0].tokens, out[2].tokens);
}

/// Checks `tokens`, a greedy generation from `prompt`, by a computation that does not decode
/// step by step: one prefill pass of the prompt steered by `prefill`, then one pass of all
/// generated tokens but the last (positions after the prompt, as generated tokens) steered by
/// `continuation`, whose argmax at every row must be the next token. The steering given here
/// acts on every position (`All`), so which positions a mode steers is spelled out by the
/// caller, not read from the mode.
fn check_greedy_by_hand(e: &CpuEngine, prompt: &[u32], tokens: &[u32], prefill: Option<Arc<Steering>>, continuation: Option<Arc<Steering>>, what: &str) {
    use resid::backend::Backend;
    use resid::engine::plan::BatchPlan;
    use resid::engine::{Pass, Phase};
    let (p, n) = (prompt.len(), tokens.len());
    let mut kv = e.backend.kv(e.num_layers(), p + n, e.kv_dim()).unwrap();
    let plan = BatchPlan::fresh(&[p]);
    let pass = Pass { ids: prompt, plan: &plan, phase: Phase::Prompt, steering: &[prefill], capture: None, logits_rows: &[p - 1] };
    let logits = e.forward(&mut kv, pass).unwrap();
    assert_eq!(argmax(&logits), tokens[0], "{what}: first token");
    let plan = BatchPlan::new(&[n - 1], &[p], &[0]);
    let rows: Vec<usize> = (0..n - 1).collect();
    let pass = Pass { ids: &tokens[..n - 1], plan: &plan, phase: Phase::Generated, steering: &[continuation], capture: None, logits_rows: &rows };
    let logits = e.forward(&mut kv, pass).unwrap();
    let next: Vec<u32> = logits.chunks(e.model.config.vocab_size).map(argmax).collect();
    assert_eq!(next, tokens[1..], "{what}: tokens after the first");
}

/// `Prompt` steers the prefill only, `Generated` the decode steps only, `All` both: each mode's
/// greedy tokens are recomputed with the steering placed by hand, and the four generations
/// (with the unsteered one) must all differ, so that no mode can pass as another.
#[test]
fn steering_positions_prompt_generated_and_all() {
    let (_t, e) = engine(&TinySpec::default());
    let prompt = random_ids(9, 97, 5);
    let opts = GenerateOptions { max_new_tokens: 6, sampling: Sampling::Greedy, stop_tokens: vec![] };
    let strong = |positions| steering(&e, vec![1, 2], 8.0, SteerOp::Add, positions);
    let everywhere = Some(strong(SteerPositions::All));
    let gen = |s: Option<Arc<Steering>>| e.generate(std::slice::from_ref(&prompt), &[s], &opts).unwrap().remove(0).tokens;
    let plain = gen(None);
    let prompt_only = gen(Some(strong(SteerPositions::Prompt)));
    let generated_only = gen(Some(strong(SteerPositions::Generated)));
    let all = gen(everywhere.clone());
    for (what, tokens, prefill, continuation) in [
        ("unsteered", &plain, None, None),
        ("positions prompt", &prompt_only, everywhere.clone(), None),
        ("positions generated", &generated_only, None, everywhere.clone()),
        ("positions all", &all, everywhere.clone(), everywhere.clone()),
    ] {
        assert_eq!(tokens.len(), 6, "{what}");
        check_greedy_by_hand(&e, &prompt, tokens, prefill, continuation, what);
    }
    // The steer is strong enough to tell the modes apart.
    assert_ne!(prompt_only[0], plain[0], "steering the prompt must change the first token");
    assert_eq!(generated_only[0], plain[0], "the first token comes from the unsteered prompt pass");
    assert_ne!(generated_only, plain, "steering the generated tokens must change later tokens");
    assert_ne!(prompt_only, all, "steering the prompt only must differ from steering everything");
    assert_ne!(generated_only, all);

    // Extraction passes are prompt passes: `prompt` steers them as `all` does, `generated` not.
    let seqs = seqs();
    let spec = CaptureSpec { points: all_points(&e), position: CapturePosition::All };
    let run = |positions: Option<SteerPositions>| {
        let s = positions.map(strong);
        e.extract(&seqs, &spec, &vec![s; seqs.len()], 4096, |_, _| {}).unwrap().data
    };
    let base = run(None);
    let prompt_steered = run(Some(SteerPositions::Prompt));
    assert_ne!(prompt_steered, base, "positions prompt must steer an extraction");
    assert_eq!(prompt_steered, run(Some(SteerPositions::All)));
    assert_eq!(run(Some(SteerPositions::Generated)), base, "positions generated must leave an extraction alone");
}

#[test]
fn stop_tokens_end_generation() {
    let (_t, e) = engine(&TinySpec::default());
    let prompt = vec![random_ids(4, 97, 8)];
    let free = e.generate(&prompt, &[None], &GenerateOptions { max_new_tokens: 5, sampling: Sampling::Greedy, stop_tokens: vec![] }).unwrap();
    let stop = free[0].tokens[2];
    let cut = e.generate(&prompt, &[None], &GenerateOptions { max_new_tokens: 5, sampling: Sampling::Greedy, stop_tokens: vec![stop] }).unwrap();
    let first = free[0].tokens.iter().position(|&t| t == stop).unwrap();
    assert_eq!(cut[0].tokens, free[0].tokens[..=first]);
    assert_eq!(cut[0].finish, resid::FinishReason::Stop);
}

#[test]
fn sharded_checkpoint_with_index_matches_single_file() {
    let spec = TinySpec::default();
    let (_t, single) = engine(&spec);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json(&spec)).unwrap();
    let all = tensors(&spec);
    let half = all.len() / 2;
    let mut map = serde_json::Map::new();
    let (first, second): (Vec<_>, Vec<_>) = all.into_iter().enumerate().partition(|(i, _)| *i < half);
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let part: Vec<_> = part.into_iter().map(|(_, t)| t).collect();
        for t in &part {
            map.insert(t.name.clone(), serde_json::Value::String(file.into()));
        }
        resid::io::write_safetensors(&dir.join(file), &part, Default::default()).unwrap();
    }
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    let sharded = CpuEngine::load(&dir).unwrap();
    let seqs = seqs();
    let spec = CaptureSpec { points: all_points(&single), position: CapturePosition::Last };
    let none = vec![None; seqs.len()];
    assert_eq!(
        single.extract(&seqs, &spec, &none, 4096, |_, _| {}).unwrap().data,
        sharded.extract(&seqs, &spec, &none, 4096, |_, _| {}).unwrap().data
    );
    // A shard named outside the model directory is refused.
    std::fs::write(dir.join("model.safetensors.index.json"), r#"{"weight_map": {"x": "../evil.safetensors"}}"#).unwrap();
    let err = CpuEngine::load(&dir).err().unwrap().to_string();
    assert!(err.contains("plain file name"), "{err}");
}

/// The scheduler's chunked prefill, mixed prefill-and-decode passes, host sampling for
/// log-probabilities and probe captures give each sequence exactly what it gets alone in
/// unchunked passes: tokens, log-probabilities and probe values bit for bit, with every
/// steering position mode in the mix.
#[test]
fn scheduler_chunks_and_mixes_without_changing_any_sequence() {
    use resid::sched::{Collect, GenRequest, Probe, SchedConfig, Scheduler};
    let (_t, e) = engine(&TinySpec::default());
    let h = e.hidden_size();
    let probe = Probe { layer: 2, direction: Arc::new((0..h).map(|i| (i % 5) as f32 - 2.0).collect()) };
    let modes = [None, Some(SteerPositions::All), Some(SteerPositions::Prompt), Some(SteerPositions::Generated)];
    let request = |k: usize| GenRequest {
        prompt: random_ids(5 + 3 * k, 97, 40 + k as u64),
        max_new_tokens: 6,
        sampling: if k % 3 == 2 { Sampling::Sample { temperature: 0.8, top_k: 0, top_p: 0.9, seed: 9 } } else { Sampling::Greedy },
        stream: k,
        stop_tokens: vec![],
        steering: modes[k % 4].map(|p| steering(&e, vec![1, 2], 6.0, SteerOp::Add, p)),
        probes: vec![probe.clone()],
        logprobs: (k % 2 == 1).then_some(3),
        deadline: None,
    };
    let run = |reqs: Vec<GenRequest>, max_batch_tokens: usize, max_running: usize| {
        let cfg = SchedConfig { max_batch_tokens, max_running, kv_slots: 4096, check_interrupt: false, prefix_cache: false };
        let mut s = Scheduler::new(&e, cfg).unwrap();
        let outs: Vec<Collect> = reqs
            .into_iter()
            .map(|r| {
                let c = Collect::default();
                s.submit(r, Box::new(c.clone())).unwrap();
                c
            })
            .collect();
        let mut passes = 0;
        while s.step().unwrap().is_some() {
            passes += 1;
        }
        assert!(s.is_idle());
        (outs.iter().map(|c| c.take().tokens).collect::<Vec<_>>(), passes)
    };
    let alone: Vec<_> = (0..8).map(|k| run(vec![request(k)], 1 << 12, 1).0.remove(0)).collect();
    // Prefill in chunks of at most 3 rows beside the decode steps, then two at a time.
    let (chunked, passes) = run((0..8).map(request).collect(), 3, 8);
    assert!(passes > 8 * 6 / 3, "{passes} passes: the budget of 3 rows was not respected");
    assert_eq!(chunked, alone, "chunked and mixed passes changed a sequence");
    let (pairs, _) = run((0..8).map(request).collect(), 64, 2);
    assert_eq!(pairs, alone);
    for (k, toks) in alone.iter().enumerate() {
        assert_eq!(toks.len(), 6);
        assert!(toks.iter().all(|t| t.probes.len() == 1 && t.probes[0].is_finite()));
        assert_eq!(toks[0].logprob.is_some(), k % 2 == 1);
    }
    // Nothing to generate is done without a pass.
    let none = e.generate(&[random_ids(4, 97, 1)], &[None], &GenerateOptions { max_new_tokens: 0, sampling: Sampling::Greedy, stop_tokens: vec![] }).unwrap();
    assert!(none[0].tokens.is_empty() && none[0].finish == resid::FinishReason::Length);
    // Steered requests differ from the unsteered one of the same prompt length class.
    assert_ne!(alone[1].iter().map(|t| t.probes[0]).collect::<Vec<_>>(), run(vec![GenRequest { steering: None, ..request(1) }], 4096, 1).0[0].iter().map(|t| t.probes[0]).collect::<Vec<_>>());
}

/// The prefix cache: a prompt that begins with a finished sequence's tokens (a shared start,
/// a conversation's next turn with the previous answer, the same prompt again) starts from that
/// sequence's cached keys and values, and every sequence still gets exactly what it gets alone:
/// tokens, log-probabilities and probe values bit for bit. Reuse needs the same steering (the
/// same values in new objects count), stops at the prompt where steering is limited to prompt
/// positions, and leaves two rows to prefill. With room for copies the counts are exact; in an
/// arena too small for a copy beside the cached sequence, the request takes the sequence's own
/// slots over, and a capture job evicts what it needs.
#[test]
fn the_prefix_cache_reuses_keys_and_values_without_changing_any_sequence() {
    use resid::sched::{CaptureFailure, CaptureListener, Collect, GenRequest, Probe, SchedConfig, Scheduler, TokenOut};
    use resid::Captured;
    let (_t, e) = engine(&TinySpec::default());
    let h = e.hidden_size();
    let probe = Probe { layer: 2, direction: Arc::new((0..h).map(|i| (i % 5) as f32 - 2.0).collect()) };
    let req = |prompt: Vec<u32>, steering: Option<Arc<Steering>>, k: usize| GenRequest {
        prompt,
        max_new_tokens: 6,
        sampling: if k % 2 == 1 { Sampling::Sample { temperature: 0.8, top_k: 0, top_p: 0.9, seed: 9 } } else { Sampling::Greedy },
        stream: k,
        stop_tokens: vec![],
        steering,
        probes: vec![probe.clone()],
        logprobs: Some(3),
        deadline: None,
    };
    // Requests one after another through one scheduler: each one's tokens and cached count.
    let run = |reqs: &[GenRequest], prefix_cache: bool, kv_slots: usize| -> (Vec<(Vec<TokenOut>, usize)>, Scheduler<'_, _>) {
        let cfg = SchedConfig { max_batch_tokens: 64, max_running: 1, kv_slots, check_interrupt: false, prefix_cache };
        let mut s = Scheduler::new(&e, cfg).unwrap();
        let outs: Vec<Collect> = reqs
            .iter()
            .map(|r| {
                let c = Collect::default();
                s.submit(r.clone(), Box::new(c.clone())).unwrap();
                c
            })
            .collect();
        s.run_until_idle().unwrap();
        (
            outs.iter()
                .map(|c| {
                    let c = c.take();
                    assert!(c.error.is_none() && c.finish.is_some());
                    (c.tokens, c.cached_tokens)
                })
                .collect(),
            s,
        )
    };
    let alone = |r: &GenRequest| run(std::slice::from_ref(r), false, 4096).0.remove(0).0;
    let ids_of = |toks: &[TokenOut], n: usize| toks.iter().take(n).map(|t| t.id).collect::<Vec<u32>>();
    let cat = |parts: &[&[u32]]| parts.concat();
    let all = || Some(steering(&e, vec![1, 2], 6.0, SteerOp::Add, SteerPositions::All));
    let prompt_only = || Some(steering(&e, vec![1, 2], 6.0, SteerOp::Add, SteerPositions::Prompt));
    let p = random_ids(24, 97, 1);
    let q = random_ids(12, 97, 2);
    let g0 = ids_of(&alone(&req(p.clone(), None, 0)), 5);
    let g5 = ids_of(&alone(&req(q.clone(), prompt_only(), 5)), 3);
    let next_turn = cat(&[&p, &g0, &random_ids(4, 97, 3)]);
    let reqs = vec![
        req(p.clone(), None, 0),
        // A shared start.
        req(cat(&[&p[..16], &random_ids(8, 97, 4)]), None, 1),
        // The next turn: the prompt, 5 of its 6 answer tokens (the last was never fed), more.
        req(next_turn.clone(), None, 2),
        // Steered: nothing cached under this steering yet; then the same values again.
        req(next_turn.clone(), all(), 3),
        req(next_turn.clone(), all(), 4),
        // Steering at prompt positions: the answer's tokens were steered as generated ones.
        req(q.clone(), prompt_only(), 5),
        req(cat(&[&q, &g5, &random_ids(3, 97, 6)]), prompt_only(), 6),
        // The same prompt again: all but its last two tokens.
        req(p.clone(), None, 7),
    ];
    let want: Vec<Vec<TokenOut>> = reqs.iter().map(alone).collect();
    let (cached_run, sched) = run(&reqs, true, 4096);
    let counts: Vec<usize> = cached_run.iter().map(|o| o.1).collect();
    assert_eq!(counts, [0, 16, 29, 0, 31, 0, 12, 22], "prompt tokens taken from the prefix cache");
    for (k, (got, _)) in cached_run.iter().enumerate() {
        assert_eq!(got, &want[k], "request {k} changed with the prefix cache");
    }
    // Request 2's sequence extends request 0's, which was dropped as no longer needed.
    assert_eq!(sched.cached_prefixes().0, 7);
    drop(sched);
    let (uncached, _) = run(&reqs, false, 4096);
    assert!(uncached.iter().enumerate().all(|(k, o)| o.1 == 0 && o.0 == want[k]));

    // 48 slots: one sequence's 30 to 39, and no room for a copy beside it.
    let (tight, mut sched) = run(&reqs, true, 48);
    let counts: Vec<usize> = tight.iter().map(|o| o.1).collect();
    assert_eq!(counts, [0, 16, 16, 0, 31, 0, 12, 0], "prompt tokens taken over in place");
    for (k, (got, _)) in tight.iter().enumerate() {
        assert_eq!(got, &want[k], "request {k} changed in the small arena");
    }
    // A capture job of 40 tokens evicts the cached sequence.
    #[derive(Clone, Default)]
    struct Keep(Arc<std::sync::Mutex<Option<Result<Captured, CaptureFailure>>>>);
    impl CaptureListener for Keep {
        fn done(&mut self, r: Result<Captured, CaptureFailure>) {
            *self.0.lock().unwrap() = Some(r);
        }
    }
    let seq = random_ids(40, 97, 7);
    let spec = CaptureSpec { points: vec![CapturePoint::Hidden(2)], position: CapturePosition::Last };
    let keep = Keep::default();
    let capture = resid::sched::CaptureRequest { seqs: vec![seq.clone()], spec: spec.clone(), steering: None, deadline: None };
    sched.submit_capture(capture, Box::new(keep.clone())).unwrap();
    sched.run_until_idle().unwrap();
    assert_eq!(sched.cached_prefixes().0, 0);
    let got = keep.0.lock().unwrap().take().unwrap().ok().unwrap();
    assert_eq!(got.data, e.extract(&[seq], &spec, &[None], 4096, |_, _| {}).unwrap().data);
}

/// A row's logits must not depend on how its sequence was split into passes: one prefill of the
/// whole sequence (150 tokens, three key tiles), a prefill of 40 tokens followed by one-row
/// decode passes, and passes of 1, 2, 3, 5 and 8 rows in turn give the same logits at every row,
/// bit for bit. (On AVX-512 decode rows once took their own attention kernel, which agreed with
/// prefill only to rounding.) Head dims 8 and 64 (the fused QKV epilogue).
#[test]
fn logits_do_not_depend_on_how_a_sequence_is_split_into_passes() {
    use resid::backend::Backend;
    use resid::engine::plan::BatchPlan;
    use resid::engine::{Pass, Phase};
    for spec in [TinySpec::default(), TinySpec { hidden: 256, inter: 96, heads: 4, kv_heads: 2, ..TinySpec::default() }] {
        let (_t, e) = engine(&spec);
        let ids = random_ids(150, spec.vocab, 11);
        let n = ids.len();
        let run = |splits: &[usize]| -> Vec<f32> {
            assert_eq!(splits.iter().sum::<usize>(), n);
            let mut kv = e.backend.kv(e.num_layers(), n, e.kv_dim()).unwrap();
            let (mut out, mut start) = (Vec::new(), 0);
            for &len in splits {
                let plan = BatchPlan::new(&[len], &[start], &[0]);
                let rows: Vec<usize> = (0..len).collect();
                let pass = Pass { ids: &ids[start..start + len], plan: &plan, phase: Phase::Prompt, steering: &[None], capture: None, logits_rows: &rows };
                out.extend(e.forward(&mut kv, pass).unwrap());
                start += len;
            }
            out
        };
        let whole = run(&[n]);
        assert_eq!(whole.len(), n * spec.vocab);
        // The first differing row, not 14,550 numbers.
        let same = |got: Vec<f32>, what: &str| {
            assert_eq!(got.len(), whole.len());
            if let Some(i) = got.iter().zip(&whole).position(|(a, b)| a.to_bits() != b.to_bits()) {
                panic!("hidden {}: {what}: row {} differs from the whole prefill ({} vs {})", spec.hidden, i / spec.vocab, got[i], whole[i]);
            }
        };
        let decoded: Vec<usize> = std::iter::once(40).chain(std::iter::repeat_n(1, n - 40)).collect();
        same(run(&decoded), "prefill of 40, then one row per pass");
        let (mut mixed, mut left) = (Vec::new(), n);
        for len in [1usize, 2, 3, 5, 8].into_iter().cycle() {
            let len = len.min(left);
            mixed.push(len);
            left -= len;
            if left == 0 {
                break;
            }
        }
        same(run(&mixed), "passes of 1, 2, 3, 5 and 8 rows");
    }
}

/// After the last layer's attention a pass runs on the rows something reads alone (each
/// sequence's last row when captures take the last position and logits are for last rows;
/// none when the pass only fills the cache). Those rows must get what a full pass gives them,
/// bit for bit: captured at every point of the last block, steered there and at index L
/// differently per sequence, and as logits; and a cache-only pass must leave the cache as a
/// full pass does. Position `all` and logits at every row run the full pass.
#[test]
fn the_last_layer_on_the_rows_read_matches_a_full_pass() {
    use resid::backend::Backend;
    use resid::engine::capture::Site;
    use resid::engine::plan::BatchPlan;
    use resid::engine::steer::SiteSteer;
    use resid::engine::{Pass, Phase};
    let (_t, e) = engine(&TinySpec::default());
    let seqs = seqs();
    let (l, h, vocab) = (e.num_layers(), e.hidden_size(), e.model.config.vocab_size);
    let g = e.steer_geometry();
    let mut points = all_points(&e);
    points.extend(Site::ALL.map(|site| CapturePoint::Block(l - 1, site)));
    // Sequence i unsteered (i % 3 == 0) or steered with its own coefficient at every point after
    // the last attention: a row given another sequence's plan shows.
    let steering: Vec<Option<Arc<Steering>>> = (0..seqs.len())
        .map(|i| {
            (i % 3 != 0).then(|| {
                let width = |site| if site == Site::Z { g.heads * g.head_dim } else { h };
                Arc::new(Steering {
                    directions: Arc::new(pseudo_random((l + 1) * h, 50 + i as u64, 1.0)),
                    hidden: h,
                    layers: vec![l - 1, l],
                    sites: Site::ALL.map(|site| SiteSteer { layer: l - 1, site, vector: Arc::new(pseudo_random(width(site), 60 + i as u64, 1.0)), heads: Vec::new() }).to_vec(),
                    coef: 0.5 + i as f32,
                    op: SteerOp::Add,
                    preserve_norm: false,
                    positions: SteerPositions::All,
                })
            })
        })
        .collect();
    let narrowed = e.extract(&seqs, &CaptureSpec { points: points.clone(), position: CapturePosition::Last }, &steering, 4096, |_, _| {}).unwrap();
    let full = e.extract(&seqs, &CaptureSpec { points: points.clone(), position: CapturePosition::All }, &steering, 4096, |_, _| {}).unwrap();
    let mut last_row = 0;
    for (i, s) in seqs.iter().enumerate() {
        last_row += s.len();
        for (slot, p) in points.iter().enumerate() {
            assert!(narrowed.row(i, slot).iter().zip(full.row(last_row - 1, slot)).all(|(a, b)| a.to_bits() == b.to_bits()), "sequence {i} at {p:?}: the rows read differ from a full pass");
        }
    }

    let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
    // Arena slots with room for one more token per sequence.
    let starts: Vec<usize> = lens.iter().scan(0, |next, &n| Some(std::mem::replace(next, *next + n + 1))).collect();
    let plan = BatchPlan::new(&lens, &vec![0; lens.len()], &starts);
    let ids: Vec<u32> = seqs.iter().flatten().copied().collect();
    let every_row: Vec<usize> = (0..plan.rows()).collect();
    let forward = |kv: &mut _, rows: &[usize]| e.forward(kv, Pass { ids: &ids, plan: &plan, phase: Phase::Prompt, steering: &steering, capture: None, logits_rows: rows }).unwrap();
    let fresh_kv = || e.backend.kv(e.num_layers(), plan.rows() + seqs.len(), e.kv_dim()).unwrap();
    let (mut kv_full, mut kv_last, mut kv_only) = (fresh_kv(), fresh_kv(), fresh_kv());
    let all_logits = forward(&mut kv_full, &every_row);
    let last_logits = forward(&mut kv_last, &plan.last_rows());
    for (i, &r) in plan.last_rows().iter().enumerate() {
        let (got, want) = (&last_logits[i * vocab..(i + 1) * vocab], &all_logits[r * vocab..(r + 1) * vocab]);
        assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "sequence {i}: last-row logits differ from a full pass");
    }
    assert!(forward(&mut kv_only, &[]).is_empty());
    // One decode step per sequence over each cache: the cache-only pass stored every layer.
    let next: Vec<u32> = (0..seqs.len() as u32).collect();
    let step_plan = BatchPlan::new(&vec![1; seqs.len()], &lens, &starts);
    let step_rows: Vec<usize> = (0..seqs.len()).collect();
    let step = |kv: &mut _| e.forward(kv, Pass { ids: &next, plan: &step_plan, phase: Phase::Generated, steering: &steering, capture: None, logits_rows: &step_rows }).unwrap();
    let want = step(&mut kv_full);
    for (what, kv) in [("last-row logits", &mut kv_last), ("cache only", &mut kv_only)] {
        let got = step(kv);
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "decode after a pass with {what} differs from after a full pass");
    }
}
