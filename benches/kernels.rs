//! CPU kernel benchmarks at SmolLM2-135M's shapes (hidden 576, 9 q / 3 kv heads of 64,
//! intermediate 1536). Run: `cargo bench --bench kernels`.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use resid::backend::cpu::{attention, gemm, residual};
use resid::backend::Heads;
use resid::engine::plan::BatchPlan;
use resid::engine::steer::{PointSteering, SlotSteer, SteerOp};
use std::hint::black_box;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) as f32 / u32::MAX as f32) - 0.5).collect()
}

fn bench_gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    for &(name, n, k) in &[("qkv_q", 576, 576), ("gate", 1536, 576), ("down", 576, 1536)] {
        for &tokens in &[1usize, 64, 512] {
            let x = data(tokens * k, 1);
            let w = data(n * k, 2);
            let mut y = vec![0f32; tokens * n];
            g.throughput(Throughput::Elements((2 * tokens * n * k) as u64));
            g.bench_with_input(BenchmarkId::new(name, tokens), &tokens, |b, &t| {
                b.iter(|| gemm::linear(black_box(&x), t, k, &w, n, None, &mut y, false))
            });
        }
    }
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let heads = Heads { q_heads: 9, kv_heads: 3, head_dim: 64 };
    let mut g = c.benchmark_group("attention_prefill");
    for &len in &[64usize, 512] {
        let seqs = 4;
        let rows = seqs * len;
        let plan = BatchPlan::new(&vec![len; seqs], &vec![0; seqs], &(0..seqs).map(|i| i * len).collect::<Vec<_>>());
        let (q, k, v) = (data(rows * 576, 3), data(rows * 192, 4), data(rows * 192, 5));
        let mut out = vec![0f32; rows * 576];
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
            b.iter(|| attention::attention(black_box(&q), &k, &v, heads, &plan, &mut out))
        });
    }
    g.finish();
}

fn bench_residual(c: &mut Criterion) {
    let h = 576;
    let rows = 512;
    let norm = vec![1.0f32; h];
    let vector = data(h, 7);
    let mut g = c.benchmark_group("residual_step");
    g.throughput(Throughput::Elements(rows as u64));
    for steered in [false, true] {
        let mut x = data(rows * h, 6);
        let mut normed = vec![0f32; rows * h];
        let steer = PointSteering {
            row_slot: vec![0; rows],
            slots: vec![SlotSteer { vector: &vector, coef: 1e-6, op: SteerOp::Add, preserve_norm: false }],
        };
        g.bench_function(if steered { "steer_add_norm" } else { "norm" }, |b| {
            b.iter(|| {
                if steered {
                    residual::steer_rows(black_box(&mut x), h, &steer);
                }
                residual::norm_rows(black_box(&x), h, &norm, 1e-5, &mut normed)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_gemm, bench_attention, bench_residual);
criterion_main!(benches);
