//! One model shared by many threads: concurrent extraction and steered generation requests with
//! different vectors give exactly the results of a sequential run.
mod common;

use common::*;
use resid::{CapturePoint, CapturePosition, CaptureSpec, CpuEngine, GenerateOptions, Sampling, SteerOp, SteerPositions, Steering};
use std::sync::Arc;

#[test]
fn concurrent_requests_match_sequential_results() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec { tie: true, ..TinySpec::default() };
    let engine = Arc::new(CpuEngine::load(&write_tiny(&tmp.path().join("m"), &spec)).unwrap());
    let h = engine.hidden_size();
    let layers = engine.num_layers();
    let vector = |seed| {
        Some(Arc::new(Steering {
            directions: Arc::new(pseudo_random((layers + 1) * h, seed, 1.0)),
            hidden: h,
            layers: vec![1, 2],
            sites: Vec::new(),
            coef: 3.0,
            op: if seed % 2 == 0 { SteerOp::Add } else { SteerOp::SignAware },
            preserve_norm: seed % 3 == 0,
            positions: SteerPositions::All,
        }))
    };
    let capture = CaptureSpec { points: (0..=layers).map(CapturePoint::Hidden).collect(), position: CapturePosition::Mean };
    let opts = GenerateOptions { max_new_tokens: 6, sampling: Sampling::Greedy, stop_tokens: vec![] };
    // Request k: an extraction and a generation, each with its own steering vector (or none).
    let request = |k: u64| {
        let seqs: Vec<Vec<u32>> = (0..3).map(|j| random_ids(5 + (k as usize * 7 + j * 3) % 40, spec.vocab, k * 10 + j as u64)).collect();
        let steer = if k % 4 == 3 { None } else { vector(k) };
        let s = vec![steer; seqs.len()];
        let hidden = engine.extract(&seqs, &capture, &s, 64, |_, _| {}).unwrap().data;
        let tokens: Vec<Vec<u32>> = engine.generate(&seqs, &s, &opts).unwrap().into_iter().map(|g| g.tokens).collect();
        (hidden, tokens)
    };
    let sequential: Vec<_> = (0..12).map(request).collect();
    let concurrent: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12).map(|k| scope.spawn(move || request(k))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (k, (a, b)) in sequential.iter().zip(&concurrent).enumerate() {
        assert_eq!(a.0, b.0, "request {k}: hidden states differ under concurrency");
        assert_eq!(a.1, b.1, "request {k}: generated tokens differ under concurrency");
    }
}
