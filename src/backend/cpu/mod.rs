//! The CPU backend: f32 compute over memory-mapped (f32) or converted (bf16/f16) weights, or
//! bf16 compute (AVX512-BF16) when asked for. Also the reference the CUDA kernels are checked
//! against.
//!
//! Weight matrices are repacked into cache-friendly panels (see [`gemm`]) the first time a GEMM
//! needs them; the memory-mapped original stays mapped (its pages are released after packing).
//! The compute type is chosen per process, before the model is loaded: [`set_compute`], or the
//! environment variable `RESID_CPU_COMPUTE=f32|bf16` (default f32). bf16 needs AVX512-BF16;
//! elsewhere it falls back to f32.
pub mod attention;
pub mod gemm;
pub mod norm;
pub mod residual;
pub mod rope;
pub mod vmath;

use super::{ActKind, Backend, CaptureLayout, Heads, Norm};
use crate::model::arch::{MlpKind, NormKind};
use crate::engine::capture::{CapturePosition, CaptureSink, Captured};
use crate::engine::plan::BatchPlan;
use crate::engine::steer::PointSteering;
use crate::error::Result;
use crate::model::weights::{F32Data, MatrixSource};
pub use gemm::Compute;
use gemm::PackedMatrix;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use super::profile::{OpTimes, WallMarks};
use std::sync::OnceLock;

pub struct CpuBackend;

static COMPUTE: AtomicU8 = AtomicU8::new(0);

/// Operation marks (`resid bench --profile`), process-wide like the compute setting.
static PROFILING: AtomicBool = AtomicBool::new(false);
static MARKS: Mutex<Option<WallMarks>> = Mutex::new(None);

/// Sets the compute type of matrices created from now on (process-wide).
pub fn set_compute(c: Compute) {
    COMPUTE.store(if c == Compute::Bf16 { 2 } else { 1 }, Ordering::SeqCst);
}

/// The compute type asked for: [`set_compute`], else `RESID_CPU_COMPUTE`, else f32.
pub fn requested_compute() -> Compute {
    match COMPUTE.load(Ordering::SeqCst) {
        1 => Compute::F32,
        2 => Compute::Bf16,
        _ => {
            let c = match std::env::var("RESID_CPU_COMPUTE") {
                Ok(v) => v.parse::<Compute>().unwrap_or_else(|e| {
                    eprintln!("warning: RESID_CPU_COMPUTE: {e}; using f32");
                    Compute::F32
                }),
                Err(_) => Compute::F32,
            };
            let _ = COMPUTE.compare_exchange(0, if c == Compute::Bf16 { 2 } else { 1 }, Ordering::SeqCst, Ordering::SeqCst);
            c
        }
    }
}

/// The compute type matrices created now get (bf16 only where the CPU has AVX512-BF16).
pub fn compute() -> Compute {
    gemm::effective_compute(requested_compute())
}

/// Kernels in use, for reports: e.g. `f32 avx512f` or `bf16 avx512bf16 …`.
pub fn kernel_description() -> String {
    match compute() {
        Compute::F32 => format!("f32 {}", gemm::isa().name()),
        Compute::Bf16 => {
            let kernel = gemm::bf16_kernel().map_or("none", |k| k.name());
            match bf16_policy() {
                Bf16Policy::All => format!("bf16 {kernel} (f32 accumulation), every GEMM"),
                Bf16Policy::F32Down => format!("bf16 {kernel} (f32 accumulation); down projections f32 {}", gemm::isa().name()),
                Bf16Policy::SplitDown => format!("bf16 {kernel} (f32 accumulation); down projections bf16 with f32 outlier inputs and sink rows"),
            }
        }
    }
}

/// How the bf16 compute path treats matrices with more inputs than outputs (the MLP's down
/// projection, which reads the widest activations and the model's massive outliers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bf16Policy {
    /// Default: bf16 down projections, except for each row's outlier inputs (> 16 × the row's
    /// RMS), applied in f32, and for the attention-sink rows (position 0), computed wholly in f32
    /// ([`gemm::gemm_split`]). The sink rows carry massive activations that the last layers
    /// cancel (SmolLM2-135M: a norm of 22,000 falls to 47), so their bf16 rounding would show
    /// up, amplified, in every later hidden state and in mean-pooled vectors. About 15 % faster
    /// extraction than `F32Down`, at the same accuracy (NOTES.md, 2026-11-28).
    SplitDown,
    /// `RESID_CPU_BF16=f32-down`: down projections entirely in f32 (the earlier policy).
    F32Down,
    /// `RESID_CPU_BF16=all`: every GEMM plainly in bf16 (outside the bf16 tolerance).
    All,
}

fn bf16_policy() -> Bf16Policy {
    static POLICY: OnceLock<Bf16Policy> = OnceLock::new();
    *POLICY.get_or_init(|| match std::env::var("RESID_CPU_BF16").as_deref() {
        Ok("all") => Bf16Policy::All,
        Ok("f32-down") => Bf16Policy::F32Down,
        Ok("split-down") | Err(_) => Bf16Policy::SplitDown,
        Ok(other) => {
            eprintln!("warning: RESID_CPU_BF16={other} is not one of split-down, f32-down, all; using split-down");
            Bf16Policy::SplitDown
        }
    })
}

/// Whether the MLP input fuses its activation into the gate/up GEMM (default), or, with
/// `RESID_CPU_FUSED_MLP=0`, runs them as two operations (for comparisons: same results).
fn fused_mlp() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("RESID_CPU_FUSED_MLP").as_deref() != Ok("0"))
}

/// A KV arena base pointer shared by the row tasks of one pass (each writes its own slot).
#[derive(Clone, Copy)]
struct RowPtr(*mut f32);
// SAFETY: tasks write disjoint slots.
unsafe impl Send for RowPtr {}
unsafe impl Sync for RowPtr {}

pub struct CpuMatrix {
    /// The original values (`[rows, cols]`), or empty once packed when they were an owned copy
    /// (stacked or converted weights): the packed panels then are the only copy.
    pub data: F32Data,
    pub rows: usize,
    pub cols: usize,
    compute: Compute,
    /// f32 panels for f32 compute and for split matrices, bf16 panels otherwise.
    packed: OnceLock<PackedMatrix>,
    /// Split matrices (bf16 down projections, see [`Bf16Policy::SplitDown`]): the bf16 panels
    /// beside the f32 ones, which serve the outlier inputs.
    split: Option<OnceLock<PackedMatrix>>,
    /// A stacked `[gate; up]` of equal halves: packed with each half on whole panels
    /// ([`PackedMatrix::pack_halves`]), so that the MLP input fuses its activation.
    halves: bool,
}

impl CpuMatrix {
    pub fn new(data: F32Data, rows: usize, cols: usize, compute: Compute) -> Self {
        Self::with_layout(data, rows, cols, compute, false)
    }

    /// `halves`: W is a stacked `[gate; up]` (two blocks of rows/2 rows).
    fn with_layout(data: F32Data, rows: usize, cols: usize, compute: Compute, halves: bool) -> Self {
        let compute = gemm::effective_compute(compute);
        let wide_input = compute == Compute::Bf16 && cols > rows;
        let (compute, split) = match bf16_policy() {
            Bf16Policy::SplitDown if wide_input => (Compute::F32, Some(OnceLock::new())),
            Bf16Policy::F32Down if wide_input => (Compute::F32, None),
            _ => (compute, None),
        };
        let halves = halves && split.is_none() && rows.is_multiple_of(2);
        let m = CpuMatrix { data, rows, cols, compute, packed: OnceLock::new(), split, halves };
        // Mapped tensors are packed on first use; meanwhile the file pages the loader touched
        // so far (the parts of stacked matrices, say) need not stay resident.
        if m.data.is_mapped() {
            release_pages(&m.data);
        }
        // Owned f32 copies are packed now and dropped: the panels hold the same values exactly.
        if !m.data.is_mapped() && m.compute == Compute::F32 && m.rows * m.cols > 0 {
            let _ = m.packed.set(m.pack(Compute::F32));
            if let Some(fast) = &m.split {
                let _ = fast.set(PackedMatrix::pack(&m.data, rows, cols, Compute::Bf16));
            }
            return CpuMatrix { data: F32Data::Owned(Vec::new()), ..m };
        }
        m
    }

    fn pack(&self, compute: Compute) -> PackedMatrix {
        if self.halves {
            PackedMatrix::pack_halves(&self.data, self.rows, self.cols, compute)
        } else {
            PackedMatrix::pack(&self.data, self.rows, self.cols, compute)
        }
    }

    /// The packed panels, made on first use.
    pub fn packed(&self) -> &PackedMatrix {
        self.packed.get_or_init(|| {
            let p = self.pack(self.compute);
            release_pages(&self.data);
            p
        })
    }

    /// The bf16 panels of a split matrix, made on first use.
    fn split_panels(&self) -> Option<&PackedMatrix> {
        self.split.as_ref().map(|fast| {
            fast.get_or_init(|| {
                let p = PackedMatrix::pack(&self.data, self.rows, self.cols, Compute::Bf16);
                release_pages(&self.data);
                p
            })
        })
    }

    /// `out = x·Wᵀ + b` (or `+=`); a split matrix computes `f32_rows` wholly in f32.
    fn multiply(&self, x: &CpuAct, b: Option<&F32Data>, out: &mut CpuAct, accumulate: bool, f32_rows: &[usize]) {
        let (exact, bias) = (self.packed(), b.map(|b| &b[..]));
        match self.split_panels() {
            Some(fast) => gemm::gemm_split(&x.data, x.rows, fast, exact, bias, &mut out.data, accumulate, f32_rows),
            None => gemm::gemm(&x.data, x.rows, exact, bias, &mut out.data, accumulate),
        }
    }

    /// Row `r` in f32, exactly as stored in the checkpoint.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        if self.data.len() == self.rows * self.cols {
            out.copy_from_slice(&self.data[r * self.cols..(r + 1) * self.cols]);
        } else {
            self.packed().row(r, out);
        }
    }

    pub fn compute(&self) -> Compute {
        self.compute
    }
}

/// Once a mapped tensor has been packed, lets the kernel drop the resident pages of its whole
/// checkpoint file: the GEMMs read only packed copies, and the few pages still used (embedding
/// rows, norm weights) are read back from the page cache on access. Without this, every page
/// the loader touched (the parts of stacked QKV and gate/up matrices, the tensors packed so far)
/// would stay in the process's resident set next to the packed copy.
fn release_pages(data: &F32Data) {
    #[cfg(unix)]
    if let F32Data::Mapped { mmap, .. } = data {
        // SAFETY: the mapping is read-only and file-backed; dropped pages are re-read on access.
        let _ = unsafe { mmap.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }
}

pub struct CpuAct {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

pub struct CpuKv {
    stored_layers: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl CpuKv {
    fn layer(&self, layer: usize) -> usize {
        layer % self.stored_layers
    }
}

/// One pass: its plan, rotary tables and pass-local capture rows.
pub struct CpuPass {
    plan: BatchPlan,
    /// Rows at position 0 (attention sinks), which split down projections compute in f32.
    sink_rows: Vec<usize>,
    rope: rope::RopeRows,
    capture: Option<(Captured, CapturePosition)>,
}

fn apply_norm(x: &[f32], h: usize, norm: &Norm<'_, F32Data>, out: &mut [f32]) {
    match norm.kind {
        NormKind::Rms => residual::norm_rows(x, h, norm.weight, norm.eps, out),
        NormKind::Layer => residual::layer_norm_rows(x, h, norm.weight, norm.bias.map(|b| &b[..]), norm.eps, out),
    }
}

impl Backend for CpuBackend {
    type Matrix = CpuMatrix;
    type Vector = F32Data;
    type Act = CpuAct;
    type Kv = CpuKv;
    type Pass = CpuPass;

    fn name(&self) -> String {
        format!("cpu ({} threads, {})", rayon::current_num_threads(), kernel_description())
    }
    fn compute_type(&self) -> &'static str {
        compute().name()
    }
    fn on_workers<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if rayon::current_thread_index().is_some() {
            return f();
        }
        // `f` runs on a worker (the caller waits once, not once per operation), and every other
        // worker is kept awake for the pass: a sleeping worker takes a futex wake-up (tens of µs
        // in a VM) per operation, 150 operations per decoded token. The keepers run the pass's
        // tasks through `yield_now` and spin (yielding the CPU to other threads) in between.
        let keepers = rayon::current_num_threads().saturating_sub(1);
        let done = AtomicBool::new(false);
        rayon::scope(|s| {
            // A keeper that this worker itself picks up (while it waits inside the pass) returns
            // at once: spinning there, above the pass it waits for, would never end.
            let (owner, done) = (rayon::current_thread_index(), &done);
            for _ in 0..keepers {
                s.spawn(move |_| {
                    if rayon::current_thread_index() == owner {
                        return;
                    }
                    while !done.load(Ordering::Acquire) {
                        if rayon::yield_now() != Some(rayon::Yield::Executed) {
                            std::thread::yield_now();
                        }
                    }
                });
            }
            struct Done<'a>(&'a AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Release);
                }
            }
            let _done = Done(done);
            f()
        })
    }
    fn compute_note(&self) -> Option<String> {
        Some(format!("--compute bf16 on this CPU: {}", gemm::bf16_note()))
    }

    fn matrix(&self, src: &MatrixSource) -> Result<CpuMatrix> {
        Ok(CpuMatrix::new(src.to_f32(), src.rows(), src.cols(), requested_compute()))
    }

    fn weight_matrix(&self, src: &MatrixSource) -> Result<CpuMatrix> {
        // Two stacked blocks of equal size are a SwiGLU `[gate; up]` (see `mlp_input`).
        let halves = matches!(src.part_rows()[..], [g, u] if g == u);
        let mut m = CpuMatrix::with_layout(src.to_f32(), src.rows(), src.cols(), requested_compute(), halves);
        m.packed();
        m.split_panels();
        // The panels are all a layer weight needs: an owned copy (stacked or converted
        // weights, kept by bf16 matrices until packed) can go.
        if !m.data.is_mapped() {
            m.data = F32Data::Owned(Vec::new());
        }
        Ok(m)
    }

    fn vector(&self, data: F32Data) -> Result<F32Data> {
        Ok(data)
    }

    fn act(&self, rows: usize, cols: usize, _kind: ActKind) -> Result<CpuAct> {
        Ok(CpuAct { data: vec![0.0; rows * cols], rows, cols })
    }

    fn act_from(&self, data: &[f32], rows: usize, cols: usize, _kind: ActKind) -> Result<CpuAct> {
        if data.len() != rows * cols {
            return Err(crate::error::Error::input(format!("{} values for a {rows}x{cols} activation", data.len())));
        }
        Ok(CpuAct { data: data.to_vec(), rows, cols })
    }

    fn kv(&self, stored_layers: usize, slots: usize, kv_dim: usize) -> Result<CpuKv> {
        Ok(CpuKv {
            stored_layers: stored_layers.max(1),
            k: (0..stored_layers.max(1)).map(|_| vec![0.0; slots * kv_dim]).collect(),
            v: (0..stored_layers.max(1)).map(|_| vec![0.0; slots * kv_dim]).collect(),
        })
    }

    fn to_host(&self, a: &CpuAct) -> Result<Vec<f32>> {
        Ok(a.data.clone())
    }

    // Steering is read from each point's plan in `residual_step`; nothing to prepare here.
    fn begin_pass(
        &self,
        plan: &BatchPlan,
        inv_freq: &[f32],
        capture: Option<CaptureLayout>,
        _steering: &[Option<PointSteering<'_>>],
        _hidden: usize,
    ) -> Result<CpuPass> {
        let capture = capture.map(|c| {
            let rows = if c.position == CapturePosition::All { plan.rows() } else { plan.seqs.len() };
            (Captured::new(rows, c.slots, c.width, Vec::new()), c.position)
        });
        let sink_rows = plan.positions.iter().enumerate().filter(|&(_, &p)| p == 0).map(|(r, _)| r).collect();
        Ok(CpuPass { plan: plan.clone(), sink_rows, rope: rope::rope_rows(inv_freq, &plan.positions), capture })
    }

    fn end_pass(&self, pass: CpuPass, sink: Option<&mut CaptureSink>) -> Result<()> {
        if let (Some((local, _)), Some(sink)) = (pass.capture, sink) {
            sink.absorb(&pass.plan, &local);
        }
        Ok(())
    }

    fn embed(&self, table: &CpuMatrix, ids: &[u32], norm: Option<Norm<'_, F32Data>>, out: &mut CpuAct) -> Result<()> {
        let h = table.cols;
        for (row, &id) in out.data.chunks_exact_mut(h).zip(ids) {
            table.row_into(id as usize, row);
        }
        if let Some(norm) = norm {
            let src = out.data.clone();
            apply_norm(&src, h, &norm, &mut out.data);
        }
        Ok(())
    }

    fn linear(&self, x: &CpuAct, w: &CpuMatrix, b: Option<&F32Data>, out: &mut CpuAct, accumulate: bool) -> Result<()> {
        w.multiply(x, b, out, accumulate, &[]);
        Ok(())
    }

    fn down_projection(&self, pass: &CpuPass, x: &CpuAct, w: &CpuMatrix, b: Option<&F32Data>, out: &mut CpuAct, accumulate: bool) -> Result<()> {
        w.multiply(x, b, out, accumulate, &pass.sink_rows);
        Ok(())
    }

    fn rope_store_kv(
        &self,
        pass: &CpuPass,
        qkv: &CpuAct,
        bias: Option<&F32Data>,
        qk_norm: Option<(&F32Data, &F32Data, f32)>,
        heads: Heads,
        kv: &mut CpuKv,
        layer: usize,
        q: &mut CpuAct,
    ) -> Result<()> {
        let (rope, plan) = (&pass.rope, &pass.plan);
        let (half, hd) = (rope.half, heads.head_dim);
        let (qd, kvd) = (heads.q_heads * hd, heads.kv_heads * hd);
        let l = kv.layer(layer);
        let cols = qkv.cols;
        let cache_len = kv.k[l].len();
        let (kc, vc) = (RowPtr(kv.k[l].as_mut_ptr()), RowPtr(kv.v[l].as_mut_ptr()));
        // One row: bias, per-head Q/K norm, rotation; q to its row, k and v to the row's slot.
        let one = |scratch: &mut (Vec<f32>, Vec<f32>), r: usize, qrow: &mut [f32]| {
            let (kc, vc) = (kc, vc);
            let (row, head) = scratch;
            row.copy_from_slice(&qkv.data[r * cols..(r + 1) * cols]);
            if let Some(b) = bias {
                row.iter_mut().zip(b.iter()).for_each(|(x, b)| *x += b);
            }
            let (cos, sin) = (&rope.cos[r * half..(r + 1) * half], &rope.sin[r * half..(r + 1) * half]);
            let (qpart, rest) = row.split_at_mut(qd);
            let (kpart, vpart) = rest.split_at_mut(kvd);
            if let Some((qn, kn, eps)) = qk_norm {
                for (part, w) in [(&mut *qpart, qn), (&mut *kpart, kn)] {
                    for chunk in part.chunks_exact_mut(hd) {
                        norm::rms_norm_row(chunk, w, eps, head);
                        chunk.copy_from_slice(head);
                    }
                }
            }
            if half > 0 {
                rope::rotate_row(qpart, heads.q_heads, hd, cos, sin);
                rope::rotate_row(kpart, heads.kv_heads, hd, cos, sin);
            }
            qrow.copy_from_slice(qpart);
            let slot = plan.seqs[plan.row_seq[r] as usize].kv_start + plan.positions[r] as usize;
            assert!((slot + 1) * kvd <= cache_len, "KV slot {slot} outside the arena");
            // SAFETY: in bounds (checked); every row of a pass has its own slot.
            unsafe {
                std::ptr::copy_nonoverlapping(kpart.as_ptr(), kc.0.add(slot * kvd), kvd);
                std::ptr::copy_nonoverlapping(vpart.as_ptr(), vc.0.add(slot * kvd), kvd);
            }
        };
        let scratch = || (vec![0f32; cols], vec![0f32; hd]);
        if qkv.rows * cols < residual::PAR_MIN_VALUES {
            let mut s = scratch();
            q.data.chunks_mut(qd).enumerate().for_each(|(r, qrow)| one(&mut s, r, qrow));
        } else {
            q.data.par_chunks_mut(qd).enumerate().for_each_init(scratch, |s, (r, qrow)| one(s, r, qrow));
        }
        Ok(())
    }

    fn attention(&self, pass: &CpuPass, q: &CpuAct, kv: &CpuKv, layer: usize, heads: Heads, alibi: Option<&[f32]>, out: &mut CpuAct) -> Result<()> {
        let l = kv.layer(layer);
        attention::attention(&q.data, &kv.k[l], &kv.v[l], heads, &pass.plan, alibi, &mut out.data);
        Ok(())
    }

    /// The gate/up GEMM with the activation in its epilogue ([`gemm::gemm_activation`]):
    /// bit-identical to the unfused default, without the `[rows, 2I]` round trip through
    /// `scratch`. f32 matrices only (bf16 ones, and any when `RESID_CPU_FUSED_MLP=0`, take the
    /// unfused path).
    fn mlp_input(&self, kind: MlpKind, x: &CpuAct, w: &CpuMatrix, b: Option<&F32Data>, scratch: &mut CpuAct, out: &mut CpuAct) -> Result<()> {
        let act = match kind {
            MlpKind::SwiGlu => gemm::Activation::SwiGlu,
            MlpKind::GeluTanh => gemm::Activation::GeluTanh,
        };
        if w.split.is_none() && fused_mlp() && gemm::gemm_activation(&x.data, x.rows, w.packed(), b.map(|b| &b[..]), act, &mut out.data) {
            return Ok(());
        }
        super::unfused_mlp_input(self, kind, x, w, b, scratch, out)
    }

    fn activation(&self, kind: MlpKind, input: &CpuAct, out: &mut CpuAct) -> Result<()> {
        let inter = out.cols;
        match kind {
            MlpKind::SwiGlu => {
                let one = |(o, gu): (&mut [f32], &[f32])| {
                    let (gate, up) = gu.split_at(inter);
                    vmath::swiglu_row(gate, up, o);
                };
                if out.data.len() < residual::PAR_MIN_VALUES {
                    out.data.chunks_mut(inter).zip(input.data.chunks(2 * inter)).for_each(one);
                } else {
                    out.data.par_chunks_mut(inter).zip(input.data.par_chunks(2 * inter)).for_each(one);
                }
            }
            MlpKind::GeluTanh => out.data.par_iter_mut().zip(input.data.par_iter()).for_each(|(o, &x)| *o = vmath::gelu_tanh(x)),
        }
        Ok(())
    }


    fn residual_step(
        &self,
        pass: &mut CpuPass,
        x: &mut CpuAct,
        norm: Norm<'_, F32Data>,
        normed: &mut CpuAct,
        steer: Option<&PointSteering>,
        capture_residual: Option<usize>,
        capture_normed: Option<usize>,
        post_ln: bool,
    ) -> Result<()> {
        let h = x.cols;
        if let Some(st) = steer {
            residual::steer_rows(&mut x.data, h, st);
        }
        if let (Some(slot), Some((buf, position))) = (capture_residual, pass.capture.as_mut()) {
            residual::capture_rows(&x.data, h, &pass.plan, buf, *position, slot);
        }
        apply_norm(&x.data, h, &norm, &mut normed.data);
        if let (Some(slot), Some((buf, position))) = (capture_normed, pass.capture.as_mut()) {
            residual::capture_rows(&normed.data, h, &pass.plan, buf, *position, slot);
        }
        if post_ln {
            x.data.copy_from_slice(&normed.data);
        }
        Ok(())
    }

    fn branch_step(
        &self,
        pass: &mut CpuPass,
        branch: &mut CpuAct,
        steer: Option<&PointSteering>,
        capture: Option<usize>,
        add_to: Option<&mut CpuAct>,
    ) -> Result<()> {
        let w = branch.cols;
        if let Some(st) = steer {
            residual::steer_rows(&mut branch.data, w, st);
        }
        if let (Some(slot), Some((buf, position))) = (capture, pass.capture.as_mut()) {
            residual::capture_rows(&branch.data, w, &pass.plan, buf, *position, slot);
        }
        if let Some(x) = add_to {
            // x + (x·Wᵀ + b): the GEMM epilogue's order when it accumulates, so capturing here
            // changes no other value.
            residual::add_rows(&mut x.data, &branch.data);
        }
        Ok(())
    }

    fn gather_rows(&self, x: &CpuAct, rows: &[usize]) -> Result<CpuAct> {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuAct { data, rows: rows.len(), cols: x.cols })
    }

    fn set_profiling(&self, on: bool) -> Result<()> {
        let mut marks = MARKS.lock().unwrap_or_else(|p| p.into_inner());
        *marks = on.then(|| {
            let mut m = WallMarks::default();
            m.mark("start");
            m
        });
        PROFILING.store(on, Ordering::Release);
        Ok(())
    }

    fn mark(&self, label: &'static str) {
        if PROFILING.load(Ordering::Acquire) {
            if let Some(m) = MARKS.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                m.mark(label);
            }
        }
    }

    fn take_profile(&self) -> Result<OpTimes> {
        let marks = MARKS.lock().unwrap_or_else(|p| p.into_inner());
        Ok(marks.as_ref().map(|m| m.times.clone()).unwrap_or_default())
    }

    fn matrix_bytes(&self, m: &CpuMatrix) -> usize {
        // What a pass streams: split matrices read their f32 panels only at outlier inputs.
        let bf16 = m.compute == Compute::Bf16 || m.split.is_some();
        m.rows.div_ceil(gemm::NR) * gemm::NR * m.cols * if bf16 { 2 } else { 4 }
    }

    fn copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        Ok(copy_bandwidth(bytes, reps))
    }
}

/// Memory copy bandwidth (bytes read + written per second) over rayon's threads: the best of
/// `reps` copies of `bytes` bytes, each thread copying its own contiguous part.
pub fn copy_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = (bytes / 8).max(1);
    let src: Vec<u64> = (0..n as u64).collect();
    let mut dst = vec![0u64; n];
    let parts = rayon::current_num_threads().max(1);
    let chunk = n.div_ceil(parts);
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) + 1 {
        let t = std::time::Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    2.0 * (n * 8) as f64 / best.max(1e-12)
}
