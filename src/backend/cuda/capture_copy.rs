//! Captured rows leave the device while the pass is still running.
//!
//! The capture plane is `[rows, slots, hidden]` f32, and so is the output it is copied into. One
//! copy of the whole plane after the last kernel leaves the GPU idle for all of it (2.2 MB per
//! step for 16 sequences of a 1B model at every layer: several % of a decode step). Instead each
//! slot is copied on a stream of its own as soon as the kernel that wrote it has run, while the
//! main stream works through the later layers; what remains after the pass is the last slot.
//! The host waits in `end_pass` either way.
use super::dev_err;
use crate::error::{Error, Result};
use cudarc::driver::sys;
use cudarc::driver::{result, CudaContext, CudaEvent, CudaStream};
use std::sync::{Arc, OnceLock};

/// A non-blocking stream for the capture copies. Raw rather than a cudarc `CudaStream`: cudarc
/// turns on its per-argument event tracking once a context has a second `CudaStream`, which
/// would add event records to every launch.
pub(super) struct CopyStream {
    raw: sys::CUstream,
    ctx: Arc<CudaContext>,
}

// SAFETY: a stream handle may be used from any thread that binds its context; `ctx` keeps the
// context alive until the stream is destroyed.
unsafe impl Send for CopyStream {}
unsafe impl Sync for CopyStream {}

impl Drop for CopyStream {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: created by `stream::create` below and destroyed once, here.
            let _ = unsafe { result::stream::destroy(self.raw) };
        }
    }
}

/// The context's copy stream, created on first use.
pub(super) fn copy_stream<'a>(cell: &'a OnceLock<CopyStream>, ctx: &Arc<CudaContext>) -> Result<&'a CopyStream> {
    if let Some(s) = cell.get() {
        return Ok(s);
    }
    ctx.bind_to_thread().map_err(dev_err("bind context"))?;
    let raw = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(dev_err("capture copy stream creation"))?;
    // A stream made by a racing thread in the meantime is dropped (destroyed) here.
    let _ = cell.set(CopyStream { raw, ctx: ctx.clone() });
    cell.get().ok_or_else(|| Error::Device("capture copy stream was not kept".into()))
}

/// The index of the next event of the pass: one past the last that `written` refers to.
fn next_event(written: &[(usize, usize)]) -> usize {
    written.iter().map(|&(_, ev)| ev + 1).max().unwrap_or(0)
}

/// Records the pass's next event on `main` (pooled in `events`) and returns its index.
fn record_next(ctx: &Arc<CudaContext>, main: &CudaStream, events: &mut Vec<CudaEvent>, written: &[(usize, usize)]) -> Result<usize> {
    let i = next_event(written);
    while events.len() <= i {
        events.push(ctx.new_event(None).map_err(dev_err("event creation"))?);
    }
    events[i].record(main).map_err(dev_err("event record"))?;
    Ok(i)
}

/// Marks `slots` as written by the kernels queued on `main` so far: `copy_plane` copies each
/// of them once those kernels have run.
pub(super) fn mark_written(
    ctx: &Arc<CudaContext>,
    main: &CudaStream,
    events: &mut Vec<CudaEvent>,
    written: &mut Vec<(usize, usize)>,
    slots: impl IntoIterator<Item = usize>,
) -> Result<()> {
    let event = record_next(ctx, main, events, written)?;
    written.extend(slots.into_iter().map(|slot| (slot, event)));
    Ok(())
}

/// Which event of the pass to wait for before copying each slot: `written` lists (slot, event)
/// in the order the kernels were queued (a later entry for a slot wins); slots no kernel wrote
/// (a repeated point's second slot keeps the plane's zeros) wait for `last`, which is recorded
/// after everything. Sorted by event, so the copies go in the order the data becomes ready.
pub(super) fn copy_order(slots: usize, written: &[(usize, usize)], last: usize) -> Vec<(usize, usize)> {
    let mut event = vec![last; slots];
    for &(slot, ev) in written {
        if let Some(e) = event.get_mut(slot) {
            *e = ev;
        }
    }
    let mut order: Vec<(usize, usize)> = event.into_iter().enumerate().collect();
    order.sort_by_key(|&(slot, ev)| (ev, slot));
    order
}

/// Copies the plane at device address `plane` (`rows × slots × hidden` f32) into `dst`, slot by
/// slot, each after its event (`mark_written`). Returns when every copy has finished.
#[allow(clippy::too_many_arguments)]
pub(super) fn copy_plane(
    stream: &CopyStream,
    main: &CudaStream,
    events: &mut Vec<CudaEvent>,
    written: &[(usize, usize)],
    plane: u64,
    rows: usize,
    slots: usize,
    hidden: usize,
    dst: &mut [f32],
) -> Result<()> {
    if dst.len() != rows * slots * hidden {
        return Err(Error::Device(format!("capture copy of {rows}x{slots}x{hidden} values into {} values", dst.len())));
    }
    if dst.is_empty() {
        return Ok(());
    }
    let last = record_next(&stream.ctx, main, events, written)?;
    let row_bytes = slots * hidden * 4;
    let mut queued = Ok(());
    for (slot, ev) in copy_order(slots, written, last) {
        let desc = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: plane + (slot * hidden * 4) as u64,
            srcArray: std::ptr::null_mut(),
            srcPitch: row_bytes,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
            // In bounds: slot < slots, and the last row ends at rows·slots·hidden = dst.len().
            dstHost: dst[slot * hidden..].as_mut_ptr().cast(),
            dstDevice: 0,
            dstArray: std::ptr::null_mut(),
            dstPitch: row_bytes,
            WidthInBytes: hidden * 4,
            Height: rows,
        };
        // SAFETY: the event and stream are live; the source lies inside the plane and the
        // destination inside `dst` (checked above), which outlives the copy (synchronised below).
        queued = unsafe {
            result::stream::wait_event(stream.raw, events[ev].cu_event(), sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                .and_then(|()| sys::cuMemcpy2DAsync_v2(&desc, stream.raw).result())
        }
        .map_err(dev_err("capture copy"));
        if queued.is_err() {
            break;
        }
    }
    // Even after a failed call: nothing may still be writing into `dst` when this returns.
    // SAFETY: a live stream.
    let finished = unsafe { result::stream::synchronize(stream.raw) }.map_err(dev_err("capture copy synchronize"));
    queued.and(finished)
}

#[cfg(test)]
mod tests {
    use super::copy_order;

    #[test]
    fn slots_are_copied_after_their_own_kernel_in_completion_order() {
        // Slots 2 and 0 written by events 0 and 1, slot 1 by event 1 then again by event 2,
        // slot 3 never written: it waits for the last event (3).
        let order = copy_order(4, &[(2, 0), (0, 1), (1, 1), (1, 2)], 3);
        assert_eq!(order, vec![(2, 0), (0, 1), (1, 2), (3, 3)]);
        assert_eq!(copy_order(2, &[], 0), vec![(0, 0), (1, 0)]);
        // A slot outside the plane is ignored rather than indexing past it.
        assert_eq!(copy_order(1, &[(5, 0)], 1), vec![(0, 1)]);
    }
}
