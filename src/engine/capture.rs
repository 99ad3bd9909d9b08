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

    pub fn row(&self, row: usize, slot: usize) -> &[f32] {
        let start = (row * self.points + slot) * self.hidden;
        &self.data[start..start + self.hidden]
    }

    pub fn row_mut(&mut self, row: usize, slot: usize) -> &mut [f32] {
        let start = (row * self.points + slot) * self.hidden;
        &mut self.data[start..start + self.hidden]
    }
}

/// Per-pass capture target: the spec plus where this batch's sequences land in the output.
pub struct CaptureSink<'a> {
    pub spec: &'a CaptureSpec,
    pub out: &'a mut Captured,
    /// Output row of each sequence of the batch (its first token row for `All`).
    pub seq_row: Vec<usize>,
}

impl CaptureSink<'_> {
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
