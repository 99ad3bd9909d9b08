//! Causal attention of packed rows over each sequence's cached keys and values, flash-style:
//! keys are visited in tiles of [`KEY_TILE`] positions with an online softmax (running max,
//! running sum, rescaled output), so no row ever holds all its scores and a tile of keys and
//! values is reused, while it is in cache, by every query of a block (up to [`QUERY_BLOCK`]
//! rows of one sequence × the query heads sharing a key/value head).
//!
//! **One order per (row, head).** Tiles start at absolute key positions 0, 64, 128, …; a
//! score is one fixed computation (on AVX-512, one FMA chain over the head dimension against 16
//! keys as the key cache holds them, see [`KEY_BLOCK`]; otherwise a 16-lane dot product with a
//! fixed lane tree); the tile's
//! exponentials are summed in a fixed tree; values are accumulated key by key in order. None of
//! this depends on which other rows or sequences share the pass, the block or the thread, nor on
//! whether the row is decoded alone or prefilled with others, so results are bit-identical
//! whatever the batch and however a sequence is split into passes.
//!
//! Decode steps over long contexts ([`PHASED_MIN_KEYS`]) whose tasks would leave workers idle
//! split those same operations in three phases whose units are shared evenly between the workers
//! (scores by key tiles, the online softmax by query, probabilities × V by output columns); see
//! `decode_phased`.
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

/// Slots per block of the key cache. The keys are cached transposed, block by block: in each
/// block of 16 slots, for each key/value head, each of the head's elements holds the 16 slots'
/// values side by side (`[block][kv head][element][slot % 16]`). A score is one FMA chain over
/// the head's elements against 16 keys at once; with the keys stored that way it loads them as
/// they lie, where row-major keys had to be transposed for every tile and every step (decode's
/// score phase spent most of its time on that transposition and on reading one head's 256-byte
/// slices of whole rows). Values are cached head by head instead ([`value_at`]).
pub const KEY_BLOCK: usize = 16;
// A vector of 16 consecutive slots lies in one block.
const _: () = assert!(KEY_BLOCK.is_multiple_of(16));
// Sequences whose slots start at the arenas' alignment start a vector (no shifted tiles).
const _: () = assert!(crate::backend::KV_SLOT_ALIGN.is_multiple_of(16));

/// Values of a key cache of `slots` slots of `kvd` values: whole blocks, and one more that the
/// reads of 16 keys from a slot inside the last block touch (unused lanes, never a result).
pub fn key_cache_len(slots: usize, kvd: usize) -> usize {
    (slots.div_ceil(KEY_BLOCK) + 1) * KEY_BLOCK * kvd
}

/// Where element 0 of key/value head `g` of slot `slot` lies in a key cache of rows of `kvd`
/// values and heads of `hd`; element d lies d·[`KEY_BLOCK`] values further.
#[inline(always)]
pub fn key_at(slot: usize, kvd: usize, g: usize, hd: usize) -> usize {
    (slot / KEY_BLOCK * kvd + g * hd) * KEY_BLOCK + slot % KEY_BLOCK
}

/// The key cache holding row-major keys `rows` (`[slots, kvd]`), for tests and benchmarks.
pub fn block_keys(rows: &[f32], kvd: usize) -> Vec<f32> {
    let slots = rows.len() / kvd.max(1);
    let mut cache = vec![0f32; key_cache_len(slots, kvd)];
    for (slot, row) in rows.chunks_exact(kvd.max(1)).enumerate() {
        // SAFETY: the cache holds `slots` slots of `kvd` values.
        unsafe { store_key(cache.as_mut_ptr(), slot, kvd, 0, row) };
    }
    cache
}

/// Stores `values` as elements `first..` of slot `slot`'s row (`kvd` values: every key/value
/// head) in the key cache at `cache`, where a row's elements lie [`KEY_BLOCK`] values apart.
///
/// # Safety
/// The cache holds `key_cache_len(slot + 1, kvd)` values, `first + values.len() <= kvd`, and no
/// other thread writes these elements meanwhile.
pub(super) unsafe fn store_key(cache: *mut f32, slot: usize, kvd: usize, first: usize, values: &[f32]) {
    let at = cache.add(key_at(slot, kvd, 0, 0) + first * KEY_BLOCK);
    for (e, &x) in values.iter().enumerate() {
        *at.add(e * KEY_BLOCK) = x;
    }
}

/// Where value head `g` of slot `slot` starts in a value cache of `slots` slots and heads of `hd`
/// values: each head's values of every slot lie together, slot after slot
/// (`[kv head][slot][element]`), so that P·V, which reads one head's values of consecutive slots,
/// reads them in one piece. Row-major values (`[slot][kv head][element]`) made those reads one
/// head's 256-byte slice of each whole row: a decode step's attention over 1,024 cached
/// positions took 13–35 % longer in phases and 19–70 % longer as one task per head than with
/// this layout, for SmolLM2's heads as for 7-billion-parameter models' (AMD EPYC Zen 4;
/// NOTES.md, 2026-12-06 10:46).
#[inline(always)]
pub fn value_at(slot: usize, slots: usize, g: usize, hd: usize) -> usize {
    (g * slots + slot) * hd
}

/// The slots of a value cache: its length over a row's values (every key/value head).
fn value_slots(v_cache: &[f32], heads: Heads) -> usize {
    v_cache.len() / (heads.kv_heads * heads.head_dim).max(1)
}

/// The value cache holding row-major values `rows` (`[slots, kv_heads · hd]`), for tests and
/// benchmarks.
pub fn head_values(rows: &[f32], kv_heads: usize, hd: usize) -> Vec<f32> {
    let kvd = kv_heads * hd;
    let slots = rows.len() / kvd.max(1);
    let mut cache = vec![0f32; slots * kvd];
    for (slot, row) in rows.chunks_exact(kvd.max(1)).enumerate() {
        for (g, head) in row.chunks_exact(hd.max(1)).enumerate() {
            let at = value_at(slot, slots, g, hd);
            cache[at..at + hd].copy_from_slice(head);
        }
    }
    cache
}

/// The values of the key cache's slots `first..first + n`, every head: whole blocks.
fn key_blocks(first: usize, n: usize, kvd: usize) -> std::ops::Range<usize> {
    first / KEY_BLOCK * KEY_BLOCK * kvd..(first + n).div_ceil(KEY_BLOCK) * KEY_BLOCK * kvd
}

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

/// Attention over row-major cached keys and values (`[slots, kv_heads * head_dim]` each), for
/// tests and benchmarks: they are first copied into a key cache ([`block_keys`]) and a value
/// cache ([`head_values`]).
/// `out`: `[rows, q_heads * head_dim]`. `alibi`: per-head slopes adding `slope·(j − p)` to the
/// score of key j for a query at p.
pub fn attention(q: &[f32], k_rows: &[f32], v_rows: &[f32], heads: Heads, plan: &BatchPlan, alibi: Option<&[f32]>, out: &mut [f32]) {
    let k_cache = block_keys(k_rows, heads.kv_heads * heads.head_dim);
    let v_cache = head_values(v_rows, heads.kv_heads, heads.head_dim);
    attention_into(q, &k_cache, &v_cache, heads, plan, alibi, out, OutLayout::Rows)
}

/// Attention over a key cache (`k_cache`, laid out in blocks of [`KEY_BLOCK`] slots) and a value
/// cache (`v_cache`, head by head, [`value_at`]; its length tells its slots), with `out` in
/// `layout`: row-major or where [`super::gemm::packed_row`] puts them.
#[allow(clippy::too_many_arguments)]
pub fn attention_into(q: &[f32], k_cache: &[f32], v_cache: &[f32], heads: Heads, plan: &BatchPlan, alibi: Option<&[f32]>, out: &mut [f32], layout: OutLayout) {
    let (qd, kvd) = (heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
    assert_eq!(q.len(), plan.rows() * qd, "q shape");
    assert_eq!(out.len(), plan.rows() * qd, "out shape");
    if let Some(a) = alibi {
        assert_eq!(a.len(), heads.q_heads, "alibi slopes");
    }
    assert!(v_cache.len().is_multiple_of(kvd.max(1)), "value cache of whole slots");
    let v_slots = value_slots(v_cache, heads);
    // The kernels read the caches through raw pointers: every slot they read must exist.
    for seq in plan.seqs.iter().filter(|seq| seq.len > 0) {
        let end = seq.kv_start + plan.positions[seq.start + seq.len - 1] as usize + 1;
        assert!(end <= v_slots && key_cache_len(end, kvd) <= k_cache.len(), "KV slot {} outside the caches", end - 1);
    }
    let ptr = OutPtr { ptr: out.as_mut_ptr(), layout, rows: plan.rows() };
    let decode = plan.rows() <= super::gemm::DECODE_ROWS;
    let keys: usize = plan.positions.iter().map(|&p| p as usize + 1).sum();
    let workers = rayon::current_num_threads();
    #[cfg(target_arch = "x86_64")]
    if decode && keys >= PHASED_MIN_KEYS && workers > 1 && super::gemm::isa() == super::gemm::Isa::Avx512 && per_head_tasks_leave_workers_idle(plan, heads.kv_heads, workers) {
        DECODE_SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => decode_phased(q, k_cache, v_cache, heads, plan, alibi, ptr, &mut scratch),
            Err(_) => decode_phased(q, k_cache, v_cache, heads, plan, alibi, ptr, &mut DecodeScratch::default()),
        });
        return;
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
    let run = |&(s, g, row0, nrows): &(usize, usize, usize, usize)| {
        // The whole wrapper, not its raw-pointer field, is what the closure must capture.
        #[allow(clippy::redundant_locals)]
        let ptr = ptr;
        // SAFETY: rows row0..row0+nrows, heads of group g: disjoint between tasks.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            {
                if super::gemm::isa() == super::gemm::Isa::Avx512 {
                    // Prefill and decode rows alike (16 keys at a time, each score one FMA chain
                    // over d), so that a row's bits do not depend on how its sequence was split
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
    let parallel = tasks.len() > 1 && workers > 1 && keys * qd >= PARALLEL_MIN_WORK;
    if decode {
        // Each worker prefetches its own run's keys and values, then computes it.
        let run_prefetched = |run_tasks: &[Task]| {
            prefetch_tasks(run_tasks, plan, k_cache, v_cache, heads);
            run_tasks.iter().for_each(run);
        };
        if parallel {
            runs_of_even_keys(&tasks, plan, workers).par_iter().for_each(|r| run_prefetched(r));
        } else {
            run_prefetched(&tasks);
        }
    } else if parallel {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

/// An attention task: (sequence, key/value head, first row, rows).
type Task = (usize, usize, usize, usize);

/// The keys a task's rows visit.
fn task_keys(plan: &BatchPlan, &(_, _, row0, nrows): &Task) -> usize {
    plan.positions[row0..row0 + nrows].iter().map(|&p| p as usize + 1).sum()
}

/// `tasks` cut into up to `workers` contiguous runs of about equal keys.
fn runs_of_even_keys<'t>(tasks: &'t [Task], plan: &BatchPlan, workers: usize) -> Vec<&'t [Task]> {
    let total: usize = tasks.iter().map(|t| task_keys(plan, t)).sum();
    let (mut runs, mut start, mut done) = (Vec::with_capacity(workers), 0, 0);
    for (i, task) in tasks.iter().enumerate() {
        done += task_keys(plan, task);
        // Run k ends once the keys so far reach k/workers of the total.
        if done * workers >= total * (runs.len() + 1) && runs.len() + 1 < workers {
            runs.push(&tasks[start..=i]);
            start = i + 1;
        }
    }
    runs.push(&tasks[start..]);
    runs.retain(|run| !run.is_empty());
    runs
}

/// At most this many bytes of keys and values are prefetched by each worker for a decode step's
/// attention (half of a Zen 4 core's L2, a quarter of an Intel Xeon's), so that the first lines
/// are still cached when they are read.
const KV_PREFETCH_BYTES: usize = 512 << 10;

/// Prefetches the cached keys and values that a worker's run of a decode step's tasks will read:
/// for each task, its key/value head's key blocks and values from the sequence's first slot up to
/// its last row's position (read tile by tile in that order), up to [`KV_PREFETCH_BYTES`] a run.
/// They were written one step ago, and the whole model has streamed through the caches since, so
/// the tasks' reads missed one after the other: over 51–179 positions, a step's attention took
/// 31–35 µs a layer, and 24–28 µs with the caller prefetching every task's slots (AMD EPYC Zen 4;
/// NOTES.md, 2026-12-06). One thread issuing every prefetch pulled them at one core's share of
/// the memory's bandwidth before any task started; each worker prefetching its own run's heads
/// took attention at 48 positions from 16–20 to 10 µs a layer at batch 1 and from 50–53 to 29–35
/// at batch 4, at 300 positions from 86–100 to 61–63 at batch 2 (Intel Xeon; NOTES.md,
/// 2026-12-07). A prefetch has no result, so no value changes.
fn prefetch_tasks(tasks: &[Task], plan: &BatchPlan, k_cache: &[f32], v_cache: &[f32], heads: Heads) {
    #[cfg(target_arch = "x86_64")]
    {
        let (hd, kvd) = (heads.head_dim, heads.kv_heads * heads.head_dim);
        let v_slots = value_slots(v_cache, heads);
        // A slot of one head: its key and its value.
        let slot_bytes = 2 * hd * std::mem::size_of::<f32>();
        let mut budget = KV_PREFETCH_BYTES / slot_bytes.max(1);
        for &(s, g, row0, nrows) in tasks {
            let first = plan.seqs[s].kv_start;
            let n = (plan.positions[row0 + nrows - 1] as usize + 1).min(budget);
            budget -= n;
            for block in (first / KEY_BLOCK..(first + n).div_ceil(KEY_BLOCK)).map(|b| b * KEY_BLOCK) {
                if let Some(keys) = k_cache.get(key_at(block, kvd, g, hd)..key_at(block, kvd, g, hd) + hd * KEY_BLOCK) {
                    prefetch_lines(keys.as_ptr(), std::mem::size_of_val(keys));
                }
            }
            if let Some(values) = v_cache.get(value_at(first, v_slots, g, hd)..value_at(first + n, v_slots, g, hd)) {
                prefetch_lines(values.as_ptr(), std::mem::size_of_val(values));
            }
            if budget == 0 {
                return;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (tasks, plan, k_cache, v_cache, heads);
}

/// Prefetches the cached keys (whole blocks) and every head's values of slots `first..first + n`.
#[cfg(target_arch = "x86_64")]
fn prefetch_slots(k_cache: &[f32], v_cache: &[f32], first: usize, n: usize, heads: Heads) {
    let (hd, kvd) = (heads.head_dim, heads.kv_heads * heads.head_dim);
    let v_slots = value_slots(v_cache, heads);
    let values = (0..heads.kv_heads).map(|g| v_cache.get(value_at(first, v_slots, g, hd)..value_at(first + n, v_slots, g, hd)));
    for region in std::iter::once(k_cache.get(key_blocks(first, n, kvd))).chain(values).flatten() {
        prefetch_lines(region.as_ptr(), std::mem::size_of_val(region));
    }
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
    /// A key tile joined into `[d][j]`, where its first slot is not a multiple of 16.
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

/// A prefill block on AVX-512: the block's queries score each key tile (read as the key cache
/// holds it, or joined once into `kt[d][j]` where the tile's first slot is not a multiple of 16)
/// 16 keys per vector, four queries at a time (so that 4·⌈n/16⌉ independent FMA
/// chains hide the FMA latency), each score one FMA chain over d = 0..hd in order (no horizontal
/// sums), the online softmax on the four queries' scores in registers ([`chunk_probabilities`]);
/// probabilities times V are accumulated four queries at a time for heads of up to 64 (two
/// otherwise, or for the last queries of a tile), each output element one chain over the keys in
/// order. Per (row, head) the operations depend only on its position and
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
    let v_slots = value_slots(v_cache, heads);
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
        // Keys t0..t0+nk of head g, 16 by 16: as the key cache holds them where the sequence's
        // slots start a vector of 16, otherwise each 16 joined from two vectors into kt[d][j].
        let first = seq.kv_start + t0;
        let mut tile = KeyTile::in_cache(k_cache, first, kvd, g, hd);
        if !first.is_multiple_of(16) {
            let idx = shift_index(first % 16);
            for v in 0..nk.div_ceil(16) {
                for d in 0..hd {
                    _mm512_storeu_ps(kt.as_mut_ptr().add(d * KEY_TILE + 16 * v), key_vector::<true>(tile, v, d * tile.d_stride, idx));
                }
            }
            tile = KeyTile { vecs: std::array::from_fn(|u| kt.as_ptr().wrapping_add(16 * u)), d_stride: KEY_TILE };
        }
        active.clear();
        active.extend((0..nq).filter(|&qi| pos(qi) >= t0));
        let vbase = v_cache.as_ptr().add(value_at(seq.kv_start + t0, v_slots, g, hd));
        for chunk in active.chunks(QUERIES_TOGETHER) {
            // Per query of the chunk (a short chunk repeats its last query: scored, unused), in
            // one loop: `std::array::from_fn` per array was called out of line, 2.4 % of a long
            // prefill's attention.
            let live = chunk.len();
            let mut n = [0usize; QUERIES_TOGETHER];
            let mut qs = [std::ptr::null(); QUERIES_TOGETHER];
            let mut outs = [std::ptr::null_mut(); QUERIES_TOGETHER];
            let mut state = [(std::ptr::null_mut(), std::ptr::null_mut()); QUERIES_TOGETHER];
            let mut bias = [None; QUERIES_TOGETHER];
            for j in 0..QUERIES_TOGETHER {
                let qi = chunk[j.min(live - 1)];
                // The keys it sees in this tile.
                n[j] = (pos(qi) + 1 - t0).min(KEY_TILE);
                qs[j] = qptr(qi);
                outs[j] = o.as_mut_ptr().add(qi * hd);
                state[j] = (m.as_mut_ptr().add(qi), l.as_mut_ptr().add(qi));
                if let Some(slopes) = alibi {
                    bias[j] = Some((slopes[g * group + qi % group], t0 as f32 - pos(qi) as f32));
                }
            }
            let corr = match n.iter().max().map_or(1, |m| m.div_ceil(16)) {
                1 => chunk_probabilities::<1>(qs, hd, tile, n, live, scale, bias, state, &mut scores),
                2 => chunk_probabilities::<2>(qs, hd, tile, n, live, scale, bias, state, &mut scores),
                3 => chunk_probabilities::<3>(qs, hd, tile, n, live, scale, bias, state, &mut scores),
                _ => chunk_probabilities::<4>(qs, hd, tile, n, live, scale, bias, state, &mut scores),
            };
            // Every query's first tile is t0 = 0: its output starts from zero there.
            let fresh = t0 == 0;
            let p = |j: usize| &scores[j][..n[j]];
            if live == QUERIES_TOGETHER && hd <= 64 {
                pv_quad(hd, outs, corr, [p(0), p(1), p(2), p(3)], vbase, hd, fresh);
                continue;
            }
            let mut j = 0;
            while j < live {
                if j + 1 < live {
                    pv_pair(hd, [outs[j], outs[j + 1]], [corr[j], corr[j + 1]], [p(j), p(j + 1)], vbase, hd, fresh);
                    j += 2;
                } else {
                    pv_pair(hd, [outs[j], outs[j]], [corr[j], corr[j]], [p(j), &[]], vbase, hd, fresh);
                    j += 1;
                }
            }
        }
        t0 += KEY_TILE;
    }
    write_rows(o, l, out, row0, nrows, g, group, qd, hd);
}

/// Keys (summed over a decode step's rows) from which a decode step on AVX-512 runs its attention
/// in phases ([`decode_phased`]) rather than one task per sequence and key/value head, where those
/// tasks would leave workers idle ([`per_head_tasks_leave_workers_idle`]).
#[cfg(target_arch = "x86_64")]
const PHASED_MIN_KEYS: usize = 256;

/// Whether one task per (sequence, key/value head) would keep the busiest worker over an eighth
/// longer than an even share of the work: the tasks, weighted by the keys their rows visit, dealt
/// longest first to the least loaded worker. Phases split any step evenly, but cost three
/// hand-overs and a pass over the scores; where the tasks divide evenly they were as fast or
/// faster. Decode attention, cold, two workers, phases ÷ one task per head over 256–4,096 keys
/// (AMD EPYC Zen 4; NOTES.md, 2026-12-06 10:46): 3 key/value heads (SmolLM2: 3 tasks) 1.08–1.24
/// at 256 and 512 keys but 0.59–0.75 from 1,024; with tasks that divide evenly, 2 heads of 64
/// (Qwen2-0.5B) 1.08–1.25, 8 of 128 (Llama-3-8B) 1.02–1.11, 32 of 128 (LLaMA-2-7B) 1.04–1.24,
/// 8 of 64 0.94–1.12 and 16 of 64 0.84–1.04.
#[cfg(target_arch = "x86_64")]
fn per_head_tasks_leave_workers_idle(plan: &BatchPlan, kv_heads: usize, workers: usize) -> bool {
    use std::cmp::Reverse;
    let mut keys: Vec<usize> = plan.seqs.iter().map(|seq| plan.positions[seq.start..seq.start + seq.len].iter().map(|&p| p as usize + 1).sum()).collect();
    keys.sort_unstable_by(|a, b| b.cmp(a));
    let mut loads = std::collections::BinaryHeap::from(vec![Reverse(0usize); workers.max(1)]);
    for &k in &keys {
        for _ in 0..kv_heads {
            let Reverse(least) = loads.pop().unwrap_or_default();
            loads.push(Reverse(least + k));
        }
    }
    let busiest = loads.into_iter().map(|Reverse(load)| load).max().unwrap_or(0);
    let total = keys.iter().sum::<usize>() * kv_heads;
    8 * busiest * workers > 9 * total
}

/// A phased decode step's working memory, shared by its workers, on the calling thread (reused by
/// every step). Query qi is (row, head); each holds `stride` scores and `tiles` tile values.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct DecodeScratch {
    /// `[query][key]`: scaled scores, then `exp(score − running max)`.
    scores: Vec<f32>,
    /// `[query][tile]`: each tile's maximum score.
    tile_max: Vec<f32>,
    /// `[query][tile]`: the factor the running output is scaled by before adding the tile.
    corr: Vec<f32>,
    /// `[query]`: the softmax's sum.
    sum: Vec<f32>,
    /// `[query][head_dim]`: the unnormalised output.
    o: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static DECODE_SCRATCH: std::cell::RefCell<DecodeScratch> = std::cell::RefCell::new(DecodeScratch::default());
}

/// [`DecodeScratch`]'s buffers as the phases' units see them.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Phased {
    scores: *mut f32,
    tile_max: *mut f32,
    corr: *mut f32,
    sum: *mut f32,
    o: *mut f32,
    /// Scores (a whole number of tiles) and tiles per query.
    stride: usize,
    tiles: usize,
}
// SAFETY: within a phase, units write disjoint (query, tile) or (query, column) ranges; a phase
// reads only what the phases before it wrote.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for Phased {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Phased {}

/// The index of query (sequence `s`, key/value head `g`, the sequence's row `i`, head `hq` of
/// the group): each (sequence, group)'s queries are consecutive, as [`write_rows`] reads them.
#[cfg(target_arch = "x86_64")]
fn query_index(plan: &BatchPlan, heads: Heads, s: usize, g: usize, i: usize, hq: usize) -> usize {
    let group = heads.q_heads / heads.kv_heads;
    let seq = &plan.seqs[s];
    seq.start * heads.q_heads + (g * seq.len + i) * group + hq
}

/// A decode step's attention in three phases, each shared evenly between the workers, so that
/// long contexts are read at the speed of every core (one task per key/value head left one of two
/// cores idle a third of the time with SmolLM2's three, and read each head's strided slices):
/// 1. the scores, by key tiles: each worker reads the key blocks of its own tiles;
/// 2. the online softmax, by query: each tile's maximum, exponentials and sum, in tile order;
/// 3. probabilities × V, by 16 output columns: each output element one chain over the keys in
///    order, as in [`pv_pair`].
///
/// Every value is computed by exactly the operations of [`prefill_block`] (each score one FMA
/// chain over d in order, the same scaling, maxima, exponentials, tile sums, corrections and
/// accumulation order), so a row's bits are the same as when it is prefilled, and do not depend
/// on how the units fall to the workers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn decode_phased(q: &[f32], k_cache: &[f32], v_cache: &[f32], heads: Heads, plan: &BatchPlan, alibi: Option<&[f32]>, out: OutPtr, sc: &mut DecodeScratch) {
    let (hd, qd) = (heads.head_dim, heads.q_heads * heads.head_dim);
    let group = heads.q_heads / heads.kv_heads;
    let v_slots = value_slots(v_cache, heads);
    let nq = plan.rows() * heads.q_heads;
    let tiles = plan.positions.iter().map(|&p| p as usize + 1).max().unwrap_or(1).div_ceil(KEY_TILE);
    let stride = tiles * KEY_TILE;
    let grow = |v: &mut Vec<f32>, n: usize| {
        if v.len() < n {
            v.resize(n, 0.0);
        }
    };
    grow(&mut sc.scores, nq * stride);
    grow(&mut sc.tile_max, nq * tiles);
    grow(&mut sc.corr, nq * tiles);
    grow(&mut sc.sum, nq);
    grow(&mut sc.o, nq * hd);
    let ph = Phased { scores: sc.scores.as_mut_ptr(), tile_max: sc.tile_max.as_mut_ptr(), corr: sc.corr.as_mut_ptr(), sum: sc.sum.as_mut_ptr(), o: sc.o.as_mut_ptr(), stride, tiles };
    // Each phase's units in as many contiguous runs as there are workers.
    let runs = |n: usize| n.div_ceil(rayon::current_num_threads()).max(1);
    let live = || plan.seqs.iter().enumerate().filter(|(_, seq)| seq.len > 0);

    let mut score_units = Vec::new();
    for (s, seq) in live() {
        let keys = plan.positions[seq.start + seq.len - 1] as usize + 1;
        for t in 0..keys.div_ceil(KEY_TILE) {
            score_units.extend((0..heads.kv_heads).map(|g| (s, t, g)));
        }
    }
    score_units.par_chunks(runs(score_units.len())).for_each(|units| {
        #[allow(clippy::redundant_locals)]
        let ph = ph;
        prefetch_run(units, plan, k_cache, v_cache, heads);
        for &unit in units {
            // SAFETY: unit (s, t, g) writes tile t of the queries of sequence s and group g.
            unsafe { score_unit(q, k_cache, heads, plan, alibi, unit, ph) };
        }
    });

    let softmax_units: Vec<(usize, usize)> = (0..plan.rows()).flat_map(|r| (0..heads.q_heads).map(move |h| (r, h))).collect();
    let seq_of = |r: usize| plan.row_seq[r] as usize;
    softmax_units.par_chunks(runs(softmax_units.len())).for_each(|units| {
        #[allow(clippy::redundant_locals)]
        let ph = ph;
        for &(r, h) in units {
            let s = seq_of(r);
            let qi = query_index(plan, heads, s, h / group, r - plan.seqs[s].start, h % group);
            // SAFETY: query qi's scores, corrections and sum, written by this unit alone.
            unsafe { softmax_unit(qi, plan.positions[r] as usize + 1, ph) };
        }
    });

    let chunks = hd.div_ceil(16);
    let pv_units: Vec<(usize, usize, usize)> = (0..plan.rows()).flat_map(|r| (0..heads.kv_heads).flat_map(move |g| (0..chunks).map(move |c| (r, g, c)))).collect();
    pv_units.par_chunks(runs(pv_units.len())).for_each(|units| {
        #[allow(clippy::redundant_locals)]
        let ph = ph;
        // Consecutive units of one (row, group) are run together: each of the head's values is
        // read once.
        let mut i = 0;
        while i < units.len() {
            let (r, g, c0) = units[i];
            let n = units[i..].iter().take_while(|&&(r2, g2, _)| (r2, g2) == (r, g)).count();
            let s = seq_of(r);
            let seq = &plan.seqs[s];
            let first = query_index(plan, heads, s, g, r - seq.start, 0);
            let v = v_cache[value_at(seq.kv_start, v_slots, g, hd)..].as_ptr();
            // SAFETY: columns c0..c0+n of the group's queries of row r, written by this unit alone.
            unsafe { pv_unit(hd, c0, n, first, group, plan.positions[r] as usize + 1, v, hd, ph) };
            i += n;
        }
    });

    for (s, seq) in live() {
        for g in 0..heads.kv_heads {
            let first = query_index(plan, heads, s, g, 0, 0);
            // SAFETY: the rows of sequence s, the heads of group g.
            unsafe { write_rows(&mut sc.o[first * hd..], &sc.sum[first..], out, seq.start, seq.len, g, group, qd, hd) };
        }
    }
}

/// Prefetches the cached keys and values of a worker's run of [`decode_phased`]'s score units:
/// the key blocks and values of its tiles, in order, up to [`KV_PREFETCH_BYTES`] (as
/// [`prefetch_tasks`] does for a run of one task per head; later values are
/// prefetched by [`pv_stream`], later keys are left to the hardware, their blocks being read in
/// order).
#[cfg(target_arch = "x86_64")]
fn prefetch_run(units: &[(usize, usize, usize)], plan: &BatchPlan, k_cache: &[f32], v_cache: &[f32], heads: Heads) {
    let mut budget_rows = KV_PREFETCH_BYTES / (2 * heads.kv_heads * heads.head_dim * std::mem::size_of::<f32>()).max(1);
    let mut last = None;
    for &(s, t, _) in units {
        if last == Some((s, t)) {
            continue;
        }
        last = Some((s, t));
        let seq = &plan.seqs[s];
        let keys = plan.positions[seq.start + seq.len - 1] as usize + 1;
        let first = seq.kv_start + t * KEY_TILE;
        let rows = (keys - t * KEY_TILE).min(KEY_TILE).min(budget_rows);
        budget_rows -= rows;
        prefetch_slots(k_cache, v_cache, first, rows, heads);
        if budget_rows == 0 {
            return;
        }
    }
}

/// Prefetches every cache line that holds a byte of `start..start + bytes`.
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_lines(start: *const f32, bytes: usize) {
    let (first, end) = (start as usize & !63, start as usize + bytes);
    for line in (first..end).step_by(64) {
        // SAFETY: a prefetch never faults.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line as *const i8) };
    }
}

/// Phase 1 of [`decode_phased`], unit (sequence `s`, tile `t`, key/value head `g`): the scaled
/// scores of the tile's keys for every query of the sequence and group that sees it, and their
/// maximum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn score_unit(q: &[f32], k_cache: &[f32], heads: Heads, plan: &BatchPlan, alibi: Option<&[f32]>, (s, t, g): (usize, usize, usize), ph: Phased) {
    let (hd, qd, kvd) = (heads.head_dim, heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
    let group = heads.q_heads / heads.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let seq = &plan.seqs[s];
    let positions = &plan.positions[seq.start..seq.start + seq.len];
    let t0 = t * KEY_TILE;
    // The tile's keys as the cache holds them; 16 by 16 joined from two vectors where the
    // sequence's slots do not start a vector of 16.
    let first = seq.kv_start + t0;
    let offset = first % 16;
    let tile = KeyTile::in_cache(k_cache, first, kvd, g, hd);
    let idx = shift_index(offset);
    // The group's queries (row i of the sequence, head hq: local index i·group + hq) that see this
    // tile, up to four at a time.
    let mut active = (0..seq.len * group).filter(|&local| positions[local / group] as usize >= t0).peekable();
    let mut scores = [[0f32; KEY_TILE]; QUERIES_TOGETHER];
    while active.peek().is_some() {
        let mut chunk = [0usize; QUERIES_TOGETHER];
        let mut len = 0;
        for local in active.by_ref().take(QUERIES_TOGETHER) {
            chunk[len] = local;
            len += 1;
        }
        let n: [usize; QUERIES_TOGETHER] = std::array::from_fn(|j| (positions[chunk[j.min(len - 1)] / group] as usize + 1 - t0).min(KEY_TILE));
        let qs: [*const f32; QUERIES_TOGETHER] = std::array::from_fn(|j| {
            let local = chunk[j.min(len - 1)];
            q.as_ptr().add((seq.start + local / group) * qd + (g * group + local % group) * hd)
        });
        let vectors = n[..len].iter().max().map_or(1, |m| m.div_ceil(16));
        macro_rules! score {
            ($($q:literal $v:literal),*) => {
                match (len, vectors, offset != 0) {
                    $(
                        ($q, $v, false) => qk_keys::<$q, $v, false>(std::array::from_fn(|j| qs[j]), hd, tile, idx, &mut scores),
                        ($q, $v, true) => qk_keys::<$q, $v, true>(std::array::from_fn(|j| qs[j]), hd, tile, idx, &mut scores),
                    )*
                    _ => unreachable!("1–4 queries × 1–4 vectors of 16 keys"),
                }
            };
        }
        score!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4, 4 1, 4 2, 4 3, 4 4);
        for (j, &local) in chunk[..len].iter().enumerate() {
            let (i, hq) = (local / group, local % group);
            let x = &mut scores[j][..n[j]];
            let tile_max = scale_and_max(x, scale, alibi.map(|a| (a[g * group + hq], t0 as f32 - positions[i] as f32)));
            let qi = query_index(plan, heads, s, g, i, hq);
            std::ptr::copy_nonoverlapping(x.as_ptr(), ph.scores.add(qi * ph.stride + t0), x.len());
            *ph.tile_max.add(qi * ph.tiles + t) = tile_max;
        }
    }
}

/// Phase 2 of [`decode_phased`], unit query `qi` (seeing `keys` keys): the online softmax over its
/// tiles in order, exactly [`softmax_step`]'s, keeping each tile's correction and the final sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn softmax_unit(qi: usize, keys: usize, ph: Phased) {
    let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
    for t in 0..keys.div_ceil(KEY_TILE) {
        let t0 = t * KEY_TILE;
        let x = std::slice::from_raw_parts_mut(ph.scores.add(qi * ph.stride + t0), (keys - t0).min(KEY_TILE));
        *ph.corr.add(qi * ph.tiles + t) = softmax_step::<Avx512>(x, *ph.tile_max.add(qi * ph.tiles + t), &mut m, &mut l);
    }
    *ph.sum.add(qi) = l;
}

/// Phase 3 of [`decode_phased`]: probabilities × V for output columns `16·c0..16·(c0 + n)` of the
/// `group` queries `first..first + group` (one row, one key/value head; `v`: that head's first
/// value, `stride` values between rows), up to four queries × four column vectors at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_unit(hd: usize, c0: usize, n: usize, first: usize, group: usize, keys: usize, v: *const f32, stride: usize, ph: Phased) {
    let mut c = c0;
    while c < c0 + n {
        let nc = (c0 + n - c).min(4);
        let mut hq = 0;
        while hq < group {
            let nqs = (group - hq).min(4);
            let qis: [usize; 4] = std::array::from_fn(|j| first + hq + j.min(nqs - 1));
            macro_rules! run {
                ($($q:literal $c:literal),*) => {
                    match (nqs, nc) {
                        $(($q, $c) => pv_stream::<$q, $c>(hd, c, keys, v, stride, qis, ph),)*
                        _ => unreachable!("at most 4 queries × 4 column vectors"),
                    }
                };
            }
            run!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4, 4 1, 4 2, 4 3, 4 4);
            hq += nqs;
        }
        c += nc;
    }
}

/// Value rows [`pv_stream`] prefetches ahead of the one it adds (a third of a tile: the lines
/// arrive from memory while about 30 rows are added).
#[cfg(target_arch = "x86_64")]
const PV_AHEAD: usize = 32;

/// [`pv_unit`]'s kernel: NQ queries (`qis`) × NC column vectors from vector `c0`, each element
/// one chain over the keys: from zero in the first tile, then times the tile's correction (unless
/// it is 1) before each further tile, then `p[j]·v_j +` in order, as [`pv_c`] computes it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pv_stream<const NQ: usize, const NC: usize>(hd: usize, c0: usize, keys: usize, v: *const f32, stride: usize, qis: [usize; 4], ph: Phased) {
    use std::arch::x86_64::*;
    let masks: [__mmask16; NC] = std::array::from_fn(|c| super::vmath::avx512::mask(hd, (c0 + c) * 16));
    let probs: [*const f32; NQ] = std::array::from_fn(|k| ph.scores.add(qis[k] * ph.stride) as *const f32);
    let mut acc = [[_mm512_setzero_ps(); NC]; NQ];
    let mut t0 = 0;
    while t0 < keys {
        if t0 > 0 {
            for (k, a) in acc.iter_mut().enumerate() {
                let corr = *ph.corr.add(qis[k] * ph.tiles + t0 / KEY_TILE);
                if corr != 1.0 {
                    a.iter_mut().for_each(|x| *x = _mm512_mul_ps(*x, _mm512_set1_ps(corr)));
                }
            }
        }
        for j in t0..(t0 + KEY_TILE).min(keys) {
            let row = v.add(j * stride + c0 * 16);
            if j + PV_AHEAD < keys {
                prefetch_lines(row.add(PV_AHEAD * stride), NC * 64);
            }
            let vv: [__m512; NC] = std::array::from_fn(|c| _mm512_maskz_loadu_ps(masks[c], row.add(c * 16)));
            for (a, p) in acc.iter_mut().zip(probs) {
                let pj = _mm512_set1_ps(*p.add(j));
                for (x, vc) in a.iter_mut().zip(vv) {
                    *x = _mm512_fmadd_ps(pj, vc, *x);
                }
            }
        }
        t0 += KEY_TILE;
    }
    for (a, &qi) in acc.iter().zip(&qis) {
        for (c, x) in a.iter().enumerate() {
            _mm512_mask_storeu_ps(ph.o.add(qi * hd + (c0 + c) * 16), masks[c], *x);
        }
    }
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
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < n {
        let k = super::vmath::avx512::mask(n, i);
        let v = scaled_scores(_mm512_maskz_loadu_ps(k, x.as_ptr().add(i)), i, sv, alibi);
        _mm512_mask_storeu_ps(x.as_mut_ptr().add(i), k, v);
        // max(v, max) returns max where v is NaN; masked-off lanes keep max.
        max = _mm512_mask_max_ps(max, k, v, max);
        i += 16;
    }
    _mm512_reduce_max_ps(max)
}

/// Scores `i..i + 16` of a tile, scaled (`sv`: the scale in every lane) with ALiBi's bias added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn scaled_scores(x: std::arch::x86_64::__m512, i: usize, sv: std::arch::x86_64::__m512, alibi: Option<(f32, f32)>) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let add = match alibi {
        // (j as f32 − pos as f32) is exact for positions below 2^24, as is j + offset here.
        Some((slope, offset)) => {
            let lanes = _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.);
            _mm512_mul_ps(_mm512_set1_ps(slope), _mm512_add_ps(_mm512_add_ps(lanes, _mm512_set1_ps(i as f32)), _mm512_set1_ps(offset)))
        }
        None => _mm512_setzero_ps(),
    };
    _mm512_add_ps(_mm512_mul_ps(x, sv), add)
}

/// Where [`qk_keys`] reads a tile's keys: element d of the 16 keys of vector u at
/// `vecs[u] + d·d_stride` (16 values side by side), in the key cache itself or in a prefill
/// block's joined copy. Vector u + 1 follows u: a shifted read joins the two.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct KeyTile {
    vecs: [*const f32; KEY_TILE / 16 + 1],
    d_stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl KeyTile {
    /// Keys of head `g` from slot `first` on, as the key cache holds them: vector u holds the 16
    /// slots from `first` rounded down to 16, + 16u (so `first % 16` is the shift that joins
    /// vectors u and u + 1 into 16 keys from `first + 16u`).
    fn in_cache(k_cache: &[f32], first: usize, kvd: usize, g: usize, hd: usize) -> Self {
        let base = first - first % 16;
        // wrapping_add: the last vectors may lie past the cache when the tile's keys end before
        // them; they are then never read.
        KeyTile { vecs: std::array::from_fn(|u| k_cache.as_ptr().wrapping_add(key_at(base + 16 * u, kvd, g, hd))), d_stride: KEY_BLOCK }
    }
}

/// The permutation that takes 16 keys from the `offset`-th of one vector of 16 cached keys on
/// (lanes `offset..16` of the vector, then lanes `0..offset` of the next, which
/// `_mm512_permutex2var_ps` addresses as 16 + lane).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn shift_index(offset: usize) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(offset as i32))
}

/// Element `at / d_stride` of keys 16v..16v + 16 of `tile`: vector v as it lies, or (`SHIFT`)
/// joined by `idx` from vectors v and v + 1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn key_vector<const SHIFT: bool>(tile: KeyTile, v: usize, at: usize, idx: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let k = _mm512_loadu_ps(tile.vecs[v].add(at));
    if SHIFT {
        _mm512_permutex2var_ps(k, idx, _mm512_loadu_ps(tile.vecs[v + 1].add(at)))
    } else {
        k
    }
}

/// Scores of NQ queries (`qs`, hd values each) against the first 16·NV keys of `tile`, into
/// `scores[q][..16·NV]`; each score is `fma(q[d], k[d], ·)` over d in order, from zero. `SHIFT`:
/// keys 16v.. are joined by `idx` from vectors v and v + 1, for keys that do not start a
/// vector of the key cache.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn qk_keys<const NQ: usize, const NV: usize, const SHIFT: bool>(qs: [*const f32; NQ], hd: usize, tile: KeyTile, idx: std::arch::x86_64::__m512i, scores: &mut [[f32; KEY_TILE]; QUERIES_TOGETHER]) {
    use std::arch::x86_64::*;
    let acc = qk_vectors::<NQ, NV, SHIFT>(qs, hd, tile, idx);
    for (a, out) in acc.iter().zip(scores.iter_mut()) {
        for (v, x) in a.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(v * 16), *x);
        }
    }
}

/// [`qk_keys`]' scores, left in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn qk_vectors<const NQ: usize, const NV: usize, const SHIFT: bool>(qs: [*const f32; NQ], hd: usize, tile: KeyTile, idx: std::arch::x86_64::__m512i) -> [[std::arch::x86_64::__m512; NV]; NQ] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; NQ];
    for d in 0..hd {
        let keys: [__m512; NV] = std::array::from_fn(|v| key_vector::<SHIFT>(tile, v, d * tile.d_stride, idx));
        for (a, qv) in acc.iter_mut().zip(qs) {
            let xv = _mm512_set1_ps(*qv.add(d));
            for (x, k) in a.iter_mut().zip(keys) {
                *x = _mm512_fmadd_ps(xv, k, *x);
            }
        }
    }
    acc
}

/// One key tile's step of the online softmax for a chunk of four queries (the first `live` of
/// them real; `n[j]` keys each, at most 16·NV): their scores against the tile
/// ([`qk_vectors`]), scaled with ALiBi's bias, the running maxima and sums (`state[j]`: m and l)
/// updated and the probabilities `exp(score − max)` written to `scores[j][..n[j]]`; returns
/// the factors the running outputs must be scaled by. Per query exactly the operations of
/// [`qk_keys`], [`scale_and_max`] and [`softmax_step`] in turn, so the bits are theirs; but the
/// scores stay in registers between the three, and the four queries' exponentials and sums run
/// side by side where one query's 4·16 exponentials and its horizontal sums were a latency
/// chain: the softmax was ~30 % of a long prefill's attention, whose QKᵀ and P·V loops ran near
/// the FMA rate. With [`pv_quad`], criterion's `attention_prefill/2048` took 114–120 ms against
/// 127–141 before (AMD EPYC Zen 4, five alternated rounds; NOTES.md, 2026-12-07 16:46).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn chunk_probabilities<const NV: usize>(qs: [*const f32; QUERIES_TOGETHER], hd: usize, tile: KeyTile, n: [usize; QUERIES_TOGETHER], live: usize, scale: f32, alibi: [Option<(f32, f32)>; QUERIES_TOGETHER], state: [(*mut f32, *mut f32); QUERIES_TOGETHER], scores: &mut [[f32; KEY_TILE]; QUERIES_TOGETHER]) -> [f32; QUERIES_TOGETHER] {
    use super::vmath::avx512::{exp16, mask, sum_tree16};
    use std::arch::x86_64::*;
    let mut x = qk_vectors::<QUERIES_TOGETHER, NV, false>(qs, hd, tile, _mm512_setzero_si512());
    let sv = _mm512_set1_ps(scale);
    let mut corr = [1f32; QUERIES_TOGETHER];
    let mut m_new = [0f32; QUERIES_TOGETHER];
    for j in 0..QUERIES_TOGETHER {
        if j < live {
            let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
            for (v, xv) in x[j].iter_mut().enumerate() {
                *xv = scaled_scores(*xv, 16 * v, sv, alibi[j]);
                max = _mm512_mask_max_ps(max, mask(n[j], 16 * v), *xv, max);
            }
            (m_new[j], corr[j]) = running_max(*state[j].0, _mm512_reduce_max_ps(max));
        }
    }
    let mut sums = [_mm512_setzero_ps(); QUERIES_TOGETHER];
    for j in 0..QUERIES_TOGETHER {
        if j < live {
            let mv = _mm512_set1_ps(m_new[j]);
            for (v, xv) in x[j].iter().enumerate() {
                if 16 * v < n[j] {
                    let k = mask(n[j], 16 * v);
                    let p = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(*xv, mv)));
                    _mm512_mask_storeu_ps(scores[j].as_mut_ptr().add(16 * v), k, p);
                    sums[j] = _mm512_add_ps(sums[j], p);
                }
            }
        }
    }
    for j in 0..live {
        let (m, l) = state[j];
        *l = *l * corr[j] + sum_tree16(sums[j]);
        *m = m_new[j];
    }
    corr
}

/// `o = o·corr` then `o = p[j]·v_j + o` for each key j in order, for two queries at once (each
/// loaded value row serves both), with exactly [`Ops::scale_accumulate`]'s operations per
/// element. `fresh`: the outputs start from zero (their first tile; corr is then 0) instead of
/// being read. The two outputs may be the same pointer when the second `p` is empty.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pv_pair(hd: usize, o: [*mut f32; 2], corr: [f32; 2], p: [&[f32]; 2], v: *const f32, stride: usize, fresh: bool) {
    match hd.div_ceil(16) {
        1 => pv_c::<2, 1>(hd, o, corr, p, v, stride, fresh),
        2 => pv_c::<2, 2>(hd, o, corr, p, v, stride, fresh),
        3 => pv_c::<2, 3>(hd, o, corr, p, v, stride, fresh),
        4 => pv_c::<2, 4>(hd, o, corr, p, v, stride, fresh),
        5 => pv_c::<2, 5>(hd, o, corr, p, v, stride, fresh),
        6 => pv_c::<2, 6>(hd, o, corr, p, v, stride, fresh),
        7 => pv_c::<2, 7>(hd, o, corr, p, v, stride, fresh),
        8 => pv_c::<2, 8>(hd, o, corr, p, v, stride, fresh),
        // Wide heads: one query at a time (two would need 32 accumulators).
        9..=16 => {
            pv_c::<2, 16>(hd, [o[0], o[0]], [corr[0]; 2], [p[0], &[]], v, stride, fresh);
            if !p[1].is_empty() {
                pv_c::<2, 16>(hd, [o[1], o[1]], [corr[1]; 2], [p[1], &[]], v, stride, fresh);
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

/// [`pv_pair`] for four queries at once (each loaded value vector serves four), for heads of up
/// to 64 (16 accumulators).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pv_quad(hd: usize, o: [*mut f32; 4], corr: [f32; 4], p: [&[f32]; 4], v: *const f32, stride: usize, fresh: bool) {
    match hd.div_ceil(16) {
        1 => pv_c::<4, 1>(hd, o, corr, p, v, stride, fresh),
        2 => pv_c::<4, 2>(hd, o, corr, p, v, stride, fresh),
        3 => pv_c::<4, 3>(hd, o, corr, p, v, stride, fresh),
        _ => pv_c::<4, 4>(hd, o, corr, p, v, stride, fresh),
    }
}

/// `o[k] = o[k]·corr[k]`, then `o[k] = p[k][j]·v_j + o[k]` for each key j in order, for NQ
/// queries of C column vectors each; keys that all the queries see are visited once for all of
/// them. Queries after the first whose `p` is empty are not there (their `o` is not written);
/// the keys are then visited query by query.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn pv_c<const NQ: usize, const C: usize>(hd: usize, o: [*mut f32; NQ], corr: [f32; NQ], p: [&[f32]; NQ], v: *const f32, stride: usize, fresh: bool) {
    use std::arch::x86_64::*;
    let mask = |c: usize| super::vmath::avx512::mask(hd, c * 16);
    let live = 1 + p[1..].iter().filter(|q| !q.is_empty()).count();
    let mut acc = [[_mm512_setzero_ps(); C]; NQ];
    for (k, a) in acc.iter_mut().enumerate().take(live) {
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
    let common = if live == NQ { p.iter().map(|q| q.len()).min().unwrap_or(0) } else { 0 };
    for j in 0..common {
        let row = v.add(j * stride);
        let pj: [__m512; NQ] = std::array::from_fn(|k| _mm512_set1_ps(*p[k].get_unchecked(j)));
        for c in 0..C {
            let vv = _mm512_maskz_loadu_ps(mask(c), row.add(c * 16));
            for (a, &pk) in acc.iter_mut().zip(&pj) {
                a[c] = _mm512_fmadd_ps(pk, vv, a[c]);
            }
        }
    }
    for (k, a) in acc.iter_mut().enumerate().take(live) {
        for (j, &pj) in p[k].iter().enumerate().skip(common) {
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
    let (m_new, corr) = running_max(*m, tile_max);
    let sum = O::exp_sub_sum(scores, m_new);
    *l = *l * corr + sum;
    *m = m_new;
    corr
}

/// The running maximum after a tile whose maximum is `tile_max`, and the factor `exp(m − m_new)`
/// that rescales what was summed under the old one.
#[inline(always)]
fn running_max(m: f32, tile_max: f32) -> (f32, f32) {
    let m_new = m.max(tile_max);
    // exp(0) is exactly 1: most tiles after the first leave the maximum where it was, and a call
    // to expf per (query, tile) took 3 % of a long prefill's attention.
    let corr = if m == f32::NEG_INFINITY {
        0.0
    } else if m == m_new {
        1.0
    } else {
        (m - m_new).exp()
    };
    (m_new, corr)
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
    let v_slots = value_slots(v_cache, heads);
    let group = heads.q_heads / heads.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let seq = &plan.seqs[s];
    let nq = nrows * group;
    // Per query vector: running max, running sum, output accumulator.
    let mut m = vec![f32::NEG_INFINITY; nq];
    let mut l = vec![0f32; nq];
    let mut o = vec![0f32; nq * hd];
    let mut scores = [0f32; KEY_TILE];
    // The tile's keys of head g, row-major, gathered once from the key cache's blocks.
    let mut tile = vec![0f32; KEY_TILE * hd];
    let keys_max = plan.positions[row0 + nrows - 1] as usize + 1;
    let mut t0 = 0;
    while t0 < keys_max {
        for (j, key) in tile.chunks_exact_mut(hd).take((keys_max - t0).min(KEY_TILE)).enumerate() {
            let at = key_at(seq.kv_start + t0 + j, kvd, g, hd);
            key.iter_mut().enumerate().for_each(|(d, x)| *x = k_cache[at + d * KEY_BLOCK]);
        }
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
                    *sc = super::vmath::dot(qv, &tile[j * hd..(j + 1) * hd]) * scale + alibi.map_or(0.0, |a| a[h] * (key as f32 - pos as f32));
                    tile_max = tile_max.max(*sc);
                }
                let vbase = v_cache[value_at(seq.kv_start + t0, v_slots, g, hd)..].as_ptr();
                online_update::<O>(&mut scores[..n], tile_max, &mut m[qi], &mut l[qi], &mut o[qi * hd..(qi + 1) * hd], vbase, hd);
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

    /// The value cache's layout: every (slot, head, element) has its own place among the cache's
    /// `slots · kvd` values, a head's values of consecutive slots follow each other, and
    /// [`head_values`] puts each row's values there.
    #[test]
    fn value_cache_holds_each_value_once() {
        for (slots, kvd, hd) in [(1usize, 8usize, 8usize), (37, 40, 20), (64, 192, 64), (17, 320, 160)] {
            let rows = f(slots * kvd, 16.0);
            let cache = head_values(&rows, kvd / hd, hd);
            assert_eq!(cache.len(), slots * kvd);
            let mut seen = vec![false; cache.len()];
            for slot in 0..slots {
                for g in 0..kvd / hd {
                    for d in 0..hd {
                        let at = value_at(slot, slots, g, hd) + d;
                        assert!(!std::mem::replace(&mut seen[at], true), "slot {slot} head {g} element {d} shares its place");
                        assert_eq!(cache[at].to_bits(), rows[slot * kvd + g * hd + d].to_bits());
                        if slot > 0 {
                            assert_eq!(at, value_at(slot - 1, slots, g, hd) + d + hd);
                        }
                    }
                }
            }
        }
    }

    /// The key cache's layout: every (slot, element) of a row has its own place inside
    /// [`key_cache_len`] and outside the last block (kept for the reads of 16 keys from a slot
    /// inside the block before it), consecutive slots of a block lie side by side, and
    /// [`block_keys`] puts each row's values there.
    #[test]
    fn key_cache_holds_each_key_once() {
        for (slots, kvd, hd) in [(1usize, 8usize, 8usize), (37, 40, 20), (64, 192, 64), (17, 320, 160)] {
            let rows = f(slots * kvd, 15.0);
            let cache = block_keys(&rows, kvd);
            assert_eq!(cache.len(), key_cache_len(slots, kvd));
            let mut seen = vec![false; cache.len()];
            for slot in 0..slots {
                for g in 0..kvd / hd {
                    for d in 0..hd {
                        let at = key_at(slot, kvd, g, hd) + d * KEY_BLOCK;
                        assert!(at < cache.len() - KEY_BLOCK * kvd, "slot {slot} head {g} element {d} in the last block");
                        assert!(!std::mem::replace(&mut seen[at], true), "slot {slot} head {g} element {d} shares its place");
                        assert_eq!(cache[at].to_bits(), rows[slot * kvd + g * hd + d].to_bits());
                        if slot % KEY_BLOCK > 0 {
                            assert_eq!(at, key_at(slot - 1, kvd, g, hd) + d * KEY_BLOCK + 1);
                        }
                    }
                }
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
            attention_into(&q, &block_keys(&k, kvd), &head_values(&v, heads.kv_heads, heads.head_dim), heads, &plan, None, &mut by_panels, OutLayout::Packed);
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

    /// Phases only where one task per (sequence, key/value head) would keep a worker waiting: tasks
    /// fewer than the workers or not dividing among them, or sequences of unequal lengths.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn phases_only_where_per_head_tasks_leave_workers_idle() {
        let one = BatchPlan::new(&[1], &[999], &[0]);
        for (kv_heads, workers, idle) in [(3, 2, true), (1, 2, true), (5, 2, true), (2, 2, false), (6, 2, false), (32, 2, false), (4, 3, true), (8, 16, true), (32, 16, false)] {
            assert_eq!(per_head_tasks_leave_workers_idle(&one, kv_heads, workers), idle, "{kv_heads} heads, {workers} workers");
        }
        let uneven = BatchPlan::new(&[1, 1], &[999, 99], &[0, 1000]);
        assert!(per_head_tasks_leave_workers_idle(&uneven, 1, 2), "1,000 keys against 100");
        assert!(!per_head_tasks_leave_workers_idle(&uneven, 2, 2), "1,000 + 100 keys on each worker");
        let even = BatchPlan::new(&[1, 1, 1], &[499, 299, 199], &[0, 500, 800]);
        assert!(!per_head_tasks_leave_workers_idle(&even, 1, 2), "500 keys against 300 + 200");
    }

    /// Decode steps over long contexts (run in phases on AVX-512, from [`PHASED_MIN_KEYS`] keys,
    /// where one task per head would leave workers idle: SmolLM2's heads on 2 workers, the others
    /// on 3, and steps of unequal sequences) give each row the bits of its prefill: one and
    /// several rows, one and several sequences, a sequence of two rows, ALiBi, heads of 20, 64,
    /// 128 and 160 dimensions, groups of 1–8 query heads, on 2 and 3 workers and on one.
    #[test]
    fn long_decode_steps_match_prefill() {
        for (heads, alibi) in [
            (Heads { q_heads: 9, kv_heads: 3, head_dim: 64 }, None),
            (Heads { q_heads: 4, kv_heads: 4, head_dim: 20 }, Some(vec![0.5f32, 0.25, 0.125, 0.0625])),
            (Heads { q_heads: 2, kv_heads: 1, head_dim: 160 }, None),
            (Heads { q_heads: 16, kv_heads: 2, head_dim: 128 }, None),
        ] {
            let (qd, kvd) = (heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
            // Two sequences prefilled whole; their cached keys and values back to back.
            let lens = [700usize, 301];
            let rows: usize = lens.iter().sum();
            let (q, k, v) = (f(rows * qd, 12.0), f(rows * kvd, 13.0), f(rows * kvd, 14.0));
            let mut whole = vec![0f32; rows * qd];
            attention(&q, &k, &v, heads, &packed(&lens), alibi.as_deref(), &mut whole);
            let second = lens[0];
            let steps: [Step; 5] = [
                (&[1], &[699], &[0]),
                (&[1], &[255], &[0]),
                (&[1], &[300], &[second]),
                (&[1, 1, 2], &[640, 200, 298], &[0, second, second]),
                (&[1, 1], &[64, 191], &[0, 0]),
            ];
            assert_steps_match_prefill(heads, alibi.as_deref(), (&q, &k, &v), &whole, &steps);
        }
    }

    /// A decode step: (rows per sequence, their first positions, the sequences' first slots).
    type Step<'a> = (&'a [usize], &'a [usize], &'a [usize]);

    /// Each step's rows, run on 2, 3 and 1 workers with the cached keys and values of prefilled
    /// sequences (`q`, `k`, `v` row-major, `whole` their prefill's output), have their prefill's
    /// bits, row-major and packed.
    fn assert_steps_match_prefill(heads: Heads, alibi: Option<&[f32]>, (q, k, v): (&[f32], &[f32], &[f32]), whole: &[f32], steps: &[Step]) {
        let (qd, kvd) = (heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
        for &(step_lens, firsts, kv_starts) in steps {
            let plan = BatchPlan::new(step_lens, firsts, kv_starts);
            let (mut qs, mut want) = (Vec::new(), Vec::new());
            for ((&n, &p), &kv) in step_lens.iter().zip(firsts).zip(kv_starts) {
                qs.extend_from_slice(&q[(kv + p) * qd..(kv + p + n) * qd]);
                want.extend_from_slice(&whole[(kv + p) * qd..(kv + p + n) * qd]);
            }
            for threads in [2, 3, 1] {
                let mut got = vec![f32::NAN; want.len()];
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| attention(&qs, k, v, heads, &plan, alibi, &mut got));
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{heads:?} {step_lens:?} at {firsts:?}, {threads} workers");
                let mut packed_out = vec![f32::NAN; want.len()];
                pool.install(|| attention_into(&qs, &block_keys(k, kvd), &head_values(v, heads.kv_heads, heads.head_dim), heads, &plan, alibi, &mut packed_out, OutLayout::Packed));
                let mut unpacked = vec![0f32; want.len()];
                super::super::gemm::unpack_rows(&packed_out, plan.rows(), qd, &mut unpacked);
                assert!(unpacked.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{heads:?} {step_lens:?} packed, {threads} workers");
            }
        }
    }

    /// A decode step's tasks cut into runs: in order, each task once, at most one run per worker,
    /// none empty, and no run longer than an even share of the keys by more than one task's.
    #[test]
    fn runs_of_even_keys_cover_the_tasks_in_order() {
        let plan = BatchPlan::new(&[1, 1, 2, 1], &[10, 500, 20, 0], &[0, 16, 528, 560]);
        let mut tasks = Vec::new();
        for (s, seq) in plan.seqs.iter().enumerate() {
            tasks.extend((0..3).map(|g| (s, g, seq.start, seq.len)));
        }
        let total: usize = tasks.iter().map(|t| task_keys(&plan, t)).sum();
        let longest = tasks.iter().map(|t| task_keys(&plan, t)).max().unwrap();
        for workers in 1..=16 {
            let runs = runs_of_even_keys(&tasks, &plan, workers);
            assert_eq!(runs.concat(), tasks, "{workers} workers");
            assert!(!runs.is_empty() && runs.len() <= workers && runs.iter().all(|r| !r.is_empty()), "{workers} workers: {} runs", runs.len());
            for run in &runs {
                let keys: usize = run.iter().map(|t| task_keys(&plan, t)).sum();
                assert!(keys * workers <= total + longest * workers, "{workers} workers: a run of {keys} keys of {total}");
            }
        }
        assert!(runs_of_even_keys(&[], &plan, 2).is_empty());
    }

    /// Decode steps of up to [`DECODE_ROWS`](super::super::gemm::DECODE_ROWS) rows, whose
    /// workers each prefetch and run their own run of tasks, give each row the bits of its
    /// prefill, on 1–3 workers: SmolLM2's heads (3 tasks a sequence, runs that split a
    /// sequence's heads) and heads of 20, sequences of 2–300 cached positions, a sequence of two
    /// rows.
    #[test]
    fn short_decode_steps_match_prefill() {
        for heads in [Heads { q_heads: 9, kv_heads: 3, head_dim: 64 }, Heads { q_heads: 4, kv_heads: 2, head_dim: 20 }] {
            let (qd, kvd) = (heads.q_heads * heads.head_dim, heads.kv_heads * heads.head_dim);
            let lens = [300usize, 40, 97];
            let rows: usize = lens.iter().sum();
            let (q, k, v) = (f(rows * qd, 15.0), f(rows * kvd, 16.0), f(rows * kvd, 17.0));
            let mut whole = vec![0f32; rows * qd];
            attention(&q, &k, &v, heads, &packed(&lens), None, &mut whole);
            let steps: [Step; 4] = [
                (&[1], &[120], &[0]),
                (&[1, 1], &[2, 39], &[300, 300]),
                (&[1, 2, 1], &[299, 60, 30], &[0, 340, 300]),
                (&[1, 1, 1, 1], &[250, 96, 11, 38], &[0, 340, 0, 300]),
            ];
            assert_steps_match_prefill(heads, None, (&q, &k, &v), &whole, &steps);
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
