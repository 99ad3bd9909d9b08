//! Reading the residual stream: which points and positions to keep, and the buffers that hold them.
use crate::error::{Error, Result};

/// Where in the network to read. `Hidden(l)` follows Hugging Face `output_hidden_states`
/// indexing: 0 = embeddings, l = output of decoder block l-1, L = after the final norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CapturePoint {
    Hidden(usize),
    /// Output of the last decoder block before the final norm.
    LastBlockRaw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapturePosition {
    Last,
    Mean,
    All,
}

impl std::str::FromStr for CapturePosition {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "last" => Ok(CapturePosition::Last),
            "mean" => Ok(CapturePosition::Mean),
            "all" => Ok(CapturePosition::All),
            other => Err(Error::input(format!("unknown position `{other}` (expected last, mean or all)"))),
        }
    }
}

impl CapturePosition {
    pub fn name(self) -> &'static str {
        match self {
            CapturePosition::Last => "last",
            CapturePosition::Mean => "mean",
            CapturePosition::All => "all",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CaptureSpec {
    pub points: Vec<CapturePoint>,
    pub position: CapturePosition,
}

impl CaptureSpec {
    /// Checks every point exists in a model with `num_layers` decoder blocks.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        if self.points.is_empty() {
            return Err(Error::input("no capture layers requested"));
        }
        for p in &self.points {
            if let CapturePoint::Hidden(l) = p {
                if *l > num_layers {
                    return Err(Error::input(format!(
                        "capture layer {l} is out of range: this model has hidden-state indices 0..={num_layers}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Slot of `point` in the output's layer axis.
    pub fn slot(&self, point: CapturePoint) -> Option<usize> {
        self.points.iter().position(|p| *p == point)
    }
}

/// Captured activations: `[rows, points, hidden]` with rows = sequences (last/mean) or
/// tokens (all; `offsets[i]..offsets[i+1]` are sequence i's rows).
#[derive(Debug, Clone)]
pub struct Captured {
    pub data: Vec<f32>,
    pub rows: usize,
    pub points: usize,
    pub hidden: usize,
    pub offsets: Vec<usize>,
}

impl Captured {
    pub fn new(rows: usize, points: usize, hidden: usize, offsets: Vec<usize>) -> Self {
        Captured { data: vec![0.0; rows * points * hidden], rows, points, hidden, offsets }
    }

    /// The output for sequences of lengths `lens`: a row per sequence, or for `All` a row per
    /// token with `offsets` = each sequence's first row and the total.
    pub fn for_lengths(lens: &[usize], points: usize, hidden: usize, position: CapturePosition) -> Self {
        match position {
            CapturePosition::All => {
                let offsets = row_offsets(lens);
                Captured::new(offsets[lens.len()], points, hidden, offsets)
            }
            _ => Captured::new(lens.len(), points, hidden, Vec::new()),
        }
    }

    pub fn row(&self, row: usize, slot: usize) -> &[f32] {
        let start = (row * self.points + slot) * self.hidden;
        &self.data[start..start + self.hidden]
    }

    pub fn row_mut(&mut self, row: usize, slot: usize) -> &mut [f32] {
        let start = (row * self.points + slot) * self.hidden;
        &mut self.data[start..start + self.hidden]
    }
}

/// `[0, l0, l0 + l1, ...]`: where each sequence's rows start when every token has a row, and the total.
pub fn row_offsets(lens: &[usize]) -> Vec<usize> {
    std::iter::once(0).chain(lens.iter().scan(0, |acc, l| {
        *acc += l;
        Some(*acc)
    })).collect()
}

/// Per-pass capture target: the spec plus where this batch's sequences land in the output.
pub struct CaptureSink<'a> {
    pub spec: &'a CaptureSpec,
    pub out: &'a mut Captured,
    /// Output row of each sequence of the batch (its first token row for `All`).
    pub seq_row: Vec<usize>,
}

impl CaptureSink<'_> {
    /// The output row of the pass's local row 0 when local row k lands in output row
    /// `first + k` for every k (one contiguous batch: extraction, scoring, a decode step), so a
    /// backend can copy all its rows in one piece; None otherwise. `local_rows` is the number of
    /// local rows (sequences for last/mean, packed rows for all).
    pub fn contiguous_start(&self, plan: &crate::engine::plan::BatchPlan, local_rows: usize) -> Option<usize> {
        let first = *self.seq_row.first()?;
        let all = self.spec.position == CapturePosition::All;
        let ok = self.seq_row.len() == plan.seqs.len()
            && plan.seqs.iter().zip(&self.seq_row).enumerate().all(|(i, (seq, &dst))| {
                let local = if all { seq.start } else { i };
                dst.checked_sub(local) == Some(first)
            });
        let rows = if all { plan.rows() } else { plan.seqs.len() };
        (ok && rows == local_rows && first + rows <= self.out.rows).then_some(first)
    }

    /// Copies a pass's local capture rows (row = sequence of the pass for last/mean, packed row
    /// for all) into their places in the output.
    pub fn absorb(&mut self, plan: &crate::engine::plan::BatchPlan, local: &Captured) {
        for (i, seq) in plan.seqs.iter().enumerate() {
            let dst = self.seq_row[i];
            for slot in 0..local.points {
                match self.spec.position {
                    CapturePosition::All => {
                        for j in 0..seq.len {
                            self.out.row_mut(dst + j, slot).copy_from_slice(local.row(seq.start + j, slot));
                        }
                    }
                    _ => self.out.row_mut(dst, slot).copy_from_slice(local.row(i, slot)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::BatchPlan;

    #[test]
    fn contiguous_destinations() {
        let plan = BatchPlan::fresh(&[2, 3]);
        let last = CaptureSpec { points: vec![CapturePoint::Hidden(0)], position: CapturePosition::Last };
        let mut out = Captured::new(6, 1, 4, Vec::new());
        let sink = CaptureSink { spec: &last, out: &mut out, seq_row: vec![3, 4] };
        assert_eq!(sink.contiguous_start(&plan, 2), Some(3));
        assert_eq!(sink.contiguous_start(&plan, 3), None);
        let sink = CaptureSink { spec: &last, out: &mut out, seq_row: vec![4, 3] };
        assert_eq!(sink.contiguous_start(&plan, 2), None);
        let sink = CaptureSink { spec: &last, out: &mut out, seq_row: vec![5, 6] };
        assert_eq!(sink.contiguous_start(&plan, 2), None, "past the end of the output");

        let all = CaptureSpec { points: vec![CapturePoint::Hidden(0)], position: CapturePosition::All };
        let mut out = Captured::new(7, 1, 4, vec![0, 2, 2, 4, 7]);
        // Sequences 2 and 3 of the output (rows 2..4 and 4..7) are this pass's two.
        let sink = CaptureSink { spec: &all, out: &mut out, seq_row: vec![2, 4] };
        assert_eq!(sink.contiguous_start(&plan, 5), Some(2));
        let sink = CaptureSink { spec: &all, out: &mut out, seq_row: vec![2, 5] };
        assert_eq!(sink.contiguous_start(&plan, 5), None);
    }
}
