//! `resid stats` on the device: the f64 accumulators of every capture point stay on the GPU and
//! kernels/stats_accumulate.cu folds each pass's capture plane into them, so no captured row is
//! copied to the host; checkpoints and the final write download the accumulators (memory
//! independent of the number of tokens). The kernels sum every element over the rows in input
//! order, with the fused multiply-add of the CPU fold (`PointMoments::add_rows`), so the
//! result is the CPU fold's of the same rows, whatever the batching.
use super::{cfg, dev_err, grow, CudaBackend, CudaPass, KernelArg};
use crate::backend::NonFinite;
use crate::error::{Error, Result};
use crate::backend::moments::PointMoments;
use cudarc::driver::{CudaSlice, LaunchConfig};

/// Threads per block of `stats_rows` (columns per block).
const ROWS_BLOCK: usize = 128;
/// The square tile of `stats_outer` (a block of 256 threads, 4 x 4 elements each).
const OUTER_TILE: usize = 64;
const OUTER_THREADS: u32 = 256;

/// Device accumulators of every capture point (`[slots, hidden]` f64 each, `sq`
/// `[slots, hidden, hidden]`), as stats_accumulate.cu lays them out.
pub struct CudaStats {
    slots: usize,
    hidden: usize,
    pairs: bool,
    /// Rows folded so far (the same for every point).
    count: u64,
    /// Whether `pending` holds a pos row waiting for its neg (pairs).
    has_pending: bool,
    shift: CudaSlice<f64>,
    sum: CudaSlice<f64>,
    min: CudaSlice<f64>,
    max: CudaSlice<f64>,
    sq: Option<CudaSlice<f64>>,
    pending: CudaSlice<f32>,
    /// The shifted rows of the current batch (`[slots, n, hidden]` f64), grown as needed.
    shifted: Option<CudaSlice<f64>>,
    /// Per slot and block of columns, the first non-finite row of the last batch.
    bad: CudaSlice<i32>,
}

impl CudaBackend {
    pub(super) fn stats_upload(&self, moments: &[PointMoments], pairs: bool) -> Result<CudaStats> {
        let (slots, hidden) = (moments.len(), moments.first().map_or(0, |m| m.hidden));
        let count = moments.first().map_or(0, |m| m.count);
        if slots == 0 || hidden == 0 || moments.iter().any(|m| m.hidden != hidden || m.count != count) {
            return Err(Error::Device(format!("statistics accumulators for {slots} points of unequal sizes or counts")));
        }
        let second = !moments[0].sq.is_empty();
        let cat = |f: &dyn Fn(&PointMoments) -> &[f64]| -> Result<CudaSlice<f64>> { self.upload(&moments.iter().flat_map(|m| f(m).iter().copied()).collect::<Vec<f64>>()) };
        // Before any row the shift is unset (zeros); the kernel sets it from the first row.
        let shift: Vec<f64> = moments.iter().flat_map(|m| if m.shift.is_empty() { vec![0.0; hidden] } else { m.shift.clone() }).collect();
        Ok(CudaStats {
            slots,
            hidden,
            pairs,
            count,
            has_pending: false,
            shift: self.upload(&shift)?,
            sum: cat(&|m| &m.sum)?,
            min: cat(&|m| &m.min)?,
            max: cat(&|m| &m.max)?,
            sq: if second { Some(cat(&|m| &m.sq)?) } else { None },
            pending: self.zeros(slots * hidden)?,
            shifted: None,
            bad: self.zeros(slots * hidden.div_ceil(ROWS_BLOCK))?,
        })
    }

    pub(super) fn stats_download(&self, acc: &CudaStats) -> Result<Vec<PointMoments>> {
        let (p, h) = (acc.slots, acc.hidden);
        let get = |s: &CudaSlice<f64>| self.stream.clone_dtoh(s).map_err(dev_err("statistics download"));
        let (shift, sum, min, max) = (get(&acc.shift)?, get(&acc.sum)?, get(&acc.min)?, get(&acc.max)?);
        let sq = acc.sq.as_ref().map(get).transpose()?;
        let row = |v: &[f64], s: usize| v[s * h..(s + 1) * h].to_vec();
        Ok((0..p)
            .map(|s| PointMoments {
                hidden: h,
                count: acc.count,
                shift: if acc.count == 0 { Vec::new() } else { row(&shift, s) },
                sum: row(&sum, s),
                sq: sq.as_ref().map_or(Vec::new(), |q| q[s * h * h..(s + 1) * h * h].to_vec()),
                min: row(&min, s),
                max: row(&max, s),
            })
            .collect())
    }

    /// Folds the pass's capture plane into `acc` (stats_rows, then stats_outer) and reads back
    /// where its first non-finite value is. The pass's buffers go back to the pool either way.
    pub(super) fn stats_end_pass(&self, pass: CudaPass, acc: &mut CudaStats) -> Result<Option<NonFinite>> {
        let CudaPass { width: h, layout, bufs, .. } = pass;
        let bufs = bufs.into_inner();
        let folded = match (layout.capture, bufs.plane.as_ref()) {
            (Some(cap), Some(plane)) if cap.slots == acc.slots && h == acc.hidden => self.stats_fold(acc, self.ptr(plane), cap.rows),
            _ => Err(Error::Device(format!("a pass without a {}x{} capture plane for statistics", acc.slots, acc.hidden))),
        };
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(bufs);
        folded
    }

    fn stats_fold(&self, acc: &mut CudaStats, plane: u64, rows: usize) -> Result<Option<NonFinite>> {
        let (slots, h) = (acc.slots, acc.hidden);
        let held = usize::from(acc.pairs && acc.has_pending);
        let n = if acc.pairs { (rows + held) / 2 } else { rows };
        grow(&self.stream, &mut acc.shifted, slots * n * h)?;
        let Some(shifted) = acc.shifted.as_ref() else { return Err(Error::Device("statistics scratch was not allocated".into())) };
        let blocks = h.div_ceil(ROWS_BLOCK);
        let (rows_i, slots_i, h_i, n_i) = (rows as i32, slots as i32, h as i32, n as i32);
        let (pairs, held_i, first) = (i32::from(acc.pairs), held as i32, i32::from(acc.count == 0));
        launch!(
            self,
            "stats_rows",
            cfg((blocks as u32, slots as u32, 1), ROWS_BLOCK as u32),
            &plane, &rows_i, &slots_i, &h_i, &pairs, &acc.pending, &held_i, &first, &acc.shift, &acc.sum, &acc.min, &acc.max, shifted, &acc.bad
        );
        if let (Some(sq), true) = (acc.sq.as_ref(), n > 0) {
            let tiles = h.div_ceil(OUTER_TILE) as u32;
            let grid = LaunchConfig { grid_dim: (tiles, tiles, slots as u32), block_dim: (OUTER_THREADS, 1, 1), shared_mem_bytes: 0 };
            launch!(self, "stats_outer", grid, shifted, &n_i, &slots_i, &h_i, sq);
        }
        // A few ints; the copy waits for the kernels.
        let bad = self.stream.clone_dtoh(&acc.bad).map_err(dev_err("statistics check"))?;
        acc.count += n as u64;
        if acc.pairs {
            acc.has_pending = (rows + held) % 2 == 1;
        }
        // The first row holding one, and its first slot: the order of the CPU's check.
        let first_bad = (0..slots).filter_map(|s| bad[s * blocks..(s + 1) * blocks].iter().copied().min().map(|r| (r, s))).min();
        Ok(first_bad.filter(|&(r, _)| r != i32::MAX).map(|(r, slot)| NonFinite { row: r as usize, slot }))
    }
}
