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
use crate::engine::sample::{sample_rows, SampleParams};
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

/// Whether the attention input fuses the rotary embedding and KV store into the QKV GEMM
/// (default), or, with `RESID_CPU_FUSED_ROPE=0`, runs them as two operations (same results).
fn fused_rope() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("RESID_CPU_FUSED_ROPE").as_deref() != Ok("0"))
}

/// Where one layer's attention input goes, head by head: the queries to their rows, keys and
/// values to each row's arena slot.
struct HeadStore<'a> {
    heads: Heads,
    bias: Option<&'a [f32]>,
    qk_norm: Option<(&'a [f32], &'a [f32], f32)>,
    rope: &'a rope::RopeRows,
    q: RowPtr,
    k: RowPtr,
    v: RowPtr,
    /// Each row's arena slot.
    slots: Vec<usize>,
    /// Slots of the value arena ([`attention::value_at`] lays each head's values out over them).
    value_slots: usize,
    /// AVX-512 present and the rotation (if any) pairs halves of a 64-wide head:
    /// [`rope::rotate_store_head64`] applies to heads of 64 values.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vector_store: bool,
}

impl<'a> HeadStore<'a> {
    fn new(pass: &'a CpuPass, bias: Option<&'a F32Data>, qk_norm: Option<(&'a F32Data, &'a F32Data, f32)>, heads: Heads, kv: &mut CpuKv, layer: usize, q: &mut CpuAct) -> Self {
        let plan = &pass.plan;
        let l = kv.layer(layer);
        let kvd = heads.kv_heads * heads.head_dim;
        let (value_slots, keys_len) = (kv.v[l].len() / kvd.max(1), kv.k[l].len());
        assert_eq!(q.data.len(), plan.rows() * heads.q_heads * heads.head_dim, "query rows");
        let slots = (0..plan.rows())
            .map(|r| {
                let slot = plan.seqs[plan.row_seq[r] as usize].kv_start + plan.positions[r] as usize;
                assert!(slot < value_slots && attention::key_cache_len(slot + 1, kvd) <= keys_len, "KV slot {slot} outside the arena");
                slot
            })
            .collect();
        HeadStore {
            heads,
            bias: bias.map(|b| &b[..]),
            qk_norm: qk_norm.map(|(qn, kn, eps)| (&qn[..], &kn[..], eps)),
            rope: &pass.rope,
            q: RowPtr(q.data.as_mut_ptr()),
            k: RowPtr(kv.k[l].as_mut_ptr()),
            v: RowPtr(kv.v[l].as_mut_ptr()),
            slots,
            value_slots,
            vector_store: gemm::isa() == gemm::Isa::Avx512 && matches!(pass.rope.half, 0 | 32),
        }
    }

    /// Columns of the QKV projection: (nq + 2·nkv)·hd.
    fn width(&self) -> usize {
        (self.heads.q_heads + 2 * self.heads.kv_heads) * self.heads.head_dim
    }

    /// Head h (Q heads, then K, then V) of row r of the QKV projection, `vals` (head_dim
    /// values, without bias): + bias, per-head RMSNorm (Q and K, Qwen3), rotation (Q and K),
    /// then stored. `tmp`: head_dim scratch values.
    ///
    /// # Safety
    /// r < rows, h < nq + 2·nkv, and no other thread stores head h of row r meanwhile.
    unsafe fn finish(&self, r: usize, h: usize, vals: &mut [f32], tmp: &mut [f32]) {
        let Heads { q_heads: nq, kv_heads: nkv, head_dim: hd } = self.heads;
        #[cfg(target_arch = "x86_64")]
        if let (Ok(head), None, None, true) = (<&[f32; 64]>::try_from(&*vals), self.bias, self.qk_norm, self.vector_store) {
            // The common case (no bias, no per-head norm, 64-wide heads) in vectors, the same
            // operations as below.
            let (cos, sin) = if h < nq + nkv { self.rope.row(r) } else { (&[][..], &[][..]) };
            if !(nq..nq + nkv).contains(&h) {
                return rope::rotate_store_head64(head, cos, sin, self.head_ptr(r, h));
            }
            rope::rotate_store_head64(head, cos, sin, tmp.as_mut_ptr());
            return self.store_key(r, h - nq, tmp);
        }
        if let Some(b) = self.bias {
            vals.iter_mut().zip(&b[h * hd..(h + 1) * hd]).for_each(|(x, b)| *x += b);
        }
        if h < nq + nkv {
            if let Some((qn, kn, eps)) = self.qk_norm {
                norm::rms_norm_row(vals, if h < nq { qn } else { kn }, eps, tmp);
                vals.copy_from_slice(tmp);
            }
            if self.rope.half > 0 {
                let (cos, sin) = self.rope.row(r);
                rope::rotate_row(vals, 1, hd, cos, sin);
            }
        }
        if (nq..nq + nkv).contains(&h) {
            return self.store_key(r, h - nq, vals);
        }
        std::ptr::copy_nonoverlapping(vals.as_ptr(), self.head_ptr(r, h), hd);
    }

    /// Stores key/value head g of row r (`key`: head_dim values) in its slot of the key cache,
    /// where the head's elements lie [`attention::KEY_BLOCK`] values apart.
    ///
    /// # Safety
    /// r < rows, g < nkv, and no other thread stores head g of row r meanwhile.
    unsafe fn store_key(&self, r: usize, g: usize, key: &[f32]) {
        let Heads { kv_heads: nkv, head_dim: hd, .. } = self.heads;
        // The arena was checked to hold slot r (`new`).
        attention::store_key(self.k.0, self.slots[r], nkv * hd, g * hd, &key[..hd]);
    }

    /// Where head h of row r goes: its row of q, or its place for the row's arena slot in the
    /// values.
    ///
    /// # Safety
    /// r < rows, h < nq + 2·nkv and not a key head (those are [`Self::store_key`]'s).
    unsafe fn head_ptr(&self, r: usize, h: usize) -> *mut f32 {
        let Heads { q_heads: nq, kv_heads: nkv, head_dim: hd } = self.heads;
        debug_assert!(!(nq..nq + nkv).contains(&h), "key heads are stored by store_key");
        if h < nq {
            self.q.0.add(r * nq * hd + h * hd)
        } else {
            self.v.0.add(attention::value_at(self.slots[r], self.value_slots, h - nq - nkv, hd))
        }
    }
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
        if x.packed {
            if self.split.is_none() && gemm::gemm_prepacked(&x.data, x.rows, exact, bias, &mut out.data, accumulate) {
                return;
            }
            // bf16 matrices take row-major activations (not met in a pass: see `packs_inputs`).
            return self.multiply(&CpuAct::new(x.row_major().into_owned(), x.rows, x.cols), b, out, accumulate, f32_rows);
        }
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
    /// `data` is in the f32 GEMM's packed layout ([`gemm::gemm_prepacked`]), not row-major, as
    /// `residual_step` writes a norm that only GEMMs read, `mlp_input` the activation for the
    /// down projection and `attention` its output for the o projection. [`CpuAct::row_major`] reads it either way.
    pub packed: bool,
}

impl CpuAct {
    fn new(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        CpuAct { data, rows, cols, packed: false }
    }

    /// The values as the fused GEMMs take them.
    fn input(&self) -> gemm::Input<'_> {
        if self.packed {
            gemm::Input::Packed(&self.data)
        } else {
            gemm::Input::Rows(&self.data)
        }
    }

    /// The values row-major, unpacked where they are packed.
    pub fn row_major(&self) -> std::borrow::Cow<'_, [f32]> {
        if !self.packed {
            return std::borrow::Cow::Borrowed(&self.data);
        }
        let mut rows = vec![0f32; self.data.len()];
        gemm::unpack_rows(&self.data, self.rows, self.cols, &mut rows);
        std::borrow::Cow::Owned(rows)
    }
}

impl Drop for CpuAct {
    fn drop(&mut self) {
        spare::SPARE.give(std::mem::take(&mut self.data));
    }
}

/// Buffers of dropped activations, kept for the next activations of the pass or of the next
/// pass, as PyTorch's caching allocator keeps device memory. glibc served each large activation
/// from fresh pages, from a worker thread's arena, and unmapped them when it was dropped (raising
/// its mmap and trim thresholds changed nothing): a 16-sequence decode step of SmolLM2 faulted
/// in its 3 MB of logits and its MLP buffer page by page, some 800 page faults, and each munmap
/// cost a TLB shootdown of the other thread (NOTES.md, 2026-12-06 19:48).
mod spare {
    use std::sync::Mutex;

    /// Smaller buffers come from malloc's free lists anyway.
    pub const MIN_LEN: usize = 1 << 14;
    /// A decode step holds two such buffers at once (the MLP's and the logits), a prefill pass
    /// a few more; more kept buffers only held memory.
    pub const MAX_BUFFERS: usize = 8;
    /// The bytes kept unless `RESID_CPU_SPARE_MB` says otherwise (0: none).
    pub const DEFAULT_MAX_BYTES: usize = 128 << 20;

    /// The activations' pool.
    pub static SPARE: Pool = Pool::new(None);

    fn max_bytes_from_env() -> usize {
        static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *BYTES.get_or_init(|| std::env::var("RESID_CPU_SPARE_MB").ok().and_then(|mb| mb.trim().parse::<usize>().ok()).map_or(DEFAULT_MAX_BYTES, |mb| mb << 20))
    }

    /// Kept buffers, up to [`MAX_BUFFERS`] and `max_bytes` (None: `RESID_CPU_SPARE_MB` or
    /// [`DEFAULT_MAX_BYTES`]).
    pub struct Pool {
        kept: Mutex<Vec<Vec<f32>>>,
        max_bytes: Option<usize>,
    }

    fn bytes(v: &Vec<f32>) -> usize {
        v.capacity() * std::mem::size_of::<f32>()
    }

    impl Pool {
        pub const fn new(max_bytes: Option<usize>) -> Self {
            Pool { kept: Mutex::new(Vec::new()), max_bytes }
        }

        fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Vec<f32>>> {
            // A panic elsewhere while it was held leaves the list consistent.
            self.kept.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// `len` zeros, in a kept buffer where one is large enough (the smallest such).
        pub fn zeroed(&self, len: usize) -> Vec<f32> {
            if len >= MIN_LEN {
                let mut kept = self.kept();
                let fit = kept.iter().enumerate().filter(|(_, v)| v.capacity() >= len).min_by_key(|(_, v)| v.capacity()).map(|(i, _)| i);
                // None fits: the largest grows (its pages reused, by mremap where glibc mapped
                // it), so that passes of growing rows do not each leave a set of buffers behind.
                let pick = fit.or_else(|| kept.iter().enumerate().max_by_key(|(_, v)| v.capacity()).map(|(i, _)| i));
                if let Some(i) = pick {
                    let mut v = kept.swap_remove(i);
                    drop(kept);
                    v.clear();
                    v.reserve_exact(len);
                    v.resize(len, 0.0);
                    return v;
                }
            }
            vec![0.0; len]
        }

        /// Keeps `v` for a later [`Pool::zeroed`], within the caps: past them the smallest
        /// buffers go.
        pub fn give(&self, v: Vec<f32>) {
            let max_bytes = self.max_bytes.unwrap_or_else(max_bytes_from_env);
            if v.capacity() < MIN_LEN || bytes(&v) > max_bytes {
                return;
            }
            let mut evicted = Vec::new();
            {
                let mut kept = self.kept();
                kept.push(v);
                // At most MAX_BUFFERS + 1 capacities to sum: no running tally to keep in step.
                while kept.len() > MAX_BUFFERS || kept.iter().map(bytes).sum::<usize>() > max_bytes {
                    let Some((i, _)) = kept.iter().enumerate().min_by_key(|(_, v)| v.capacity()) else { break };
                    evicted.push(kept.swap_remove(i));
                }
            }
            // Freed (unmapped) outside the lock.
            drop(evicted);
        }

        /// The capacities kept, smallest first.
        #[cfg(test)]
        pub fn capacities(&self) -> Vec<usize> {
            let mut c: Vec<usize> = self.kept().iter().map(Vec::capacity).collect();
            c.sort_unstable();
            c
        }
    }
}

pub struct CpuKv {
    stored_layers: usize,
    /// Per stored layer: the keys in blocks of [`attention::KEY_BLOCK`] slots ([`attention::key_at`]).
    k: Vec<LineAligned>,
    /// Per stored layer: the values, head by head (`[kv head][slot][head_dim]`, [`attention::value_at`]).
    v: Vec<LineAligned>,
}

/// Zeroed f32s whose first value starts a cache line: the KV caches. A `Vec<f32>` this large
/// comes from `mmap` through glibc, 16 bytes past a page, so every 64-byte vector of 16 cached
/// keys and every value row straddled two lines. Aligned, a decode step's QKV projection with its
/// rotary embedding and KV store took 161 instead of 244 µs a layer at 16 sequences and 249
/// instead of 371 at 32, and batched decode gained 3–11 % (Intel Xeon; NOTES.md, 2026-12-07).
/// Bits are unchanged.
struct LineAligned {
    buf: Vec<f32>,
    at: usize,
    len: usize,
}

impl LineAligned {
    fn zeroed(len: usize) -> Self {
        let buf = vec![0f32; len + 15];
        let at = buf.as_ptr().align_offset(64).min(15);
        LineAligned { buf, at, len }
    }
}

impl std::ops::Deref for LineAligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[self.at..self.at + self.len]
    }
}

impl std::ops::DerefMut for LineAligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.at..self.at + self.len]
    }
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

/// The rows at position 0.
fn sink_rows(plan: &BatchPlan) -> Vec<usize> {
    plan.positions.iter().enumerate().filter(|&(_, &p)| p == 0).map(|(r, _)| r).collect()
}

/// Whether GEMM inputs are written in the f32 kernels' packed layout: with f32 compute, where
/// every matrix is f32 and reads it without packing (bf16 matrices would unpack it again).
fn packs_inputs() -> bool {
    compute() == Compute::F32
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
    type Stats = std::convert::Infallible;

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
        Ok(CpuAct::new(spare::SPARE.zeroed(rows * cols), rows, cols))
    }

    fn act_from(&self, data: &[f32], rows: usize, cols: usize, _kind: ActKind) -> Result<CpuAct> {
        if data.len() != rows * cols {
            return Err(crate::error::Error::input(format!("{} values for a {rows}x{cols} activation", data.len())));
        }
        Ok(CpuAct::new(data.to_vec(), rows, cols))
    }

    fn kv(&self, stored_layers: usize, slots: usize, kv_dim: usize) -> Result<CpuKv> {
        Ok(CpuKv {
            stored_layers: stored_layers.max(1),
            k: (0..stored_layers.max(1)).map(|_| LineAligned::zeroed(attention::key_cache_len(slots, kv_dim))).collect(),
            v: (0..stored_layers.max(1)).map(|_| LineAligned::zeroed(slots * kv_dim)).collect(),
        })
    }

    fn kv_copy(&self, kv: &mut CpuKv, heads: Heads, from: usize, to: usize, len: usize) -> Result<()> {
        let (kvd, hd) = (heads.kv_heads * heads.head_dim, heads.head_dim);
        let slots = kv.v.first().map_or(0, |v| v.len() / kvd.max(1));
        if from.max(to) + len > slots || from.abs_diff(to) < len {
            return Err(crate::error::Error::input(format!("KV copy of {len} slots from {from} to {to} in an arena of {slots}")));
        }
        for (k, v) in kv.k.iter_mut().zip(kv.v.iter_mut()) {
            // A slot's keys are strided by the block (`attention::key_at`); its values lie in
            // one run per head (`attention::value_at`).
            for i in 0..len {
                let (src, dst) = (attention::key_at(from + i, kvd, 0, 1), attention::key_at(to + i, kvd, 0, 1));
                for e in 0..kvd {
                    k[dst + e * attention::KEY_BLOCK] = k[src + e * attention::KEY_BLOCK];
                }
            }
            for g in 0..heads.kv_heads {
                let src = attention::value_at(from, slots, g, hd);
                v.copy_within(src..src + len * hd, attention::value_at(to, slots, g, hd));
            }
        }
        Ok(())
    }

    fn to_host(&self, a: &CpuAct) -> Result<Vec<f32>> {
        Ok(a.row_major().into_owned())
    }

    /// The trait's picks, from the logits where they are (no copy: 3 MB for 16 rows of a
    /// 49,152-token vocabulary).
    fn sample(&self, logits: &CpuAct, params: &[SampleParams]) -> Result<Vec<u32>> {
        sample_rows(&logits.row_major(), params)
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
        Ok(CpuPass { plan: plan.clone(), sink_rows: sink_rows(plan), rope: rope::rope_rows(inv_freq, &plan.positions), capture })
    }

    // Steering is read from each point's plan in `residual_step`, as in `begin_pass`.
    fn narrow_pass(&self, pass: &mut CpuPass, plan: &BatchPlan, rows: &[usize], _steering: &[Option<PointSteering<'_>>]) -> Result<bool> {
        pass.rope = pass.rope.select(rows);
        pass.sink_rows = sink_rows(plan);
        pass.plan = plan.clone();
        Ok(true)
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
        let hd = heads.head_dim;
        let dst = HeadStore::new(pass, bias, qk_norm, heads, kv, layer, q);
        let cols = qkv.cols;
        assert_eq!(cols, dst.width(), "QKV projection columns");
        // One row: each head copied out of the projection, finished and stored.
        let one = |head: &mut (Vec<f32>, Vec<f32>), r: usize| {
            let (vals, tmp) = head;
            for (h, src) in qkv.data[r * cols..(r + 1) * cols].chunks_exact(hd).enumerate() {
                vals.copy_from_slice(src);
                // SAFETY: row r's heads are written by this call only.
                unsafe { dst.finish(r, h, vals, tmp) };
            }
        };
        let scratch = || (vec![0f32; hd], vec![0f32; hd]);
        if qkv.rows * cols < residual::PAR_MIN_VALUES {
            let mut s = scratch();
            (0..qkv.rows).for_each(|r| one(&mut s, r));
        } else {
            (0..qkv.rows).into_par_iter().for_each_init(scratch, one);
        }
        Ok(())
    }

    /// The QKV GEMM with the rotary embedding and KV store in its epilogue
    /// ([`gemm::gemm_heads`]): each task finishes whole heads of 64 columns (two panels, which
    /// in HF's `rotate_half` layout hold a head's two halves) from an L1 tile and stores them,
    /// without the `[rows, (nq + 2·nkv)·hd]` round trip through `scratch`. Bit-identical to the
    /// unfused default (the same per-head finishing). f32 and bf16 matrices, with head_dim 64
    /// only; others, and any when `RESID_CPU_FUSED_ROPE=0`, take the unfused path.
    fn attention_input(&self, pass: &CpuPass, x: &CpuAct, input: super::AttentionInput<'_, Self>, kv: &mut CpuKv, layer: usize, scratch: &mut CpuAct, q: &mut CpuAct) -> Result<()> {
        let (heads, w) = (input.heads, input.qkv);
        let rotary = pass.rope.half == 0 || 2 * pass.rope.half == heads.head_dim;
        if fused_rope() && w.split.is_none() && heads.head_dim == 2 * gemm::NR && rotary {
            let dst = HeadStore::new(pass, input.bias, input.qk_norm, heads, kv, layer, q);
            assert_eq!(w.rows, dst.width(), "QKV projection rows");
            let fused = gemm::gemm_heads(x.input(), x.rows, w.packed(), &|r, h, vals| {
                let mut tmp = [0f32; 2 * gemm::NR];
                // SAFETY: head h of row r is handed to one task once.
                unsafe { dst.finish(r, h, vals, &mut tmp) }
            });
            if fused {
                return Ok(());
            }
        }
        super::unfused_attention_input(self, pass, x, input, kv, layer, scratch, q)
    }

    fn attention(&self, pass: &CpuPass, q: &CpuAct, kv: &CpuKv, layer: usize, heads: Heads, alibi: Option<&[f32]>, out: &mut CpuAct) -> Result<()> {
        let l = kv.layer(layer);
        // Written packed for the o projection, which then skips its packing; `branch_step` (hook_z)
        // and `gather_rows` read it row-major.
        out.packed = packs_inputs();
        let layout = if out.packed { gemm::OutLayout::Packed } else { gemm::OutLayout::Rows };
        attention::attention_into(&q.data, &kv.k[l], &kv.v[l], heads, &pass.plan, alibi, &mut out.data, layout);
        Ok(())
    }

    /// The gate/up GEMM with the activation in its epilogue ([`gemm::gemm_activation`]):
    /// bit-identical to the unfused default, without the `[rows, 2I]` round trip through
    /// `scratch`, and leaving `out` packed for `down_projection` (which alone reads it) when the
    /// compute is f32. f32 and bf16 matrices (bf16: row-major output); split ones, and any when
    /// `RESID_CPU_FUSED_MLP=0`, take the unfused path.
    fn mlp_input(&self, kind: MlpKind, x: &CpuAct, w: &CpuMatrix, b: Option<&F32Data>, scratch: &mut CpuAct, out: &mut CpuAct) -> Result<()> {
        let act = match kind {
            MlpKind::SwiGlu => gemm::Activation::SwiGlu,
            MlpKind::GeluTanh => gemm::Activation::GeluTanh,
        };
        // bf16 GEMMs (AMX) read row-major inputs, not the f32 kernels' packed layout.
        let layout = if packs_inputs() { gemm::OutLayout::Packed } else { gemm::OutLayout::Rows };
        if w.split.is_none() && fused_mlp() && gemm::gemm_activation(x.input(), x.rows, w.packed(), b.map(|b| &b[..]), act, &mut out.data, layout) {
            out.packed = layout == gemm::OutLayout::Packed;
            return Ok(());
        }
        out.packed = false;
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
        normed.packed = packs_inputs() && capture_normed.is_none() && !post_ln;
        if normed.packed {
            // Only GEMMs read it: written packed as they read it, not packed again by each.
            gemm::pack_rows_with(normed.rows, h, &mut normed.data, &|r, out| apply_norm(&x.data[r * h..(r + 1) * h], h, &norm, out));
        } else {
            apply_norm(&x.data, h, &norm, &mut normed.data);
        }
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
        if branch.packed {
            // Attention's output, written packed for the o projection: steered and captured row-major.
            branch.data = branch.row_major().into_owned();
            branch.packed = false;
        }
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
        let mut data = vec![0f32; rows.len() * x.cols];
        for (out, &r) in data.chunks_mut(x.cols.max(1)).zip(rows) {
            if x.packed {
                gemm::unpack_row(&x.data, x.rows, r, out);
            } else {
                out.copy_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
            }
        }
        Ok(CpuAct::new(data, rows.len(), x.cols))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{unfused_attention_input, unfused_mlp_input, AttentionInput};
    use crate::model::weights::{MatrixSource, SourcePart};
    use std::sync::Arc;
    use gemm::tests::pseudo as values;

    /// A kept buffer comes back for a request it fits, the smallest that fits, zeroed and of
    /// the length asked, or the largest grown where none fits; a small one is not kept.
    #[test]
    fn spare_buffers_come_back_zeroed_best_fit_first() {
        let pool = spare::Pool::new(Some(spare::DEFAULT_MAX_BYTES));
        let (min, big) = (spare::MIN_LEN, 4 * spare::MIN_LEN);
        pool.give(vec![7.0; min - 1]);
        assert!(pool.capacities().is_empty(), "a buffer under MIN_LEN is not kept");
        let dirty = vec![f32::NAN; 2 * min];
        let dirty_at = dirty.as_ptr();
        pool.give(dirty);
        pool.give(vec![3.0; big]);
        let v = pool.zeroed(min + 1);
        assert_eq!(v.as_ptr(), dirty_at, "the smallest buffer that fits");
        assert_eq!(v.len(), min + 1);
        assert!(v.iter().all(|&x| x.to_bits() == 0), "zeroed, not the previous values");
        assert_eq!(pool.capacities(), vec![big]);
        let grown = pool.zeroed(big + 1);
        assert_eq!(grown.len(), big + 1);
        assert!(grown.iter().all(|&x| x.to_bits() == 0));
        assert!(pool.capacities().is_empty(), "none fits: the largest grows");
        assert_eq!(pool.zeroed(min).len(), min, "none kept: a new buffer");
    }

    /// Past MAX_BUFFERS or the byte cap the smallest buffers go; one over the cap, or any with
    /// a cap of 0, is not kept.
    #[test]
    fn spare_pool_keeps_within_its_caps() {
        let cap = 64 * spare::MIN_LEN * 4;
        let pool = spare::Pool::new(Some(cap));
        for i in 0..spare::MAX_BUFFERS + 2 {
            pool.give(Vec::with_capacity(spare::MIN_LEN + i));
        }
        let kept = pool.capacities();
        assert_eq!(kept.len(), spare::MAX_BUFFERS);
        assert_eq!(kept[0], spare::MIN_LEN + 2, "the two smallest went");
        // Capacity is never touched: no memory is committed for these.
        // With room for the largest small one beside it.
        pool.give(Vec::with_capacity(cap / 4 - 2 * spare::MIN_LEN));
        assert_eq!(pool.capacities(), vec![spare::MIN_LEN + spare::MAX_BUFFERS + 1, cap / 4 - 2 * spare::MIN_LEN], "the smaller ones went to fit it");
        pool.give(Vec::with_capacity(cap / 4 + 1));
        assert_eq!(pool.capacities().len(), 2, "over the cap: not kept");
        let off = spare::Pool::new(Some(0));
        off.give(vec![1.0; spare::MIN_LEN]);
        assert!(off.capacities().is_empty(), "a cap of 0 keeps nothing");
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// `x` in the f32 GEMM's packed layout, as `residual_step` writes a norm.
    fn packed(x: &CpuAct) -> CpuAct {
        let mut data = vec![f32::NAN; x.data.len()];
        gemm::pack_rows_with(x.rows, x.cols, &mut data, &|r, out| out.copy_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]));
        CpuAct { data, rows: x.rows, cols: x.cols, packed: true }
    }

    /// A norm that only GEMMs read is written packed (f32 compute), its values those of the
    /// row-major norm; with `post_ln` (the residual continues from it) it stays row-major.
    #[test]
    fn residual_step_writes_a_norm_packed_only_for_gemms() {
        let be = CpuBackend;
        let hidden = 40;
        let weight = F32Data::Owned(values(hidden, 8).iter().map(|v| 1.0 + v).collect());
        let bias = F32Data::Owned(values(hidden, 9));
        for long in [0, 37] {
            let plan = plan(long);
            let rows = plan.rows();
            let x0 = values(rows * hidden, 10);
            for (kind, bias) in [(NormKind::Rms, None), (NormKind::Layer, Some(&bias))] {
                let norm = || Norm { kind, weight: &weight, bias, eps: 1e-5 };
                let mut want = vec![0f32; rows * hidden];
                apply_norm(&x0, hidden, &norm(), &mut want);
                for post_ln in [false, true] {
                    let mut pass = be.begin_pass(&plan, &[], None, &[], hidden).unwrap();
                    let mut x = be.act_from(&x0, rows, hidden, ActKind::Residual).unwrap();
                    let mut normed = be.act(rows, hidden, ActKind::Hidden).unwrap();
                    be.residual_step(&mut pass, &mut x, norm(), &mut normed, None, None, None, post_ln).unwrap();
                    let case = format!("{kind:?} post_ln {post_ln} {rows} rows");
                    assert_eq!(normed.packed, !post_ln && compute() == Compute::F32, "{case}");
                    assert!(same_bits(&be.to_host(&normed).unwrap(), &want), "{case}");
                    if normed.packed {
                        assert!(!same_bits(&normed.data, &want), "{case}: packed is not row-major");
                    }
                    // The rows the LM head reads.
                    let pick = [rows - 1, 0, 2];
                    let gathered = be.gather_rows(&normed, &pick).unwrap();
                    let want_rows: Vec<f32> = pick.iter().flat_map(|&r| want[r * hidden..(r + 1) * hidden].to_vec()).collect();
                    assert!(!gathered.packed && same_bits(&gathered.data, &want_rows), "{case}: gathered rows");
                }
            }
        }
    }

    /// A pass over three sequences (one with cached tokens) in an arena with gaps: 3 rows (the
    /// few-row kernels) or 40 (tiles and row blocks).
    fn plan(long: usize) -> BatchPlan {
        BatchPlan::new(&[2, long, 1], &[0, 3, 7], &[100, 0, 60])
    }

    /// Each row's key and value heads land in its slot as attention reads them: the keys in
    /// [`attention::block_keys`]' layout, the values in [`attention::head_values`]'; slots start
    /// inside and at the start of a key block; heads of 64 (stored in vectors) and 20 values.
    #[test]
    fn stored_heads_land_where_attention_reads_them() {
        let be = CpuBackend;
        for hd in [64, 20] {
            let heads = Heads { q_heads: 4, kv_heads: 2, head_dim: hd };
            let (qd, kvd) = (4 * hd, 2 * hd);
            let plan = plan(37);
            let rows = plan.rows();
            // No rotation, bias or norm: the stored heads are the projection's columns.
            let pass = be.begin_pass(&plan, &[], None, &[], 8).unwrap();
            let qkv = be.act_from(&values(rows * (qd + 2 * kvd), 6), rows, qd + 2 * kvd, ActKind::Hidden).unwrap();
            let slots = 160;
            let mut kv = be.kv(1, slots, kvd).unwrap();
            let mut q = be.act(rows, qd, ActKind::Hidden).unwrap();
            be.rope_store_kv(&pass, &qkv, None, None, heads, &mut kv, 0, &mut q).unwrap();
            let (mut keys, mut vals) = (vec![0f32; slots * kvd], vec![0f32; slots * kvd]);
            for r in 0..rows {
                let slot = plan.seqs[plan.row_seq[r] as usize].kv_start + plan.positions[r] as usize;
                let row = &qkv.data[r * (qd + 2 * kvd)..(r + 1) * (qd + 2 * kvd)];
                keys[slot * kvd..(slot + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
                vals[slot * kvd..(slot + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
            }
            assert!(same_bits(&kv.k[0], &attention::block_keys(&keys, kvd)), "keys, head_dim {hd}");
            assert!(same_bits(&kv.v[0], &attention::head_values(&vals, 2, hd)), "values, head_dim {hd}");
        }
    }

    /// Every layer's key and value caches start a cache line, zeroed, of the lengths asked for,
    /// whatever the allocator returned (sizes below and above glibc's mmap threshold, and none).
    #[test]
    fn kv_caches_start_cache_lines() {
        for (slots, kvd) in [(0, 192), (3, 20), (160, 128), (4096, 192)] {
            let kv = CpuBackend.kv(3, slots, kvd).unwrap();
            for (name, caches, len) in [("keys", &kv.k, attention::key_cache_len(slots, kvd)), ("values", &kv.v, slots * kvd)] {
                for cache in caches {
                    assert_eq!(cache.as_ptr() as usize % 64, 0, "{name} of {slots} slots of {kvd}");
                    assert_eq!(cache.len(), len, "{name} of {slots} slots of {kvd}");
                    assert!(cache.iter().all(|&x| x == 0.0), "{name} of {slots} slots of {kvd}");
                }
            }
        }
    }

    /// The fused attention input (QKV GEMM, then bias, Q/K norm, rotation and KV store in its
    /// epilogue) against the unfused default, bit for bit: queries and both arenas, with and
    /// without bias and Qwen3's Q/K norm, rotary and ALiBi (no rotation), GQA and MHA, on 1–3
    /// threads.
    #[test]
    fn fused_attention_input_is_the_unfused_result() {
        let be = CpuBackend;
        let hidden = 72;
        let pools: Vec<_> = [1, 2, 3].iter().map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()).collect();
        for (nq, nkv, with_bias, with_norm, rotary) in [(3, 1, false, false, true), (2, 2, true, false, true), (4, 2, true, true, true), (2, 1, true, false, false)] {
            let heads = Heads { q_heads: nq, kv_heads: nkv, head_dim: 64 };
            let (qd, kvd) = (nq * 64, nkv * 64);
            let n = qd + 2 * kvd;
            let w = be.weight_matrix(&MatrixSource::from_values(values(n * hidden, 1), n, hidden).unwrap()).unwrap();
            let bias = with_bias.then(|| F32Data::Owned(values(n, 2)));
            let (qn, kn) = (F32Data::Owned(values(64, 3).iter().map(|v| 1.0 + v).collect()), F32Data::Owned(values(64, 4).iter().map(|v| 1.0 + v).collect()));
            let inv_freq: Vec<f32> = if rotary { (0..32).map(|i| 1.0 / 10000f32.powf(i as f32 / 32.0)).collect() } else { Vec::new() };
            for long in [0, 37] {
                let plan = plan(long);
                let rows = plan.rows();
                let pass = be.begin_pass(&plan, &inv_freq, None, &[], hidden).unwrap();
                let x = be.act_from(&values(rows * hidden, 5), rows, hidden, ActKind::Hidden).unwrap();
                let input = || AttentionInput::<CpuBackend> { qkv: &w, bias: bias.as_ref(), qk_norm: with_norm.then_some((&qn, &kn, 1e-6)), heads };
                let xp = packed(&x);
                let run = |fused: bool, x: &CpuAct| {
                    let mut kv = be.kv(2, 160, kvd).unwrap();
                    let (mut scratch, mut q) = (be.act(rows, n, ActKind::Hidden).unwrap(), be.act(rows, qd, ActKind::Hidden).unwrap());
                    if fused {
                        be.attention_input(&pass, x, input(), &mut kv, 1, &mut scratch, &mut q).unwrap();
                    } else {
                        unfused_attention_input(&be, &pass, x, input(), &mut kv, 1, &mut scratch, &mut q).unwrap();
                    }
                    (std::mem::take(&mut q.data), kv.k[1].to_vec(), kv.v[1].to_vec())
                };
                let want = run(false, &x);
                assert!(want.1.iter().any(|&v| v != 0.0));
                for pool in &pools {
                    // Row-major and packed input (as a norm writes it), fused and not.
                    for (fused, x, layout) in [(true, &x, "rows"), (true, &xp, "packed"), (false, &xp, "packed")] {
                        let got = pool.install(|| run(fused, x));
                        let case = format!("fused {fused} {layout} nq {nq} nkv {nkv} bias {with_bias} norm {with_norm} rotary {rotary}, {rows} rows, {} threads", pool.current_num_threads());
                        assert!(same_bits(&got.0, &want.0), "queries: {case}");
                        assert!(same_bits(&got.1, &want.1), "keys: {case}");
                        assert!(same_bits(&got.2, &want.2), "values: {case}");
                    }
                }
            }
        }
    }

    /// The fused MLP input against the unfused default, bit for bit, through the backend: a
    /// stacked `[gate; up]` as the loader makes it (halves off panel boundaries for I = 40),
    /// with and without bias, and GELU.
    #[test]
    fn fused_mlp_input_is_the_unfused_result() {
        let be = CpuBackend;
        let hidden = 50;
        for inter in [40, 64] {
            let part = |seed| SourcePart::Values(Arc::new(values(inter * hidden, seed)));
            let swiglu = be.weight_matrix(&MatrixSource::stacked(vec![part(1), part(2)], hidden).unwrap()).unwrap();
            let gelu = be.weight_matrix(&MatrixSource::from_values(values(inter * hidden, 3), inter, hidden).unwrap()).unwrap();
            let down = be.weight_matrix(&MatrixSource::from_values(values(hidden * inter, 6), hidden, inter).unwrap()).unwrap();
            for rows in [1, 3, 30] {
                let x = be.act_from(&values(rows * hidden, 4), rows, hidden, ActKind::Hidden).unwrap();
                let xp = packed(&x);
                for (kind, w, width) in [(MlpKind::SwiGlu, &swiglu, 2 * inter), (MlpKind::GeluTanh, &gelu, inter)] {
                    for bias in [None, Some(F32Data::Owned(values(width, 5)))] {
                        // The activation, and the down projection that reads it (packed when fused).
                        let run = |fused: bool, x: &CpuAct| {
                            let (mut scratch, mut out) = (be.act(rows, width, ActKind::Hidden).unwrap(), be.act(rows, inter, ActKind::Hidden).unwrap());
                            if fused {
                                be.mlp_input(kind, x, w, bias.as_ref(), &mut scratch, &mut out).unwrap();
                            } else {
                                unfused_mlp_input(&be, kind, x, w, bias.as_ref(), &mut scratch, &mut out).unwrap();
                            }
                            let mut y = be.act_from(&values(rows * hidden, 7), rows, hidden, ActKind::Hidden).unwrap();
                            be.linear(&out, &down, None, &mut y, true).unwrap();
                            (out.packed, be.to_host(&out).unwrap(), std::mem::take(&mut y.data))
                        };
                        let want = run(false, &x);
                        assert!(!want.0);
                        for (fused, x, layout) in [(true, &x, "rows"), (true, &xp, "packed"), (false, &xp, "packed")] {
                            let got = run(fused, x);
                            let case = format!("fused {fused} {layout} {kind:?} I {inter} rows {rows} bias {}", bias.is_some());
                            assert_eq!(got.0, fused, "activation packed: {case}");
                            assert!(same_bits(&got.1, &want.1), "activation: {case}");
                            assert!(same_bits(&got.2, &want.2), "down projection: {case}");
                        }
                    }
                }
            }
        }
    }
}
