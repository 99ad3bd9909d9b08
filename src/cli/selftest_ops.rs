//! The selftest's operation-level checks: each backend operation (embedding gather, rotary
//! embedding with the KV-cache write, prefill and decode attention, the attention input with its
//! projection, the MLP activations and the MLP input with its projection, the fused residual
//! step) on the device against the same operation of the CPU backend, on fresh
//! random inputs every run, with the device's outputs poisoned (NaN) beforehand so that an
//! element a kernel does not write fails. Inputs are bf16-exact, so both sides see the same
//! values; bf16 outputs are held to the selftest's 1e-2, f32 outputs that only move data to 1e-6.
use super::selftest::{fresh_seed, rel_err, TOL};
use anyhow::Result;
use resid::backend::{ActKind, AttentionInput, Backend, Heads, Norm};
use resid::engine::plan::BatchPlan;
use resid::model::arch::{alibi_slopes, MlpKind, NormKind};
use resid::model::weights::{F32Data, MatrixSource};
use resid::testing::pseudo_random;
use resid::CpuBackend;

/// Tolerance of outputs that are copies of bf16-exact inputs (gathers).
const EXACT_TOL: f64 = 1e-6;

struct Checker<'a, D: Backend> {
    dev: &'a D,
    cpu: CpuBackend,
    seed: u64,
    draws: u64,
    name: &'a str,
    cases: usize,
    worst: f64,
    failures: &'a mut Vec<String>,
}

impl<D: Backend> Checker<'_, D> {
    /// Fresh bf16-exact values.
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        self.draws += 1;
        pseudo_random(n, self.seed ^ self.draws.wrapping_mul(0x9E37_79B9), scale).into_iter().map(|v| half::bf16::from_f32(v).to_f32()).collect()
    }

    fn acts(&self, data: &[f32], rows: usize, cols: usize, kind: ActKind) -> Result<(D::Act, <CpuBackend as Backend>::Act)> {
        Ok((self.dev.act_from(data, rows, cols, kind)?, self.cpu.act_from(data, rows, cols, kind)?))
    }

    /// An output: NaN on the device, zeros on the CPU.
    fn outputs(&self, rows: usize, cols: usize, kind: ActKind) -> Result<(D::Act, <CpuBackend as Backend>::Act)> {
        Ok((self.dev.act_from(&vec![f32::NAN; rows * cols], rows, cols, kind)?, self.cpu.act(rows, cols, kind)?))
    }

    fn vectors(&mut self, n: usize, scale: f32, offset: f32) -> Result<(D::Vector, <CpuBackend as Backend>::Vector)> {
        let v: Vec<f32> = self.values(n, scale).into_iter().map(|x| x + offset).collect();
        Ok((self.dev.vector(F32Data::Owned(v.clone()))?, self.cpu.vector(F32Data::Owned(v))?))
    }

    fn compare(&mut self, what: &str, dev: &D::Act, cpu: &<CpuBackend as Backend>::Act, tol: f64) -> Result<()> {
        let want = self.cpu.to_host(cpu)?;
        let e = rel_err(&self.dev.to_host(dev)?, &want);
        self.cases += 1;
        self.judge(what, e, tol);
        Ok(())
    }

    /// Records a check's error: the worst so far when within `tol`, a failure otherwise.
    fn judge(&mut self, what: &str, e: f64, tol: f64) -> f64 {
        if e <= tol {
            self.worst = self.worst.max(e);
        } else {
            self.failures.push(format!("{}: operation check {what} (seed {}): relative error {e:.3e} (tolerance {tol:e})", self.name, self.seed));
        }
        e
    }
}

/// Attention geometry of one operation case, and how positions enter it.
struct AttnCase {
    label: &'static str,
    heads: Heads,
    rope: bool,
    alibi: bool,
    qkv_bias: bool,
    qk_norm: bool,
}

pub(crate) fn check_ops<D: Backend>(name: &str, dev: &D, failures: &mut Vec<String>) -> Result<serde_json::Value> {
    let seed = fresh_seed();
    let mut c = Checker { dev, cpu: CpuBackend, seed, draws: 0, name, cases: 0, worst: 0.0, failures };
    let h = 320;
    let eps = 1e-5;

    // Embedding gather, plain and with BLOOM's LayerNorm, into a poisoned residual.
    let (vocab, ids): (usize, Vec<u32>) = (300, c.values(37, 0.5).iter().map(|v| ((v + 0.5) * 299.0) as u32).collect());
    let table = c.values(vocab * h, 1.0);
    let (tab_d, tab_c) = (dev.matrix(&MatrixSource::from_values(table.clone(), vocab, h)?)?, c.cpu.matrix(&MatrixSource::from_values(table, vocab, h)?)?);
    let (mut xd, mut xc) = c.outputs(ids.len(), h, ActKind::Residual)?;
    dev.embed(&tab_d, &ids, None, &mut xd)?;
    c.cpu.embed(&tab_c, &ids, None, &mut xc)?;
    c.compare("embedding gather", &xd, &xc, EXACT_TOL)?;
    let ((wd, wc), (bd, bc)) = (c.vectors(h, 0.2, 1.0)?, c.vectors(h, 0.2, 0.0)?);
    let (mut xd, mut xc) = c.outputs(ids.len(), h, ActKind::Residual)?;
    dev.embed(&tab_d, &ids, Some(Norm { kind: NormKind::Layer, weight: &wd, bias: Some(&bd), eps }), &mut xd)?;
    c.cpu.embed(&tab_c, &ids, Some(Norm { kind: NormKind::Layer, weight: &wc, bias: Some(&bc), eps }), &mut xc)?;
    c.compare("embedding gather + LayerNorm", &xd, &xc, TOL)?;

    // Rotary embedding and KV store, then attention: a prefill of sequences of 1, 17 and 300
    // tokens, then one decode step of each (300 cached keys take two decode splits).
    let cases = [
        AttnCase { label: "rope, grouped-query, qkv bias", heads: Heads { q_heads: 4, kv_heads: 2, head_dim: 64 }, rope: true, alibi: false, qkv_bias: true, qk_norm: false },
        AttnCase { label: "no rotary, ALiBi, 5 heads", heads: Heads { q_heads: 5, kv_heads: 5, head_dim: 64 }, rope: false, alibi: true, qkv_bias: true, qk_norm: false },
        AttnCase { label: "rope, Q/K norm, head dim 128", heads: Heads { q_heads: 4, kv_heads: 2, head_dim: 128 }, rope: true, alibi: false, qkv_bias: false, qk_norm: true },
    ];
    let lens = [1usize, 17, 300];
    let starts = [0usize, 2, 20];
    let slots = 321; // each sequence's tokens plus its decode step
    for case in &cases {
        let Heads { q_heads: nq, kv_heads: nkv, head_dim: hd } = case.heads;
        let inv_freq: Vec<f32> = if case.rope { (0..hd / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32)).collect() } else { Vec::new() };
        let slopes = case.alibi.then(|| alibi_slopes(nq));
        let qkv_cols = (nq + 2 * nkv) * hd;
        let bias = if case.qkv_bias { Some(c.vectors(qkv_cols, 0.5, 0.0)?) } else { None };
        let norms = if case.qk_norm { Some((c.vectors(hd, 0.2, 1.0)?, c.vectors(hd, 0.2, 1.0)?)) } else { None };
        let qk_d = norms.as_ref().map(|((qw, _), (kw, _))| (qw, kw, eps));
        let qk_c = norms.as_ref().map(|((_, qw), (_, kw))| (qw, kw, eps));
        let (mut kv_d, mut kv_c) = (dev.kv(1, slots, nkv * hd)?, c.cpu.kv(1, slots, nkv * hd)?);
        let plans = [
            ("prefill", BatchPlan::new(&lens, &[0, 0, 0], &starts)),
            ("decode", BatchPlan::new(&[1, 1, 1], &lens, &starts)),
        ];
        for (phase, plan) in &plans {
            let rows = plan.rows();
            let mut pd = dev.begin_pass(plan, &inv_freq, None, &[], h)?;
            let mut pc = c.cpu.begin_pass(plan, &inv_freq, None, &[], h)?;
            let data = c.values(rows * qkv_cols, 1.0);
            let (qkv_d, qkv_c) = c.acts(&data, rows, qkv_cols, ActKind::Hidden)?;
            let (mut qd, mut qc) = c.outputs(rows, nq * hd, ActKind::Hidden)?;
            dev.rope_store_kv(&pd, &qkv_d, bias.as_ref().map(|b| &b.0), qk_d, case.heads, &mut kv_d, 0, &mut qd)?;
            c.cpu.rope_store_kv(&pc, &qkv_c, bias.as_ref().map(|b| &b.1), qk_c, case.heads, &mut kv_c, 0, &mut qc)?;
            c.compare(&format!("{phase} rotary/KV store ({})", case.label), &qd, &qc, TOL)?;
            // Attention on identical queries (the CPU's), so that only attention differs.
            let q_host = c.cpu.to_host(&qc)?;
            let q_dev = dev.act_from(&q_host, rows, nq * hd, ActKind::Hidden)?;
            let (mut od, mut oc) = c.outputs(rows, nq * hd, ActKind::Hidden)?;
            dev.attention(&pd, &q_dev, &kv_d, 0, case.heads, slopes.as_deref(), &mut od)?;
            c.cpu.attention(&pc, &qc, &kv_c, 0, case.heads, slopes.as_deref(), &mut oc)?;
            c.compare(&format!("{phase} attention ({})", case.label), &od, &oc, TOL)?;

            // The fused residual step (RMSNorm, LayerNorm, BLOOM's post-LN residual) on this plan.
            for (kind, post_ln) in [(NormKind::Rms, false), (NormKind::Layer, false), (NormKind::Layer, true)] {
                let resid = c.values(rows * h, 4.0);
                let (mut xd, mut xc) = c.acts(&resid, rows, h, ActKind::Residual)?;
                let (mut nd, mut nc) = c.outputs(rows, h, ActKind::Hidden)?;
                let ((wd, wc), (bd, bc)) = (c.vectors(h, 0.2, 1.0)?, c.vectors(h, 0.2, 0.0)?);
                let bias_d = (kind == NormKind::Layer).then_some(&bd);
                let bias_c = (kind == NormKind::Layer).then_some(&bc);
                dev.residual_step(&mut pd, &mut xd, Norm { kind, weight: &wd, bias: bias_d, eps }, &mut nd, None, None, None, post_ln)?;
                c.cpu.residual_step(&mut pc, &mut xc, Norm { kind, weight: &wc, bias: bias_c, eps }, &mut nc, None, None, None, post_ln)?;
                let what = format!("{phase} residual step ({kind:?}{})", if post_ln { ", post-LN residual" } else { "" });
                c.compare(&format!("{what}, normed rows"), &nd, &nc, TOL)?;
                c.compare(&format!("{what}, residual"), &xd, &xc, if post_ln { TOL } else { EXACT_TOL })?;
            }
            // The branch step of a point inside a block (hook_attn_out, hook_mlp_out): the
            // sub-layer's output added into the residual by the fused residual kernel.
            let (branch, resid) = (c.values(rows * h, 1.0), c.values(rows * h, 4.0));
            let (mut bd, mut bc) = c.acts(&branch, rows, h, ActKind::Residual)?;
            let (mut xd, mut xc) = c.acts(&resid, rows, h, ActKind::Residual)?;
            dev.branch_step(&mut pd, &mut bd, None, None, Some(&mut xd))?;
            c.cpu.branch_step(&mut pc, &mut bc, None, None, Some(&mut xc))?;
            c.compare(&format!("{phase} branch step (added into the residual)"), &xd, &xc, EXACT_TOL)?;
            dev.end_pass(pd, None)?;
            c.cpu.end_pass(pc, None)?;
        }

        // The attention input of decode steps of 1 to 3 of these sequences (projection, bias,
        // rotation, KV store: one kernel on the device, except with Q/K norm), then attention
        // over the caches it wrote, on the CPU's queries: K and V must have been stored.
        let k = 96;
        let w = c.values(qkv_cols * k, 0.3);
        let (w_d, w_c) = (dev.weight_matrix(&MatrixSource::from_values(w.clone(), qkv_cols, k)?)?, c.cpu.weight_matrix(&MatrixSource::from_values(w, qkv_cols, k)?)?);
        for n in 1..=lens.len() {
            let plan = BatchPlan::new(&vec![1; n], &lens[..n], &starts[..n]);
            let pd = dev.begin_pass(&plan, &inv_freq, None, &[], h)?;
            let pc = c.cpu.begin_pass(&plan, &inv_freq, None, &[], h)?;
            let data = c.values(n * k, 1.0);
            let (x_d, x_c) = c.acts(&data, n, k, ActKind::Hidden)?;
            let (mut s_d, mut s_c) = c.outputs(n, qkv_cols, ActKind::Hidden)?;
            let (mut qd, mut qc) = c.outputs(n, nq * hd, ActKind::Hidden)?;
            let input_d = AttentionInput { qkv: &w_d, bias: bias.as_ref().map(|b| &b.0), qk_norm: qk_d, heads: case.heads };
            let input_c = AttentionInput { qkv: &w_c, bias: bias.as_ref().map(|b| &b.1), qk_norm: qk_c, heads: case.heads };
            dev.attention_input(&pd, &x_d, input_d, &mut kv_d, 0, &mut s_d, &mut qd)?;
            c.cpu.attention_input(&pc, &x_c, input_c, &mut kv_c, 0, &mut s_c, &mut qc)?;
            let what = format!("decode attention input, {n} rows ({})", case.label);
            c.compare(&format!("{what}, queries"), &qd, &qc, TOL)?;
            let q_dev = dev.act_from(&c.cpu.to_host(&qc)?, n, nq * hd, ActKind::Hidden)?;
            let (mut od, mut oc) = c.outputs(n, nq * hd, ActKind::Hidden)?;
            dev.attention(&pd, &q_dev, &kv_d, 0, case.heads, slopes.as_deref(), &mut od)?;
            c.cpu.attention(&pc, &qc, &kv_c, 0, case.heads, slopes.as_deref(), &mut oc)?;
            c.compare(&format!("{what}, attention over the keys and values it stored"), &od, &oc, TOL)?;
            dev.end_pass(pd, None)?;
            c.cpu.end_pass(pc, None)?;
        }
    }

    // MLP activations over 5 rows.
    let (rows, inter) = (5, 264);
    let data = c.values(rows * 2 * inter, 3.0);
    let (gu_d, gu_c) = c.acts(&data, rows, 2 * inter, ActKind::Hidden)?;
    let (mut od, mut oc) = c.outputs(rows, inter, ActKind::Hidden)?;
    dev.activation(MlpKind::SwiGlu, &gu_d, &mut od)?;
    c.cpu.activation(MlpKind::SwiGlu, &gu_c, &mut oc)?;
    c.compare("SwiGLU", &od, &oc, TOL)?;
    let data = c.values(rows * inter, 3.0);
    let (up_d, up_c) = c.acts(&data, rows, inter, ActKind::Hidden)?;
    let (mut od, mut oc) = c.outputs(rows, inter, ActKind::Hidden)?;
    dev.activation(MlpKind::GeluTanh, &up_d, &mut od)?;
    c.cpu.activation(MlpKind::GeluTanh, &up_c, &mut oc)?;
    c.compare("GELU (tanh)", &od, &oc, TOL)?;

    // The MLP input (gate/up projection and SwiGLU; fused on the device for up to 4 rows).
    let (inter, k) = (200, 96);
    let w = c.values(2 * inter * k, 0.3);
    let (w_d, w_c) = (dev.matrix(&MatrixSource::from_values(w.clone(), 2 * inter, k)?)?, c.cpu.matrix(&MatrixSource::from_values(w, 2 * inter, k)?)?);
    let (b_d, b_c) = c.vectors(2 * inter, 0.5, 0.0)?;
    for rows in 1..=5 {
        let data = c.values(rows * k, 1.0);
        let (x_d, x_c) = c.acts(&data, rows, k, ActKind::Hidden)?;
        let (mut s_d, mut s_c) = c.outputs(rows, 2 * inter, ActKind::Hidden)?;
        let (mut o_d, mut o_c) = c.outputs(rows, inter, ActKind::Hidden)?;
        dev.mlp_input(MlpKind::SwiGlu, &x_d, &w_d, Some(&b_d), &mut s_d, &mut o_d)?;
        c.cpu.mlp_input(MlpKind::SwiGlu, &x_c, &w_c, Some(&b_c), &mut s_c, &mut o_c)?;
        c.compare(&format!("MLP input (gate/up + SwiGLU), {rows} rows"), &o_d, &o_c, TOL)?;
    }

    let (cases, worst) = (c.cases, c.worst);
    let linear = check_linear(&mut c)?;
    Ok(serde_json::json!({ "cases": cases, "worst_relative_error": worst, "seed": seed, "linear": linear }))
}

/// `Backend::linear` on 1 to 5 token rows (the device's GEMV kernel up to 4, cuBLASLt beyond),
/// against an f64 reference on the same bf16-exact inputs: f32 output accumulated into the
/// residual with a bias, f32 output overwritten, bf16 output with a bias. Overwritten outputs
/// start as NaN. Tolerances: 1e-4 for f32 outputs (f32 accumulation), 1e-2 for bf16 outputs
/// (their rounding).
fn check_linear<D: Backend>(c: &mut Checker<'_, D>) -> Result<serde_json::Value> {
    let (mut cases, mut worst) = (0usize, 0f64);
    let dev = c.dev;
    for (n, k) in [(384usize, 256usize), (1000, 520), (40, 8)] {
        let w = c.values(n * k, 1.0);
        let bias = c.values(n, 1.0);
        let matrix = dev.matrix(&MatrixSource::from_values(w.clone(), n, k)?)?;
        let bias_vec = dev.vector(F32Data::Owned(bias.clone()))?;
        for rows in 1..=5 {
            let x = c.values(rows * k, 1.0);
            let xa = dev.act_from(&x, rows, k, ActKind::Hidden)?;
            let start = c.values(rows * n, 1.0);
            for (variant, kind, accumulate, with_bias) in
                [("f32 += x·Wᵀ + b", ActKind::Residual, true, true), ("f32 = x·Wᵀ", ActKind::Residual, false, false), ("bf16 = x·Wᵀ + b", ActKind::Hidden, false, true)]
            {
                let initial = if accumulate { start.clone() } else { vec![f32::NAN; rows * n] };
                let mut y = dev.act_from(&initial, rows, n, kind)?;
                dev.linear(&xa, &matrix, with_bias.then_some(&bias_vec), &mut y, accumulate)?;
                let want: Vec<f32> = (0..rows * n)
                    .map(|i| {
                        let (r, j) = (i / n, i % n);
                        let dot: f64 = (0..k).map(|q| x[r * k + q] as f64 * w[j * k + q] as f64).sum();
                        (dot + if with_bias { bias[j] as f64 } else { 0.0 } + if accumulate { start[i] as f64 } else { 0.0 }) as f32
                    })
                    .collect();
                let tol = if kind == ActKind::Hidden { TOL } else { 1e-4 };
                let e = c.judge(&format!("linear {variant}, {rows} rows, n {n}, k {k}"), rel_err(&dev.to_host(&y)?, &want), tol);
                cases += 1;
                if e <= tol {
                    worst = worst.max(e);
                }
            }
        }
    }
    Ok(serde_json::json!({ "cases": cases, "worst_relative_error": worst }))
}
