//! CPU kernel benchmarks at SmolLM2-135M's shapes (hidden 576, 9 q / 3 kv heads of 64,
//! intermediate 1536, 30 layers). Run: `cargo bench --bench kernels` (all groups) or e.g.
//! `cargo bench --bench kernels -- gemm_f32`. Throughput is reported in FLOP/s for the GEMMs
//! (criterion's "elements" are FLOPs there) and in rows/s elsewhere.
//!
//! Groups: `gemm_f32` and `gemm_bf16` (the packed microkernels through `gemm::gemm` at the stacked
//! QKV, O, stacked gate/up and down shapes, for 1, 64 and 512 tokens), `attention_prefill`
//! (causal attention of 4 sequences of 64, 512 and 2,048 tokens), `attention_decode` (one new
//! row over 512, 1,024 and 4,096 cached keys, inside a pass with the workers kept awake as in
//! decode; `cold/…`: over 256 and 1,024 keys with every core's caches streamed over first, as a
//! decode step's weights do), `residual_step` (norm; steer + norm; steer + capture + norm),
//! `layer` (one whole decoder layer through the backend: 1 and 512 tokens) and `stats_fold`
//! (`resid stats`' f64 fold of 2,048 captured rows into one point's mean and second moments;
//! FLOPs are the upper triangle's multiply-adds × 2) and `sampling` (one token from a 49,152-token
//! logits row: greedy, temperature, top-p, top-k, log-probabilities) and `kv_copy` (the prefix
//! cache's copy of 256 cached tokens' keys and values, all 30 layers, to an aligned and to an
//! unaligned start; elements are tokens).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use resid::backend::cpu::gemm::{self, Compute, PackedMatrix};
use resid::backend::cpu::{attention, residual, CpuBackend, CpuMatrix};
use resid::backend::{ActKind, Backend, CaptureLayout, Heads, Norm};
use resid::model::arch::{MlpKind, NormKind};
use resid::engine::capture::{CapturePosition, Captured};
use resid::engine::plan::BatchPlan;
use resid::engine::steer::{PointSteering, SlotSteer, SteerOp};
use resid::model::weights::{F32Data, MatrixSource};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Duration;

const H: usize = 576;
const INTER: usize = 1536;
const HEADS: Heads = Heads { q_heads: 9, kv_heads: 3, head_dim: 64 };

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) as f32 / u32::MAX as f32) - 0.5).collect()
}

fn shapes() -> [(&'static str, usize, usize); 4] {
    [("qkv", 960, H), ("o", H, H), ("gate_up", 2 * INTER, H), ("down", H, INTER)]
}

fn bench_gemm_with(c: &mut Criterion, group: &str, compute: Compute) {
    if compute == Compute::Bf16 && gemm::effective_compute(Compute::Bf16) != Compute::Bf16 {
        eprintln!("{group}: this CPU has no AVX512-BF16; skipped");
        return;
    }
    let mut g = c.benchmark_group(group);
    for (name, n, k) in shapes() {
        let w = PackedMatrix::pack(&data(n * k, 2), n, k, compute);
        for &tokens in &[1usize, 64, 512] {
            let x = data(tokens * k, 1);
            let mut y = vec![0f32; tokens * n];
            g.throughput(Throughput::Elements((2 * tokens * n * k) as u64));
            g.bench_with_input(BenchmarkId::new(name, tokens), &tokens, |b, &t| {
                b.iter(|| gemm::gemm(black_box(&x), t, &w, None, &mut y, false))
            });
        }
    }
    g.finish();
}

fn bench_gemm_f32(c: &mut Criterion) {
    bench_gemm_with(c, "gemm_f32", Compute::F32);
}

fn bench_gemm_bf16(c: &mut Criterion) {
    bench_gemm_with(c, "gemm_bf16", Compute::Bf16);
}

/// Few-row GEMMs (batched decode) with their weights streamed from memory, as in a decode step:
/// copies of the matrix that together exceed the last-level cache are used in turn.
fn bench_gemm_streamed(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm_f32_streamed");
    for (name, n, k) in shapes() {
        // 64 MiB of weights or more: twice the L3 of an AMD EPYC Zen 4 CCD.
        let copies = (64 << 20) / (n * k * 4) + 1;
        let ws: Vec<PackedMatrix> = (0..copies).map(|i| PackedMatrix::pack(&data(n * k, 2 + i as u32), n, k, Compute::F32)).collect();
        for &tokens in &[8usize, 16, 32] {
            let x = data(tokens * k, 1);
            let mut y = vec![0f32; tokens * n];
            let mut next = 0;
            g.throughput(Throughput::Elements((2 * tokens * n * k) as u64));
            g.bench_with_input(BenchmarkId::new(name, tokens), &tokens, |b, &t| {
                b.iter(|| {
                    next = (next + 1) % copies;
                    gemm::gemm(black_box(&x), t, &ws[next], None, &mut y, false)
                })
            });
        }
    }
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention_prefill");
    for &len in &[64usize, 512, 2048] {
        let seqs = 4;
        let rows = seqs * len;
        let plan = BatchPlan::new(&vec![len; seqs], &vec![0; seqs], &(0..seqs).map(|i| i * len).collect::<Vec<_>>());
        let (q, k, v) = (data(rows * 576, 3), attention::block_keys(&data(rows * 192, 4), 192), attention::head_values(&data(rows * 192, 5), HEADS.kv_heads, HEADS.head_dim));
        let mut out = vec![0f32; rows * 576];
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, _| {
            b.iter(|| attention::attention_into(black_box(&q), &k, &v, HEADS, &plan, None, &mut out, gemm::OutLayout::Rows))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("attention_decode");
    // What a decode step's weights stream through every core's caches between two attentions.
    let evict = vec![1f32; 64 << 18];
    for (cold, past) in [(false, 512usize), (false, 1024), (false, 4096), (true, 256), (true, 1024)] {
        let plan = BatchPlan::new(&[1], &[past], &[0]);
        let (q, k, v) = (data(576, 3), attention::block_keys(&data((past + 1) * 192, 4), 192), attention::head_values(&data((past + 1) * 192, 5), HEADS.kv_heads, HEADS.head_dim));
        let mut out = vec![0f32; 576];
        g.throughput(Throughput::Elements(1));
        let id = if cold { format!("cold/{past}") } else { past.to_string() };
        // Inside a pass with the workers kept awake, as the engine runs a decode step.
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                CpuBackend.on_workers(|| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        if cold {
                            black_box(evict.par_chunks(evict.len() / rayon::current_num_threads()).map(|c| c.iter().fold(0u32, |a, x| a ^ x.to_bits())).reduce(|| 0, |a, b| a ^ b));
                        }
                        let start = std::time::Instant::now();
                        attention::attention_into(black_box(&q), &k, &v, HEADS, &plan, None, &mut out, gemm::OutLayout::Rows);
                        timed += start.elapsed();
                    }
                    timed
                })
            })
        });
    }
    g.finish();
}

fn bench_residual(c: &mut Criterion) {
    let rows = 512;
    let norm = vec![1.0f32; H];
    let vector = data(H, 7);
    let plan = BatchPlan::new(&vec![16; rows / 16], &vec![0; rows / 16], &(0..rows / 16).map(|i| i * 16).collect::<Vec<_>>());
    let mut g = c.benchmark_group("residual_step");
    g.throughput(Throughput::Elements(rows as u64));
    for variant in ["norm", "steer_add_norm", "steer_capture_norm"] {
        let mut x = data(rows * H, 6);
        let mut normed = vec![0f32; rows * H];
        let mut cap = Captured::new(plan.seqs.len(), 1, H, Vec::new());
        let steer = PointSteering {
            index: 1,
            row_slot: vec![0; rows],
            slots: vec![SlotSteer { vector: &vector, coef: 1e-6, op: SteerOp::Add, preserve_norm: false, table: None }],
        };
        g.bench_function(variant, |b| {
            b.iter(|| {
                if variant != "norm" {
                    residual::steer_rows(black_box(&mut x), H, &steer);
                }
                if variant == "steer_capture_norm" {
                    residual::capture_rows(&x, H, &plan, &mut cap, CapturePosition::Last, 0);
                }
                residual::norm_rows(black_box(&x), H, &norm, 1e-5, &mut normed)
            })
        });
    }
    g.finish();
}

/// One decoder layer through the backend, as the engine runs it.
fn bench_layer(c: &mut Criterion) {
    let be = CpuBackend;
    let (qd, kvd) = (HEADS.q_heads * HEADS.head_dim, HEADS.kv_heads * HEADS.head_dim);
    let m = |n: usize, k: usize, seed| -> CpuMatrix { be.matrix(&MatrixSource::from_values(data(n * k, seed), n, k).unwrap()).unwrap() };
    let (qkv_w, o_w, gu_w, down_w) = (m(qd + 2 * kvd, H, 11), m(H, qd, 12), m(2 * INTER, H, 13), m(H, INTER, 14));
    let norm = F32Data::Owned(vec![1.0; H]);
    let inv_freq: Vec<f32> = (0..32).map(|i| 1.0 / 10000f32.powf(i as f32 / 32.0)).collect();
    let mut g = c.benchmark_group("layer");
    for &(seqs, len) in &[(1usize, 1usize), (16, 32)] {
        let rows = seqs * len;
        let plan = BatchPlan::new(&vec![len; seqs], &vec![0; seqs], &(0..seqs).map(|i| i * len).collect::<Vec<_>>());
        let mut kv = be.kv(1, rows, kvd).unwrap();
        let mut pass = be.begin_pass(&plan, &inv_freq, Some(CaptureLayout { slots: 1, position: CapturePosition::Last, width: H }), &[], H).unwrap();
        let act = |cols| be.act(rows, cols, ActKind::Hidden).unwrap();
        let mut x = be.act(rows, H, ActKind::Residual).unwrap();
        x.data.copy_from_slice(&data(rows * H, 15));
        let (mut normed, mut qkv, mut q, mut attn, mut gu, mut a) = (act(H), act(qd + 2 * kvd), act(qd), act(qd), act(2 * INTER), act(INTER));
        g.throughput(Throughput::Elements(rows as u64));
        g.bench_function(BenchmarkId::from_parameter(rows), |b| {
            b.iter(|| {
                let n = || Norm { kind: NormKind::Rms, weight: &norm, bias: None, eps: 1e-5 };
                be.residual_step(&mut pass, &mut x, n(), &mut normed, None, Some(0), None, false).unwrap();
                be.linear(&normed, &qkv_w, None, &mut qkv, false).unwrap();
                be.rope_store_kv(&pass, &qkv, None, None, HEADS, &mut kv, 0, &mut q).unwrap();
                be.attention(&pass, &q, &kv, 0, HEADS, None, &mut attn).unwrap();
                be.linear(&attn, &o_w, None, &mut x, true).unwrap();
                be.residual_step(&mut pass, &mut x, n(), &mut normed, None, None, None, false).unwrap();
                be.linear(&normed, &gu_w, None, &mut gu, false).unwrap();
                be.activation(MlpKind::SwiGlu, &gu, &mut a).unwrap();
                be.linear(&a, &down_w, None, &mut x, true).unwrap();
                // Keep the residual bounded across iterations.
                x.data.iter_mut().for_each(|v| *v = v.clamp(-4.0, 4.0));
            })
        });
    }
    g.finish();
}

/// Filling a device upload's pinned staging buffer from the mapped checkpoint (the host half of
/// the CUDA weight upload, which must outpace the host-to-device link to stay hidden): bf16 rows
/// are copied, f16 and f32 rows converted. One 4096 x 4096 matrix (32 MiB of bf16 out) per iteration.
fn bench_weight_staging(c: &mut Criterion) {
    use safetensors::tensor::{Dtype, TensorView};
    let (rows, cols) = (4096, 4096);
    let values = data(rows * cols, 9);
    let f32_bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let bf16_bytes: Vec<u8> = values.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
    let f16_bytes: Vec<u8> = values.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    let dir = tempfile::tempdir().unwrap();
    let views = vec![
        ("w_f32", TensorView::new(Dtype::F32, vec![rows, cols], &f32_bytes).unwrap()),
        ("w_bf16", TensorView::new(Dtype::BF16, vec![rows, cols], &bf16_bytes).unwrap()),
        ("w_f16", TensorView::new(Dtype::F16, vec![rows, cols], &f16_bytes).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let store = resid::model::weights::WeightStore::open(dir.path()).unwrap();
    let mut out = vec![0u16; rows * cols];
    let mut g = c.benchmark_group("weight_staging");
    g.throughput(Throughput::Bytes((rows * cols * 2) as u64));
    for name in ["w_bf16", "w_f16", "w_f32"] {
        let src = MatrixSource::single(store.raw(name, &[rows, cols]).unwrap(), rows, cols).unwrap();
        g.bench_function(name, |b| b.iter(|| src.write_bf16_rows(0, &mut out)));
    }
    g.finish();
}

fn bench_stats_fold(c: &mut Criterion) {
    let rows = 2048;
    let x = data(rows * H, 7);
    let batch: Vec<&[f32]> = x.chunks_exact(H).collect();
    let mut g = c.benchmark_group("stats_fold");
    g.throughput(Throughput::Elements((rows * H * (H + 1)) as u64));
    let mut m = resid::backend::moments::PointMoments::new(H, true);
    g.bench_function("mean_cov_2048x576", |b| b.iter(|| m.add_rows(black_box(&batch))));
    g.finish();
}

/// A 49,152-token logits row (SmolLM2's vocabulary): a N(0, 2²) bulk, and for `peaked` 32
/// leading tokens at 14 down to 8 (top-1 17 %, the 0.9 nucleus 16 tokens at T = 1: a confident
/// next token); without them (`flat`) the 0.9 nucleus holds thousands.
fn logits_row(peaked: bool) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut row: Vec<f32> = (0..49_152)
        .map(|_| {
            // Box–Muller.
            let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
            2.0 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect();
    if peaked {
        // Spread over the vocabulary, not the first ids.
        for i in 0..32 {
            let at = (i * 1_531 + 17) % row.len();
            row[at] = 14.0 - 6.0 * i as f32 / 31.0;
        }
    }
    row
}

/// Choosing one token from one row, as a decode step does per sequence: greedy; temperature;
/// temperature with a nucleus (`top_p`, on the peaked and the flat row); top-k (the host
/// sampler); and the OpenAI `logprobs` of a row (top 5).
fn bench_sampling(c: &mut Criterion) {
    use resid::engine::sample::{sample_row, SampleParams, Sampler};
    use resid::Sampling;
    let (peaked, flat) = (logits_row(true), logits_row(false));
    let mut g = c.benchmark_group("sampling");
    g.throughput(Throughput::Elements(1));
    let temperature = |top_p: f32| SampleParams { temperature: 0.8, top_p, uniform: 0.37 };
    g.bench_function("greedy", |b| b.iter(|| sample_row(black_box(&peaked), SampleParams::GREEDY)));
    g.bench_function("temperature", |b| b.iter(|| sample_row(black_box(&peaked), temperature(1.0))));
    g.bench_function("top_p/peaked", |b| b.iter(|| sample_row(black_box(&peaked), temperature(0.9))));
    g.bench_function("top_p/flat", |b| b.iter(|| sample_row(black_box(&flat), temperature(0.9))));
    let mut top_k = Sampler::new(Sampling::Sample { temperature: 0.8, top_k: 50, top_p: 1.0, seed: 5 }, 0);
    g.bench_function("top_k", |b| b.iter(|| top_k.next(black_box(&peaked))));
    g.bench_function("logprobs", |b| b.iter(|| resid::sched::log_probabilities(black_box(&peaked), 3, 5)));
    g.finish();
}

fn bench_kv_copy(c: &mut Criterion) {
    let (layers, slots, kvd) = (30, 2048, HEADS.kv_heads * HEADS.head_dim);
    let mut kv = CpuBackend.kv(layers, slots, kvd).expect("KV arena");
    let mut g = c.benchmark_group("kv_copy");
    g.throughput(Throughput::Elements(256));
    for (name, to) in [("aligned", 256usize), ("unaligned", 263)] {
        g.bench_function(name, |b| b.iter(|| CpuBackend.kv_copy(&mut kv, HEADS, black_box(0), to, 256).expect("in the arena")));
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(20)
}

criterion_group! { name = benches; config = config(); targets = bench_gemm_f32, bench_gemm_streamed, bench_gemm_bf16, bench_attention, bench_residual, bench_layer, bench_weight_staging, bench_stats_fold, bench_sampling, bench_kv_copy }
criterion_main!(benches);
