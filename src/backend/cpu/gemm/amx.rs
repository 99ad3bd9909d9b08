//! The bf16 GEMM on AMX tiles (Intel Xeon, Sapphire Rapids and later): `tdpbf16ps` multiplies
//! a 16 × 32 bf16 tile of activations by a 32 × 16 bf16 tile of weights into a 16 × 16 f32
//! tile, 16 times the work of one `vdpbf16ps` per instruction. Stable Rust has no AMX
//! intrinsics, so the few tile instructions are inline assembly, and Linux must first grant the
//! process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`).
//!
//! The operands are the bf16 path's own layouts: activations as rows of bf16 pairs (an A tile is
//! 16 rows × 16 pairs, at the row stride), and the packed weight panels `[k pair][32 columns][2]`
//! (a B tile is 16 pair-rows × 16 columns: half a panel row, at a 128-byte stride). K is padded
//! with zero pairs to a multiple of 16 pairs in both. Up to 16 activation rows (decode) make
//! short tiles of just those rows; more are padded with zero rows to a multiple of 32, so that
//! every tile is whole.
//!
//! Batch invariance: an output element only ever accumulates its own row's tiles, in increasing
//! K, from zero; which rows share a tile, and how the work is split, never changes that.
use super::{simd512, Out, PackedMatrix, NR};
use std::arch::asm;
use std::sync::OnceLock;

/// K pairs (32 bf16 values) per tile step: 64 bytes, one tile row.
pub const KSTEP: usize = 16;
/// Activation rows per block (two A tiles).
pub const MBLOCK: usize = 32;

/// Weight tiles are prefetched (into L1) this many K steps ahead (2 KiB of a panel each) while
/// a panel's first block streams it from memory. Without, AMX read the weights at 10–20 GB/s
/// where the f32 kernels read 25. On an Intel Xeon (family 6 model 167), batch-1 bf16 decode
/// tokens/s, alternated (NOTES.md, 2026-12-07 05:29): 2 steps 70.0–77.4, 3 71.6–77.0, 4
/// 71.2–81.6, 6 72.4–73.7, 8 66.3–69.4; `prefetcht1`/`t2` 6–10 % behind `t0`.
const PREFETCH_STEPS: usize = 4;

/// A block's activation rows (more than 16) are prefetched into L1 this many K steps ahead. On
/// an Intel Xeon (family 6 model 167), bf16 extraction tokens/s (`resid bench`, NOTES.md,
/// 2026-12-07 11:23): none 3,739–3,793, 1 step 3,837–4,059, 2 3,920–4,195, 3 4,084–4,195, 4
/// 3,994–4,193, 6 4,027–4,051, 8 3,900–3,941.
const A_PREFETCH_STEPS: usize = 4;

/// The tile configuration `ldtilecfg` reads: palette 1, eight tiles of 64 bytes a row
/// (tmm0–3 accumulators, tmm4–5 activations, tmm6–7 weights).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    /// Accumulator and activation tiles of `m` rows (1–16), weight tiles of 16 pair-rows.
    const fn rows(m: u8) -> Self {
        TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
            rows: [m, m, m, m, m, m, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }
}

/// Whether the CPU has AMX-BF16 and the kernel granted this process the tile state (asked for
/// once, on the first call).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = ((leaf7.edx >> 22) & 1 == 1, (leaf7.edx >> 24) & 1 == 1);
        amx_bf16 && amx_tile && super::has_bf16() && request_tile_state()
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments; it fails (non-zero) where the kernel or
    // the hypervisor does not offer AMX.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn request_tile_state() -> bool {
    false
}

/// K pairs as stored for AMX: padded to whole tile steps.
pub fn padded_pairs(kp: usize) -> usize {
    kp.div_ceil(KSTEP) * KSTEP
}

/// Rows of the activation buffer: up to 16 as they are (short tiles), more padded to whole
/// blocks.
pub fn padded_rows(tokens: usize) -> usize {
    if tokens <= 16 {
        tokens
    } else {
        tokens.div_ceil(MBLOCK) * MBLOCK
    }
}

/// `out = xb · Wᵀ` through the epilogue of `out`: `xb` holds `padded_rows(tokens)` rows of
/// `w.kdepth` bf16 pairs (zero padding), `w` is packed in bf16 with `kdepth` a multiple of
/// [`KSTEP`].
pub(super) fn gemm(xb: &[u32], tokens: usize, w: &PackedMatrix, out: Out) {
    let kdepth = w.kdepth;
    debug_assert!(kdepth.is_multiple_of(KSTEP) && xb.len() >= padded_rows(tokens) * kdepth);
    run(xb, tokens, kdepth, w.panels, &|a, p, t0, rows, first, tile| {
        // SAFETY: (for `run`'s callers) panel p exists, and the task owns these outputs.
        unsafe {
            let b = w.buf.ptr.add(p * w.panel_bytes()) as *const u32;
            block(a, kdepth, b, rows, p * NR, t0, first, tile, out)
        }
    });
}

/// The fused GEMMs' driver on AMX ([`super::fused_on`]'s): unit i of `count` is `unit(i) = (u,
/// first, offset, n)`, panels first + j·offset for j < n (n ≤ 2) into columns 32j.. of a tile,
/// whose rows go to `epi(t, u, n, rows)` block by block (up to 32 rows).
pub(super) fn fused(xb: &[u32], tokens: usize, w: &PackedMatrix, count: usize, unit: &(dyn Fn(usize) -> (usize, usize, usize, usize) + Sync), epi: &super::FusedEpilogue) {
    let kdepth = w.kdepth;
    debug_assert!(kdepth.is_multiple_of(KSTEP) && xb.len() >= padded_rows(tokens) * kdepth);
    run(xb, tokens, kdepth, count, &|a, i, t0, rows, first, tile| {
        let (u, p0, offset, n) = unit(i);
        for j in 0..n {
            // SAFETY: the unit's panels exist; the tile holds 32 rows of 64 columns (256-byte
            // rows), panel j's columns from 32j.
            unsafe {
                let b = w.buf.ptr.add((p0 + j * offset) * w.panel_bytes()) as *const u32;
                tiles(a, kdepth, b, rows, first, tile.0.as_mut_ptr().cast::<f32>().add(j * NR), 2 * NR * 4);
            }
        }
        epi(t0, u, n, &mut tile.0[..rows]);
    });
}

/// A block's products, stored from the accumulator tiles: up to 32 rows × two panels (a fused
/// unit's), or × one panel in the first half (the plain GEMM's, as rows of 32).
#[repr(C, align(64))]
struct Tile([[f32; 2 * NR]; MBLOCK]);

/// [`run`]'s work on a block: `(a, unit, t0, rows, first, tile)`.
type Work<'a> = dyn Fn(*const u32, usize, usize, usize, bool, &mut Tile) + Sync + 'a;

/// Spreads `count` units (panels, or a fused GEMM's units) over tasks and calls `work(a, i, t0,
/// rows, first, tile)` for each unit i and block of rows t0..t0+rows (at `a`), with AMX
/// configured for them; `first`: the first block of its row chunk, which streams the unit's
/// weights; `tile`: the task's own, zeroed once per task and holding the previous block's
/// values (a fresh zeroed buffer per block cost bf16 extraction 6–11 % on an Intel Xeon:
/// NOTES.md, 2026-12-07 08:30).
fn run(xb: &[u32], tokens: usize, kdepth: usize, count: usize, work: &Work) {
    use rayon::prelude::*;
    let blocks = tokens.div_ceil(MBLOCK);
    // Row chunks whose activations stay in L2 while the panels stream past them.
    let chunk_blocks = ((512 * 1024) / (MBLOCK * kdepth * 4).max(1)).clamp(1, blocks);
    let threads = rayon::current_num_threads().max(1);
    // More than one chunk: as many as a multiple of the threads, of sizes differing by at most
    // one block, so that each thread gets the same work (64 blocks made chunks of 14, 14, 14,
    // 14 and 8 before; bf16 extraction 2–5 % faster so on an Intel Xeon: NOTES.md, 2026-12-07
    // 11:23). One chunk stays one: its tasks share the panels, each streamed from memory once.
    let natural = blocks.div_ceil(chunk_blocks);
    let chunks = if natural == 1 { 1 } else { natural.div_ceil(threads).saturating_mul(threads).min(blocks) };
    let target = if threads == 1 { 1 } else { 8 * threads };
    // Groups differ by at most one unit: 18 panels (a down projection) in 16 groups of at most
    // 2, not 9 groups of 2, of which one thread took 5 (down projections in batch-1 decode
    // 145–157 → 92–101 µs a layer).
    let groups = target.div_ceil(chunks).clamp(1, count);
    // Up to 16 rows: tiles of just those rows (no zero rows to load or multiply).
    let config = TileConfig::rows(tokens.min(16) as u8);
    let a = super::Src(xb.as_ptr());
    let task = |i: usize| {
        #[allow(clippy::redundant_locals)]
        let a = a;
        let (c, g) = (i / groups, i % groups);
        let (b0, b1) = (c * blocks / chunks, (c + 1) * blocks / chunks);
        let (u0, u1) = (g * count / groups, (g + 1) * count / groups);
        let mut tile = Tile([[0.0; 2 * NR]; MBLOCK]);
        // SAFETY: AMX is available (checked by the caller), the tiles are configured on this
        // thread before use, and every tile load stays inside the padded buffers.
        unsafe {
            configure(&config);
            for u in u0..u1 {
                for blk in b0..b1 {
                    let t0 = blk * MBLOCK;
                    let rows = (tokens - t0).min(MBLOCK);
                    // Later blocks find the unit's panels in L2.
                    work(a.0.add(t0 * kdepth), u, t0, rows, blk == b0, &mut tile);
                }
            }
            release();
        }
    };
    if threads == 1 || chunks * groups == 1 {
        (0..chunks * groups).for_each(task);
    } else {
        (0..chunks * groups).into_par_iter().for_each(task);
    }
}

#[inline(always)]
unsafe fn configure(config: &TileConfig) {
    asm!("ldtilecfg [{0}]", in(reg) config as *const TileConfig, options(nostack, readonly));
}

#[inline(always)]
unsafe fn release() {
    asm!("tilerelease", options(nostack, nomem));
}

/// Rows t0..t0+rows (at most 32; `a` points at row t0, `kdepth` pairs a row) × one panel
/// (`b`, columns col0..col0+32), through `tile` and the epilogue; `prefetch`: the panel comes
/// from memory.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block(a: *const u32, kdepth: usize, b: *const u32, rows: usize, col0: usize, t0: usize, prefetch: bool, tile: &mut Tile, out: Out) {
    // Rows of 32 values, back to back (the tile's first half).
    let c = tile.0.as_mut_ptr().cast::<f32>();
    tiles(a, kdepth, b, rows, prefetch, c, NR * 4);
    let out = Out { y: out.y.add(t0 * out.ldy + col0), cols: out.cols - col0, bias: if out.bias.is_null() { out.bias } else { out.bias.add(col0) }, ..out };
    for r in 0..rows {
        simd512::store_row32(&out, r, c.add(r * NR));
    }
}

/// The products of rows `a` (up to 32) × panel `b`, stored as f32 rows of 32 at `c`, `ldc`
/// bytes apart (a multiple of 64).
#[inline(always)]
unsafe fn tiles(a: *const u32, kdepth: usize, b: *const u32, rows: usize, prefetch: bool, c: *mut f32, ldc: usize) {
    let lda = kdepth * 4;
    let ldb = NR * 4;
    // Only read with more than 16 rows (a short tile has no second half).
    let a1 = a.wrapping_add(16 * kdepth);
    asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
    if rows > 16 {
        asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }
    let mut kk = 0;
    while kk < kdepth {
        let (ak, bk) = (a.add(kk), b.add(kk * NR));
        if prefetch {
            // Past the last panel's end this touches nothing: a prefetch never faults.
            let ahead = bk.wrapping_add(PREFETCH_STEPS * KSTEP * NR) as *const i8;
            for line in 0..KSTEP * NR * 4 / 64 {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ahead.wrapping_add(line * 64));
            }
        }
        if rows > 16 {
            // Each row's line of a later K step, from L2 (a block's 32 rows are 32 streams of one
            // line a step, which the hardware prefetchers did not keep ahead of). Past the last
            // row's end this touches nothing.
            let ahead = ak.wrapping_add(A_PREFETCH_STEPS * KSTEP) as *const i8;
            for r in 0..rows {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ahead.wrapping_add(r * lda));
            }
            asm!(
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1]",
                "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) ak, a1 = in(reg) a1.wrapping_add(kk), b = in(reg) bk, lda = in(reg) lda, ldb = in(reg) ldb,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1]",
                "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                a = in(reg) ak, b = in(reg) bk, lda = in(reg) lda, ldb = in(reg) ldb,
                options(nostack, readonly),
            );
        }
        kk += KSTEP;
    }
    // The accumulators: 16 rows each of 16 columns (tmm0, tmm2) and the next 16 (tmm1, tmm3).
    asm!(
        "tilestored [{c} + {ldc}*1], tmm0",
        "tilestored [{c} + {ldc}*1 + 64], tmm1",
        c = in(reg) c, ldc = in(reg) ldc,
        options(nostack),
    );
    if rows > 16 {
        asm!(
            "tilestored [{c} + {ldc}*1], tmm2",
            "tilestored [{c} + {ldc}*1 + 64], tmm3",
            c = in(reg) c.cast::<u8>().add(16 * ldc), ldc = in(reg) ldc,
            options(nostack),
        );
    }
}
