//! Weight upload through pinned staging buffers: the host converts (or, for bf16 checkpoints,
//! copies) the next chunk of rows from the mapped file into one buffer while the DMA engine
//! copies the other to the device. Pageable copies run at a fraction of the link's rate and
//! leave the conversion and the copy in series; this keeps both busy.
use crate::error::{Error, Result};
use crate::model::weights::MatrixSource;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, PinnedHostSlice};
use std::sync::Arc;

/// Elements (bf16) per staging buffer: 32 MiB, large enough that per-copy costs vanish, small
/// enough that the first copy starts early.
const STAGE_ELEMS: usize = 16 << 20;

struct Stage {
    host: PinnedHostSlice<u16>,
    /// Recorded after the copy that last read `host`; waited on before it is refilled.
    copied: CudaEvent,
}

impl Drop for Stage {
    /// The buffer is freed only after the copy reading it has finished.
    fn drop(&mut self) {
        let _ = self.copied.synchronize();
    }
}

/// Two pinned buffers, used alternately.
#[derive(Default)]
pub struct Staging {
    stages: Vec<Stage>,
    next: usize,
}

fn err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Device(format!("CUDA weight upload ({what}): {e}"))
}

impl Staging {
    fn ensure(&mut self, ctx: &Arc<CudaContext>, elems: usize) -> Result<()> {
        if self.stages.len() == 2 && self.stages.iter().all(|s| s.host.len() >= elems) {
            return Ok(());
        }
        self.stages.clear();
        for _ in 0..2 {
            // SAFETY: the buffer is written by the host before any copy reads it. Write-combined
            // (cudarc's default) suits memory the host only writes.
            let host = unsafe { ctx.alloc_pinned::<u16>(elems) }.map_err(err("pinned allocation"))?;
            let copied = ctx.new_event(None).map_err(err("event"))?;
            self.stages.push(Stage { host, copied });
        }
        Ok(())
    }

    /// Copies `src` as bf16 into the device allocation at `dst` (`rows · cols` elements),
    /// `rows_per_copy` rows at a time. Returns when the last copy has been queued; the staging
    /// buffers are reused only after their copies complete, and freeing them waits too.
    pub fn upload(&mut self, ctx: &Arc<CudaContext>, stream: &CudaStream, src: &MatrixSource, dst: u64) -> Result<()> {
        let (rows, cols) = (src.rows(), src.cols());
        if rows * cols == 0 {
            return Ok(());
        }
        let chunks = row_chunks(rows, cols, STAGE_ELEMS);
        self.ensure(ctx, chunks.iter().map(|&(_, n)| n * cols).max().unwrap_or(0))?;
        for (first, n) in chunks {
            let stage = &mut self.stages[self.next];
            self.next = (self.next + 1) % 2;
            stage.copied.synchronize().map_err(err("wait for the previous copy"))?;
            let host = stage.host.as_mut_slice().map_err(err("staging buffer"))?;
            let chunk = &mut host[..n * cols];
            src.write_bf16_rows(first, chunk);
            let at = dst + (first * cols * 2) as u64;
            // SAFETY: `dst` holds rows · cols bf16 elements; the chunk is pinned and is not
            // written again before `copied` (recorded next) has completed.
            unsafe { cudarc::driver::result::memcpy_htod_async(at, &chunk[..], stream.cu_stream()) }.map_err(err("copy"))?;
            stage.copied.record(stream).map_err(err("event record"))?;
        }
        Ok(())
    }
}

/// The copies of a `rows × cols` upload through buffers of `stage_elems`: (first row, rows), in
/// order, each at most one buffer (or one row, if a row is larger).
fn row_chunks(rows: usize, cols: usize, stage_elems: usize) -> Vec<(usize, usize)> {
    let per_copy = (stage_elems / cols.max(1)).clamp(1, rows.max(1));
    (0..rows).step_by(per_copy).map(|first| (first, per_copy.min(rows - first))).collect()
}

#[cfg(test)]
mod tests {
    use super::row_chunks;

    #[test]
    fn chunks_cover_every_row_once_within_a_buffer() {
        for (rows, cols, stage) in [(4096, 4096, 16 << 20), (32000, 4096, 16 << 20), (7, 3, 5), (5, 100, 10), (1, 1, 1), (0, 8, 8)] {
            let chunks = row_chunks(rows, cols, stage);
            let mut next = 0;
            for &(first, n) in &chunks {
                assert_eq!(first, next, "{rows}x{cols} through {stage}");
                assert!(n >= 1 && (n * cols <= stage || n == 1), "{rows}x{cols} through {stage}: {n} rows");
                next += n;
            }
            assert_eq!(next, rows);
        }
        // A 32000 x 4096 embedding goes up in 8 copies of 4,096 rows.
        assert_eq!(row_chunks(32000, 4096, 16 << 20).len(), 8);
    }
}
