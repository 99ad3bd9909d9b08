//! The small device tables of one pass (index maps, capture maps, steering row maps and slot
//! descriptors) laid out in one host buffer, so that a pass uploads them with one copy into a
//! reused device buffer. Pure host code, tested without a GPU; `mod.rs` turns the byte offsets
//! into device addresses.
use crate::backend::CaptureLayout;
use crate::engine::capture::CapturePosition;
use crate::engine::plan::BatchPlan;
use crate::engine::steer::{PointSteering, SteerOp};
use crate::error::{Error, Result};
use std::sync::Arc;

/// Every table starts on a 16-byte boundary (float4 loads of inline vectors, 16-byte slot
/// descriptors).
const ALIGN: usize = 16;

/// Bytes of one `steer_slot_t` (kernels/fused_residual.cu): vector pointer, coefficient, mode.
pub const SLOT_BYTES: usize = 16;

/// The host image of the tables. Device pointers to data inside the image itself (vectors that
/// are not resident) are known only once the device buffer is, so they are patched in `finish`.
#[derive(Default)]
pub struct TableImage {
    bytes: Vec<u8>,
    /// (byte position of a u64 pointer field, table-relative byte offset it points to)
    patches: Vec<(usize, usize)>,
}

impl TableImage {
    fn align(&mut self) -> usize {
        let at = self.bytes.len().next_multiple_of(ALIGN);
        self.bytes.resize(at, 0);
        at
    }

    pub fn i32s(&mut self, v: impl IntoIterator<Item = i32>) -> usize {
        let at = self.align();
        for x in v {
            self.bytes.extend_from_slice(&x.to_le_bytes());
        }
        at
    }

    pub fn f32s(&mut self, v: impl IntoIterator<Item = f32>) -> usize {
        let at = self.align();
        for x in v {
            self.bytes.extend_from_slice(&x.to_le_bytes());
        }
        at
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes to upload, with pointers into the image resolved against its device address.
    pub fn finish(mut self, base: u64) -> Vec<u8> {
        for &(pos, target) in &self.patches {
            self.bytes[pos..pos + 8].copy_from_slice(&(base + target as u64).to_le_bytes());
        }
        self.bytes
    }
}

/// Byte offsets of four per-segment arrays (`begin`, `end`, `dst` as i32, `weight` as f32).
#[derive(Debug, Clone, Copy)]
pub struct Segments {
    pub begin: usize,
    pub end: usize,
    pub dst: usize,
    pub weight: usize,
    pub count: usize,
}

/// Capture maps. The capture plane is `[rows, slots, hidden]` f32 (the layout of `Captured`),
/// so slot s of row r is at `(r·slots + s)·hidden`: the kernels get the plane offset by
/// `s·hidden` and destination rows `r·slots`, and `end_pass` copies the plane out in one piece.
#[derive(Debug, Clone, Copy)]
pub struct CaptureMaps {
    pub position: CapturePosition,
    pub slots: usize,
    /// Rows of the plane: sequences (last, mean) or packed rows (all).
    pub rows: usize,
    /// `[T]` plane row·slots of each packed row, or -1 (last and all).
    pub capture_row: Option<usize>,
    /// One per sequence, weight 1/len (mean).
    pub mean: Option<Segments>,
    /// Rows whose normalised values are captured (index L): one-row segments for last and all,
    /// the mean segments for mean.
    pub normed: Segments,
}

/// One steered point: the `[T]` slot map and the slot descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteerMaps {
    pub row_slot: usize,
    pub table: usize,
    pub slots: usize,
}

#[derive(Debug)]
pub struct PassLayout {
    pub positions: usize,
    pub kv_slot: usize,
    pub cu_seqlens: usize,
    pub kv_start: usize,
    pub kv_len: usize,
    pub inv_freq: Option<usize>,
    pub capture: Option<CaptureMaps>,
    /// Entry l for hidden-state index l (`PointSteering::index`).
    pub steer: Vec<Option<SteerMaps>>,
}

fn i32_of(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Device(format!("{what} ({x}) exceeds the CUDA kernels' 32-bit indices: use smaller batches")))
}

/// Lays out the tables of a pass. `resident(table)` returns the device address of a resident
/// copy of a shared directions table (uploading it the first time); slots without a shared
/// table have their vector stored in the image.
pub fn build(
    plan: &BatchPlan,
    inv_freq: &[f32],
    capture: Option<CaptureLayout>,
    steering: &[Option<PointSteering<'_>>],
    hidden: usize,
    mut resident: impl FnMut(&Arc<Vec<f32>>) -> Result<u64>,
) -> Result<(PassLayout, TableImage)> {
    let rows = plan.rows();
    let nseq = plan.seqs.len();
    let mut img = TableImage::default();
    // Every index below fits once the largest ones do.
    let max_slot = plan.seqs.iter().map(|s| s.kv_start + s.past + s.len).max().unwrap_or(0);
    i32_of(rows.max(max_slot), "rows and KV slots of one pass")?;
    let positions = img.i32s(plan.positions.iter().map(|&p| p as i32));
    let kv_slot = img.i32s((0..rows).map(|r| (plan.seqs[plan.row_seq[r] as usize].kv_start + plan.positions[r] as usize) as i32));
    let cu_seqlens = img.i32s(std::iter::once(0).chain(plan.seqs.iter().map(|s| (s.start + s.len) as i32)));
    let kv_start = img.i32s(plan.seqs.iter().map(|s| s.kv_start as i32));
    let kv_len = img.i32s(plan.seqs.iter().map(|s| (s.past + s.len) as i32));
    // An empty table must reach the kernel as null: a non-null pointer means "rotate".
    let inv_freq = (!inv_freq.is_empty()).then(|| img.f32s(inv_freq.iter().copied()));

    let capture = match capture {
        None => None,
        Some(c) => {
            let slots = c.slots;
            let cap_rows = if c.position == CapturePosition::All { rows } else { nseq };
            i32_of(cap_rows * slots.max(1), "capture rows × captured points of one pass")?;
            let mut segs = |begin: &[usize], end: &[usize], dst: &[usize], weight: &[f32]| Segments {
                begin: img.i32s(begin.iter().map(|&x| x as i32)),
                end: img.i32s(end.iter().map(|&x| x as i32)),
                dst: img.i32s(dst.iter().map(|&x| (x * slots) as i32)),
                weight: img.f32s(weight.iter().copied()),
                count: begin.len(),
            };
            let (capture_row, mean, normed) = match c.position {
                CapturePosition::Last => {
                    let last: Vec<usize> = plan.seqs.iter().map(|s| s.start + s.len - 1).collect();
                    let mut map = vec![-1i32; rows];
                    for (i, &r) in last.iter().enumerate() {
                        map[r] = (i * slots) as i32;
                    }
                    let next: Vec<usize> = last.iter().map(|r| r + 1).collect();
                    let normed = segs(&last, &next, &(0..nseq).collect::<Vec<_>>(), &vec![1.0; nseq]);
                    (Some(img.i32s(map)), None, normed)
                }
                CapturePosition::All => {
                    let all: Vec<usize> = (0..rows).collect();
                    let next: Vec<usize> = (1..=rows).collect();
                    let normed = segs(&all, &next, &all, &vec![1.0; rows]);
                    (Some(img.i32s((0..rows).map(|r| (r * slots) as i32))), None, normed)
                }
                CapturePosition::Mean => {
                    let begin: Vec<usize> = plan.seqs.iter().map(|s| s.start).collect();
                    let end: Vec<usize> = plan.seqs.iter().map(|s| s.start + s.len).collect();
                    let weight: Vec<f32> = plan.seqs.iter().map(|s| 1.0 / s.len as f32).collect();
                    let mean = segs(&begin, &end, &(0..nseq).collect::<Vec<_>>(), &weight);
                    (None, Some(mean), mean)
                }
            };
            Some(CaptureMaps { position: c.position, slots, rows: cap_rows, capture_row, mean, normed })
        }
    };

    let points = steering.iter().flatten().map(|p| p.index + 1).max().unwrap_or(0);
    let mut steer = vec![None; points];
    // Points steered alike share one row map (the usual case: same sequences at every layer).
    let mut last_map: Option<(&[i32], usize)> = None;
    for p in steering.iter().flatten() {
        if p.row_slot.len() != rows {
            return Err(Error::Device(format!("steering plan for index {} has {} rows, the pass {rows}", p.index, p.row_slot.len())));
        }
        let row_slot = match last_map {
            Some((m, at)) if m == &p.row_slot[..] => at,
            _ => {
                let at = img.i32s(p.row_slot.iter().copied());
                last_map = Some((&p.row_slot, at));
                at
            }
        };
        // Descriptors first, vectors that are not resident after them (patched in `finish`).
        let mut addrs = Vec::with_capacity(p.slots.len());
        // The hidden size, or heads·head_dim at hook_z: every slot of a point has one width.
        let width = p.slots.first().map_or(hidden, |s| s.vector.len());
        for s in &p.slots {
            if s.vector.len() != width || width == 0 {
                return Err(Error::Device(format!("steering vector for point {} has {} values, the point {width}", p.index, s.vector.len())));
            }
            addrs.push(match s.table {
                Some((t, off)) if off + width <= t.len() && t[off..off + width].as_ptr() == s.vector.as_ptr() => {
                    Some(resident(t)? + (off * 4) as u64)
                }
                _ => None,
            });
        }
        let table = img.align();
        for s in &p.slots {
            let mode = (s.op == SteerOp::SignAware) as i32 | (s.preserve_norm as i32) << 1;
            img.bytes.extend_from_slice(&0u64.to_le_bytes());
            img.bytes.extend_from_slice(&s.coef.to_le_bytes());
            img.bytes.extend_from_slice(&mode.to_le_bytes());
        }
        for (k, (s, addr)) in p.slots.iter().zip(&addrs).enumerate() {
            let field = table + k * SLOT_BYTES;
            match addr {
                Some(a) => img.bytes[field..field + 8].copy_from_slice(&a.to_le_bytes()),
                None => {
                    let at = img.f32s(s.vector.iter().copied());
                    img.patches.push((field, at));
                }
            }
        }
        steer[p.index] = Some(SteerMaps { row_slot, table, slots: p.slots.len() });
    }
    Ok((PassLayout { positions, kv_slot, cu_seqlens, kv_start, kv_len, inv_freq, capture, steer }, img))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::steer::{plan_pass, SlotSteer, SteerPositions, Steering};

    fn i32_at(b: &[u8], at: usize, k: usize) -> i32 {
        i32::from_le_bytes(b[at + 4 * k..at + 4 * k + 4].try_into().unwrap())
    }
    fn f32_at(b: &[u8], at: usize, k: usize) -> f32 {
        f32::from_le_bytes(b[at + 4 * k..at + 4 * k + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn index_and_capture_maps() {
        // Two sequences: 2 new tokens after 0 cached, 3 after 4 cached.
        let plan = BatchPlan::new(&[2, 3], &[0, 4], &[0, 10]);
        for position in [CapturePosition::Last, CapturePosition::All, CapturePosition::Mean] {
            let (l, img) = build(&plan, &[0.5, 0.25], Some(CaptureLayout { slots: 3, position, width: 8 }), &[], 8, |_| unreachable!()).unwrap();
            let b = img.finish(0);
            assert!([l.positions, l.kv_slot, l.cu_seqlens, l.kv_start, l.kv_len].iter().all(|o| o.is_multiple_of(ALIGN)));
            assert_eq!((0..5).map(|k| i32_at(&b, l.positions, k)).collect::<Vec<_>>(), [0, 1, 4, 5, 6]);
            assert_eq!((0..5).map(|k| i32_at(&b, l.kv_slot, k)).collect::<Vec<_>>(), [0, 1, 14, 15, 16]);
            assert_eq!((0..3).map(|k| i32_at(&b, l.cu_seqlens, k)).collect::<Vec<_>>(), [0, 2, 5]);
            assert_eq!((0..2).map(|k| i32_at(&b, l.kv_len, k)).collect::<Vec<_>>(), [2, 7]);
            assert_eq!(f32_at(&b, l.inv_freq.unwrap(), 1), 0.25);
            let c = l.capture.unwrap();
            let seg = |s: Segments| {
                (0..s.count)
                    .map(|k| (i32_at(&b, s.begin, k), i32_at(&b, s.end, k), i32_at(&b, s.dst, k), f32_at(&b, s.weight, k)))
                    .collect::<Vec<_>>()
            };
            match position {
                CapturePosition::Last => {
                    assert_eq!(c.rows, 2);
                    assert_eq!((0..5).map(|k| i32_at(&b, c.capture_row.unwrap(), k)).collect::<Vec<_>>(), [-1, 0, -1, -1, 3]);
                    assert_eq!(seg(c.normed), [(1, 2, 0, 1.0), (4, 5, 3, 1.0)]);
                }
                CapturePosition::All => {
                    assert_eq!(c.rows, 5);
                    assert_eq!((0..5).map(|k| i32_at(&b, c.capture_row.unwrap(), k)).collect::<Vec<_>>(), [0, 3, 6, 9, 12]);
                    assert_eq!(seg(c.normed)[4], (4, 5, 12, 1.0));
                }
                CapturePosition::Mean => {
                    assert!(c.capture_row.is_none());
                    assert_eq!(seg(c.mean.unwrap()), [(0, 2, 0, 0.5), (2, 5, 3, 1.0 / 3.0)]);
                    assert_eq!(seg(c.normed), seg(c.mean.unwrap()));
                }
            }
        }
        // ALiBi models: no rotary table at all, so the kernel gets null.
        let (l, _) = build(&plan, &[], None, &[], 8, |_| unreachable!()).unwrap();
        assert!(l.inv_freq.is_none() && l.capture.is_none() && l.steer.is_empty());
    }

    #[test]
    fn steering_tables_resident_and_inline() {
        let h = 4;
        let s = |seed: f32, op, keep| {
            Some(Arc::new(Steering {
                directions: Arc::new((0..3 * h).map(|i| seed + i as f32).collect()),
                hidden: h,
                layers: vec![1, 2],
                sites: Vec::new(),
                coef: 1.5,
                op,
                preserve_norm: keep,
                positions: SteerPositions::All,
            }))
        };
        let seqs = vec![s(100.0, SteerOp::Add, false), None, s(200.0, SteerOp::SignAware, true)];
        let plan = BatchPlan::fresh(&[2, 1, 1]);
        let mut points = plan_pass(2, 2, &seqs, &plan.row_seq, crate::engine::Phase::Prompt);
        // A slot with no shared table (a bench's ad-hoc vector) travels inline.
        let ad_hoc = [9.0f32; 4];
        points[2].as_mut().unwrap().slots[0] =
            SlotSteer { vector: &ad_hoc, coef: -1.0, op: SteerOp::Add, preserve_norm: false, table: None };
        let mut uploads = Vec::new();
        let (l, img) = build(&plan, &[], None, &points, h, |t| {
            uploads.push(t[0]);
            Ok(if t[0] == 100.0 { 0x1000 } else { 0x2000 })
        })
        .unwrap();
        let b = img.finish(0x9000_0000);
        assert_eq!(l.steer.len(), 3);
        assert!(l.steer[0].is_none());
        let (p1, p2) = (l.steer[1].unwrap(), l.steer[2].unwrap());
        assert_eq!(p1.row_slot, p2.row_slot, "identical row maps are shared");
        assert_eq!((0..4).map(|k| i32_at(&b, p1.row_slot, k)).collect::<Vec<_>>(), [0, 0, -1, 1]);
        assert!(p1.table.is_multiple_of(ALIGN));
        // Point 1: both slots resident, at row 1 of their tables (4 floats = 16 bytes in).
        assert_eq!(u64_at(&b, p1.table), 0x1000 + 16);
        assert_eq!(f32_at(&b, p1.table, 2), 1.5);
        assert_eq!(i32_at(&b, p1.table, 3), 0);
        assert_eq!(u64_at(&b, p1.table + SLOT_BYTES), 0x2000 + 16);
        assert_eq!(i32_at(&b, p1.table + SLOT_BYTES, 3), 3, "sign-aware | preserve norm");
        // Point 2: slot 0 inline (patched to the image's device address), slot 1 resident row 2.
        let inline = u64_at(&b, p2.table);
        assert!(inline >= 0x9000_0000 && (inline - 0x9000_0000).is_multiple_of(ALIGN as u64));
        let at = (inline - 0x9000_0000) as usize;
        assert_eq!((0..4).map(|k| f32_at(&b, at, k)).collect::<Vec<_>>(), [9.0; 4]);
        assert_eq!(f32_at(&b, p2.table, 2), -1.0);
        assert_eq!(u64_at(&b, p2.table + SLOT_BYTES), 0x2000 + 32);
        assert_eq!(uploads, [100.0, 200.0, 200.0], "asked per slot; the cache dedupes");

        // A plan whose rows do not match the pass is refused, not read out of bounds.
        let other = BatchPlan::fresh(&[1]);
        assert!(build(&other, &[], None, &points, h, |_| Ok(0)).is_err());
    }
}
