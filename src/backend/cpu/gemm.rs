//! `y = x · Wᵀ (+ b)` for row-major activations x [T, K] and HF-layout weights W [N, K].
//!
//! Weights are repacked once into K-major panels of [`NR`] = 32 output columns
//! (`panel[p][k][j] = W[32p + j, k]`, zero-padded, 64-byte aligned), so a microkernel streams a
//! panel contiguously while it broadcasts activations. Register-blocked microkernels exist per
//! instruction set, chosen at run time: AVX-512F (6 tokens × 64 columns, two panels at once),
//! AVX2+FMA (3 × 32, or 1 × 64), a portable `mul_add` loop for other CPUs, and AVX512-BF16
//! (`vdpbf16ps`: bf16 weights and activations, f32 accumulation) for the bf16 compute path.
//!
//! **One order per output element.** Every `y[t, n]` is one fused-multiply-add chain over
//! k = 0, 1, …, K−1 (f32), or over k-pairs (bf16), started from zero; then `+ b[n]`, then
//! `y + ·` when accumulating. Which tokens share a register block, how many panels a kernel
//! handles at once, how the work is split between threads and the thread count never change
//! that chain, so a sentence's activations are bit-identical whatever shares its batch and
//! however many threads run. In f32, the AVX-512, AVX2 and portable paths even agree bit for bit
//! (they issue the same FMA chain); the bf16 path differs (it rounds its inputs).
//!
//! **Fused epilogues** ([`gemm_activation`], [`gemm_heads`]): a task computes a unit of one or
//! two panels (SwiGLU's gate panel with its up panel, a 64-column attention head) for 24 rows at
//! a time into an L1 tile and finishes them from there (activation; bias, norm, rotation, KV
//! store), so the GEMM's output never goes out to memory and back. Same chains, same results.
//! bf16 matrices fuse on AMX ([`amx::fused`]: blocks of up to 32 rows, row-major output only).
//!
//! Activations are packed once per call into micro-panels (`[k][mr]`: 6 rows on AVX-512 through
//! masked permutes, 3 on AVX2, 4 portable, 8 in bf16 through 8×8 transposes), so a kernel reads
//! one contiguous activation stream beside its weight streams. A producer that only feeds f32
//! GEMMs writes that layout itself ([`pack_rows_with`] for a norm, [`OutLayout::Packed`] for
//! the MLP activation, [`packed_row`] and [`pack_micro_panel`] for attention's output), and they skip the packing ([`Input::Packed`], [`gemm_prepacked`]). Work is split along
//! N (panel groups) and along T (blocks of rows sized to stay in L2) over rayon's persistent
//! pool. The packed activations (and, for bf16, the converted ones) live in per-thread scratch
//! buffers that are reused: nothing is allocated per call once they have grown.
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
pub mod amx;

/// How far ahead of its loads, in panel rows (128 bytes each), the one- and two-row f32 kernels
/// (decode, which streams every weight once) issue a prefetch: `None` for no prefetch. Chosen by
/// vendor, by measurement (NOTES.md, 2026-12-05), once per process:
/// - Intel Xeon (family 6 model 167): 16 rows ahead. It helped only while the VM's memory
///   bandwidth was throttled (0.96–1.09 of the copy-bandwidth limit against 0.80–0.89; 8 and 24
///   rows less), and was neutral within noise at full bandwidth.
/// - AMD EPYC Zen 4 (family 25 model 17): 0, a prefetch of the row just loaded. In decode steps
///   interleaved one by one, that was 2–4 % faster than no prefetch, and 2–9 % faster than
///   prefetching 2, 4, 8 or 16 rows ahead.
///
/// `RESID_CPU_DECODE_PREFETCH=ROWS` (or `none`) overrides it, for comparisons.
pub fn decode_prefetch_rows() -> Option<usize> {
    static ROWS: OnceLock<Option<usize>> = OnceLock::new();
    *ROWS.get_or_init(|| prefetch_policy(std::env::var("RESID_CPU_DECODE_PREFETCH").ok().as_deref(), || Some(if cpu_vendor() == "AuthenticAMD" { 0 } else { 16 })))
}

/// The same for the f32 kernels of three rows and more. Each panel's first micro-panel streams
/// it from memory (the later ones find it in L2), and a few-row GEMM is little more than that
/// first micro-panel, so batched decode waited on memory: on an Intel Xeon (family 6 model 167)
/// the gate/up GEMM of a 16-sequence step read its weights at 15 GB/s, against 23 for batch 1.
/// Chosen by vendor, by measurement (NOTES.md, 2026-12-06 17:28):
/// - Intel: 8 rows ahead. Decode steps of 4–32 sequences 5–20 % faster (4, 8 and 12 rows ahead
///   alike), extraction 2–4 % faster.
/// - AMD EPYC Zen 4 (family 25 model 17): none. 8 rows ahead made 4-sequence decode steps 12 %
///   slower (six alternated rounds), and 8–32 sequences and extraction moved within 2 %
///   (NOTES.md, 2026-12-07 13:35).
///
/// `RESID_CPU_PANEL_PREFETCH=ROWS` (or `none`) overrides it, for comparisons.
pub fn panel_prefetch_rows() -> Option<usize> {
    static ROWS: OnceLock<Option<usize>> = OnceLock::new();
    *ROWS.get_or_init(|| prefetch_policy(std::env::var("RESID_CPU_PANEL_PREFETCH").ok().as_deref(), || if cpu_vendor() == "AuthenticAMD" { None } else { Some(8) }))
}

/// Whether the AVX-512 f32 GEMM takes blocks of 13–66 rows (3–11 micro-panels, as batched
/// decode and short prompts give) in chunks of [`K_CHUNK`] panel rows, every micro-panel over a
/// chunk while it is in L1 and prefetching the next ([`simd512`]'s `f32_block_chunked`). Whole
/// micro-panels one after another left memory idle: the first streamed each panel, the others
/// then computed from L2, so a 16-row GEMM with its weights cycled from memory took the time of
/// a 1-row GEMM plus that of the same GEMM in cache. Chosen by vendor, by measurement (NOTES.md,
/// 2026-12-06 19:48):
/// - Intel Xeon (family 6 model 167): on. Decode steps of 16 sequences 5–13 % faster, of 32
///   6–11 %, bit-identical; at 2 micro-panels (7–12 rows) the fused gate/up GEMM was slower,
///   hence from 3; blocks of a larger fused GEMM (extraction) find their panels in L2 and lost
///   10 % so, hence only few-row GEMMs (see `block_f32`).
/// - AMD EPYC Zen 4 (family 25 model 17): off. Decode steps of 16 and 32 sequences were within
///   2 % either way over eight alternated rounds (NOTES.md, 2026-12-07 13:35).
///
/// `RESID_CPU_K_CHUNKS=on|off` overrides it, for comparisons.
pub fn k_chunks() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| on_off_policy(std::env::var("RESID_CPU_K_CHUNKS").ok().as_deref(), || cpu_vendor() != "AuthenticAMD"))
}

/// Whether the AVX-512 kernels (f32, and AVX512-BF16) of a few-row GEMM (more than one
/// micro-panel, at most [`K_CHUNK_MAX_ROWS`] rows: batched decode, short prompts) prefetch the
/// task's next unit of panels into L2 while they compute the current one (see
/// [`prefetched_next`] for which units). Without it, each unit's first micro-panel streamed its
/// panels from memory at memory speed and the others then computed from L2 with memory idle:
/// SmolLM2-135M's gate/up GEMM of 16 rows took 283 µs with its weights in cache and 400–460
/// streamed. Chosen by vendor, by measurement (NOTES.md, 2026-12-07 19:48):
/// - AMD EPYC Zen 4 (family 25 model 17): on. f32 decode steps of 16 sequences 22 % faster
///   (medians of five alternated rounds), of 32 19 %, of 8 7 %; bf16 steps of 8 and 16
///   sequences 10–12 %; bit-identical.
/// - Intel Xeon: off, not measured there ([`k_chunks`] overlaps memory with compute there
///   above 12 rows).
///
/// `RESID_CPU_NEXT_PREFETCH=on|off` overrides it, for comparisons.
pub fn next_unit_prefetch() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| on_off_policy(std::env::var("RESID_CPU_NEXT_PREFETCH").ok().as_deref(), || cpu_vendor() == "AuthenticAMD"))
}

/// Panel rows per chunk of [`k_chunks`]: 16, 24, 32 and 48 measured alike, 16 a little ahead.
pub const K_CHUNK: usize = 16;
/// Rows up to which a GEMM's blocks may be taken in chunks (11 micro-panels of 6).
pub const K_CHUNK_MAX_ROWS: usize = 66;

/// `on` or `off` from an override, else the vendor's default.
fn on_off_policy(setting: Option<&str>, by_vendor: impl Fn() -> bool) -> bool {
    match setting {
        Some("on") => true,
        Some("off") => false,
        _ => by_vendor(),
    }
}

/// A prefetch distance from an override (`none` or a row count), else the vendor's default.
fn prefetch_policy(setting: Option<&str>, by_vendor: impl Fn() -> Option<usize>) -> Option<usize> {
    match setting {
        Some("none") => None,
        Some(rows) => rows.parse().ok().or_else(by_vendor),
        None => by_vendor(),
    }
}

/// Output columns per packed panel.
pub const NR: usize = 32;

/// Arithmetic of a packed matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    /// f32 weights and activations, f32 FMA (HF parity ≤ 1e-4).
    F32,
    /// bf16 weights and activations (round to nearest even), f32 accumulation (AVX512-BF16).
    Bf16,
}

impl Compute {
    pub fn name(self) -> &'static str {
        match self {
            Compute::F32 => "f32",
            Compute::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Compute {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Compute::F32),
            "bf16" | "bfloat16" => Ok(Compute::Bf16),
            other => Err(format!("unknown compute type `{other}` (expected f32 or bf16)")),
        }
    }
}

/// The f32 microkernel family in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512f",
            Isa::Avx2 => "avx2+fma",
            Isa::Portable => "portable",
        }
    }
}

fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// The f32 kernels used: the best the CPU has, or lower when `RESID_CPU_ISA` names
/// `avx2` or `portable` (for tests and comparisons; a request above the CPU is ignored).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detect_isa();
        let rank = |i: Isa| match i {
            Isa::Portable => 0,
            Isa::Avx2 => 1,
            Isa::Avx512 => 2,
        };
        let asked = match std::env::var("RESID_CPU_ISA").ok().as_deref() {
            Some("portable") => Some(Isa::Portable),
            Some("avx2") => Some(Isa::Avx2),
            Some("avx512") | Some("avx512f") => Some(Isa::Avx512),
            _ => None,
        };
        match asked {
            Some(a) if rank(a) <= rank(best) => a,
            _ => best,
        }
    })
}

/// Whether the CPU has AVX512-BF16 dot products (the bf16 compute path).
pub fn has_bf16() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// The bf16 GEMM kernels a CPU can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`tdpbf16ps`): Intel Xeon from Sapphire Rapids on.
    Amx,
    /// AVX512-BF16 dot products (`vdpbf16ps`).
    Avx512Bf16,
}

impl Bf16Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "amx-bf16",
            Bf16Kernel::Avx512Bf16 => "avx512bf16",
        }
    }
}

/// The bf16 kernel of this process: AMX where the CPU and the OS offer it, else AVX512-BF16,
/// else none. `RESID_CPU_BF16_KERNEL=avx512bf16` picks AVX512-BF16 on an AMX CPU (for
/// comparisons); the choice is made once, so that every row of every batch takes one path.
pub fn bf16_kernel() -> Option<Bf16Kernel> {
    static KERNEL: OnceLock<Option<Bf16Kernel>> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        if !has_bf16() || isa() != Isa::Avx512 {
            return None;
        }
        #[cfg(target_arch = "x86_64")]
        {
            let asked = std::env::var("RESID_CPU_BF16_KERNEL").ok();
            if asked.as_deref() != Some("avx512bf16") && amx::available() {
                return Some(Bf16Kernel::Amx);
            }
        }
        Some(Bf16Kernel::Avx512Bf16)
    })
}

/// The CPU's vendor string (cpuid leaf 0), e.g. `GenuineIntel` or `AuthenticAMD`. Read once:
/// in a VM each `cpuid` traps to the hypervisor, and the bf16 policy asks on every operation
/// (through [`bf16_pays`]). Uncached, bf16 decode's residual step took 7.3 µs a layer instead
/// of 1.3 on an AMD EPYC VM (NOTES.md, 2026-12-06).
pub fn cpu_vendor() -> &'static str {
    static VENDOR: OnceLock<String> = OnceLock::new();
    VENDOR.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let r = std::arch::x86_64::__cpuid(0);
            let bytes: Vec<u8> = [r.ebx, r.edx, r.ecx].iter().flat_map(|w| w.to_le_bytes()).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            String::new()
        }
    })
}

/// Whether bf16 compute is faster than f32 on this CPU, by measurement (NOTES.md): with AMX
/// tiles (Intel Xeon, 2026-12-05), and with AVX512-BF16 on AMD EPYC Zen 4 (2026-11-28). Not with
/// AVX512-BF16 alone on Intel Xeon, where `vdpbf16ps` runs at half its f32 rate (extraction 504
/// against 708 tokens/s; PyTorch's bf16 GEMM there is also at half its f32 rate).
pub fn bf16_pays() -> bool {
    match bf16_kernel() {
        Some(Bf16Kernel::Amx) => true,
        Some(Bf16Kernel::Avx512Bf16) => cpu_vendor() == "AuthenticAMD",
        None => false,
    }
}

static BF16_EVEN_IF_SLOWER: AtomicBool = AtomicBool::new(false);

/// Lets bf16 run where it is slower than f32 (for tests and comparisons); also
/// `RESID_CPU_BF16_FORCE=1`.
pub fn set_bf16_even_if_slower(on: bool) {
    BF16_EVEN_IF_SLOWER.store(on, Ordering::SeqCst);
}

fn bf16_even_if_slower() -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    BF16_EVEN_IF_SLOWER.load(Ordering::SeqCst) || *ENV.get_or_init(|| std::env::var("RESID_CPU_BF16_FORCE").as_deref() == Ok("1"))
}

/// Why `--compute bf16` runs what it runs on this CPU, for `resid info` and warnings.
pub fn bf16_note() -> String {
    match bf16_kernel() {
        None => "this CPU has no AVX512-BF16: bf16 falls back to f32".into(),
        Some(Bf16Kernel::Amx) => "AMX tiles: bf16 is faster than f32 here".into(),
        Some(Bf16Kernel::Avx512Bf16) if bf16_pays() => "AVX512-BF16 on AMD: bf16 is faster than f32 here".into(),
        Some(Bf16Kernel::Avx512Bf16) if bf16_even_if_slower() => "AVX512-BF16 without AMX, forced (RESID_CPU_BF16_FORCE=1): slower than f32 on Intel".into(),
        Some(Bf16Kernel::Avx512Bf16) => "AVX512-BF16 without AMX on Intel is slower than f32 (measured), so bf16 falls back to f32; RESID_CPU_BF16_FORCE=1 runs it anyway".into(),
    }
}

/// A 64-byte aligned, zero-initialised heap buffer.
struct AlignedBuf {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the buffer is plain memory, written only while packing (before it is shared).
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    fn zeroed(bytes: usize) -> Self {
        let bytes = bytes.max(64);
        let layout = std::alloc::Layout::from_size_align(bytes, 64).expect("packed matrix layout");
        // SAFETY: non-zero size; the pointer is checked.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, bytes }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, std::alloc::Layout::from_size_align_unchecked(self.bytes, 64)) }
    }
}

/// A weight matrix `W [n, k]` repacked into panels of [`NR`] columns.
pub struct PackedMatrix {
    pub n: usize,
    pub k: usize,
    pub format: Compute,
    panels: usize,
    /// `Some(h)`: W is two halves of `h` rows (a SwiGLU `[gate; up]`), each padded to whole
    /// panels, so that gate panel q and up panel `q + h/32` (rounded up) hold the same output
    /// columns of their halves ([`gemm_swiglu`]). `None` when h is a multiple of [`NR`]: the
    /// layout is then the plain one.
    halves: Option<usize>,
    /// Elements along K per panel row: k (f32) or ⌈k/2⌉ pairs (bf16; zero-padded to whole AMX
    /// tile steps when AMX runs the bf16 GEMMs).
    kdepth: usize,
    buf: AlignedBuf,
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: users write disjoint regions.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl PackedMatrix {
    /// Packs `w` (`[n, k]`, row-major) for `format`. bf16 falls back to f32 when the CPU has no
    /// AVX512-BF16 (see [`effective_compute`]).
    pub fn pack(w: &[f32], n: usize, k: usize, format: Compute) -> Self {
        Self::pack_layout(w, n, k, format, None)
    }

    /// Packs a stacked `[gate; up]` (`n` even) with each half padded to whole panels (f32
    /// compute; bf16 matrices get the plain layout), for [`gemm_swiglu`].
    pub fn pack_halves(w: &[f32], n: usize, k: usize, format: Compute) -> Self {
        assert!(n.is_multiple_of(2), "gate/up halves of an odd row count");
        let half = n / 2;
        let halves = (!half.is_multiple_of(NR) && effective_compute(format) == Compute::F32).then_some(half);
        Self::pack_layout(w, n, k, format, halves)
    }

    fn pack_layout(w: &[f32], n: usize, k: usize, format: Compute, halves: Option<usize>) -> Self {
        assert_eq!(w.len(), n * k, "w shape");
        let format = effective_compute(format);
        let panels = match halves {
            Some(h) => 2 * h.div_ceil(NR),
            None => n.div_ceil(NR),
        };
        let kdepth = match format {
            Compute::F32 => k,
            // AMX reads whole tile steps of K: zero pairs pad the panels to them.
            Compute::Bf16 if bf16_kernel() == Some(Bf16Kernel::Amx) => amx_pairs(k.div_ceil(2)),
            Compute::Bf16 => k.div_ceil(2),
        };
        // f32: kdepth × NR f32; bf16: kdepth × NR pairs of u16 — 4 bytes per slot either way.
        let panel_bytes = kdepth * NR * 4;
        let buf = AlignedBuf::zeroed(panels * panel_bytes);
        let base = SendPtr(buf.ptr);
        let fill = |p: usize| {
            // The whole wrapper, not its raw-pointer field, is what the closure must capture.
            #[allow(clippy::redundant_locals)]
            let base = base;
            let (row0, end) = panel_rows(halves, n, p);
            let rows = (end - row0).min(NR);
            // SAFETY: panel p owns bytes [p·panel_bytes, (p+1)·panel_bytes).
            unsafe {
                let dst = base.0.add(p * panel_bytes);
                match format {
                    Compute::F32 => {
                        let dst = dst as *mut f32;
                        for j in 0..rows {
                            let src = &w[(row0 + j) * k..(row0 + j + 1) * k];
                            for (kk, &v) in src.iter().enumerate() {
                                *dst.add(kk * NR + j) = v;
                            }
                        }
                    }
                    Compute::Bf16 => {
                        let dst = dst as *mut u16;
                        for j in 0..rows {
                            let src = &w[(row0 + j) * k..(row0 + j + 1) * k];
                            for (kk, &v) in src.iter().enumerate() {
                                *dst.add((kk / 2) * NR * 2 + j * 2 + kk % 2) = half::bf16::from_f32(v).to_bits();
                            }
                        }
                    }
                }
            }
        };
        if panels * panel_bytes > (1 << 20) {
            (0..panels).into_par_iter().for_each(fill);
        } else {
            (0..panels).for_each(fill);
        }
        PackedMatrix { n, k, format, panels, halves, kdepth, buf }
    }

    /// The first output column of panel p and the end of its valid columns.
    fn panel_cols(&self, p: usize) -> (usize, usize) {
        panel_rows(self.halves, self.n, p)
    }

    /// Panels per half of a `[gate; up]` matrix of `half` rows packed by [`Self::pack_halves`]
    /// (or plainly, when `half` is a multiple of [`NR`]); `None` when W is not laid out so.
    pub fn half_panels(&self, half: usize) -> Option<usize> {
        let aligned = self.halves == Some(half) || (self.halves.is_none() && half.is_multiple_of(NR));
        (self.n == 2 * half && aligned).then(|| half.div_ceil(NR))
    }

    /// Bytes of the packed weights (what one pass over the matrix reads).
    pub fn bytes(&self) -> usize {
        self.panels * self.kdepth * NR * 4
    }

    fn panel_bytes(&self) -> usize {
        self.kdepth * NR * 4
    }

    /// Copies row `row` of W (as packed: exact for f32, bf16-rounded for bf16) into `out`.
    pub fn row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.n && out.len() == self.k);
        let (p, j) = match self.halves {
            Some(h) if row >= h => (h.div_ceil(NR) + (row - h) / NR, (row - h) % NR),
            _ => (row / NR, row % NR),
        };
        // SAFETY: indices are inside panel p.
        unsafe {
            let base = self.buf.ptr.add(p * self.panel_bytes());
            match self.format {
                Compute::F32 => {
                    let b = base as *const f32;
                    for (kk, o) in out.iter_mut().enumerate() {
                        *o = *b.add(kk * NR + j);
                    }
                }
                Compute::Bf16 => {
                    let b = base as *const u16;
                    for (kk, o) in out.iter_mut().enumerate() {
                        *o = half::bf16::from_bits(*b.add((kk / 2) * NR * 2 + j * 2 + kk % 2)).to_f32();
                    }
                }
            }
        }
    }
}

/// Rows of W (= output columns) in panel p: its first and the end of its part (W's end, or the
/// gate half's end for the gate panels of a halves layout).
fn panel_rows(halves: Option<usize>, n: usize, p: usize) -> (usize, usize) {
    match halves {
        Some(h) if p >= h.div_ceil(NR) => (h + (p - h.div_ceil(NR)) * NR, n),
        Some(h) => (p * NR, h),
        None => (p * NR, n),
    }
}

/// The compute type actually used for `asked`: bf16 needs a bf16 kernel and runs only where it
/// is faster than f32 (see [`bf16_pays`]), unless forced.
pub fn effective_compute(asked: Compute) -> Compute {
    match asked {
        Compute::Bf16 if bf16_kernel().is_some() && (bf16_pays() || bf16_even_if_slower()) => Compute::Bf16,
        _ => Compute::F32,
    }
}

/// Where a kernel writes: `y[row0.., col0..]` with leading dimension `ldy`.
#[derive(Clone, Copy)]
struct Out {
    y: *mut f32,
    ldy: usize,
    /// Valid columns from `col0` (may be fewer than the kernel's width at the matrix edge).
    cols: usize,
    bias: *const f32,
    accumulate: bool,
}

// SAFETY: tasks write disjoint blocks of y; bias is read-only.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The epilogue of one element, in the one order every path uses: `acc + b`, then `y + ·`.
    #[inline(always)]
    unsafe fn scalar(&self, row: usize, col: usize, acc: f32) {
        let mut v = acc;
        if !self.bias.is_null() {
            v += *self.bias.add(col);
        }
        let dst = self.y.add(row * self.ldy + col);
        *dst = if self.accumulate { *dst + v } else { v };
    }
}

/// Convenience: packs `w` in f32 and computes `y = x·Wᵀ + b` (or `y +=` when `accumulate`).
/// Engine code packs once and calls [`gemm`].
#[allow(clippy::too_many_arguments)]
pub fn linear(x: &[f32], tokens: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32], accumulate: bool) {
    let p = PackedMatrix::pack(w, n, k, Compute::F32);
    gemm(x, tokens, &p, bias, y, accumulate);
}

thread_local! {
    static BF16_SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static A_SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on the first `len` elements of this thread's buffer in `cell`, grown as needed. A
/// nested call on the same thread (work stolen while waiting) gets a buffer of its own.
fn with_scratch<R>(cell: &'static std::thread::LocalKey<RefCell<Vec<u32>>>, len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    cell.with(|cell| {
        let mut own = Vec::new();
        let mut guard = cell.try_borrow_mut();
        let buf = match guard.as_mut() {
            Ok(b) => &mut **b,
            Err(_) => &mut own,
        };
        if buf.len() < len {
            buf.resize(len, 0);
        }
        f(&mut buf[..len])
    })
}

/// Row-major activations as 4-byte elements (f32 bits, or bf16 pairs).
#[derive(Clone, Copy)]
struct Src(*const u32);
// SAFETY: read-only while the GEMM runs.
unsafe impl Send for Src {}
unsafe impl Sync for Src {}

/// The activations [`drive`] hands its kernels: row-major ones it packs first, or ones already
/// in the packed layout ([`gemm_prepacked`]).
#[derive(Clone, Copy)]
enum Source {
    Rows(Src),
    Packed(Src),
}

/// Packs rows t0..t0+mr (of `ld` elements) into a micro-panel `[kdepth][mr]`: the kernel then
/// reads its activations as one contiguous stream.
unsafe fn pack_a(src: Src, ld: usize, t0: usize, mr: usize, kdepth: usize, dst: *mut u32) {
    #[cfg(target_arch = "x86_64")]
    if mr == 6 && isa() == Isa::Avx512 {
        let rows: [*const u32; 6] = std::array::from_fn(|i| src.0.add((t0 + i) * ld));
        simd512::pack6(&rows, kdepth, dst);
        return;
    }
    if mr == 8 {
        let rows: [*const u32; 8] = std::array::from_fn(|i| src.0.add((t0 + i) * ld));
        #[cfg(target_arch = "x86_64")]
        {
            if isa() != Isa::Portable {
                simd256::pack8(&rows, kdepth, dst);
                return;
            }
        }
        for kk in 0..kdepth {
            for (i, r) in rows.iter().enumerate() {
                *dst.add(kk * 8 + i) = *r.add(kk);
            }
        }
        return;
    }
    for i in 0..mr {
        let row = src.0.add((t0 + i) * ld);
        for kk in 0..kdepth {
            *dst.add(kk * mr + i) = *row.add(kk);
        }
    }
}

/// Checks the shapes of `y = x·Wᵀ + b` and describes where the kernels write; `None` when there
/// is nothing to compute.
fn output(x: &[f32], tokens: usize, w: &PackedMatrix, bias: Option<&[f32]>, y: &mut [f32], accumulate: bool) -> Option<Out> {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), tokens * k, "x shape");
    assert_eq!(y.len(), tokens * n, "y shape");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "bias shape");
    }
    if tokens == 0 || n == 0 {
        return None;
    }
    Some(Out { y: y.as_mut_ptr(), ldy: n, cols: n, bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()), accumulate })
}

/// `y[t, n] = Σ_k x[t, k]·W[n, k] + b[n]`, adding to y instead when `accumulate`.
pub fn gemm(x: &[f32], tokens: usize, w: &PackedMatrix, bias: Option<&[f32]>, y: &mut [f32], accumulate: bool) {
    let Some(out) = output(x, tokens, w, bias, y, accumulate) else { return };
    match w.format {
        Compute::F32 => gemm_f32_on(isa(), Source::Rows(Src(x.as_ptr() as *const u32)), tokens, w, out),
        Compute::Bf16 => gemm_bf16(x, tokens, w, out, None),
    }
}

/// The f32 GEMM with the kernels of `isa` (which the CPU must have).
fn gemm_f32_on(isa: Isa, src: Source, tokens: usize, w: &PackedMatrix, out: Out) {
    drive(tokens, w.k, src, Panels::of(w), f32_rows(isa), f32_pair_rows(isa), &|a, t0, mr, p, np, next| {
        // SAFETY: `a` is the packed micro-panel of rows t0..t0+mr, panels p..p+np exist, the
        // task owns these outputs.
        unsafe { kernel_f32(isa, a as *const f32, w, p, np, mr, t0, next, out) }
    });
}

/// Activations `[tokens, k]` as the fused GEMMs take them.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    /// Row-major.
    Rows(&'a [f32]),
    /// In the f32 kernels' packed layout ([`pack_rows_with`], [`OutLayout::Packed`]).
    Packed(&'a [f32]),
}

impl<'a> Input<'a> {
    fn values(self) -> &'a [f32] {
        match self {
            Input::Rows(x) | Input::Packed(x) => x,
        }
    }

    fn source(self) -> Source {
        match self {
            Input::Rows(x) => Source::Rows(Src(x.as_ptr() as *const u32)),
            Input::Packed(a) => Source::Packed(Src(a.as_ptr() as *const u32)),
        }
    }
}

/// Writes a `[tokens, k]` matrix in the f32 kernels' packed layout, each row computed by
/// `row(r, values)` into an L1-resident buffer first: a producer (a norm) so writes a GEMM's
/// input once, instead of row-major for the GEMM to read and pack again.
pub fn pack_rows_with(tokens: usize, k: usize, out: &mut [f32], row: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    assert_eq!(out.len(), tokens * k, "packed activation shape");
    let mr_max = f32_rows(isa());
    let dst = SendPtr(out.as_mut_ptr());
    let micro_panel = |buf: &mut Vec<f32>, b: usize| {
        let t0 = b * mr_max;
        let mr = (tokens - t0).min(mr_max);
        buf.resize(mr_max * k, 0.0);
        for (i, values) in buf.chunks_mut(k.max(1)).take(mr).enumerate() {
            row(t0 + i, values);
        }
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        // SAFETY: the buffer holds mr rows of k; micro-panels are disjoint slices of `out`.
        unsafe { pack_a(Src(buf.as_ptr() as *const u32), k, 0, mr, k, dst.0.add(t0 * k) as *mut u32) };
    };
    each_micro_panel(tokens, mr_max, k, Vec::new, micro_panel);
}

/// Calls `f(scratch, b)` for every micro-panel b (rows b·mr_max..) of `tokens` rows of `kdepth`
/// elements: over the pool where there is enough to share, each worker with its own `scratch`.
fn each_micro_panel<S>(tokens: usize, mr_max: usize, kdepth: usize, scratch: impl Fn() -> S + Sync + Send, f: impl Fn(&mut S, usize) + Sync + Send) {
    let nb = tokens.div_ceil(mr_max);
    if rayon::current_num_threads() > 1 && tokens * kdepth > 1 << 15 {
        (0..nb).into_par_iter().for_each_init(scratch, f);
    } else {
        let mut own = scratch();
        (0..nb).for_each(|b| f(&mut own, b));
    }
}

/// [`gemm`] of activations already in the f32 kernels' packed layout (as
/// [`gemm_activation`] writes them with [`OutLayout::Packed`]): the same products, bit for bit,
/// without packing. Returns false (computing nothing) where W is not f32.
pub fn gemm_prepacked(a: &[f32], tokens: usize, w: &PackedMatrix, bias: Option<&[f32]>, y: &mut [f32], accumulate: bool) -> bool {
    gemm_prepacked_on(isa(), a, tokens, w, bias, y, accumulate)
}

fn gemm_prepacked_on(isa: Isa, a: &[f32], tokens: usize, w: &PackedMatrix, bias: Option<&[f32]>, y: &mut [f32], accumulate: bool) -> bool {
    if w.format != Compute::F32 {
        return false;
    }
    if let Some(out) = output(a, tokens, w, bias, y, accumulate) {
        gemm_f32_on(isa, Source::Packed(Src(a.as_ptr() as *const u32)), tokens, w, out);
    }
    true
}

/// Where row t, column c of a `[tokens, k]` matrix lies in the f32 kernels' packed layout of
/// `isa`: micro-panels of `f32_rows(isa)` rows (fewer in the last), the one starting at row t0
/// stored `[k][mr]` from element t0·k.
fn packed_index(isa: Isa, tokens: usize, k: usize, t: usize, c: usize) -> usize {
    let (start, stride) = packed_row_on(isa, tokens, k, t);
    start + c * stride
}

/// Where row t of a `[tokens, k]` matrix lies in the f32 kernels' packed layout: its column c at
/// `start + c·stride` (returned as `(start, stride)`).
pub fn packed_row(tokens: usize, k: usize, t: usize) -> (usize, usize) {
    packed_row_on(isa(), tokens, k, t)
}

/// Packs rows `src`, `src + ld`, … (`mr` of them, a whole micro-panel, `width` values each) as
/// `[width][mr]` at `dst`, as the GEMM packs its inputs ([`pack_a`]): the packed layout of those
/// columns, `dst` being where [`packed_row`] puts the first row's first of them.
///
/// # Safety
/// The `mr` rows must be valid for `width` reads and `dst` for `width · mr` writes.
pub unsafe fn pack_micro_panel(src: *const f32, ld: usize, mr: usize, width: usize, dst: *mut f32) {
    pack_a(Src(src as *const u32), ld, 0, mr, width, dst as *mut u32)
}

fn packed_row_on(isa: Isa, tokens: usize, k: usize, t: usize) -> (usize, usize) {
    let mr_max = f32_rows(isa);
    let t0 = t / mr_max * mr_max;
    let mr = (tokens - t0).min(mr_max);
    (t0 * k + (t - t0), mr)
}

/// Row-major `[tokens, k]` from the f32 kernels' packed layout (for consumers other than
/// [`gemm_prepacked`]).
pub fn unpack_rows(a: &[f32], tokens: usize, k: usize, out: &mut [f32]) {
    assert!(a.len() == tokens * k && out.len() == tokens * k, "packed activation shape");
    for (t, row) in out.chunks_mut(k.max(1)).enumerate().take(tokens) {
        unpack_row(a, tokens, t, row);
    }
}

/// Row t (`out.len()` values) of a `[tokens, out.len()]` matrix in the f32 kernels' packed layout.
pub fn unpack_row(a: &[f32], tokens: usize, t: usize, out: &mut [f32]) {
    let (isa, k) = (isa(), out.len());
    for (c, v) in out.iter_mut().enumerate() {
        *v = a[packed_index(isa, tokens, k, t, c)];
    }
}

/// The bf16 product of x (rounded to bf16 pairs); with `outliers`, each row's outliers
/// ([`for_each_outlier`]) are left out of it and appended there as `(row, k, value)`, in row
/// order.
fn gemm_bf16(x: &[f32], tokens: usize, w: &PackedMatrix, out: Out, outliers: Option<&mut Vec<(usize, usize, f32)>>) {
    let kp = w.kdepth;
    #[cfg(target_arch = "x86_64")]
    let on_amx = bf16_kernel() == Some(Bf16Kernel::Amx);
    #[cfg(not(target_arch = "x86_64"))]
    let on_amx = false;
    with_bf16_input(x, tokens, w, on_amx, outliers, |xb| {
        #[cfg(target_arch = "x86_64")]
        if on_amx {
            return amx::gemm(xb, tokens, w, out);
        }
        let src = Src(xb.as_ptr());
        drive(tokens, kp, Source::Rows(src), Panels::of(w), BF16_ROWS, BF16_PAIR_ROWS, &|a, t0, mr, p, np, next| {
            // SAFETY: `a` is the packed micro-panel of rows t0..t0+mr, panels p..p+np exist, the
            // task owns these outputs; bf16 matrices exist only when the CPU has AVX512-BF16.
            unsafe { kernel_bf16(a, w, p, np, mr, t0, next, out) }
        });
    });
}

/// Rows of a micro-panel of the AVX512-BF16 kernels, and the most rows for which a task takes
/// two panels in one kernel.
const BF16_ROWS: usize = 8;
const BF16_PAIR_ROWS: usize = 4;

/// K pairs of a bf16 panel on AMX.
fn amx_pairs(kp: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        amx::padded_pairs(kp)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        kp
    }
}

/// Runs `f` on x's rows as bf16 pairs (`w.kdepth` a row, in per-thread scratch); with
/// `outliers`, each row's outliers zeroed there and appended to `outliers` (as [`gemm_bf16`]);
/// `on_amx`: padded with zero rows to AMX's whole tiles.
fn with_bf16_input<R>(x: &[f32], tokens: usize, w: &PackedMatrix, on_amx: bool, outliers: Option<&mut Vec<(usize, usize, f32)>>, f: impl FnOnce(&[u32]) -> R) -> R {
    let kp = w.kdepth;
    let rows = if on_amx { amx_rows(tokens) } else { tokens };
    with_scratch(&BF16_SCRATCH, rows * kp, |xb| {
        let found = to_bf16_pairs(x, tokens, w.k, kp, xb, outliers.is_some());
        if let Some(outliers) = outliers {
            outliers.extend(found);
        }
        xb[tokens * kp..].fill(0);
        f(xb)
    })
}

/// Activation rows of a bf16 GEMM on AMX.
fn amx_rows(tokens: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        amx::padded_rows(tokens)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        tokens
    }
}

/// Inputs larger than this multiple of their row's RMS are outliers in [`gemm_split`].
pub const OUTLIER_RATIO: f32 = 16.0;

/// Calls `f(j, x[j])` for each outlier of `row`, in increasing j: the inputs with
/// |x[j]| > [`OUTLIER_RATIO`] · rms(row). The RMS is summed in one fixed order, so a row's
/// outliers never depend on the rest of the batch; a non-finite row has none.
fn for_each_outlier(row: &[f32], mut f: impl FnMut(usize, f32)) {
    #[cfg(target_arch = "x86_64")]
    {
        if isa() == Isa::Avx512 {
            // SAFETY: feature checked.
            unsafe { simd512::for_each_outlier(row, OUTLIER_RATIO, &mut f) };
            return;
        }
    }
    let sum: f32 = row.iter().map(|v| v * v).sum();
    let bound = OUTLIER_RATIO * (sum / row.len().max(1) as f32).sqrt();
    for (j, &v) in row.iter().enumerate() {
        if v.abs() > bound {
            f(j, v);
        }
    }
}

/// `y = x·Wᵀ (+ b)` (or `y +=`) in bf16, except for each row's outliers: inputs with
/// |x[t, j]| > [`OUTLIER_RATIO`]·rms(x[t]) are left out of the bf16 product and their terms
/// `x[t, j]·W[:, j]` are added afterwards in f32 from `exact` (the same matrix packed in f32),
/// in increasing j. The rows listed in `f32_rows` are computed wholly in f32 (exactly as
/// [`gemm`] with `exact` computes them). Meant for down projections, whose inputs carry the
/// model's massive activations (plain bf16 costs 2e-2 relative error on SmolLM2's
/// attention-sink token), with the sink rows in `f32_rows`. A row's result depends on that row
/// alone (and on whether it is listed), so it stays batch- and thread-invariant.
#[allow(clippy::too_many_arguments)]
pub fn gemm_split(x: &[f32], tokens: usize, fast: &PackedMatrix, exact: &PackedMatrix, bias: Option<&[f32]>, y: &mut [f32], accumulate: bool, f32_rows: &[usize]) {
    assert!(exact.format == Compute::F32 && fast.n == exact.n && fast.k == exact.k && exact.halves.is_none(), "split GEMM needs one plain matrix in two formats");
    if fast.format != Compute::Bf16 {
        return gemm(x, tokens, exact, bias, y, accumulate);
    }
    let (n, k) = (exact.n, exact.k);
    assert!(f32_rows.iter().all(|&t| t < tokens), "f32 rows out of range");
    // The f32 rows: inputs gathered, and outputs as they are before this call (when adding).
    let f32_x: Vec<f32> = f32_rows.iter().flat_map(|&t| &x[t * k..(t + 1) * k]).copied().collect();
    let mut f32_y: Vec<f32> = if accumulate { f32_rows.iter().flat_map(|&t| &y[t * n..(t + 1) * n]).copied().collect() } else { vec![0.0; f32_rows.len() * n] };
    let Some(out) = output(x, tokens, fast, bias, y, accumulate) else { return };
    // Found once per row (as the row is converted to bf16): left out of the bf16 product, then
    // added in f32, row by row in increasing j (a few per row, so one thread suffices).
    let mut outliers = Vec::new();
    gemm_bf16(x, tokens, fast, out, Some(&mut outliers));
    for &(t, j, v) in &outliers {
        for p in 0..exact.panels {
            let cols = (n - p * NR).min(NR);
            // SAFETY: panel p's row j holds W[32p.., j] for its `cols` valid columns.
            let w = unsafe { std::slice::from_raw_parts((exact.buf.ptr as *const f32).add(p * exact.kdepth * NR + j * NR), cols) };
            for (o, &wv) in y[t * n + p * NR..t * n + p * NR + cols].iter_mut().zip(w) {
                *o += v * wv;
            }
        }
    }
    if !f32_rows.is_empty() {
        gemm(&f32_x, f32_rows.len(), exact, bias, &mut f32_y, accumulate);
        for (&t, row) in f32_rows.iter().zip(f32_y.chunks_exact(n)) {
            y[t * n..(t + 1) * n].copy_from_slice(row);
        }
    }
}

/// Above this many values [`to_bf16_pairs`] shares the rows between the workers.
const PARALLEL_CONVERSION_VALUES: usize = 1 << 16;

/// Rows of x as bf16 pairs (low half = even k), `ld` pairs a row, zero-padded beyond K. With
/// `find_outliers`, returns each row's outliers ([`for_each_outlier`]) as `(row, k, value)` in
/// row order, zeroed in `out`: searched for as the row is converted, so that x is read from
/// memory once (SmolLM2-135M's down projection input is 12 MiB at 2,048 rows).
fn to_bf16_pairs(x: &[f32], tokens: usize, k: usize, ld: usize, out: &mut [u32], find_outliers: bool) -> Vec<(usize, usize, f32)> {
    let kp = k.div_ceil(2);
    let conv = |(t, o): (usize, &mut [u32])| {
        let row = &x[t * k..(t + 1) * k];
        let mut found = Vec::new();
        if find_outliers {
            for_each_outlier(row, |j, v| found.push((t, j, v)));
        }
        let (o, pad) = o.split_at_mut(kp);
        pad.fill(0);
        row_to_bf16_pairs(row, o);
        for &(_, j, _) in &found {
            o[j / 2] &= if j % 2 == 0 { 0xffff_0000 } else { 0x0000_ffff };
        }
        found
    };
    let out = &mut out[..tokens * ld];
    let parallel = tokens * k > PARALLEL_CONVERSION_VALUES;
    if !find_outliers {
        // Nothing to gather: the GEMMs other than down projections convert without collecting.
        if parallel {
            out.par_chunks_mut(ld).enumerate().for_each(|r| drop(conv(r)));
        } else {
            out.chunks_mut(ld).enumerate().for_each(|r| drop(conv(r)));
        }
        return Vec::new();
    }
    if parallel {
        out.par_chunks_mut(ld).enumerate().flat_map_iter(conv).collect()
    } else {
        out.chunks_mut(ld).enumerate().flat_map(conv).collect()
    }
}

/// One row as bf16 pairs (`out`: `row.len()` / 2 pairs, rounded up; the last one's high half 0
/// for an odd length).
fn row_to_bf16_pairs(row: &[f32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_bf16() {
            // SAFETY: feature checked.
            unsafe { simd512::row_to_bf16(row, out) };
            return;
        }
    }
    let k = row.len();
    for (i, o) in out.iter_mut().enumerate() {
        let lo = half::bf16::from_f32(row[2 * i]).to_bits() as u32;
        let hi = if 2 * i + 1 < k { half::bf16::from_f32(row[2 * i + 1]).to_bits() as u32 } else { 0 };
        *o = lo | (hi << 16);
    }
}

/// Bytes of activations a row block keeps in L2: 3/8 of this core's L2 (384 KiB of AMD Zen 4's
/// 1 MiB; 768 KiB of Intel Sapphire Rapids' 2 MiB, 3 % faster extraction there than 384 KiB,
/// 1.25 MiB slower: NOTES.md, 2026-12-05). 384 KiB where the size is unknown.
fn l2_block_bytes() -> usize {
    static BYTES: OnceLock<usize> = OnceLock::new();
    *BYTES.get_or_init(|| l2_bytes().map_or(384 * 1024, |l2| (l2 / 8 * 3).clamp(128 * 1024, 2 << 20)))
}

/// One cache of cpu0, as Linux describes it (`/sys/devices/system/cpu/cpu0/cache/index*`).
pub struct CacheInfo {
    pub level: String,
    /// `Data`, `Instruction` or `Unified`.
    pub kind: String,
    /// As written there, e.g. `2048K`.
    pub size: String,
}

impl CacheInfo {
    pub fn bytes(&self) -> Option<usize> {
        match self.size.strip_suffix('K') {
            Some(k) => k.parse::<usize>().ok().map(|k| k << 10),
            None => self.size.strip_suffix('M').and_then(|m| m.parse::<usize>().ok()).map(|m| m << 20),
        }
    }
}

/// cpu0's caches (empty where Linux does not describe them).
pub fn cpu0_caches() -> Vec<CacheInfo> {
    (0..8)
        .filter_map(|i| {
            let read = |f: &str| std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu0/cache/index{i}/{f}")).ok().map(|s| s.trim().to_string());
            Some(CacheInfo { level: read("level")?, kind: read("type")?, size: read("size")? })
        })
        .collect()
}

/// The L2 size of cpu0.
fn l2_bytes() -> Option<usize> {
    cpu0_caches().iter().find(|c| c.level == "2" && c.kind != "Instruction")?.bytes()
}

/// The panels [`drive`] spreads over its tasks; a kernel never takes `pair_break` as the second
/// of two panels (the up half of a halves layout does not continue the gate half's columns).
#[derive(Clone, Copy)]
struct Panels {
    count: usize,
    pair_break: usize,
}

impl Panels {
    fn of(w: &PackedMatrix) -> Self {
        Panels { count: w.panels, pair_break: w.halves.map_or(usize::MAX, |h| h.div_ceil(NR)) }
    }
}

/// Splits the work into (row block × panel group) tasks, or for the rows of one row block into
/// each thread's share of the panels ([`panel_share`]), and runs `kern(a, t0, rows, panel, np,
/// next)` over them, `a` being rows t0..t0+rows packed as consecutive micro-panels of `mr_max`
/// rows; np = 2 (two panels in one kernel) where a task has at most `pair_rows` rows and a next
/// panel; `next` is the panel the task computes after these (to prefetch), if any.
/// The split only decides who computes an element, never how.
#[allow(clippy::type_complexity)]
fn drive(tokens: usize, kdepth: usize, src: Source, panels: Panels, mr_max: usize, pair_rows: usize, kern: &(dyn Fn(*const u32, usize, usize, usize, usize, Option<usize>) + Sync)) {
    let Panels { count: panels, pair_break } = panels;
    // A row block of activations (kdepth × 4 bytes per row) plus one panel stay in L2.
    let mut mc = (l2_block_bytes() / (kdepth * 4).max(1) / mr_max * mr_max).max(mr_max);
    let threads = rayon::current_num_threads().max(1);
    // A few rows (decode) stream the weights once, memory-bound: one long contiguous stream per
    // thread (the prefetchers ramp up once), in equal parts.
    let few = tokens <= DECODE_ROWS;
    // Rows of more than one micro-panel that fit one row block stay one: the threads share the
    // panels in equal contiguous runs instead, so each panel streams from memory once and serves
    // every micro-panel from L2. As a row block per thread (12 + 4 rows for 16), both threads
    // streamed every panel, together only while they kept pace. SmolLM2-135M's GEMMs with the
    // weights cycled from memory, 2 threads, AMD EPYC Zen 4: 8–24 rows 0.82–1.03 of the time
    // before (most 0.85–0.91), the LM head of a 16-sequence decode step 7.2–7.7 ms against
    // 8.8–11.2; one micro-panel (≤ 6 rows) was 2–11 % slower so, and keeps the grid below
    // (NOTES.md, 2026-12-06 14:12).
    let share_panels = threads > 1 && !few && tokens > mr_max && tokens <= mc;
    // `after`: the first panel of the thread's next task, if it is known.
    let body = |a: Src, (m0, m1, p0, p1): Task, after: Option<usize>| {
        let mut p = p0;
        while p < p1 {
            // Two panels at once: more independent FMA chains per loaded activation.
            let np = if m1 - m0 <= pair_rows && p + 1 < p1 && p + 1 != pair_break { 2 } else { 1 };
            let next = if p + np < p1 { Some(p + np) } else { after };
            // SAFETY: the micro-panels of rows m0..m1 lie inside the packed buffer.
            kern(unsafe { a.0.add(m0 * kdepth) }, m0, m1 - m0, p, np, next);
            p += np;
        }
    };
    if share_panels {
        let run = |a: Src| {
            (0..threads).into_par_iter().for_each(|t| {
                #[allow(clippy::redundant_locals)]
                let a = a;
                let mut tasks = panel_share(tokens, mr_max, panels, threads, t).peekable();
                while let Some(task) = tasks.next() {
                    body(a, task, tasks.peek().map(|&(_, _, p, _)| p));
                }
            })
        };
        return with_packed(src, tokens, kdepth, mr_max, run);
    }
    if threads > 1 {
        // Row blocks of equal size, as many as a multiple of the threads, so that each thread
        // gets the same work: 2,048 rows made 6 blocks of 330 and one of 68 before, and the
        // threads' unequal shares cost 6–9 % of extraction on an Intel Xeon (NOTES.md,
        // 2026-12-05 15:18).
        let blocks = tokens.div_ceil(mc).div_ceil(threads) * threads;
        mc = tokens.div_ceil(blocks).div_ceil(mr_max).max(1) * mr_max;
    }
    let mblocks = tokens.div_ceil(mc);
    let target = if threads == 1 { 1 } else { 8 * threads };
    let groups = if few { threads.min(panels) } else { target.div_ceil(mblocks).clamp(1, panels) };
    let mut g = panels.div_ceil(groups);
    if pair_rows == usize::MAX && !few {
        // Kernels take panels in pairs: groups of an even count leave no panel alone. (Not for
        // a few rows: their equal halves matter more than a single panel's slower kernel.)
        g = g.div_ceil(2) * 2;
    }
    let ngroups = panels.div_ceil(g);
    let run = |a: Src| {
        let task = |i: usize| {
            let (mb, gi) = (i / ngroups, i % ngroups);
            body(a, (mb * mc, ((mb + 1) * mc).min(tokens), gi * g, ((gi + 1) * g).min(panels)), None);
        };
        if threads == 1 || mblocks * ngroups == 1 {
            (0..mblocks * ngroups).for_each(task);
        } else {
            (0..mblocks * ngroups).into_par_iter().for_each(task);
        }
    };
    with_packed(src, tokens, kdepth, mr_max, run)
}

/// A GEMM task: rows m0..m1 (from a micro-panel's first row) against panels p0..p1.
type Task = (usize, usize, usize, usize);

/// Runs `run` on the activations packed as the kernels read them: as given, or packed first.
fn with_packed(src: Source, tokens: usize, kdepth: usize, mr_max: usize, run: impl Fn(Src)) {
    match src {
        Source::Packed(a) => run(a),
        Source::Rows(src) => with_scratch(&A_SCRATCH, tokens * kdepth, |buf| {
            // Every micro-panel once: rows t0..t0+mr at offset t0·kdepth, t0 a multiple of mr_max.
            let dst = Src(buf.as_mut_ptr() as *const u32);
            each_micro_panel(tokens, mr_max, kdepth, || (), |_, b| {
                let (t0, dst) = (b * mr_max, dst);
                // SAFETY: rows t0..t0+mr exist; micro-panels are disjoint.
                unsafe { pack_a(src, kdepth, t0, (tokens - t0).min(mr_max), kdepth, (dst.0 as *mut u32).add(t0 * kdepth)) };
            });
            run(Src(buf.as_ptr()))
        }),
    }
}

/// Thread `t`'s tasks where the threads share the panels of one row block: the (panel pair ×
/// micro-panel) units in pair-major order, dealt out in `threads` contiguous equal runs. A run
/// is whole pairs over every row, plus at its ends the part of a pair's rows it shares with the
/// next thread, so each thread does the same work (to a micro-panel) and reads every panel but
/// those at most two once. An iterator, so a GEMM call allocates nothing for it.
fn panel_share(tokens: usize, mr_max: usize, panels: usize, threads: usize, t: usize) -> impl Iterator<Item = Task> {
    let (micro, pairs) = (tokens.div_ceil(mr_max), panels.div_ceil(2));
    let units = micro * pairs;
    let (mut u, hi) = (units * t / threads, units * (t + 1) / threads);
    std::iter::from_fn(move || {
        if u >= hi {
            return None;
        }
        let (pair, first) = (u / micro, u % micro);
        let last = (first + hi - u).min(micro);
        u += last - first;
        Some((first * mr_max, (last * mr_max).min(tokens), 2 * pair, (2 * pair + 2).min(panels)))
    })
}

/// Up to this many rows, a GEMM streams the weights once in one long stream per thread.
pub(crate) const DECODE_ROWS: usize = 4;

/// Rows in an f32 micro-panel of `isa`'s kernels (the activations are packed so).
fn f32_rows(isa: Isa) -> usize {
    match isa {
        // 6 rows × 2 panels (24 accumulators): 6–14 % faster than 8 × 1 panel on an Intel Xeon
        // (family 6 model 167), in isolation and in a two-thread GEMM (NOTES.md, 2026-12-05).
        Isa::Avx512 => 6,
        Isa::Avx2 => 3,
        Isa::Portable => 4,
    }
}

/// Up to how many rows a task hands `isa`'s f32 kernels two panels at once (with more, one).
fn f32_pair_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => usize::MAX,
        Isa::Avx2 | Isa::Portable => 4,
    }
}

/// Dispatches an f32 block: rows t0..t0+mr of x (at `a`), panels p..p+np; the task's next
/// panel is `next`.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_f32(isa: Isa, a: *const f32, w: &PackedMatrix, p: usize, np: usize, rows: usize, t0: usize, next: Option<usize>, out: Out) {
    let b = w.buf.ptr.add(p * w.panel_bytes()) as *const f32;
    let pstride = w.kdepth * NR;
    let (col0, end) = w.panel_cols(p);
    let out = Out { y: out.y.add(t0 * out.ldy + col0), cols: end.min(out.cols) - col0, bias: if out.bias.is_null() { out.bias } else { out.bias.add(col0) }, ..out };
    let next = next.map_or(std::ptr::null(), |q| w.buf.ptr.add(q * w.panel_bytes()) as *const f32);
    block_f32(isa, a, b, pstride, w.k, rows, np, rows <= K_CHUNK_MAX_ROWS, next, out)
}

/// The f32 microkernels of `isa` over `rows` rows (at `a`) and `np` panels: the first at `b`,
/// the second `pstride` floats on. `few`: the GEMM's task has at most [`K_CHUNK_MAX_ROWS`] rows,
/// so these panels stream from memory for it, and the kernels may take them in chunks
/// ([`k_chunks`]), or prefetch the task's next unit ([`next_unit_prefetch`]): `next`, laid out
/// as these panels (null: none); a block of a larger fused task finds them in L2.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn block_f32(isa: Isa, a: *const f32, b: *const f32, pstride: usize, k: usize, rows: usize, np: usize, few: bool, next: *const f32, out: Out) {
    #[cfg(target_arch = "x86_64")]
    {
        match isa {
            Isa::Avx512 if few && rows > 12 && k_chunks() => return simd512::f32_block_chunked(a, b, pstride, k, rows, np, out),
            Isa::Avx512 => return simd512::f32_block(a, b, pstride, k, rows, np, prefetched_next(few, np, k, next), out),
            Isa::Avx2 => return simd256::f32_block(a, b, pstride, k, rows, np, out),
            Isa::Portable => {}
        }
    }
    let _ = (isa, next);
    portable_f32(a, b, pstride, k, rows, np, out)
}

/// `next` where the AVX-512 kernels of a block of `np` panels `depth` rows deep prefetch it
/// ([`next_unit_prefetch`]), else null: a few-row task's (`few`), and only where two units fit
/// in L2 at once, within a row block's share of it. The down projection's units (2 × 384 KiB
/// for K = 1,536) did not fit on AMD EPYC Zen 4, and ran slower so.
fn prefetched_next<T>(few: bool, np: usize, depth: usize, next: *const T) -> *const T {
    let fits = 2 * np * depth * NR * 4 <= l2_block_bytes();
    if few && fits && next_unit_prefetch() {
        next
    } else {
        std::ptr::null()
    }
}

/// The activation a fused GEMM ([`gemm_activation`]) applies in its epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) · up` from a stacked `[gate; up]` W: `y` has half of W's rows as columns.
    SwiGlu,
    /// `gelu_tanh(·)` (BLOOM's tanh approximation) of each output.
    GeluTanh,
}

/// Rows a fused task computes into its tile before the epilogue: a multiple of every f32
/// kernel's micro-panel height (6, 3 and 4: a tile is whole micro-panels, as `store_packed`
/// needs) and of the AVX512-BF16 kernels' (8), small enough for the tile to stay in L1 (6 KiB).
const FUSED_ROWS: usize = 24;
const _: () = assert!(FUSED_ROWS.is_multiple_of(6) && FUSED_ROWS.is_multiple_of(3) && FUSED_ROWS.is_multiple_of(4) && FUSED_ROWS.is_multiple_of(BF16_ROWS));

/// A fused GEMM's accumulator tile: [`FUSED_ROWS`] rows of two panels.
#[repr(align(64))]
struct Tile([[f32; 2 * NR]; FUSED_ROWS]);

/// A fused GEMM's output pointer, shared by its tasks.
#[derive(Clone, Copy)]
struct FusedPtr(*mut f32);
// SAFETY: tasks write disjoint blocks.
unsafe impl Send for FusedPtr {}
unsafe impl Sync for FusedPtr {}

/// `y = act(x·Wᵀ + b)` in one pass over W, without writing `x·Wᵀ + b` out ([`fused_on`]). For
/// [`Activation::SwiGlu`], output panel q needs gate panel q and up panel q + (panels per half):
/// both are computed by the same task (in one kernel, as a pair of panels, when the rows are
/// few). Every product is the FMA chain of [`gemm`], `+ b` is the same single add, and the
/// activation is [`super::vmath`]'s (the one the unfused `activation` applies), so `y` is
/// bit-identical to the GEMM followed by the activation, and as batch- and thread-invariant.
/// Returns false (computing nothing) where W is neither f32 nor bf16 with [`OutLayout::Rows`]
/// and a row-major `x` ([`fuses_bf16`]; the same bits as `gemm` in bf16 followed by the
/// activation), or, for SwiGLU, not a `[gate; up]` whose halves start on panel boundaries
/// ([`PackedMatrix::pack_halves`]; bf16 matrices keep the plain layout, so theirs must be whole
/// panels). SmolLM2-135M's bf16 extraction ran 17–31 % faster fused on AMX (Intel Xeon; NOTES.md,
/// 2026-12-07 05:29), and about 2 % on AVX512-BF16 (AMD EPYC Zen 4; NOTES.md, 2026-12-07 13:35).
///
/// With [`OutLayout::Packed`], `y` is written in the layout [`gemm_prepacked`] reads, so that the
/// next GEMM (the down projection) need not read it back and pack it.
#[allow(clippy::too_many_arguments)]
pub fn gemm_activation(x: Input<'_>, tokens: usize, w: &PackedMatrix, bias: Option<&[f32]>, act: Activation, y: &mut [f32], layout: OutLayout) -> bool {
    gemm_activation_on(isa(), x, tokens, w, bias, act, y, layout)
}

/// How [`gemm_activation`] lays out its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutLayout {
    /// Row-major `[tokens, width]`.
    Rows,
    /// The f32 kernels' packed layout of `[tokens, width]` ([`gemm_prepacked`], [`unpack_rows`]).
    Packed,
}

/// Stores columns `c0..c0+cols` of rows t.. (`rows`, values from column `from` of each) of a
/// `[tokens, width]` matrix in the f32 kernels' packed layout of `isa`; t is a multiple of the
/// micro-panel height, so the rows are whole micro-panels (the last may be short) and each
/// micro-panel's columns are one contiguous `[cols][mr]` block, packed as [`pack_a`] packs.
#[allow(clippy::too_many_arguments)]
unsafe fn store_packed(isa: Isa, y: *mut f32, tokens: usize, width: usize, t: usize, c0: usize, cols: usize, rows: &[[f32; 2 * NR]], from: usize) {
    let mr_max = f32_rows(isa);
    debug_assert!(t.is_multiple_of(mr_max) && from + cols <= 2 * NR);
    for (j, block) in rows.chunks(mr_max).enumerate() {
        let tm = t + j * mr_max;
        let mr = (tokens - tm).min(mr_max);
        // The block's rows lie 2·NR values apart in the tile.
        let src = Src(block[0][from..].as_ptr() as *const u32);
        pack_a(src, 2 * NR, 0, mr, cols, y.add(tm * width + c0 * mr) as *mut u32);
    }
}

/// [`gemm_activation`] with the kernels of `isa` (which the CPU must have).
#[allow(clippy::too_many_arguments)]
fn gemm_activation_on(isa: Isa, x: Input<'_>, tokens: usize, w: &PackedMatrix, bias: Option<&[f32]>, act: Activation, y: &mut [f32], layout: OutLayout) -> bool {
    let (width, count, units) = match act {
        Activation::SwiGlu => match w.half_panels(w.n / 2) {
            // Each gate panel with its up panel.
            Some(hp) if w.n.is_multiple_of(2) => (w.n / 2, hp, Units::Pairs { stride: 1, offset: hp, dealt: 1 }),
            _ => return false,
        },
        // W's own panels, paired as in `gemm`.
        Activation::GeluTanh if w.halves.is_none() => (w.n, w.panels, Units::Panels),
        Activation::GeluTanh => return false,
    };
    if w.format != Compute::F32 && !(fuses_bf16(w, x) && layout == OutLayout::Rows) {
        return false;
    }
    assert_eq!(y.len(), tokens * width, "y shape");
    if let Some(b) = bias {
        assert_eq!(b.len(), w.n, "bias shape");
    }
    let yp = FusedPtr(y.as_mut_ptr());
    fused_any(isa, x, tokens, w, count, units, &|t, q, np, rows| {
        #[allow(clippy::redundant_locals)]
        let yp = yp;
        // SAFETY: rows t.. of output panels q..q+np belong to this task.
        let y_row = |r: usize| unsafe { std::slice::from_raw_parts_mut(yp.0.add(r * width), width) };
        match act {
            Activation::SwiGlu => {
                let (c0, cols) = (q * NR, (width - q * NR).min(NR));
                for (i, vals) in rows.iter_mut().enumerate() {
                    let (gate, up) = vals.split_at_mut(NR);
                    if let Some(b) = bias {
                        for c in 0..cols {
                            gate[c] += b[c0 + c];
                            up[c] += b[width + c0 + c];
                        }
                    }
                    match layout {
                        OutLayout::Rows => super::vmath::swiglu_row(&gate[..cols], &up[..cols], &mut y_row(t + i)[c0..c0 + cols]),
                        // Into the gate's columns, to be stored as whole micro-panels.
                        OutLayout::Packed => super::vmath::swiglu_in_place(&mut gate[..cols], &up[..cols]),
                    }
                }
                if layout == OutLayout::Packed {
                    // SAFETY: as above; t is a tile's first row.
                    unsafe { store_packed(isa, yp.0, tokens, width, t, c0, cols, rows, 0) };
                }
            }
            Activation::GeluTanh => {
                for j in 0..np {
                    let c0 = (q + j) * NR;
                    let cols = (width - c0).min(NR);
                    for (i, vals) in rows.iter_mut().enumerate() {
                        for c in 0..cols {
                            let v = match bias {
                                Some(b) => vals[j * NR + c] + b[c0 + c],
                                None => vals[j * NR + c],
                            };
                            match layout {
                                OutLayout::Rows => y_row(t + i)[c0 + c] = super::vmath::gelu_tanh(v),
                                OutLayout::Packed => vals[j * NR + c] = super::vmath::gelu_tanh(v),
                            }
                        }
                    }
                    if layout == OutLayout::Packed {
                        // SAFETY: as above.
                        unsafe { store_packed(isa, yp.0, tokens, width, t, c0, cols, rows, j * NR) };
                    }
                }
            }
        }
    });
    true
}

/// `x·Wᵀ` of f32 W, or of bf16 W ([`fuses_bf16`]), plain layout, N a multiple of
/// 2·[`NR`], in heads of 64 columns, without writing it out: `epi(t, h, values)` gets row t's 64
/// products of head h (columns 64h..64h+64; each as [`gemm`] computes it, no bias) to finish
/// and store. Each head is computed by one task, so the epilogue sees whole heads (rotary pairs,
/// per-head norms). Returns false (computing nothing) where W is not laid out so.
pub fn gemm_heads(x: Input<'_>, tokens: usize, w: &PackedMatrix, epi: &(dyn Fn(usize, usize, &mut [f32]) + Sync)) -> bool {
    gemm_heads_on(isa(), x, tokens, w, epi)
}

fn gemm_heads_on(isa: Isa, x: Input<'_>, tokens: usize, w: &PackedMatrix, epi: &(dyn Fn(usize, usize, &mut [f32]) + Sync)) -> bool {
    if (w.format != Compute::F32 && !fuses_bf16(w, x)) || w.halves.is_some() || !w.n.is_multiple_of(2 * NR) {
        return false;
    }
    // The heads' epilogues differ in cost: a key head's store touches 64 cache lines (one per
    // element, `attention::key_at`), a value head's 4 in a page of their own, a query head's 4
    // in the query rows. In order, the key and value heads (last) fell in the last thread's run,
    // which stored them all while the others waited. Dealt out, SmolLM2-135M's QKV GEMM of a
    // 16-sequence decode step took 249–264 µs against 302 on an Intel Xeon (NOTES.md,
    // 2026-12-06 23:09).
    let dealt = rayon::current_num_threads().max(1);
    fused_any(isa, x, tokens, w, w.panels / 2, Units::Pairs { stride: 2, offset: 1, dealt }, &|t, h, _, rows| {
        for (i, vals) in rows.iter_mut().enumerate() {
            epi(t + i, h, vals);
        }
    });
    true
}

/// A fused GEMM's epilogue: `epi(t, u, panels, rows)` finishes rows t.. of unit u, each row's
/// values in its first `NR·panels` columns. t is a multiple of the kernels' micro-panel height.
type FusedEpilogue<'a> = dyn Fn(usize, usize, usize, &mut [[f32; 2 * NR]]) + Sync + 'a;

/// What one unit of a fused GEMM's work is.
#[derive(Clone, Copy)]
enum Units {
    /// Output panel u, with panel u + 1 when the rows are few (as in [`gemm`]).
    Panels,
    /// Panels `v·stride` and `v·stride + offset`, always together, for unit v =
    /// [`dealt_unit`]`(u, count, dealt)`: units dealt out as cards to `dealt` hands, so that each
    /// of that many contiguous runs of u holds every `dealt`-th unit (1: in order).
    Pairs { stride: usize, offset: usize, dealt: usize },
}

/// The unit at position `i` of units 0..n dealt round-robin to `hands` hands laid end to end:
/// hand r holds r, r + hands, r + 2·hands, …
fn dealt_unit(i: usize, n: usize, hands: usize) -> usize {
    let (per, extra) = (n / hands, n % hands);
    // Hands 0..extra hold per + 1 units (positions 0..big), the rest per.
    let big = extra * (per + 1);
    let (hand, at) = if i < big { (i / (per + 1), i % (per + 1)) } else { (extra + (i - big) / per.max(1), (i - big) % per.max(1)) };
    hand + at * hands
}

/// Whether a fused GEMM of bf16 `w` can run ([`amx::fused`], [`fused_on`] over the AVX512-BF16
/// kernels): a bf16 kernel, and a row-major input (bf16 GEMMs never read the f32 kernels' packed
/// layout).
fn fuses_bf16(w: &PackedMatrix, x: Input<'_>) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        w.format == Compute::Bf16 && bf16_kernel().is_some() && matches!(x, Input::Rows(_))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, x);
        false
    }
}

/// [`fused_on`] the f32 kernels for an f32 `w`; for a bf16 one (see [`fuses_bf16`]), [`amx::fused`]
/// on AMX, else [`fused_on`] the AVX512-BF16 kernels: the same units and epilogue; the AMX blocks hand the
/// epilogue up to 32 rows at a time.
fn fused_any(isa: Isa, x: Input<'_>, tokens: usize, w: &PackedMatrix, count: usize, units: Units, epi: &FusedEpilogue) {
    assert_eq!(x.values().len(), tokens * w.k, "x shape");
    if tokens == 0 || count == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if w.format == Compute::Bf16 {
        debug_assert!(fuses_bf16(w, x));
        let x = x.values();
        if bf16_kernel() != Some(Bf16Kernel::Amx) {
            return with_bf16_input(x, tokens, w, false, None, |xb| fused_on(FusedKernels::Bf16, Source::Rows(Src(xb.as_ptr())), tokens, w, count, units, epi));
        }
        let unit = |i: usize| match units {
            Units::Panels => (i, i, 1, 1),
            Units::Pairs { stride, offset, dealt } => {
                let u = dealt_unit(i, count, dealt);
                (u, u * stride, offset, 2)
            }
        };
        return with_bf16_input(x, tokens, w, true, None, |xb| amx::fused(xb, tokens, w, count, &unit, epi));
    }
    fused_on(FusedKernels::F32(isa), x.source(), tokens, w, count, units, epi)
}

/// The kernels of a fused GEMM ([`fused_on`]).
#[derive(Clone, Copy)]
enum FusedKernels {
    /// The f32 kernels of this ISA; x packed as they read it.
    F32(Isa),
    /// The AVX512-BF16 kernels of [`gemm_bf16`]; x as bf16 pairs.
    #[cfg(target_arch = "x86_64")]
    Bf16,
}

impl FusedKernels {
    /// Rows of a micro-panel, and the most rows for which a task takes two panels in one kernel.
    fn rows(self) -> (usize, usize) {
        match self {
            FusedKernels::F32(isa) => (f32_rows(isa), f32_pair_rows(isa)),
            #[cfg(target_arch = "x86_64")]
            FusedKernels::Bf16 => (BF16_ROWS, BF16_PAIR_ROWS),
        }
    }

    /// Rows i..i+r of the task's packed rows at `a`, over `np` panels from `b` (the second
    /// `pstride` values on) into `out`. `few` and `next`: as [`block_f32`]'s.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(self, a: *const u32, w: &PackedMatrix, i: usize, r: usize, b: *const u8, pstride: usize, np: usize, few: bool, next: *const u8, out: Out) {
        match self {
            FusedKernels::F32(isa) => block_f32(isa, (a as *const f32).add(i * w.k), b as *const f32, pstride, w.k, r, np, few, next as *const f32, out),
            #[cfg(target_arch = "x86_64")]
            FusedKernels::Bf16 => simd512::bf16_block(a.add(i * w.kdepth), b as *const u32, pstride, w.kdepth, r, np, prefetched_next(few, np, w.kdepth, next as *const u32), out),
        }
    }
}

/// The fused GEMMs' driver: the `count` units of W's panels are spread over tasks as [`gemm`]
/// spreads panels; a task computes a unit's panels for [`FUSED_ROWS`] rows at a time into an
/// L1-resident tile, then hands the tile's rows (`NR` values per panel, no bias) to
/// `epi(t, u, panels, rows)`. Each product is the FMA chain of the unfused GEMM of `kernels`.
#[allow(clippy::too_many_arguments)]
fn fused_on(kernels: FusedKernels, src: Source, tokens: usize, w: &PackedMatrix, count: usize, units: Units, epi: &FusedEpilogue) {
    let (mr, pair_rows) = kernels.rows();
    // SAFETY (of its uses): the panel exists.
    let panel = |p: usize| unsafe { w.buf.ptr.add(p * w.panel_bytes()) as *const u8 };
    drive(tokens, w.kdepth, src, Panels { count, pair_break: usize::MAX }, mr, pair_rows, &|a, t0, rows, u, np, next| {
        // SAFETY: `a` is the packed micro-panel of rows t0..t0+rows, the units' panels exist, the
        // task owns these outputs.
        unsafe {
            match units {
                Units::Panels => fused_block(kernels, a, w, (u, 1, np), rows, t0, u, next.map_or(std::ptr::null(), panel), epi),
                Units::Pairs { stride, offset, dealt } => {
                    for i in u..u + np {
                        let unit = dealt_unit(i, count, dealt);
                        let next = if i + 1 < u + np { Some(i + 1) } else { next };
                        let next = next.map_or(std::ptr::null(), |i| panel(dealt_unit(i, count, dealt) * stride));
                        fused_block(kernels, a, w, (unit * stride, offset, 2), rows, t0, unit, next, epi);
                    }
                }
            }
        }
    });
}

/// Unit `u` of rows t0..t0+rows: `panels = (first, offset, n)` are panels first + j·offset,
/// j < n (n ≤ 2), computed [`FUSED_ROWS`] rows at a time into tile columns 32j.., then handed to
/// the epilogue. `next`: the first panel of the task's next unit, laid out as these (null: none),
/// which the first tile's kernels may prefetch ([`block_f32`]).
#[allow(clippy::too_many_arguments)]
unsafe fn fused_block(kernels: FusedKernels, a: *const u32, w: &PackedMatrix, panels: (usize, usize, usize), rows: usize, t0: usize, u: usize, next: *const u8, epi: &FusedEpilogue) {
    let (first, offset, n) = panels;
    // f32 values or bf16 pairs: 4 bytes either way.
    let pstride = w.kdepth * NR;
    let panel = |p: usize| w.buf.ptr.add(p * w.panel_bytes()) as *const u8;
    let mut tile = Tile([[0.0; 2 * NR]; FUSED_ROWS]);
    let tp = tile.0.as_mut_ptr() as *mut f32;
    let to_tile = |y: *mut f32| Out { y, ldy: 2 * NR, cols: NR * n, bias: std::ptr::null(), accumulate: false };
    let few = rows <= K_CHUNK_MAX_ROWS;
    let both_in_one = n == 2 && rows <= kernels.rows().1;
    let mut i = 0;
    while i < rows {
        let r = (rows - i).min(FUSED_ROWS);
        // The next unit streams in once, during the first tile.
        let next = if i == 0 { next } else { std::ptr::null() };
        if both_in_one {
            // Both panels in one kernel (AVX-512: always; otherwise few rows), for more
            // independent FMA chains.
            kernels.block(a, w, i, r, panel(first), offset * pstride, 2, few, next, to_tile(tp));
        } else {
            for j in 0..n {
                let next = if next.is_null() { next } else { next.add(j * offset * w.panel_bytes()) };
                kernels.block(a, w, i, r, panel(first + j * offset), pstride, 1, few, next, to_tile(tp.add(j * NR)));
            }
        }
        epi(t0 + i, u, n, &mut tile.0[..r]);
        i += r;
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn kernel_bf16(a: *const u32, w: &PackedMatrix, p: usize, np: usize, rows: usize, t0: usize, next: Option<usize>, out: Out) {
    let b = w.buf.ptr.add(p * w.panel_bytes()) as *const u32;
    let next = next.map_or(std::ptr::null(), |q| w.buf.ptr.add(q * w.panel_bytes()) as *const u32);
    let pstride = w.kdepth * NR;
    let (col0, end) = w.panel_cols(p);
    let out = Out { y: out.y.add(t0 * out.ldy + col0), cols: end.min(out.cols) - col0, bias: if out.bias.is_null() { out.bias } else { out.bias.add(col0) }, ..out };
    #[cfg(target_arch = "x86_64")]
    {
        simd512::bf16_block(a, b, pstride, w.kdepth, rows, np, prefetched_next(rows <= K_CHUNK_MAX_ROWS, np, w.kdepth, next), out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b, pstride, rows, np, next, out);
        unreachable!("bf16 matrices are only packed on CPUs with AVX512-BF16")
    }
}

/// The portable kernel: the same FMA chain per element, through `f32::mul_add`.
#[allow(clippy::too_many_arguments)]
unsafe fn portable_f32(a: *const f32, b: *const f32, pstride: usize, k: usize, total: usize, np: usize, out: Out) {
    for q in 0..np {
        let bp = b.add(q * pstride);
        let mut i = 0;
        while i < total {
            // Micro-panels of 4 rows (`[k][rows]`) start at row i.
            let rows = (total - i).min(4);
            let ai = a.add(i * k);
            let mut acc = [[0f32; NR]; 4];
            for kk in 0..k {
                let wv = std::slice::from_raw_parts(bp.add(kk * NR), NR);
                for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
                    let xv = *ai.add(kk * rows + r);
                    for (c, &wj) in acc_r.iter_mut().zip(wv) {
                        *c = xv.mul_add(wj, *c);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate().take(rows) {
                for (j, &v) in acc_r.iter().enumerate() {
                    let col = q * NR + j;
                    if col < out.cols {
                        out.scalar(i + r, col, v);
                    }
                }
            }
            i += rows;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod simd512 {
    use super::{Out, NR};
    use std::arch::x86_64::*;

    /// Stores one 16-column group of a row through the epilogue.
    #[inline(always)]
    unsafe fn store16(out: &Out, row: usize, col: usize, acc: __m512) {
        if col >= out.cols {
            return;
        }
        let valid = (out.cols - col).min(16);
        let m: __mmask16 = if valid == 16 { 0xffff } else { (1u32 << valid) as u16 - 1 };
        let mut v = acc;
        if !out.bias.is_null() {
            v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, out.bias.add(col)));
        }
        let dst = out.y.add(row * out.ldy + col);
        if out.accumulate {
            v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), v);
        }
        _mm512_mask_storeu_ps(dst, m, v);
    }

    /// One 32-column row of an accumulator block (64-byte aligned) through the epilogue.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn store_row32(out: &Out, row: usize, acc: *const f32) {
        store16(out, row, 0, _mm512_load_ps(acc));
        store16(out, row, 16, _mm512_load_ps(acc.add(16)));
    }

    /// The next unit's panels (laid out as the block's; f32 values or bf16 pairs, 4 bytes
    /// either way), which the block's micro-panels prefetch into L2 between them: micro-panel
    /// `part` of `parts` its `part`-th share of the panel rows, one row every `parts` of its
    /// own, so the stream is spread evenly over the block.
    #[derive(Clone, Copy)]
    struct Ahead {
        next: *const u32,
        part: usize,
        parts: usize,
    }

    impl Ahead {
        /// A block's micro-panels of `rows` rows, `mr` each: none where there is one (it streams
        /// its own panels from memory; prefetching more would only compete).
        fn of_block(next: *const u32, rows: usize, mr: usize) -> impl Fn(usize) -> Ahead {
            let parts = rows.div_ceil(mr);
            let next = if parts > 1 { next } else { std::ptr::null() };
            move |i| Ahead { next, part: i / mr, parts }
        }

        /// The prefetch stream of a micro-panel of `depth` panel rows over NV vectors (NV/2
        /// panels, the second `pstride` on).
        #[inline(always)]
        fn stream<const NV: usize>(self, pstride: usize, depth: usize) -> AheadStream<NV> {
            let mut lines = [self.next; NV];
            for (j, l) in lines.iter_mut().enumerate() {
                *l = self.next.wrapping_add((j / 2) * pstride + (j % 2) * 16);
            }
            AheadStream { lines, row: self.part * depth / self.parts.max(1), until: 0, every: self.parts }
        }
    }

    /// A micro-panel's share of [`Ahead`]: the next unit's panel row it prefetches next, in
    /// `until` rows of its own.
    struct AheadStream<const NV: usize> {
        lines: [*const u32; NV],
        row: usize,
        until: usize,
        every: usize,
    }

    impl<const NV: usize> AheadStream<NV> {
        /// Called once per panel row of the micro-panel.
        #[inline(always)]
        unsafe fn tick(&mut self) {
            if self.lines[0].is_null() {
                return;
            }
            if self.until == 0 {
                // Into L2, where the next unit's micro-panels will find it (a prefetch never faults).
                for l in self.lines {
                    _mm_prefetch::<_MM_HINT_T1>(l.wrapping_add(self.row * NR) as *const i8);
                }
                self.row += 1;
                self.until = self.every;
            }
            self.until -= 1;
        }
    }

    /// Rows of x (micro-panels of 6 at `a`) × `np` panels (at `b`, the second `pstride` on);
    /// with two micro-panels or more, prefetching `next` (null: none) as [`Ahead`] says.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn f32_block(a: *const f32, b: *const f32, pstride: usize, k: usize, rows: usize, np: usize, next: *const f32, out: Out) {
        let ahead_of = Ahead::of_block(next as *const u32, rows, 6);
        let mut i = 0;
        while i < rows {
            // Micro-panels of 6 rows ([`super::f32_rows`]).
            let mr = (rows - i).min(6);
            let (a, out) = (a.add(i * k), Out { y: out.y.add(i * out.ldy), ..out });
            let ahead = ahead_of(i);
            match (mr, np) {
                (1, 2) => f32_kern::<1, 4>(a, b, pstride, k, ahead, out),
                (2, 2) => f32_kern::<2, 4>(a, b, pstride, k, ahead, out),
                (3, 2) => f32_kern::<3, 4>(a, b, pstride, k, ahead, out),
                (4, 2) => f32_kern::<4, 4>(a, b, pstride, k, ahead, out),
                (5, 2) => f32_kern::<5, 4>(a, b, pstride, k, ahead, out),
                (_, 2) => f32_kern::<6, 4>(a, b, pstride, k, ahead, out),
                (1, _) => f32_kern::<1, 2>(a, b, pstride, k, ahead, out),
                (2, _) => f32_kern::<2, 2>(a, b, pstride, k, ahead, out),
                (3, _) => f32_kern::<3, 2>(a, b, pstride, k, ahead, out),
                (4, _) => f32_kern::<4, 2>(a, b, pstride, k, ahead, out),
                (5, _) => f32_kern::<5, 2>(a, b, pstride, k, ahead, out),
                _ => f32_kern::<6, 2>(a, b, pstride, k, ahead, out),
            }
            i += mr;
        }
    }

    /// Micro-panels up to which [`f32_block_chunked`] takes a block (its accumulator tiles stay
    /// in L1 beside two chunks: 11 × 1.5 KiB).
    pub const CHUNKED_MICRO: usize = super::K_CHUNK_MAX_ROWS / 6;

    /// One micro-panel's accumulators: up to 6 rows × 4 vectors.
    const TILE: usize = 6 * 4 * 16;

    #[repr(C, align(64))]
    struct AccTiles([[f32; TILE]; CHUNKED_MICRO]);

    /// The same block, chunk by chunk of [`super::K_CHUNK`] panel rows: every micro-panel runs
    /// over a chunk, its accumulators kept in a tile between chunks, while the chunk is in L1,
    /// and together they prefetch the next chunk, so memory streams while the micro-panels
    /// compute (see [`super::k_chunks`]). Each output is the same FMA chain in the same order as
    /// in [`f32_block`] (a tile holds the running sums exactly), so results are bit-identical.
    ///
    /// # Safety
    /// As [`f32_block`], with at most [`CHUNKED_MICRO`] micro-panels.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_block_chunked(a: *const f32, b: *const f32, pstride: usize, k: usize, rows: usize, np: usize, out: Out) {
        let micro = rows.div_ceil(6);
        debug_assert!(micro <= CHUNKED_MICRO);
        let mut tiles = AccTiles([[0.0; TILE]; CHUNKED_MICRO]);
        let mut k0 = 0;
        while k0 < k {
            let k1 = (k0 + super::K_CHUNK).min(k);
            for (t, tile) in tiles.0.iter_mut().enumerate().take(micro) {
                let i = t * 6;
                let a = a.add(i * k);
                let c = Chunk { k0, k1, micro, t, tile: tile.as_mut_ptr() };
                match ((rows - i).min(6), np) {
                    (1, 2) => f32_chunk::<1, 4>(a, b, pstride, c),
                    (2, 2) => f32_chunk::<2, 4>(a, b, pstride, c),
                    (3, 2) => f32_chunk::<3, 4>(a, b, pstride, c),
                    (4, 2) => f32_chunk::<4, 4>(a, b, pstride, c),
                    (5, 2) => f32_chunk::<5, 4>(a, b, pstride, c),
                    (_, 2) => f32_chunk::<6, 4>(a, b, pstride, c),
                    (1, _) => f32_chunk::<1, 2>(a, b, pstride, c),
                    (2, _) => f32_chunk::<2, 2>(a, b, pstride, c),
                    (3, _) => f32_chunk::<3, 2>(a, b, pstride, c),
                    (4, _) => f32_chunk::<4, 2>(a, b, pstride, c),
                    (5, _) => f32_chunk::<5, 2>(a, b, pstride, c),
                    _ => f32_chunk::<6, 2>(a, b, pstride, c),
                }
            }
            k0 = k1;
        }
        let vectors = if np == 2 { 4 } else { 2 };
        for (t, tile) in tiles.0.iter().enumerate().take(micro) {
            let i = t * 6;
            let out = Out { y: out.y.add(i * out.ldy), ..out };
            for r in 0..(rows - i).min(6) {
                for j in 0..vectors {
                    store16(&out, r, (j / 2) * NR + (j % 2) * 16, _mm512_load_ps(tile.as_ptr().add((r * 4 + j) * 16)));
                }
            }
        }
    }

    /// Micro-panel `t` of `micro` over panel rows k0..k1, its running sums in `tile`
    /// (`[row][vector][16]`, 4 vectors a row).
    #[derive(Clone, Copy)]
    struct Chunk {
        k0: usize,
        k1: usize,
        micro: usize,
        t: usize,
        tile: *mut f32,
    }

    /// MR rows × NV vectors over one chunk; micro-panel t prefetches the next chunk's rows
    /// t, t + micro, … (each of them: NV lines).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn f32_chunk<const MR: usize, const NV: usize>(a: *const f32, b: *const f32, pstride: usize, c: Chunk) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        if c.k0 > 0 {
            for i in 0..MR {
                for j in 0..NV {
                    acc[i][j] = _mm512_load_ps(c.tile.add((i * 4 + j) * 16));
                }
            }
        }
        let mut bp = [b; NV];
        for (j, p) in bp.iter_mut().enumerate() {
            *p = b.add((j / 2) * pstride + (j % 2) * 16);
        }
        let mut until_prefetch = c.t;
        for kk in c.k0..c.k1 {
            let mut wv = [_mm512_setzero_ps(); NV];
            for j in 0..NV {
                wv[j] = _mm512_load_ps(bp[j].add(kk * NR));
            }
            if until_prefetch == 0 {
                // Past a panel's end this touches the next panel or nothing: a prefetch never faults.
                for j in 0..NV {
                    _mm_prefetch::<_MM_HINT_T0>(bp[j].wrapping_add((kk + super::K_CHUNK) * NR) as *const i8);
                }
                until_prefetch = c.micro;
            }
            until_prefetch -= 1;
            for i in 0..MR {
                let xv = _mm512_set1_ps(*a.add(kk * MR + i));
                for j in 0..NV {
                    acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
                }
            }
        }
        for i in 0..MR {
            for j in 0..NV {
                _mm512_store_ps(c.tile.add((i * 4 + j) * 16), acc[i][j]);
            }
        }
    }

    /// MR rows (a micro-panel `[k][MR]`) × NV 16-column vectors (NV/2 panels).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn f32_kern<const MR: usize, const NV: usize>(a: *const f32, b: *const f32, pstride: usize, k: usize, ahead: Ahead, out: Out) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut bp = [b; NV];
        for (j, p) in bp.iter_mut().enumerate() {
            *p = b.add((j / 2) * pstride + (j % 2) * 16);
        }
        let prefetch = if MR <= 2 { super::decode_prefetch_rows() } else { super::panel_prefetch_rows() };
        let mut next_unit = ahead.stream::<NV>(pstride, k);
        for kk in 0..k {
            let mut wv = [_mm512_setzero_ps(); NV];
            for j in 0..NV {
                wv[j] = _mm512_load_ps(bp[j].add(kk * NR));
            }
            if let Some(ahead) = prefetch {
                // Past a panel's end this touches the next panel or nothing: a prefetch never faults.
                for j in 0..NV {
                    _mm_prefetch::<_MM_HINT_T0>(bp[j].wrapping_add((kk + ahead) * NR) as *const i8);
                }
            }
            next_unit.tick();
            for i in 0..MR {
                let xv = _mm512_set1_ps(*a.add(kk * MR + i));
                for j in 0..NV {
                    acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                store16(&out, i, (j / 2) * NR + (j % 2) * 16, v);
            }
        }
    }

    /// Lane l of output vector q of a 16-column chunk packed `[16][6]` is flat element
    /// f = 16q + l: row f % 6, column f / 6.
    const PACK6_COLUMNS: [[i32; 16]; 6] = {
        let mut idx = [[0; 16]; 6];
        let mut f = 0;
        while f < 96 {
            idx[f / 16][f % 16] = (f / 6) as i32;
            f += 1;
        }
        idx
    };
    /// The lanes of output vector q that come from row i.
    const PACK6_LANES: [[u16; 6]; 6] = {
        let mut m = [[0; 6]; 6];
        let mut f = 0;
        while f < 96 {
            m[f / 16][f % 6] |= 1 << (f % 16);
            f += 1;
        }
        m
    };

    /// Packs 6 rows into a micro-panel `[kdepth][6]`, 16 columns at a time: each of the 6
    /// output vectors gathers its lanes from the rows by masked permutes (pure data movement).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack6(rows: &[*const u32; 6], kdepth: usize, dst: *mut u32) {
        let idx: [__m512i; 6] = std::array::from_fn(|q| _mm512_loadu_si512(PACK6_COLUMNS[q].as_ptr() as *const _));
        let mut kk = 0;
        while kk + 16 <= kdepth {
            let r: [__m512; 6] = std::array::from_fn(|i| _mm512_loadu_ps(rows[i].add(kk) as *const f32));
            for q in 0..6 {
                let mut o = _mm512_setzero_ps();
                for (i, &ri) in r.iter().enumerate() {
                    o = _mm512_mask_permutexvar_ps(o, PACK6_LANES[q][i], idx[q], ri);
                }
                _mm512_storeu_ps(dst.add(kk * 6 + 16 * q) as *mut f32, o);
            }
            kk += 16;
        }
        while kk < kdepth {
            for (i, r) in rows.iter().enumerate() {
                *dst.add(kk * 6 + i) = *r.add(kk);
            }
            kk += 1;
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn bf16_block(a: *const u32, b: *const u32, pstride: usize, kp: usize, rows: usize, np: usize, next: *const u32, out: Out) {
        let ahead_of = Ahead::of_block(next, rows, 8);
        let mut i = 0;
        while i < rows {
            let mr = (rows - i).min(8);
            let (a, out) = (a.add(i * kp), Out { y: out.y.add(i * out.ldy), ..out });
            let ahead = ahead_of(i);
            match (mr, np) {
                (1, 2) => bf16_kern::<1, 4>(a, b, pstride, kp, ahead, out),
                (2, 2) => bf16_kern::<2, 4>(a, b, pstride, kp, ahead, out),
                (3, 2) => bf16_kern::<3, 4>(a, b, pstride, kp, ahead, out),
                (4, 2) => bf16_kern::<4, 4>(a, b, pstride, kp, ahead, out),
                (1, _) => bf16_kern::<1, 2>(a, b, pstride, kp, ahead, out),
                (2, _) => bf16_kern::<2, 2>(a, b, pstride, kp, ahead, out),
                (3, _) => bf16_kern::<3, 2>(a, b, pstride, kp, ahead, out),
                (4, _) => bf16_kern::<4, 2>(a, b, pstride, kp, ahead, out),
                (5, _) => bf16_kern::<5, 2>(a, b, pstride, kp, ahead, out),
                (6, _) => bf16_kern::<6, 2>(a, b, pstride, kp, ahead, out),
                (7, _) => bf16_kern::<7, 2>(a, b, pstride, kp, ahead, out),
                _ => bf16_kern::<8, 2>(a, b, pstride, kp, ahead, out),
            }
            i += mr;
        }
    }

    /// `vdpbf16ps`: each 32-bit lane multiplies a bf16 pair of x by the pair of its column.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn bf16_kern<const MR: usize, const NV: usize>(a: *const u32, b: *const u32, pstride: usize, kp: usize, ahead: Ahead, out: Out) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut bp = [b; NV];
        for (j, p) in bp.iter_mut().enumerate() {
            *p = b.add((j / 2) * pstride + (j % 2) * 16);
        }
        let mut next_unit = ahead.stream::<NV>(pstride, kp);
        for kk in 0..kp {
            let mut wv = [_mm512_setzero_si512(); NV];
            for j in 0..NV {
                wv[j] = _mm512_load_si512(bp[j].add(kk * NR) as *const __m512i);
            }
            next_unit.tick();
            for i in 0..MR {
                let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(kk * MR + i) as i32));
                for j in 0..NV {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, std::mem::transmute::<__m512i, __m512bh>(wv[j]));
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                store16(&out, i, (j / 2) * NR + (j % 2) * 16, v);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_burst(iters: usize) -> f64 {
        let mut acc = [_mm512_setzero_ps(); 16];
        let (a, b) = (std::hint::black_box(_mm512_set1_ps(1e-7)), std::hint::black_box(_mm512_set1_ps(0.999)));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(a, b, *v);
            }
        }
        std::hint::black_box(&acc);
        (iters * 16 * 16 * 2) as f64
    }

    /// [`super::for_each_outlier`]: the squares summed in 16 lanes (masked tail), then across
    /// the lanes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn for_each_outlier(row: &[f32], ratio: f32, f: &mut impl FnMut(usize, f32)) {
        let (k, p) = (row.len(), row.as_ptr());
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= k {
            let v = _mm512_loadu_ps(p.add(i));
            acc = _mm512_fmadd_ps(v, v, acc);
            i += 16;
        }
        let tail: __mmask16 = ((1u32 << (k - i)) - 1) as u16;
        let v = _mm512_maskz_loadu_ps(tail, p.add(i));
        acc = _mm512_fmadd_ps(v, v, acc);
        let bound = _mm512_set1_ps(ratio * (_mm512_reduce_add_ps(acc) / k.max(1) as f32).sqrt());
        let mut i = 0;
        while i < k {
            let m: __mmask16 = if i + 16 <= k { 0xffff } else { ((1u32 << (k - i)) - 1) as u16 };
            let v = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, p.add(i)));
            let mut hit = _mm512_mask_cmp_ps_mask::<_CMP_GT_OQ>(m, v, bound);
            while hit != 0 {
                let l = hit.trailing_zeros() as usize;
                f(i + l, *p.add(i + l));
                hit &= hit - 1;
            }
            i += 16;
        }
    }

    /// One row of f32 as bf16 (round to nearest even) pairs, zero-padded to an even length.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn row_to_bf16(row: &[f32], out: &mut [u32]) {
        let k = row.len();
        let dst = out.as_mut_ptr() as *mut u16;
        let mut i = 0;
        while i + 16 <= k {
            let v = _mm512_loadu_ps(row.as_ptr().add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(dst.add(i) as *mut __m256i, h);
            i += 16;
        }
        if i < k {
            let m: __mmask16 = (1u32 << (k - i)) as u16 - 1;
            let v = _mm512_maskz_loadu_ps(m, row.as_ptr().add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            let mut tmp = [0u16; 16];
            _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, h);
            for (j, &t) in tmp.iter().enumerate().take(k - i) {
                *dst.add(i + j) = t;
            }
        }
        if k % 2 == 1 {
            *dst.add(k) = 0;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
pub(crate) mod simd256 {
    use super::{Out, NR};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn store8(out: &Out, row: usize, col: usize, acc: __m256) {
        if col >= out.cols {
            return;
        }
        if out.cols - col >= 8 {
            let mut v = acc;
            if !out.bias.is_null() {
                v = _mm256_add_ps(v, _mm256_loadu_ps(out.bias.add(col)));
            }
            let dst = out.y.add(row * out.ldy + col);
            if out.accumulate {
                v = _mm256_add_ps(_mm256_loadu_ps(dst), v);
            }
            _mm256_storeu_ps(dst, v);
        } else {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            for (j, &l) in lanes.iter().enumerate().take(out.cols - col) {
                out.scalar(row, col + j, l);
            }
        }
    }

    /// Packs 8 rows into a micro-panel `[kdepth][8]`, 8×8 blocks at a time through transposes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn pack8(rows: &[*const u32; 8], kdepth: usize, dst: *mut u32) {
        let mut kk = 0;
        while kk + 8 <= kdepth {
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(rows[i].add(kk) as *const f32));
            let cols = transpose8(r);
            for (j, c) in cols.iter().enumerate() {
                _mm256_storeu_ps(dst.add((kk + j) * 8) as *mut f32, *c);
            }
            kk += 8;
        }
        while kk < kdepth {
            for (i, r) in rows.iter().enumerate() {
                *dst.add(kk * 8 + i) = *r.add(kk);
            }
            kk += 1;
        }
    }

    /// 8×8 transpose: `out[j][i] = r[i][j]` (pure data movement).
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ]
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_burst(iters: usize) -> f64 {
        let mut acc = [_mm256_setzero_ps(); 12];
        let (a, b) = (std::hint::black_box(_mm256_set1_ps(1e-7)), std::hint::black_box(_mm256_set1_ps(0.999)));
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(a, b, *v);
            }
        }
        std::hint::black_box(&acc);
        (iters * 12 * 8 * 2) as f64
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn f32_block(a: *const f32, b: *const f32, pstride: usize, k: usize, rows: usize, np: usize, out: Out) {
        let mut i = 0;
        while i < rows {
            let mr = (rows - i).min(3);
            let (a, out) = (a.add(i * k), Out { y: out.y.add(i * out.ldy), ..out });
            let second = Out { y: out.y.add(NR), cols: out.cols.saturating_sub(NR), bias: if out.bias.is_null() { out.bias } else { out.bias.add(NR) }, ..out };
            match (mr, np) {
                (1, 2) => f32_kern::<1, 8>(a, b, pstride, k, out),
                (1, _) => f32_kern::<1, 4>(a, b, pstride, k, out),
                (2, _) => f32_kern::<2, 4>(a, b, pstride, k, out),
                _ => f32_kern::<3, 4>(a, b, pstride, k, out),
            }
            // Two panels at once only pay for one row; otherwise the second panel separately.
            if np == 2 && mr > 1 {
                match mr {
                    2 => f32_kern::<2, 4>(a, b.add(pstride), pstride, k, second),
                    _ => f32_kern::<3, 4>(a, b.add(pstride), pstride, k, second),
                }
            }
            i += mr;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn f32_kern<const MR: usize, const NV: usize>(a: *const f32, b: *const f32, pstride: usize, k: usize, out: Out) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        let mut bp = [b; NV];
        for (j, p) in bp.iter_mut().enumerate() {
            *p = b.add((j / 4) * pstride + (j % 4) * 8);
        }
        for kk in 0..k {
            for i in 0..MR {
                let xv = _mm256_set1_ps(*a.add(kk * MR + i));
                for j in 0..NV {
                    acc[i][j] = _mm256_fmadd_ps(xv, _mm256_load_ps(bp[j].add(kk * NR)), acc[i][j]);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                store8(&out, i, (j / 4) * NR + (j % 4) * 8, v);
            }
        }
    }
}

/// The CPU's f32 FMA rate in GFLOP/s over rayon's threads: register-only FMA chains in the
/// widest vectors the f32 kernels use, for about `seconds`. The ceiling no GEMM can pass.
pub fn fma_peak_gflops(seconds: f64) -> f64 {
    let threads = rayon::current_num_threads().max(1);
    let isa = isa();
    let per_thread: Vec<f64> = (0..threads)
        .into_par_iter()
        .map(|_| {
            let start = std::time::Instant::now();
            let mut flops = 0f64;
            while start.elapsed().as_secs_f64() < seconds {
                flops += fma_burst(isa);
            }
            flops / start.elapsed().as_secs_f64()
        })
        .collect();
    per_thread.iter().sum::<f64>() / 1e9
}

/// Runs a burst of independent FMA chains; returns the FLOPs done.
fn fma_burst(isa: Isa) -> f64 {
    const ITERS: usize = 1 << 16;
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: features checked by `isa()`.
        match isa {
            Isa::Avx512 => return unsafe { simd512::fma_burst(ITERS) },
            Isa::Avx2 => return unsafe { simd256::fma_burst(ITERS) },
            Isa::Portable => {}
        }
    }
    let _ = isa;
    let mut acc = [0f32; 64];
    for _ in 0..ITERS / 16 {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = (i as f32).mul_add(1e-7, *a);
        }
    }
    std::hint::black_box(&acc);
    (ITERS / 16 * 64 * 2) as f64
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn reference(x: &[f32], t: usize, k: usize, w: &[f32], n: usize, b: Option<&[f32]>) -> Vec<f32> {
        let mut y = vec![0f32; t * n];
        for i in 0..t {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    s += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                y[i * n + j] = s as f32 + b.map_or(0.0, |b| b[j]);
            }
        }
        y
    }

    /// The chain every path must reproduce bit for bit.
    fn chain(x: &[f32], t: usize, k: usize, w: &[f32], n: usize, b: Option<&[f32]>, y0: Option<&[f32]>) -> Vec<f32> {
        let mut y = vec![0f32; t * n];
        for i in 0..t {
            for j in 0..n {
                let mut s = 0f32;
                for kk in 0..k {
                    s = x[i * k + kk].mul_add(w[j * k + kk], s);
                }
                if let Some(b) = b {
                    s += b[j];
                }
                y[i * n + j] = match y0 {
                    Some(y0) => y0[i * n + j] + s,
                    None => s,
                };
            }
        }
        y
    }

    pub(crate) fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    const SHAPES: &[(usize, usize, usize)] =
        &[(1, 1, 1), (3, 7, 5), (5, 17, 33), (9, 64, 19), (4, 576, 40), (17, 33, 97), (1, 100, 64), (2, 9, 65), (3, 20, 130), (4, 11, 100), (25, 40, 70)];

    #[test]
    fn matches_reference_on_odd_shapes() {
        for &(t, k, n) in SHAPES {
            let x = pseudo(t * k, 1);
            let w = pseudo(n * k, 2);
            let b = pseudo(n, 3);
            let want = reference(&x, t, k, &w, n, Some(&b));
            let mut y = vec![0f32; t * n];
            linear(&x, t, k, &w, n, Some(&b), &mut y, false);
            for (a, e) in y.iter().zip(&want) {
                assert!((a - e).abs() <= 1e-5 * (1.0 + e.abs()), "{t}x{k}x{n}: {a} vs {e}");
            }
            let mut acc = vec![1f32; t * n];
            linear(&x, t, k, &w, n, Some(&b), &mut acc, true);
            for (a, e) in acc.iter().zip(&want) {
                assert!((a - (e + 1.0)).abs() <= 1e-5 * (1.0 + e.abs()));
            }
        }
    }

    #[test]
    fn every_kernel_is_the_same_fma_chain() {
        let isa = isa();
        for &(t, k, n) in SHAPES {
            let x = pseudo(t * k, 4);
            let w = pseudo(n * k, 5);
            let b = pseudo(n, 6);
            let y0 = pseudo(t * n, 7);
            let p = PackedMatrix::pack(&w, n, k, Compute::F32);
            for (bias, acc) in [(None, false), (Some(&b[..]), false), (Some(&b[..]), true)] {
                let want = chain(&x, t, k, &w, n, bias, if acc { Some(&y0) } else { None });
                for threads in [1, 2, 3] {
                    let mut y = if acc { y0.clone() } else { vec![0f32; t * n] };
                    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| gemm(&x, t, &p, bias, &mut y, acc));
                    assert_eq!(y, want, "{isa:?} {t}x{k}x{n} bias={} acc={acc} threads {threads}", bias.is_some());
                }
                // The lower instruction sets too, where the CPU has them.
                let mut y2 = if acc { y0.clone() } else { vec![0f32; t * n] };
                let out = Out { y: y2.as_mut_ptr(), ldy: n, cols: n, bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()), accumulate: acc };
                for lower in [Isa::Avx2, Isa::Portable] {
                    if lower == Isa::Avx2 && detect_isa() == Isa::Portable {
                        continue;
                    }
                    y2.copy_from_slice(&if acc { y0.clone() } else { vec![0f32; t * n] });
                    let mr = if lower == Isa::Avx2 { 3 } else { 4 };
                    // One thread: one panel group, so small row counts take the two-panel kernels.
                    for threads in [1, 2] {
                        y2.copy_from_slice(&if acc { y0.clone() } else { vec![0f32; t * n] });
                        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
                            drive(t, k, Source::Rows(Src(x.as_ptr() as *const u32)), Panels::of(&p), mr, 4, &|a, t0, mr, pp, np, next| unsafe { kernel_f32(lower, a as *const f32, &p, pp, np, mr, t0, next, out) })
                        });
                        assert_eq!(y2, want, "{lower:?} {t}x{k}x{n} threads {threads}");
                    }
                }
            }
        }
    }

    /// The k-chunked AVX-512 blocks (which the GEMMs take on some CPUs only, see `k_chunks`)
    /// are the same FMA chain, across chunk ends, partial micro-panels and single panels.
    #[test]
    fn k_chunked_blocks_are_the_same_fma_chain() {
        if detect_isa() != Isa::Avx512 {
            eprintln!("no AVX-512 here: the k-chunked kernels are not built for this CPU");
            return;
        }
        for &(t, k, n) in &[(13, 33, 97), (18, 16, 64), (24, 576, 70), (31, 17, 40), (66, 100, 130), (40, 1, 33), (7, 50, 32)] {
            let x = pseudo(t * k, 8);
            let w = pseudo(n * k, 9);
            let b = pseudo(n, 10);
            let y0 = pseudo(t * n, 11);
            let p = PackedMatrix::pack(&w, n, k, Compute::F32);
            for (bias, acc) in [(None, false), (Some(&b[..]), true)] {
                let want = chain(&x, t, k, &w, n, bias, if acc { Some(&y0) } else { None });
                let mut y = if acc { y0.clone() } else { vec![0f32; t * n] };
                let out = Out { y: y.as_mut_ptr(), ldy: n, cols: n, bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()), accumulate: acc };
                // One thread: every row in one block.
                rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| {
                    drive(t, k, Source::Rows(Src(x.as_ptr() as *const u32)), Panels::of(&p), 6, usize::MAX, &|a, t0, rows, pp, np, _| unsafe {
                        assert!(rows.div_ceil(6) <= simd512::CHUNKED_MICRO, "{rows} rows in one block");
                        // The whole Out (Sync), not its pointer fields, into the closure.
                        let whole = out;
                        let (col0, end) = p.panel_cols(pp);
                        let bias = if whole.bias.is_null() { whole.bias } else { whole.bias.add(col0) };
                        let out = Out { y: whole.y.add(t0 * whole.ldy + col0), cols: end.min(whole.cols) - col0, bias, ..whole };
                        simd512::f32_block_chunked(a as *const f32, p.buf.ptr.add(pp * p.panel_bytes()) as *const f32, p.kdepth * NR, k, rows, np, out)
                    })
                });
                assert_eq!(y, want, "{t}x{k}x{n} bias={} acc={acc}", bias.is_some());
            }
        }
    }

    #[test]
    fn on_off_policy_reads_on_off_or_falls_back() {
        for (setting, vendor, on) in [(None, true, true), (None, false, false), (Some("on"), false, true), (Some("off"), true, false), (Some("yes"), false, false), (Some("yes"), true, true)] {
            assert_eq!(on_off_policy(setting, || vendor), on, "{setting:?}, vendor default {vendor}");
        }
    }

    /// A prefetch distance: `none`, a row count, or (unset or unreadable) the vendor's default.
    #[test]
    fn prefetch_policy_reads_none_a_count_or_falls_back() {
        let vendor = || Some(7);
        for (setting, rows) in [(None, Some(7)), (Some("none"), None), (Some("0"), Some(0)), (Some("12"), Some(12)), (Some("far"), Some(7)), (Some("-1"), Some(7))] {
            assert_eq!(prefetch_policy(setting, vendor), rows, "{setting:?}");
        }
    }

    /// Threads sharing one row block's panels: every (row, panel) is computed exactly once, every
    /// task starts at a micro-panel, and the threads' work differs by at most one micro-panel.
    #[test]
    fn panel_shares_cover_every_row_and_panel_once_in_equal_parts() {
        for (tokens, mr, panels) in [(5, 6, 18), (16, 6, 18), (16, 6, 96), (7, 6, 1), (13, 8, 3), (64, 6, 1536), (6, 6, 2), (100, 3, 5)] {
            for threads in 2..=5 {
                let shares: Vec<Vec<Task>> = (0..threads).map(|t| panel_share(tokens, mr, panels, threads, t).collect()).collect();
                assert_eq!(shares.len(), threads);
                let mut seen = vec![0u8; tokens * panels];
                let mut work = Vec::new();
                for share in &shares {
                    let mut units = 0;
                    for &(m0, m1, p0, p1) in share {
                        assert!(m0 % mr == 0 && m0 < m1 && m1 <= tokens && p0 < p1 && p1 <= panels, "{tokens} {mr} {panels} {threads}: task {:?}", (m0, m1, p0, p1));
                        assert!(p1 - p0 <= 2 && p0 % 2 == 0, "a task is one panel pair");
                        for r in m0..m1 {
                            for p in p0..p1 {
                                seen[r * panels + p] += 1;
                            }
                        }
                        units += (m1 - m0).div_ceil(mr);
                    }
                    work.push(units);
                }
                assert!(seen.iter().all(|&c| c == 1), "{tokens} rows {mr}/micro-panel {panels} panels {threads} threads: not covered once");
                let (lo, hi) = (work.iter().min().unwrap(), work.iter().max().unwrap());
                assert!(hi - lo <= 1, "{tokens} {mr} {panels} {threads}: micro-panel pairs per thread {work:?}");
            }
        }
    }

    /// `drive` tells each kernel call the panel its thread computes next (which the few-row
    /// kernels prefetch, [`next_unit_prefetch`]): the following call's, across the tasks of a
    /// thread's panel share too, and none only after a task (a share: after a thread's run).
    #[test]
    fn drive_names_the_panel_each_call_computes_next() {
        use std::sync::Mutex;
        let kdepth = 8;
        for (tokens, panels, threads) in [(16, 96, 2), (13, 7, 2), (30, 18, 3), (16, 5, 4), (300, 40, 2), (1, 9, 2), (64, 1536, 2)] {
            let x = pseudo(tokens * kdepth, 1);
            let calls = Mutex::new(Vec::new());
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
                drive(tokens, kdepth, Source::Rows(Src(x.as_ptr() as *const u32)), Panels { count: panels, pair_break: usize::MAX }, 6, usize::MAX, &|_, t0, rows, p, np, next| {
                    calls.lock().unwrap().push((rayon::current_thread_index(), t0, rows, p, np, next));
                })
            });
            let calls = calls.into_inner().unwrap();
            let shared = tokens > 6 && tokens <= (l2_block_bytes() / (kdepth * 4) / 6 * 6);
            let mut ends = 0;
            for (i, &(worker, t0, rows, p, np, next)) in calls.iter().enumerate() {
                let following = calls[i + 1..].iter().find(|c| c.0 == worker);
                match next {
                    Some(q) => assert_eq!(following.map(|c| c.3), Some(q), "{tokens} rows {panels} panels {threads} threads: call {:?} names {q}", (t0, rows, p, np)),
                    None => ends += 1,
                }
            }
            if shared {
                let runs = (0..threads).filter(|&t| panel_share(tokens, 6, panels, threads, t).next().is_some()).count();
                assert_eq!(ends, runs, "{tokens} rows {panels} panels {threads} threads: a thread's next task went unnamed");
            }
        }
    }

    #[test]
    fn rows_are_batch_and_thread_invariant() {
        for compute in [Compute::F32, Compute::Bf16] {
            let (k, n) = (100, 70);
            let x = pseudo(13 * k, 4);
            let w = pseudo(n * k, 5);
            let p = PackedMatrix::pack(&w, n, k, compute);
            let mut all = vec![0f32; 13 * n];
            gemm(&x, 13, &p, None, &mut all, false);
            for t in 0..13 {
                let mut one = vec![0f32; n];
                gemm(&x[t * k..(t + 1) * k], 1, &p, None, &mut one, false);
                assert_eq!(one, all[t * n..(t + 1) * n], "{compute:?}: row {t} differs when computed alone");
            }
            let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let mut one_thread = vec![0f32; 13 * n];
            single.install(|| gemm(&x, 13, &p, None, &mut one_thread, false));
            assert_eq!(one_thread, all, "{compute:?}: thread count changed results");
        }
    }

    #[test]
    fn bf16_is_close_to_f32() {
        if !has_bf16() {
            eprintln!("no AVX512-BF16 here: the bf16 path falls back to f32");
        }
        for &(t, k, n) in SHAPES {
            let x = pseudo(t * k, 8);
            let w = pseudo(n * k, 9);
            let want = reference(&x, t, k, &w, n, None);
            let p = PackedMatrix::pack(&w, n, k, Compute::Bf16);
            let mut y = vec![0f32; t * n];
            gemm(&x, t, &p, None, &mut y, false);
            let err: f64 = y.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
            let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            assert!(err <= 1e-2 * norm.max(1e-3), "{t}x{k}x{n}: bf16 relative error {}", err / norm);
        }
    }

    /// The bf16 kernel in use (AMX tiles or AVX512-BF16) against an f64 sum of the same
    /// bf16-rounded products: only the f32 accumulation may differ, so the bound is tight. Odd K
    /// and row counts that are not whole tiles check the padding; 1–16 rows AMX's short tiles,
    /// 18 and 19 panels its uneven panel groups, 330 rows of K 1,536 its row chunks of unequal
    /// blocks (11 blocks in 3 or 4 chunks).
    #[test]
    fn bf16_kernel_matches_rounded_reference() {
        set_bf16_even_if_slower(true);
        if effective_compute(Compute::Bf16) != Compute::Bf16 {
            eprintln!("no bf16 kernel here");
            return;
        }
        let round = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
        for &(t, k, n) in &[(1, 7, 5), (17, 33, 40), (33, 576, 64), (70, 1537, 97), (5, 64, 3), (16, 100, 600), (3, 1536, 576), (330, 1536, 40)] {
            let x = pseudo(t * k, 31);
            let w = pseudo(n * k, 32);
            let bias = pseudo(n, 33);
            let p = PackedMatrix::pack(&w, n, k, Compute::Bf16);
            let y0 = pseudo(t * n, 34);
            let mut y = y0.clone();
            gemm(&x, t, &p, Some(&bias), &mut y, true);
            for r in 0..t {
                for c in 0..n {
                    let dot: f64 = (0..k).map(|j| round(x[r * k + j]) * round(w[c * k + j])).sum();
                    let want = y0[r * n + c] as f64 + (dot + bias[c] as f64);
                    let scale: f64 = (0..k).map(|j| (round(x[r * k + j]) * round(w[c * k + j])).abs()).sum::<f64>() + 1.0;
                    let got = y[r * n + c] as f64;
                    assert!((got - want).abs() <= 1e-6 * scale, "{t}x{k}x{n} [{r},{c}] ({:?}): {got} vs {want}", bf16_kernel());
                }
            }
        }
    }

    /// Rows with massive inputs (as in down projections): plain bf16 loses the big terms'
    /// precision, the split applies them in f32. Also: a row's split result does not depend on
    /// the batch or the thread count, and rows listed as f32 rows get exactly the f32 GEMM's
    /// result, with and without accumulation. 45 rows of 1,536 inputs are converted (and their
    /// outliers found) by the workers; each row alone, on the calling thread.
    #[test]
    fn split_applies_outlier_inputs_in_f32() {
        let (t, k, n) = (45, 1536, 100);
        assert!(t * k > PARALLEL_CONVERSION_VALUES, "the batch must take the parallel conversion");
        let mut x = pseudo(t * k, 21);
        // Every other row gets two inputs beyond 16 × its RMS (with them, RMS ≈ 10), one at an
        // odd index (the high half of a bf16 pair), one at an even one (the low half).
        for r in (0..t).step_by(2) {
            x[r * k + 7] = 300.0 + r as f32;
            x[r * k + 1000] = -250.4567;
        }
        let w = pseudo(n * k, 22);
        let bias = pseudo(n, 23);
        let want = reference(&x, t, k, &w, n, Some(&bias));
        let (fast, exact) = (PackedMatrix::pack(&w, n, k, Compute::Bf16), PackedMatrix::pack(&w, n, k, Compute::F32));
        let rel = |y: &[f32], r: usize| {
            let (y, want) = (&y[r * n..(r + 1) * n], &want[r * n..(r + 1) * n]);
            let err: f64 = y.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
            err / want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt()
        };
        let mut split = vec![0f32; t * n];
        gemm_split(&x, t, &fast, &exact, Some(&bias), &mut split, false, &[]);
        let mut plain = vec![0f32; t * n];
        gemm(&x, t, &fast, Some(&bias), &mut plain, false);
        for r in 0..t {
            let e = rel(&split, r);
            // The bf16 kernels run only beside the AVX-512 f32 kernels (not under RESID_CPU_ISA=avx2).
            if bf16_kernel().is_some() {
                // Without outliers the split is plain bf16, bit for bit.
                if r % 2 == 1 {
                    assert_eq!(split[r * n..(r + 1) * n], plain[r * n..(r + 1) * n], "row {r}");
                } else {
                    // The outlier terms dominate these rows; only the small inputs are rounded.
                    assert!(e < 1e-3, "row {r}: split relative error {e:.2e}");
                    assert!(rel(&plain, r) > 2.0 * e, "row {r}: plain bf16 {:.2e} vs split {e:.2e}", rel(&plain, r));
                }
            } else {
                assert!(e < 1e-5, "row {r}: without AVX512-BF16 the split is f32 ({e:.2e})");
            }
        }
        for r in 0..t {
            let mut one = pseudo(n, 24);
            let mut both = one.clone();
            gemm_split(&x[r * k..(r + 1) * k], 1, &fast, &exact, Some(&bias), &mut one, true, &[]);
            for (b, s) in both.iter_mut().zip(&split[r * n..(r + 1) * n]) {
                *b += *s;
            }
            let mut alone = vec![0f32; n];
            gemm_split(&x[r * k..(r + 1) * k], 1, &fast, &exact, Some(&bias), &mut alone, false, &[]);
            assert_eq!(alone, split[r * n..(r + 1) * n], "row {r} differs when computed alone");
            let gap: f32 = one.iter().zip(&both).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(gap < 1e-2, "row {r}: accumulating differs from adding by {gap}");
        }
        let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let mut one_thread = vec![0f32; t * n];
        single.install(|| gemm_split(&x, t, &fast, &exact, Some(&bias), &mut one_thread, false, &[]));
        assert_eq!(one_thread, split, "thread count changed results");
        // Rows listed as f32 rows are exactly the f32 GEMM's, accumulating or not; the others
        // keep their split result.
        let f32_rows = [0, 5, 36];
        for accumulate in [false, true] {
            let start = pseudo(t * n, 25);
            let (mut mixed, mut all_f32, mut all_split) = (start.clone(), start.clone(), start.clone());
            gemm_split(&x, t, &fast, &exact, Some(&bias), &mut mixed, accumulate, &f32_rows);
            gemm(&x, t, &exact, Some(&bias), &mut all_f32, accumulate);
            gemm_split(&x, t, &fast, &exact, Some(&bias), &mut all_split, accumulate, &[]);
            for r in 0..t {
                let want = if f32_rows.contains(&r) { &all_f32 } else { &all_split };
                assert_eq!(mixed[r * n..(r + 1) * n], want[r * n..(r + 1) * n], "row {r} (accumulate: {accumulate})");
            }
        }
    }

    /// On-CPU nanoseconds of this thread (from the scheduler), so rates ignore time lost to other
    /// processes.
    fn thread_cpu_ns() -> f64 {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN)
    }

    /// `RESID_PROBE=f32|bf16 cargo test --release --lib probe -- --ignored --nocapture`: FLOPs per
    /// on-CPU second of the microkernels on one thread, against the FMA-chain peak of that thread.
    #[test]
    #[ignore]
    fn probe_gemm_rate() {
        let compute: Compute = std::env::var("RESID_PROBE").unwrap_or("f32".into()).parse().unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        pool.install(|| {
            let c0 = thread_cpu_ns();
            let f: f64 = (0..2000).map(|_| fma_burst(isa())).sum();
            let peak = f / (thread_cpu_ns() - c0);
            for &(t, k, n) in &[(512usize, 576usize, 3072usize), (512, 1536, 576), (2048, 576, 960), (64, 576, 3072), (1, 576, 3072)] {
                let x = pseudo(t * k, 1);
                let p = PackedMatrix::pack(&pseudo(n * k, 2), n, k, compute);
                let mut y = vec![0f32; t * n];
                let reps = (4e9 / (2.0 * (t * n * k) as f64)).ceil() as usize;
                gemm(&x, t, &p, None, &mut y, false);
                let c0 = thread_cpu_ns();
                for _ in 0..reps {
                    gemm(&x, t, &p, None, &mut y, false);
                }
                let rate = 2.0 * (t * n * k * reps) as f64 / (thread_cpu_ns() - c0);
                eprintln!("{compute:?} {t}x{k}x{n}: {rate:.1} GFLOP per CPU-s; f32 FMA peak {peak:.1}; ratio {:.2}", rate / peak);
            }
        });
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// The unfused path's SwiGLU of `[gate; up]` GEMM rows (`2·inter` values each).
    fn swiglu_rows(gu: &[f32], inter: usize) -> Vec<f32> {
        let mut y = vec![0f32; gu.len() / 2];
        for (o, row) in y.chunks_mut(inter).zip(gu.chunks(2 * inter)) {
            super::super::vmath::swiglu_row(&row[..inter], &row[inter..], o);
        }
        y
    }

    /// What a fused heads GEMM (`run`, given the epilogue) hands its epilogue, as the bits of a
    /// `[t, n]` matrix; `u32::MAX` where no value came. Panics if `run` refuses.
    fn heads_bits(t: usize, n: usize, run: impl FnOnce(&(dyn Fn(usize, usize, &mut [f32]) + Sync)) -> bool) -> Vec<u32> {
        use std::sync::atomic::{AtomicU32, Ordering};
        let got: Vec<AtomicU32> = (0..t * n).map(|_| AtomicU32::new(u32::MAX)).collect();
        let fused = run(&|r, h, vals| {
            for (c, v) in vals.iter().enumerate() {
                got[r * n + h * 2 * NR + c].store(v.to_bits(), Ordering::Relaxed);
            }
        });
        assert!(fused, "the heads GEMM refused");
        got.iter().map(|a| a.load(Ordering::Relaxed)).collect()
    }

    /// The fused MLP input against the GEMM followed by the activation, as the unfused path
    /// runs them: bit for bit, on odd widths (halves not on panel boundaries), row counts around
    /// the tile and the pair kernels, with and without bias, on every instruction set the CPU
    /// has and on 1–3 threads. Also: a plain GEMM over a halves layout is the plain GEMM.
    #[test]
    fn fused_activation_is_the_unfused_result() {
        let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|&i| match i {
                Isa::Avx512 => detect_isa() == Isa::Avx512,
                Isa::Avx2 => detect_isa() != Isa::Portable,
                Isa::Portable => true,
            })
            .collect();
        let pools: Vec<_> = [1, 2, 3].iter().map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()).collect();
        for &(t, k, inter) in &[(1, 7, 5), (2, 33, 32), (3, 64, 48), (4, 40, 80), (5, 17, 64), (24, 9, 33), (25, 64, 96), (50, 100, 70), (130, 2000, 40), (9, 576, 1)] {
            let x = pseudo(t * k, 41);
            let w = pseudo(2 * inter * k, 42);
            let b = pseudo(2 * inter, 43);
            let (plain, halves) = (PackedMatrix::pack(&w, 2 * inter, k, Compute::F32), PackedMatrix::pack_halves(&w, 2 * inter, k, Compute::F32));
            assert_eq!(halves.halves.is_some(), inter % NR != 0);
            let single_up = PackedMatrix::pack(&w[..inter * k], inter, k, Compute::F32);
            for bias in [None, Some(&b[..])] {
                let mut gu = vec![0f32; t * 2 * inter];
                gemm(&x, t, &plain, bias, &mut gu, false);
                let mut gu_halves = vec![0f32; t * 2 * inter];
                gemm(&x, t, &halves, bias, &mut gu_halves, false);
                assert_eq!(gu_halves, gu, "{t}x{k}x{inter}: plain GEMM over the halves layout");
                let want = swiglu_rows(&gu, inter);
                let mut up = vec![0f32; t * inter];
                gemm(&x, t, &single_up, bias.map(|b| &b[..inter]), &mut up, false);
                let want_gelu: Vec<f32> = up.iter().map(|&v| super::super::vmath::gelu_tanh(v)).collect();
                for &isa in &isas {
                    for pool in &pools {
                        let n = pool.current_num_threads();
                        for layout in [OutLayout::Rows, OutLayout::Packed] {
                            // Packed: each value where `packed_index` puts it (every slot written).
                            let rows_of = |y: &[f32]| -> Vec<f32> { if layout == OutLayout::Rows { y.to_vec() } else { (0..t * inter).map(|i| y[packed_index(isa, t, inter, i / inter, i % inter)]).collect() } };
                            let mut y = vec![f32::NAN; t * inter];
                            assert!(pool.install(|| gemm_activation_on(isa, Input::Rows(&x), t, &halves, bias, Activation::SwiGlu, &mut y, layout)));
                            assert!(rows_of(&y).iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "SwiGLU {isa:?} {layout:?} {t}x{k}x{inter} bias={} threads {n}", bias.is_some());
                            assert!(y.iter().all(|v| !v.is_nan()), "SwiGLU {isa:?} {layout:?} {t}x{k}x{inter}: a slot left unwritten");
                            let mut y = vec![f32::NAN; t * inter];
                            assert!(pool.install(|| gemm_activation_on(isa, Input::Rows(&x), t, &single_up, bias.map(|b| &b[..inter]), Activation::GeluTanh, &mut y, layout)));
                            assert!(rows_of(&y).iter().zip(&want_gelu).all(|(a, b)| a.to_bits() == b.to_bits()), "GELU {isa:?} {layout:?} {t}x{k}x{inter} bias={} threads {n}", bias.is_some());
                            assert!(y.iter().all(|v| !v.is_nan()), "GELU {isa:?} {layout:?} {t}x{k}x{inter}: a slot left unwritten");
                        }
                        // The packed output into the next GEMM: the row-major GEMM's bits.
                        let mut packed = vec![0f32; t * inter];
                        assert!(pool.install(|| gemm_activation_on(isa, Input::Rows(&x), t, &halves, bias, Activation::SwiGlu, &mut packed, OutLayout::Packed)));
                        let down = PackedMatrix::pack(&pseudo(7 * inter, 45), 7, inter, Compute::F32);
                        let mut want_down = pseudo(t * 7, 46);
                        let mut got_down = want_down.clone();
                        pool.install(|| gemm_f32_on(isa, Source::Rows(Src(want.as_ptr() as *const u32)), t, &down, output(&want, t, &down, None, &mut want_down, true).unwrap()));
                        assert!(pool.install(|| gemm_prepacked_on(isa, &packed, t, &down, None, &mut got_down, true)));
                        assert!(got_down.iter().zip(&want_down).all(|(a, b)| a.to_bits() == b.to_bits()), "prepacked {isa:?} {t}x{inter}x7 threads {n}");
                    }
                }
            }
            // Heads of 64 columns: the epilogue gets exactly the GEMM's products.
            let heads = (2 * inter).div_ceil(2 * NR);
            let wh = pseudo(heads * 2 * NR * k, 44);
            let ph = PackedMatrix::pack(&wh, heads * 2 * NR, k, Compute::F32);
            let mut want = vec![0f32; t * heads * 2 * NR];
            gemm(&x, t, &ph, None, &mut want, false);
            for &isa in &isas {
                for pool in &pools {
                    let got = pool.install(|| heads_bits(t, ph.n, |epi| gemm_heads_on(isa, Input::Rows(&x), t, &ph, epi)));
                    assert!(got == bits(&want), "heads {isa:?} {t}x{k}x{} threads {}", ph.n, pool.current_num_threads());
                }
            }
            // A stacked matrix whose halves are not on panel boundaries, packed plainly: refused.
            if inter % NR != 0 {
                assert!(!gemm_activation(Input::Rows(&x), t, &plain, None, Activation::SwiGlu, &mut vec![0f32; t * inter], OutLayout::Rows));
            }
        }
    }

    /// The fused epilogues in bf16 (on AMX, or on the AVX512-BF16 kernels) against the bf16 GEMM
    /// followed by the same finishing, as the unfused path runs them: bit for bit, on row counts
    /// of short tiles (1–16), of one and two A tiles (AMX) or one to three micro-panels and pairs
    /// of panels (AVX512-BF16), of several blocks, odd widths, with and without bias, on 1–3
    /// threads. The packed output layout (f32 kernels only), and SwiGLU halves off panel
    /// boundaries, are refused.
    #[test]
    fn fused_bf16_is_the_unfused_bf16_result() {
        set_bf16_even_if_slower(true);
        #[cfg(target_arch = "x86_64")]
        let kernel = bf16_kernel();
        #[cfg(not(target_arch = "x86_64"))]
        let kernel: Option<()> = None;
        let Some(kernel) = kernel else {
            eprintln!("no bf16 kernel here");
            return;
        };
        eprintln!("bf16 kernel: {kernel:?}");
        let pools: Vec<_> = [1, 2, 3].iter().map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()).collect();
        // 330 × 1,536: row blocks of 128 rows on AVX512-BF16 (384 KiB of L2), so several.
        for &(t, k, inter) in &[(1, 7, 5), (5, 64, 64), (16, 100, 96), (17, 33, 40), (33, 576, 64), (70, 200, 33), (600, 64, 32), (330, 1536, 64)] {
            let x = pseudo(t * k, 51);
            let w = pseudo(2 * inter * k, 52);
            let b = pseudo(2 * inter, 53);
            let halves = PackedMatrix::pack_halves(&w, 2 * inter, k, Compute::Bf16);
            let up = PackedMatrix::pack(&w[..inter * k], inter, k, Compute::Bf16);
            for bias in [None, Some(&b[..])] {
                let mut gu = vec![0f32; t * 2 * inter];
                gemm(&x, t, &halves, bias, &mut gu, false);
                let want = swiglu_rows(&gu, inter);
                let mut up_y = vec![0f32; t * inter];
                gemm(&x, t, &up, bias.map(|b| &b[..inter]), &mut up_y, false);
                let want_gelu: Vec<f32> = up_y.iter().map(|&v| super::super::vmath::gelu_tanh(v)).collect();
                for pool in &pools {
                    let n = pool.current_num_threads();
                    let mut y = vec![f32::NAN; t * inter];
                    let fused = pool.install(|| gemm_activation(Input::Rows(&x), t, &halves, bias, Activation::SwiGlu, &mut y, OutLayout::Rows));
                    // bf16 matrices keep the plain layout: halves off panel boundaries are refused.
                    assert_eq!(fused, inter % NR == 0, "SwiGLU {t}x{k}x{inter}: fused");
                    if fused {
                        assert_eq!(bits(&y), bits(&want), "SwiGLU {t}x{k}x{inter} bias={} threads {n}", bias.is_some());
                    }
                    let mut y = vec![f32::NAN; t * inter];
                    assert!(pool.install(|| gemm_activation(Input::Rows(&x), t, &up, bias.map(|b| &b[..inter]), Activation::GeluTanh, &mut y, OutLayout::Rows)));
                    assert_eq!(bits(&y), bits(&want_gelu), "GELU {t}x{k}x{inter} bias={} threads {n}", bias.is_some());
                }
            }
            assert!(!gemm_activation(Input::Rows(&x), t, &halves, None, Activation::SwiGlu, &mut vec![0f32; t * inter], OutLayout::Packed));
            // Heads of 64 columns: the epilogue gets exactly the GEMM's products.
            let heads = (2 * inter).div_ceil(2 * NR);
            let ph = PackedMatrix::pack(&pseudo(heads * 2 * NR * k, 54), heads * 2 * NR, k, Compute::Bf16);
            let mut want = vec![0f32; t * ph.n];
            gemm(&x, t, &ph, None, &mut want, false);
            for pool in &pools {
                let got = pool.install(|| heads_bits(t, ph.n, |epi| gemm_heads(Input::Rows(&x), t, &ph, epi)));
                assert!(got == bits(&want), "heads {t}x{k}x{} threads {}", ph.n, pool.current_num_threads());
            }
        }
    }

    #[test]
    fn dealt_units_are_every_hands_th_unit_per_hand() {
        for n in 1..40 {
            for hands in 1..7 {
                let want: Vec<usize> = (0..hands).flat_map(|r| (r..n).step_by(hands)).collect();
                let got: Vec<usize> = (0..n).map(|i| dealt_unit(i, n, hands)).collect();
                assert_eq!(got, want, "{n} units, {hands} hands");
            }
        }
        // SmolLM2's 9 query, 3 key and 3 value heads in two halves: keys and values in both.
        assert_eq!((0..8).map(|i| dealt_unit(i, 15, 2)).collect::<Vec<_>>(), [0, 2, 4, 6, 8, 10, 12, 14]);
    }

    #[test]
    fn packed_rows_read_back() {
        let (n, k) = (37, 11);
        let w = pseudo(n * k, 10);
        let p = PackedMatrix::pack(&w, n, k, Compute::F32);
        let mut row = vec![0f32; k];
        for r in 0..n {
            p.row(r, &mut row);
            assert_eq!(row, w[r * k..(r + 1) * k]);
        }
        let (n, w) = (2 * 37, pseudo(2 * 37 * k, 11));
        let p = PackedMatrix::pack_halves(&w, n, k, Compute::F32);
        for r in 0..n {
            p.row(r, &mut row);
            assert_eq!(row, w[r * k..(r + 1) * k], "halves layout, row {r}");
        }
    }
}
