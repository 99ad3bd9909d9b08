//! Causal attention of packed rows over each sequence's cached keys and values, flash-style:
//! keys are visited in tiles of [`KEY_TILE`] positions with an online softmax (running max,
//! running sum, rescaled output), so no row ever holds all its scores and a tile of keys and
//! values is reused, while it is in cache, by every query of a block (up to [`QUERY_BLOCK`]
//! rows of one sequence × the query heads sharing a key/value head).
//!
//! **One order per (row, head).** Tiles start at absolute key positions 0, 64, 128, …; a
//! score is one fixed computation (on AVX-512, one FMA chain over the head dimension against a
//! transposed key tile; otherwise a 16-lane dot product with a fixed lane tree); the tile's
//! exponentials are summed in a fixed tree; values are accumulated key by key in order. None of
//! this depends on which other rows or sequences share the pass, the block or the thread, nor on
//! whether the row is decoded alone or prefilled with others, so results are bit-identical
//! whatever the batch and however a sequence is split into passes.
use super::gemm::OutLayout;
use crate::backend::Heads;
use crate::engine::plan::BatchPlan;
use rayon::prelude::*;

/// Keys per online-softmax tile.
pub const KEY_TILE: usize = 64;
/// Query rows of one sequence handled together (they share every key/value tile).
pub const QUERY_BLOCK: usize = 16;

/// Query values × keys visited (summed over a pass's rows) from which attention's tasks are
/// shared between the workers.
const PARALLEL_MIN_WORK: usize = 1 << 14;

/// Where the tasks write: `[rows, q_heads * head_dim]`, row-major or in the f32 GEMM's packed
/// layout (for the o projection, which then does not pack it).
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut f32,
    layout: OutLayout,
    rows: usize,
}
// SAFETY: every task writes the heads of its own group in its own rows only.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `k_cache`/`v_cache`: `[slots, kv_heads * head_dim]`. `out`: `[rows, q_heads * head_dim]`.
/// `alibi`: per-head slopes adding `slope·(j − p)` to the score of key j for a query at p.
pub fn attention(q: &[f32], k_cache: &[f32], v_cache: &[f32], heads: Heads, plan: &BatchPlan, alibi: Option<&[f32]>, out: &mut [f32]) {
    attention_into(q, k_cache, v_cache, heads, plan, alibi, out, OutLayout::Rows)
}

/// [`attention`] with `out` in `layout`: the same values, row-major or where
/// [`super::gemm::packed_row`] puts them.
#[allow(clippy::too_many_arguments)]
pub fn attention_into(q: &[f32], k_cache: &[f32], v_cache: &[f32], heads: Heads, plan: &BatchPlan, alibi: Option<&[f32]>, out: &mut [f32], layout: OutLayout) {
    let qd = heads.q_heads * heads.head_dim;
    assert_eq!(q.len(), plan.rows() * qd, "q shape");
    assert_eq!(out.len(), plan.rows() * qd, "out shape");
    if let Some(a) = alibi {
        assert_eq!(a.len(), heads.q_heads, "alibi slopes");
    }
    // Tasks: (sequence, key/value head, block of the sequence's rows).
    let mut tasks = Vec::new();
    for (s, seq) in plan.seqs.iter().enumerate() {
        for g in 0..heads.kv_heads {
            let mut r = 0;
            while r < seq.len {
                let n = (seq.len - r).min(QUERY_BLOCK);
                tasks.push((s, g, seq.start + r, n));
                r += n;
            }
        }
    }
    if plan.rows() <= super::gemm::DECODE_ROWS {
        prefetch_keys_and_values(plan, k_cache, v_cache, heads.kv_heads * heads.head_dim);
    }
    let ptr = OutPtr { ptr: out.as_mut_ptr(), layout, rows: plan.rows() };
    let run = |&(s, g, row0, nrows): &(usize, usize, usize, usize)| {
        // The whole wrapper, not its raw-pointer field, is what the closure must capture.
        #[allow(clippy::redundant_locals)]
        let ptr = ptr;
        // SAFETY: rows row0..row0+nrows, heads of group g: disjoint between tasks.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            {
                if super::gemm::isa() == super::gemm::Isa::Avx512 {
                    // Prefill and decode rows alike (16 keys at a time against a transposed key
                    // tile), so that a row's bits do not depend on how its sequence was split
                    // into passes.
                    return block_avx512_tiled(q, k_cache, v_cache, heads, plan, alibi, s, g, row0, nrows, ptr);
                }
            }
            block::<Portable>(q, k_cache, v_cache, heads, plan, alibi, s, g, row0, nrows, ptr)
        };
    };
    // The shortest contexts are cheaper on the calling thread. The other workers are kept awake
    // through a pass (`on_workers`), so sharing costs little: SmolLM2-135M's decode steps (shared
    // from 29 positions on) ran 0.5 % faster at 12–260 positions and 3.1 % faster at 300–430
    // than with the threshold of 2^18 before, which kept them on one thread below 455 positions
    // (steps alternated one by one; AMD EPYC Zen 4, NOTES.md 2026-12-06).
    let work: usize = plan.positions.iter().map(|&p| p as usize + 1).sum::<usize>() * qd;
    if tasks.len() > 1 && rayon::current_num_threads() > 1 && work >= PARALLEL_MIN_WORK {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

/// At most this many bytes of keys and values are prefetched for a decode step's attention
/// (half of a Zen 4 core's L2, a quarter of an Intel Xeon's), so that the first lines are still
/// cached when they are read.
const KV_PREFETCH_BYTES: usize = 512 << 10;

/// Prefetches the cached keys and values that the rows of a decode step will read: in each
/// sequence the slots from the first up to its last row's position, whole rows (every key/value
/// head), keys and values alike (they are read tile by tile in that order), up to
/// [`KV_PREFETCH_BYTES`] in all. They were written one step ago, and the whole model has streamed
/// through the caches since, so the tasks' reads (each one head's 256 bytes of a row, on one
/// thread) missed one after the other: over 51–179 positions, a step's attention took 31–35 µs
/// a layer, and 24–28 µs with this (AMD EPYC Zen 4; NOTES.md, 2026-12-06). A prefetch has no
/// result, so no value changes.
fn prefetch_keys_and_values(plan: &BatchPlan, k_cache: &[f32], v_cache: &[f32], kvd: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let row_bytes = 2 * kvd * std::mem::size_of::<f32>();
        let mut budget_rows = KV_PREFETCH_BYTES / row_bytes.max(1);
        for seq in &plan.seqs {
            let Some(&last) = plan.positions[seq.start..seq.start + seq.len].last() else { continue };
            let rows = (last as usize + 1).min(budget_rows);
            budget_rows -= rows;
            let values = (seq.kv_start * kvd)..((seq.kv_start + rows) * kvd);
            for cache in [k_cache, v_cache] {
                let Some(region) = cache.get(values.clone()) else { return };
                let base = region.as_ptr() as *const i8;
                for line in (0..std::mem::size_of_val(region)).step_by(64) {
                    // SAFETY: a prefetch never faults; the address lies inside `region` anyway.
                    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(base.add(line)) };
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (plan, k_cache, v_cache, kvd);
}

/// The vector operations of a block, inlined into one function per instruction set.
trait Ops {
    unsafe fn exp_sub_sum(x: &mut [f32], m: f32) -> f32;
    /// `o = o·corr`, then `o = p[j]·v_j + o` for each j in order (`v_j` at `v + j·stride`).
    unsafe fn scale_accumulate(o: &mut [f32], corr: f32, p: &[f32], v: *const f32, stride: usize) {
        if corr != 1.0 {
            o.iter_mut().for_each(|x| *x *= corr);
        }
        for (j, &pj) in p.iter().enumerate() {
            super::vmath::axpy(pj, std::slice::from_raw_parts(v.add(j * stride), o.len()), o);
        }
    }
}

struct Portable;

impl Ops for Portable {
    #[inline(always)]
    unsafe fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        super::vmath::exp_sub_sum(x, m)
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512;

#[cfg(target_arch = "x86_64")]
impl Ops for Avx512 {
    #[inline(always)]
    unsafe fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        super::vmath::avx512::exp_sub_sum(x, m)
    }
}

/// A prefill block's working memory, reused by every block a thread runs (a block of a short
/// sequence does little work, and allocating and zeroing ~30 KB for each one showed in profiles).
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct PrefillScratch {
    m: Vec<f32>,
    l: Vec<f32>,
    o: Vec<f32>,
    kt: Vec<f32>,
    active: Vec<usize>,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static PREFILL_SCRATCH: std::cell::RefCell<PrefillScratch> = std::cell::RefCell::new(PrefillScratch::default());
}

/// Queries scored together against a key tile (they share each loaded key vector).
#[cfg(target_arch = "x86_64")]
const QUERIES_TOGETHER: usize = 4;

/// A prefill block on AVX-512: each key tile is transposed once (`kt[d][j]`), then the block's
/// queries score 16 keys per vector, four queries at a time (so that 4·⌈n/16⌉ independent FMA
/// chains hide the FMA latency), each score one FMA chain over d = 0..hd in order (no horizontal
/// sums); probabilities times V are accumulated two queries at a time, each output element one
/// chain over the keys in order. Per (row, head) the operations depend only on its position and
/// data, never on which queries share a group.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx512_tiled(q: &[f32], k_cache: &[f32], v_cache: &[f32], heads: Heads, plan: &BatchPlan, alibi: Option<&[f32]>, s: usize, g: usize, row0: usize, nrows: usize, out: OutPtr) {
    PREFILL_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => prefill_block(q, k_cache, v_cache, heads, plan, alibi, (s, g, row0, nrows), out, &mut scratch),
        // Not reached (a block never re-enters), but a fresh scratch is always correct.
        Err(_) => prefill_block(q, k_cache, v_cache, heads, plan, alibi, (s, g, row0, nrows), out, &mut PrefillScratch::default()),
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn prefill_block(q: &[f32], k_cache: &[f32], v_cache: &[f32], heads: Heads, plan: &BatchPlan, alibi: Option<&[f32]>, task: (usize, usize, usize, usize), out: OutPtr, sc: &mut PrefillScratch) {
    use std::arch::x86_64::*;
    let (s, g, row0, nrows) = task;
    let (hd, qd, kvd) = (heads.head_dim, heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
    let group = heads.q_heads / heads.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let seq = &plan.seqs[s];
    let nq = nrows * group;
    let grow = |v: &mut Vec<f32>, n: usize| {
        if v.len() < n {
            v.resize(n, 0.0);
        }
    };
    grow(&mut sc.m, nq);
    grow(&mut sc.l, nq);
    grow(&mut sc.o, nq * hd);
    grow(&mut sc.kt, hd * KEY_TILE);
    let PrefillScratch { m, l, o, kt, active } = sc;
    m[..nq].fill(f32::NEG_INFINITY);
    l[..nq].fill(0.0);
    // Query qi = i·group + hq: row row0 + i, head g·group + hq.
    let pos = |qi: usize| plan.positions[row0 + qi / group] as usize;
    let qptr = |qi: usize| q.as_ptr().add((row0 + qi / group) * qd + (g * group + qi % group) * hd);
    let mut scores = [[0f32; KEY_TILE]; QUERIES_TOGETHER];
    let keys_max = plan.positions[row0 + nrows - 1] as usize + 1;
    let mut t0 = 0;
    while t0 < keys_max {
        let nk = (keys_max - t0).min(KEY_TILE);
        // Transpose keys t0..t0+nk of head g into kt[d][j] (8×8 blocks, then the edges).
        let key = |j: usize| k_cache.as_ptr().add((seq.kv_start + t0 + j) * kvd + g * hd);
        let (j8, d8) = (nk / 8 * 8, hd / 8 * 8);
        for j in (0..j8).step_by(8) {
            for d in (0..d8).step_by(8) {
                let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(key(j + i).add(d)));
                let c = super::gemm::simd256::transpose8(r);
                for (dd, v) in c.iter().enumerate() {
                    _mm256_storeu_ps(kt.as_mut_ptr().add((d + dd) * KEY_TILE + j), *v);
                }
            }
            for i in 0..8 {
                for d in d8..hd {
                    kt[d * KEY_TILE + j + i] = *key(j + i).add(d);
                }
            }
        }
        for j in j8..nk {
            for d in 0..hd {
                kt[d * KEY_TILE + j] = *key(j).add(d);
            }
        }
        active.clear();
        active.extend((0..nq).filter(|&qi| pos(qi) >= t0));
        let vbase = v_cache.as_ptr().add((seq.kv_start + t0) * kvd + g * hd);
        for chunk in active.chunks(QUERIES_TOGETHER) {
            // Keys each query sees in this tile; a short chunk repeats its last query (scored, unused).
            let n: [usize; QUERIES_TOGETHER] = std::array::from_fn(|j| (pos(chunk[j.min(chunk.len() - 1)]) + 1 - t0).min(KEY_TILE));
            let qs: [*const f32; QUERIES_TOGETHER] = std::array::from_fn(|j| qptr(chunk[j.min(chunk.len() - 1)]));
            match n.iter().max().map_or(1, |m| m.div_ceil(16)) {
                1 => qk_tiles::<1>(qs, hd, kt, &mut scores),
                2 => qk_tiles::<2>(qs, hd, kt, &mut scores),
                3 => qk_tiles::<3>(qs, hd, kt, &mut scores),
                _ => qk_tiles::<4>(qs, hd, kt, &mut scores),
            }
            let mut corr = [0f32; QUERIES_TOGETHER];
            for (j, &qi) in chunk.iter().enumerate() {
                let (h, p) = (g * group + qi % group, pos(qi));
                let sc = &mut scores[j][..n[j]];
                let tile_max = scale_and_max(sc, scale, alibi.map(|a| (a[h], t0 as f32 - p as f32)));
                corr[j] = softmax_step::<Avx512>(sc, tile_max, &mut m[qi], &mut l[qi]);
            }
            // Every query's first tile is t0 = 0: its output starts from zero there.
            let fresh = t0 == 0;
            let mut j = 0;
            while j < chunk.len() {
                let (qa, na) = (chunk[j], n[j]);
                let oa = o.as_mut_ptr().add(qa * hd);
                if j + 1 < chunk.len() {
                    let (qb, nb) = (chunk[j + 1], n[j + 1]);
                    let ob = o.as_mut_ptr().add(qb * hd);
                    pv_pair(hd, [oa, ob], [corr[j], corr[j + 1]], [&scores[j][..na], &scores[j + 1][..nb]], vbase, kvd, fresh);
                    j += 2;
                } else {
                    pv_pair(hd, [oa, oa], [corr[j], corr[j]], [&scores[j][..na], &[]], vbase, kvd, fresh);
                    j += 1;
                }
            }
        }
        t0 += KEY_TILE;
    }
    write_rows(o, l, out, row0, nrows, g, group, qd, hd);
}

/// `x = x·scale + slope·(j + offset)` for each score j (`+ 0` without ALiBi: the scalar
/// path's operations, in vectors, one rounding each), and the tile's maximum (NaN scores ignored,
/// as `f32::max` does).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scale_and_max(x: &mut [f32], scale: f32, alibi: Option<(f32, f32)>) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let sv = _mm512_set1_ps(scale);
    let lanes = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n {
        let k = super::vmath::avx512::mask(n, i);
        let add = match alibi {
            // (j as f32 − pos as f32) is exact for positions below 2^24, as is j + offset here.
            Some((slope, offset)) => _mm512_mul_ps(_mm512_set1_ps(slope), _mm512_add_ps(_mm512_add_ps(lanes, _mm512_set1_ps(i as f32)), _mm512_set1_ps(offset))),
            None => _mm512_setzero_ps(),
        };
        let v = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x.as_ptr().add(i)), sv), add);
        _mm512_mask_storeu_ps(x.as_mut_ptr().add(i), k, v);
        // max(v, max) returns max where v is NaN; masked-off lanes keep max.
        max = _mm512_mask_max_ps(max, k, v, max);
        i += 16;
    }
    _mm512_reduce_max_ps(max)
}

/// Scores of up to four queries (`qs`, hd values each) against the first 16·NV keys of a
/// transposed tile; each score is `fma(q[d], k[d], ·)` over d in order, from zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn qk_tiles<const NV: usize>(qs: [*const f32; QUERIES_TOGETHER], hd: usize, kt: &[f32], scores: &mut [[f32; KEY_TILE]; QUERIES_TOGETHER]) {
    use std::arch::x86_64::*;
    debug_assert!(kt.len() >= hd * KEY_TILE);
    let mut acc = [[_mm512_setzero_ps(); NV]; QUERIES_TOGETHER];
    for d in 0..hd {
        let row = kt.as_ptr().add(d * KEY_TILE);
        let keys: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(row.add(v * 16)));
        for (a, qv) in acc.iter_mut().zip(qs) {
            let xv = _mm512_set1_ps(*qv.add(d));
            for (x, k) in a.iter_mut().zip(keys) {
                *x = _mm512_fmadd_ps(xv, k, *x);
            }
        }
    }
    for (a, out) in acc.iter().zip(scores.iter_mut()) {
        for (v, x) in a.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(v * 16), *x);
        }
    }
}

/// `o = o·corr` then `o = p[j]·v_j + o` for each key j in order, for two queries at once (each
/// loaded value row serves both), with exactly [`Ops::scale_accumulate`]'s operations per
/// element. `fresh`: the outputs start from zero (their first tile; corr is then 0) instead of
/// being read. The two outputs may be the same pointer when the second `p` is empty.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pv_pair(hd: usize, o: [*mut f32; 2], corr: [f32; 2], p: [&[f32]; 2], v: *const f32, stride: usize, fresh: bool) {
    match hd.div_ceil(16) {
        1 => pv_pair_c::<1>(hd, o, corr, p, v, stride, fresh),
        2 => pv_pair_c::<2>(hd, o, corr, p, v, stride, fresh),
        3 => pv_pair_c::<3>(hd, o, corr, p, v, stride, fresh),
        4 => pv_pair_c::<4>(hd, o, corr, p, v, stride, fresh),
        5 => pv_pair_c::<5>(hd, o, corr, p, v, stride, fresh),
        6 => pv_pair_c::<6>(hd, o, corr, p, v, stride, fresh),
        7 => pv_pair_c::<7>(hd, o, corr, p, v, stride, fresh),
        8 => pv_pair_c::<8>(hd, o, corr, p, v, stride, fresh),
        // Wide heads: one query at a time (two would need 32 accumulators).
        9..=16 => {
            pv_pair_c::<16>(hd, [o[0], o[0]], [corr[0]; 2], [p[0], &[]], v, stride, fresh);
            if !p[1].is_empty() {
                pv_pair_c::<16>(hd, [o[1], o[1]], [corr[1]; 2], [p[1], &[]], v, stride, fresh);
            }
        }
        _ => {
            for (k, (&oq, &pq)) in o.iter().zip(&p).enumerate() {
                if k == 1 && pq.is_empty() {
                    break;
                }
                let out = std::slice::from_raw_parts_mut(oq, hd);
                if fresh {
                    out.fill(0.0);
                }
                Avx512::scale_accumulate(out, corr[k], pq, v, stride);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pv_pair_c<const C: usize>(hd: usize, o: [*mut f32; 2], corr: [f32; 2], p: [&[f32]; 2], v: *const f32, stride: usize, fresh: bool) {
    use std::arch::x86_64::*;
    let mask = |c: usize| super::vmath::avx512::mask(hd, c * 16);
    let two = !p[1].is_empty();
    let mut acc = [[_mm512_setzero_ps(); C]; 2];
    for (k, a) in acc.iter_mut().enumerate().take(if two { 2 } else { 1 }) {
        if fresh {
            continue;
        }
        for (c, x) in a.iter_mut().enumerate() {
            *x = _mm512_maskz_loadu_ps(mask(c), o[k].add(c * 16));
            if corr[k] != 1.0 {
                *x = _mm512_mul_ps(*x, _mm512_set1_ps(corr[k]));
            }
        }
    }
    let both = if two { p[0].len().min(p[1].len()) } else { 0 };
    let [acc_a, acc_b] = &mut acc;
    for (j, (&pa, &pb)) in p[0].iter().zip(p[1]).enumerate().take(both) {
        let row = v.add(j * stride);
        let (pa, pb) = (_mm512_set1_ps(pa), _mm512_set1_ps(pb));
        for (c, (a, b)) in acc_a.iter_mut().zip(acc_b.iter_mut()).enumerate() {
            let vv = _mm512_maskz_loadu_ps(mask(c), row.add(c * 16));
            *a = _mm512_fmadd_ps(pa, vv, *a);
            *b = _mm512_fmadd_ps(pb, vv, *b);
        }
    }
    for (k, a) in acc.iter_mut().enumerate().take(if two { 2 } else { 1 }) {
        for (j, &pj) in p[k].iter().enumerate().skip(both) {
            let row = v.add(j * stride);
            let pv = _mm512_set1_ps(pj);
            for (c, x) in a.iter_mut().enumerate() {
                *x = _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(mask(c), row.add(c * 16)), *x);
            }
        }
        for (c, x) in a.iter().enumerate() {
            _mm512_mask_storeu_ps(o[k].add(c * 16), mask(c), *x);
        }
    }
}

/// One key tile of the online softmax for one (row, head): rescale the running output by the
/// change of maximum, add this tile's probabilities times V.
#[inline(always)]
unsafe fn online_update<O: Ops>(scores: &mut [f32], tile_max: f32, m: &mut f32, l: &mut f32, o: &mut [f32], v: *const f32, stride: usize) {
    let corr = softmax_step::<O>(scores, tile_max, m, l);
    O::scale_accumulate(o, corr, scores, v, stride);
}

/// The softmax half of [`online_update`]: turns the tile's scores into `exp(score − max)`, updates
/// the running max and sum, and returns the factor the running output must be scaled by.
#[inline(always)]
unsafe fn softmax_step<O: Ops>(scores: &mut [f32], tile_max: f32, m: &mut f32, l: &mut f32) -> f32 {
    let m_new = m.max(tile_max);
    let corr = if *m == f32::NEG_INFINITY { 0.0 } else { (*m - m_new).exp() };
    let sum = O::exp_sub_sum(scores, m_new);
    *l = *l * corr + sum;
    *m = m_new;
    corr
}

/// Writes the normalised outputs `o / l` of a block's rows × query heads of KV head `g`
/// (normalising `o` in place).
#[allow(clippy::too_many_arguments)]
unsafe fn write_rows(o: &mut [f32], l: &[f32], out: OutPtr, row0: usize, nrows: usize, g: usize, group: usize, qd: usize, hd: usize) {
    for (qi, &sum) in l[..nrows * group].iter().enumerate() {
        let inv = 1.0 / sum;
        o[qi * hd..(qi + 1) * hd].iter_mut().for_each(|v| *v *= inv);
    }
    let head = |i: usize, hq: usize| o[(i * group + hq) * hd..].as_ptr();
    let mut i = 0;
    while i < nrows {
        let (start, stride) = match out.layout {
            OutLayout::Rows => ((row0 + i) * qd, 1),
            OutLayout::Packed => super::gemm::packed_row(out.rows, qd, row0 + i),
        };
        // Element c of the row at start + c·stride.
        let dst = |hq: usize| out.ptr.add(start + (g * group + hq) * hd * stride);
        if stride == 1 {
            for hq in 0..group {
                std::ptr::copy_nonoverlapping(head(i, hq), dst(hq), hd);
            }
            i += 1;
        } else if start % qd == 0 && i + stride <= nrows {
            // The first row of a micro-panel that lies wholly in the block: its heads transposed
            // at once (the vector transposition of the GEMM's packing).
            for hq in 0..group {
                // Consecutive rows of one head lie group·hd apart in `o`.
                super::gemm::pack_micro_panel(head(i, hq), group * hd, stride, hd, dst(hq));
            }
            i += stride;
        } else {
            for hq in 0..group {
                for d in 0..hd {
                    *dst(hq).add(d * stride) = *head(i, hq).add(d);
                }
            }
            i += 1;
        }
    }
}

/// One task without AVX-512: rows row0..row0+nrows of sequence `s`, the query heads of key/value
/// head `g`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block<O: Ops>(q: &[f32], k_cache: &[f32], v_cache: &[f32], heads: Heads, plan: &BatchPlan, alibi: Option<&[f32]>, s: usize, g: usize, row0: usize, nrows: usize, out: OutPtr) {
    let (hd, qd, kvd) = (heads.head_dim, heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
    let group = heads.q_heads / heads.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let seq = &plan.seqs[s];
    let nq = nrows * group;
    // Per query vector: running max, running sum, output accumulator.
    let mut m = vec![f32::NEG_INFINITY; nq];
    let mut l = vec![0f32; nq];
    let mut o = vec![0f32; nq * hd];
    let mut scores = [0f32; KEY_TILE];
    let keys_max = plan.positions[row0 + nrows - 1] as usize + 1;
    let mut t0 = 0;
    while t0 < keys_max {
        for i in 0..nrows {
            let row = row0 + i;
            let pos = plan.positions[row] as usize;
            if t0 > pos {
                continue;
            }
            let n = (pos + 1 - t0).min(KEY_TILE);
            for hq in 0..group {
                let h = g * group + hq;
                let qv = &q[row * qd + h * hd..row * qd + (h + 1) * hd];
                let qi = i * group + hq;
                let mut tile_max = f32::NEG_INFINITY;
                for (j, sc) in scores[..n].iter_mut().enumerate() {
                    let key = t0 + j;
                    let slot = seq.kv_start + key;
                    let kv = &k_cache[slot * kvd + g * hd..slot * kvd + (g + 1) * hd];
                    *sc = super::vmath::dot(qv, kv) * scale + alibi.map_or(0.0, |a| a[h] * (key as f32 - pos as f32));
                    tile_max = tile_max.max(*sc);
                }
                let vbase = v_cache[(seq.kv_start + t0) * kvd + g * hd..].as_ptr();
                online_update::<O>(&mut scores[..n], tile_max, &mut m[qi], &mut l[qi], &mut o[qi * hd..(qi + 1) * hd], vbase, kvd);
            }
        }
        t0 += KEY_TILE;
    }
    write_rows(&mut o, &l, out, row0, nrows, g, group, qd, hd);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain softmax(QKᵀ/√d + ALiBi)V per sequence in f64, with an explicit causal mask.
    fn reference(q: &[f32], k: &[f32], v: &[f32], heads: Heads, lens: &[usize], alibi: Option<&[f32]>) -> Vec<f32> {
        let (hd, qd, kvd) = (heads.head_dim, heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
        let mut out = vec![0f32; q.len()];
        let mut start = 0;
        for &len in lens {
            for i in 0..len {
                for h in 0..heads.q_heads {
                    let kvh = h * heads.kv_heads / heads.q_heads;
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd).map(|d| q[(start + i) * qd + h * hd + d] as f64 * k[(start + j) * kvd + kvh * hd + d] as f64).sum::<f64>()
                                / (hd as f64).sqrt()
                                + alibi.map_or(0.0, |a| a[h] as f64 * (j as f64 - i as f64))
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        out[(start + i) * qd + h * hd + d] =
                            (0..=i).map(|j| e[j] / z * v[(start + j) * kvd + kvh * hd + d] as f64).sum::<f64>() as f32;
                    }
                }
            }
            start += len;
        }
        out
    }

    fn f(n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + s) * 0.731).sin()).collect()
    }

    fn packed(lens: &[usize]) -> BatchPlan {
        let mut starts = Vec::new();
        let mut acc = 0;
        for l in lens {
            starts.push(acc);
            acc += l;
        }
        BatchPlan::new(lens, &vec![0; lens.len()], &starts)
    }

    #[test]
    fn packed_gqa_matches_reference() {
        for (heads, lens, alibi) in [
            (Heads { q_heads: 4, kv_heads: 2, head_dim: 8 }, vec![3usize, 1, 6], None),
            (Heads { q_heads: 6, kv_heads: 2, head_dim: 20 }, vec![150usize, 1, 70], Some(vec![0.5f32, 0.25, 0.125, 0.0625, 0.03, 0.01])),
            (Heads { q_heads: 3, kv_heads: 3, head_dim: 64 }, vec![200usize], None),
        ] {
            let (qd, kvd) = (heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
            let rows: usize = lens.iter().sum();
            let (q, k, v) = (f(rows * qd, 0.0), f(rows * kvd, 1.0), f(rows * kvd, 2.0));
            let plan = packed(&lens);
            let mut out = vec![0f32; rows * qd];
            attention(&q, &k, &v, heads, &plan, alibi.as_deref(), &mut out);
            let want = reference(&q, &k, &v, heads, &lens, alibi.as_deref());
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 2e-5, "{heads:?} {lens:?}: {a} vs {b}");
            }
        }
    }

    /// Written in the f32 GEMM's packed layout (for the o projection), the output holds the
    /// row-major output's values bit for bit, every slot written: micro-panels that straddle two
    /// sequences or two 16-row blocks, a decode row, and heads of 64 and 20 dimensions.
    #[test]
    fn packed_output_holds_the_row_major_values() {
        for (heads, plan) in [
            (Heads { q_heads: 9, kv_heads: 3, head_dim: 64 }, packed(&[5, 130, 17])),
            (Heads { q_heads: 4, kv_heads: 2, head_dim: 20 }, packed(&[7, 3, 1, 40])),
            (Heads { q_heads: 9, kv_heads: 3, head_dim: 64 }, BatchPlan::new(&[1], &[33], &[0])),
        ] {
            let (qd, kvd, rows) = (heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim, plan.rows());
            let slots = plan.seqs.iter().map(|s| s.kv_start + s.len).max().unwrap_or(0).max(34);
            let (q, k, v) = (f(rows * qd, 9.0), f(slots * kvd, 10.0), f(slots * kvd, 11.0));
            let mut by_rows = vec![0f32; rows * qd];
            attention(&q, &k, &v, heads, &plan, None, &mut by_rows);
            let mut by_panels = vec![f32::NAN; rows * qd];
            attention_into(&q, &k, &v, heads, &plan, None, &mut by_panels, OutLayout::Packed);
            assert!(by_panels.iter().all(|x| !x.is_nan()), "{heads:?}: a slot not written");
            let mut unpacked = vec![0f32; rows * qd];
            super::super::gemm::unpack_rows(&by_panels, rows, qd, &mut unpacked);
            assert!(unpacked.iter().zip(&by_rows).all(|(a, b)| a.to_bits() == b.to_bits()), "{heads:?} {rows} rows");
        }
    }

    /// A row's output must not depend on which other rows share its block (prefill groups the
    /// queries of a block four by four for scoring and two by two against V): rows 50..130 of a
    /// sequence, prefilled as a continuation over the cached keys of rows 0..50, are blocked
    /// 50–65, 66–81, … instead of 48–63, 64–79, …, and must equal the whole prefill bit for bit.
    #[test]
    fn a_row_does_not_depend_on_its_block() {
        for (heads, alibi) in [
            (Heads { q_heads: 9, kv_heads: 3, head_dim: 64 }, None),
            (Heads { q_heads: 4, kv_heads: 4, head_dim: 20 }, Some(vec![0.5f32, 0.25, 0.125, 0.0625])),
            (Heads { q_heads: 2, kv_heads: 1, head_dim: 160 }, None),
        ] {
            let (qd, kvd) = (heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
            let (n, cut) = (130usize, 50usize);
            let (q, k, v) = (f(n * qd, 6.0), f(n * kvd, 7.0), f(n * kvd, 8.0));
            let mut whole = vec![0f32; n * qd];
            attention(&q, &k, &v, heads, &packed(&[n]), alibi.as_deref(), &mut whole);
            let mut tail = vec![0f32; (n - cut) * qd];
            attention(&q[cut * qd..], &k, &v, heads, &BatchPlan::new(&[n - cut], &[cut], &[0]), alibi.as_deref(), &mut tail);
            assert_eq!(tail, whole[cut * qd..], "{heads:?}");
        }
    }

    #[test]
    fn rows_are_batch_invariant_and_decode_matches_prefill() {
        let heads = Heads { q_heads: 6, kv_heads: 2, head_dim: 24 };
        let (qd, kvd) = (heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
        let lens = [5usize, 130, 17];
        let rows: usize = lens.iter().sum();
        let (q, k, v) = (f(rows * qd, 3.0), f(rows * kvd, 4.0), f(rows * kvd, 5.0));
        let mut all = vec![0f32; rows * qd];
        attention(&q, &k, &v, heads, &packed(&lens), None, &mut all);
        // The middle sequence alone.
        let (s0, n) = (5, 130);
        let mut alone = vec![0f32; n * qd];
        attention(&q[s0 * qd..(s0 + n) * qd], &k[s0 * kvd..(s0 + n) * kvd], &v[s0 * kvd..(s0 + n) * kvd], heads, &packed(&[n]), None, &mut alone);
        assert_eq!(alone, all[s0 * qd..(s0 + n) * qd]);
        // Its row at position 100 as a decode step over the cached keys: the same bits.
        let p = 100;
        let plan = BatchPlan::new(&[1], &[p], &[0]);
        let mut one = vec![0f32; qd];
        attention(&q[(s0 + p) * qd..(s0 + p + 1) * qd], &k[s0 * kvd..(s0 + n) * kvd], &v[s0 * kvd..(s0 + n) * kvd], heads, &plan, None, &mut one);
        assert_eq!(one, all[(s0 + p) * qd..(s0 + p + 1) * qd]);
        // A decode step is itself batch-invariant.
        let two = BatchPlan::new(&[1, 1], &[p, 3], &[0, n]);
        let mut q2 = q[(s0 + p) * qd..(s0 + p + 1) * qd].to_vec();
        q2.extend_from_slice(&q[..qd]);
        let (mut k2, mut v2) = (k[s0 * kvd..(s0 + n) * kvd].to_vec(), v[s0 * kvd..(s0 + n) * kvd].to_vec());
        k2.extend_from_slice(&k[..4 * kvd]);
        v2.extend_from_slice(&v[..4 * kvd]);
        let mut out2 = vec![0f32; 2 * qd];
        attention(&q2, &k2, &v2, heads, &two, None, &mut out2);
        assert_eq!(out2[..qd], one[..]);
        // One thread.
        let mut single = vec![0f32; rows * qd];
        rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| attention(&q, &k, &v, heads, &packed(&lens), None, &mut single));
        assert_eq!(single, all);
    }
}
