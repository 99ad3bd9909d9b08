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
        let rows_per_copy = (STAGE_ELEMS / cols).clamp(1, rows);
        self.ensure(ctx, rows_per_copy * cols)?;
        let mut first = 0;
        while first < rows {
            let n = rows_per_copy.min(rows - first);
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
            first += n;
        }
        Ok(())
    }
}
