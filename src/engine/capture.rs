//! Reading the residual stream: which points and positions to keep, and the buffers that hold them.
use crate::error::{Error, Result};

/// Where in the network to read. `Hidden(l)` follows Hugging Face `output_hidden_states`
/// indexing: 0 = embeddings, l = output of decoder block l-1, L = after the final norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CapturePoint {
    Hidden(usize),
    /// Output of the last decoder block before the final norm.
    LastBlockRaw,
    /// A point inside decoder block `l` (TransformerLens `blocks.{l}.hook_*`).
    Block(usize, Site),
}

/// The points inside a decoder block, as TransformerLens names them (`hook_resid_pre` and
/// `hook_resid_post` are hidden-state indices: [`CapturePoint::Hidden`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// `hook_resid_mid`: the residual after attention's add, the input of the MLP's norm.
    ResidMid,
    /// `hook_attn_out`: attention's output after the o projection (and its bias), before the add.
    AttnOut,
    /// `hook_mlp_out`: the MLP's output (down projection and its bias), before the add.
    MlpOut,
    /// `hook_z`: every head's attention output before the o projection, `[heads·head_dim]`
    /// flattened head-major.
    Z,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::ResidMid, Site::AttnOut, Site::MlpOut, Site::Z];

    pub fn hook(self) -> &'static str {
        match self {
            Site::ResidMid => "hook_resid_mid",
            Site::AttnOut => "hook_attn_out",
            Site::MlpOut => "hook_mlp_out",
            Site::Z => "hook_z",
        }
    }

    /// Position in [`Site::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A point's name in outputs (the `points` metadata) and errors: TransformerLens names where one
/// exists (`blocks.{l}.hook_resid_pre` for index l < L, `blocks.{L-1}.hook_resid_post` for the
/// raw last-block output), and the index itself for L (after the final norm, which
/// TransformerLens does not name). Each name parses back to the same point.
pub fn point_name(p: CapturePoint, num_layers: usize) -> String {
    match p {
        CapturePoint::Hidden(l) if l < num_layers => format!("blocks.{l}.hook_resid_pre"),
        CapturePoint::Hidden(l) => l.to_string(),
        CapturePoint::LastBlockRaw => format!("blocks.{}.hook_resid_post", num_layers.saturating_sub(1)),
        CapturePoint::Block(l, site) => format!("blocks.{l}.{}", site.hook()),
    }
}

/// Parses a point list as `--layers` takes it: hidden-state indices and ranges (`0,5,10-20`),
/// `raw`, and TransformerLens names (`blocks.3.hook_mlp_out`, with a layer range such as
/// `blocks.2-4.hook_z`), mixed freely, kept in the order given, duplicates dropped.
/// `blocks.{l}.hook_resid_pre` is index l and `blocks.{l}.hook_resid_post` index l + 1, except
/// for the last block, whose `hook_resid_post` is `raw` (before the final norm, as in
/// TransformerLens). `num_layers` bounds every layer: a point beyond the model is an error.
pub fn parse_points(text: &str, num_layers: usize) -> Result<Vec<CapturePoint>> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "raw" {
            out.push(CapturePoint::LastBlockRaw);
        } else if let Some(rest) = part.strip_prefix("blocks.") {
            let bad = || Error::input(format!(
                "invalid point `{part}` in `{text}`: expected blocks.LAYER.hook_NAME with NAME one of resid_pre, resid_mid, resid_post, attn_out, mlp_out, z"
            ));
            let (layers, hook) = rest.split_once('.').ok_or_else(bad)?;
            let layers = crate::engine::steer::parse_layer_list(layers).map_err(|_| bad())?;
            for l in layers {
                if l >= num_layers {
                    return Err(Error::input(format!(
                        "point `{part}` is beyond the model: it has blocks 0..={}",
                        num_layers.saturating_sub(1)
                    )));
                }
                out.push(match hook {
                    "hook_resid_pre" => CapturePoint::Hidden(l),
                    "hook_resid_post" if l + 1 == num_layers => CapturePoint::LastBlockRaw,
                    "hook_resid_post" => CapturePoint::Hidden(l + 1),
                    _ => CapturePoint::Block(l, *Site::ALL.iter().find(|s| s.hook() == hook).ok_or_else(bad)?),
                });
            }
        } else {
            let layers = crate::engine::steer::parse_layer_list(part)?;
            if let Some(l) = layers.iter().find(|&&l| l > num_layers) {
                return Err(Error::input(format!("capture layer {l} is out of range: this model has hidden-state indices 0..={num_layers}")));
            }
            out.extend(layers.into_iter().map(CapturePoint::Hidden));
        }
    }
    if out.is_empty() {
        return Err(Error::input(format!("invalid layer list `{text}`: no points")));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(*p));
    Ok(out)
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
            match *p {
                CapturePoint::Hidden(l) if l > num_layers => {
                    return Err(Error::input(format!(
                        "capture layer {l} is out of range: this model has hidden-state indices 0..={num_layers}"
                    )))
                }
                CapturePoint::Block(l, _) if l >= num_layers => {
                    return Err(Error::input(format!(
                        "capture point {} is beyond the model: it has blocks 0..={}",
                        point_name(*p, num_layers),
                        num_layers.saturating_sub(1)
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The width of the output's rows: `hidden`, or `z_width` (heads·head_dim) when every point
    /// is a `hook_z`. One output holds one width: `hook_z` mixes with other points only where
    /// the two widths are equal.
    pub fn width(&self, hidden: usize, z_width: usize) -> Result<usize> {
        let z = self.points.iter().filter(|p| matches!(p, CapturePoint::Block(_, Site::Z))).count();
        if z == 0 || z_width == hidden {
            return Ok(hidden);
        }
        if z == self.points.len() {
            return Ok(z_width);
        }
        Err(Error::input(format!(
            "hook_z points are {z_width} wide (heads·head_dim) and the other points {hidden}: one output holds one width, so capture hook_z separately"
        )))
    }

    /// The names of the points, in output order (the `points` metadata).
    pub fn point_names(&self, num_layers: usize) -> Vec<String> {
        self.points.iter().map(|&p| point_name(p, num_layers)).collect()
    }

    /// The hidden-state index after which nothing more is captured: the pass can stop there.
    pub fn deepest_index(&self, num_layers: usize) -> usize {
        self.points
            .iter()
            .map(|p| match *p {
                CapturePoint::Hidden(l) => l,
                CapturePoint::LastBlockRaw => num_layers,
                CapturePoint::Block(l, _) => l + 1,
            })
            .max()
            .unwrap_or(0)
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
    fn point_lists() {
        use CapturePoint::*;
        let p = parse_points("0, blocks.1.hook_mlp_out,raw,2-3,blocks.0.hook_resid_post,blocks.0-1.hook_z,blocks.2.hook_resid_pre", 4).unwrap();
        assert_eq!(p, vec![Hidden(0), Block(1, Site::MlpOut), LastBlockRaw, Hidden(2), Hidden(3), Hidden(1), Block(0, Site::Z), Block(1, Site::Z)]);
        assert_eq!(parse_points("blocks.3.hook_resid_post", 4).unwrap(), vec![LastBlockRaw]);
        assert_eq!(parse_points("blocks.3.hook_resid_mid,blocks.3.hook_attn_out", 4).unwrap(), vec![Block(3, Site::ResidMid), Block(3, Site::AttnOut)]);
        // Names round-trip.
        for p in p {
            assert_eq!(parse_points(&point_name(p, 4), 4).unwrap(), vec![p]);
        }
        assert_eq!(point_name(Hidden(4), 4), "4");
        let err = parse_points("blocks.4.hook_z", 4).unwrap_err().to_string();
        assert!(err.contains("beyond the model") && err.contains("0..=3"), "{err}");
        for bad in ["blocks.1.hook_q", "blocks.x.hook_z", "blocks.1", "1-x", ""] {
            assert!(parse_points(bad, 4).is_err(), "{bad}");
        }
        let spec = CaptureSpec { points: vec![Block(0, Site::Z), Hidden(1)], position: CapturePosition::Last };
        assert_eq!(spec.width(8, 8).unwrap(), 8);
        assert!(spec.width(8, 12).unwrap_err().to_string().contains("hook_z"));
        let z = CaptureSpec { points: vec![Block(0, Site::Z)], position: CapturePosition::Last };
        assert_eq!(z.width(8, 12).unwrap(), 12);
        assert_eq!(z.deepest_index(4), 1);
    }

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
