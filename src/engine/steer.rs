//! Writing the residual stream: steering vectors, operators, and the per-point plan a kernel reads.
use super::Phase;
use crate::error::{Error, Result};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerOp {
    /// h + c·v (RepE `linear_comb`).
    Add,
    /// h + c·v·sign(⟨h, c·v⟩) = h + |c|·v·sign(⟨h, v⟩) (RepE `piecewise_linear`).
    SignAware,
}

impl std::str::FromStr for SteerOp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "add" | "linear_comb" => Ok(SteerOp::Add),
            "piecewise" | "piecewise_linear" | "sign-aware" => Ok(SteerOp::SignAware),
            other => Err(Error::input(format!("unknown steering operator `{other}` (expected add or piecewise)"))),
        }
    }
}

impl SteerOp {
    pub fn name(self) -> &'static str {
        match self {
            SteerOp::Add => "add",
            SteerOp::SignAware => "piecewise",
        }
    }
}

/// Which tokens are steered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerPositions {
    All,
    Prompt,
    Generated,
}

impl std::str::FromStr for SteerPositions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(SteerPositions::All),
            "prompt" => Ok(SteerPositions::Prompt),
            "generated" => Ok(SteerPositions::Generated),
            other => Err(Error::input(format!("unknown steering positions `{other}` (expected all, prompt or generated)"))),
        }
    }
}

impl SteerPositions {
    pub fn name(self) -> &'static str {
        match self {
            SteerPositions::All => "all",
            SteerPositions::Prompt => "prompt",
            SteerPositions::Generated => "generated",
        }
    }

    fn applies(self, generated: bool) -> bool {
        match self {
            SteerPositions::All => true,
            SteerPositions::Prompt => !generated,
            SteerPositions::Generated => generated,
        }
    }
}

/// One steering intervention: per-layer directions (row l used at hidden-state index l),
/// the layers it acts on, and how.
#[derive(Debug, Clone)]
pub struct Steering {
    /// `[num_layers + 1, hidden]`, row-major.
    pub directions: Arc<Vec<f32>>,
    pub hidden: usize,
    pub layers: Vec<usize>,
    pub coef: f32,
    pub op: SteerOp,
    pub preserve_norm: bool,
    pub positions: SteerPositions,
}

impl Steering {
    pub fn validate(&self, num_layers: usize, hidden: usize) -> Result<()> {
        if self.hidden != hidden {
            return Err(Error::input(format!(
                "steering vectors have hidden size {}, the model has {hidden}",
                self.hidden
            )));
        }
        let rows = self.directions.len() / hidden.max(1);
        if rows * hidden != self.directions.len() || rows < num_layers + 1 {
            return Err(Error::input(format!(
                "steering directions have {rows} rows, the model needs {} (hidden-state indices 0..={num_layers})",
                num_layers + 1
            )));
        }
        if !self.coef.is_finite() {
            return Err(Error::input(format!("steering coefficient {} is not finite", self.coef)));
        }
        for &l in &self.layers {
            if l > num_layers {
                return Err(Error::input(format!(
                    "steering layer {l} is out of range: this model has hidden-state indices 0..={num_layers}"
                )));
            }
            if self.direction(l).iter().any(|v| !v.is_finite()) {
                return Err(Error::input(format!("steering direction for layer {l} contains NaN or Inf")));
            }
        }
        Ok(())
    }

    /// How outputs describe this steering in metadata and manifests (JSON, or `none`); `file`
    /// is the vector file it came from, if any.
    pub fn describe(s: Option<&Steering>, file: Option<&std::path::Path>) -> String {
        match s {
            None => "none".into(),
            Some(s) => serde_json::json!({
                "file": file.map(|p| p.display().to_string()),
                "coef": s.coef,
                "layers": s.layers,
                "op": s.op.name(),
                "preserve_norm": s.preserve_norm,
                "positions": s.positions.name(),
            })
            .to_string(),
        }
    }

    pub fn direction(&self, layer: usize) -> &[f32] {
        &self.directions[layer * self.hidden..(layer + 1) * self.hidden]
    }
}

/// What the fused residual kernel needs at one point: a slot per packed row (-1 = untouched)
/// and, per slot, the vector and its settings.
pub struct PointSteering<'a> {
    /// The hidden-state index this plan is for: a device backend finds the tables it uploaded
    /// for the point at `begin_pass` by it.
    pub index: usize,
    pub row_slot: Vec<i32>,
    pub slots: Vec<SlotSteer<'a>>,
}

#[derive(Clone, Copy)]
pub struct SlotSteer<'a> {
    pub vector: &'a [f32],
    pub coef: f32,
    pub op: SteerOp,
    pub preserve_norm: bool,
    /// The directions table `vector` is a row of, and the row's element offset in it. A device
    /// backend keeps such tables resident across passes, keyed by the `Arc`'s identity; a
    /// vector without one is uploaded with its pass.
    pub table: Option<(&'a Arc<Vec<f32>>, usize)>,
}

/// Builds the plan for hidden-state index `layer`, or None when nothing steers there (the
/// kernel then skips steering entirely: no cost when steering is off).
/// `seq_steering[i]` is sequence i's intervention; `phase` says whether each sequence's rows
/// are generated tokens (decode) or prompt tokens (prefill).
pub fn plan_point<'a>(
    layer: usize,
    seq_steering: &'a [Option<Arc<Steering>>],
    row_seq: &[u32],
    phase: Phase,
) -> Option<PointSteering<'a>> {
    let mut slots: Vec<SlotSteer<'a>> = Vec::new();
    let mut seq_slot = vec![-1i32; seq_steering.len()];
    // Sequences sharing one intervention (the usual case) share its slot.
    let mut slot_of: std::collections::HashMap<*const Steering, i32> = std::collections::HashMap::new();
    for (i, s) in seq_steering.iter().enumerate() {
        let Some(s) = s else { continue };
        if !s.layers.contains(&layer) || !s.positions.applies(phase.generated(i)) {
            continue;
        }
        if let Some(&k) = slot_of.get(&Arc::as_ptr(s)) {
            seq_slot[i] = k;
            continue;
        }
        seq_slot[i] = slots.len() as i32;
        slot_of.insert(Arc::as_ptr(s), seq_slot[i]);
        slots.push(SlotSteer {
            vector: s.direction(layer),
            coef: s.coef,
            op: s.op,
            preserve_norm: s.preserve_norm,
            table: Some((&s.directions, layer * s.hidden)),
        });
    }
    if slots.is_empty() {
        return None;
    }
    Some(PointSteering { index: layer, row_slot: row_seq.iter().map(|&s| seq_slot[s as usize]).collect(), slots })
}

/// The plans of every hidden-state index `0..=last` of one pass (entry l for index l), made
/// once before the pass so a device backend can upload them together. Empty when no sequence
/// is steered.
pub fn plan_pass<'a>(
    last: usize,
    seq_steering: &'a [Option<Arc<Steering>>],
    row_seq: &[u32],
    phase: Phase,
) -> Vec<Option<PointSteering<'a>>> {
    if seq_steering.iter().all(Option::is_none) {
        return Vec::new();
    }
    (0..=last).map(|l| plan_point(l, seq_steering, row_seq, phase)).collect()
}

/// Parses layer lists such as `0,5,10-20`.
pub fn parse_layer_list(text: &str) -> Result<Vec<usize>> {
    // No model has more layers than a config may declare; this also bounds a range's length.
    let check_index = |l: usize| {
        if l > crate::model::config::MAX_LAYERS {
            return Err(Error::input(format!(
                "invalid layer list `{text}`: layer {l} is out of range (models have at most {} layers)",
                crate::model::config::MAX_LAYERS
            )));
        }
        Ok(())
    };
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || Error::input(format!("invalid layer list `{text}`: `{part}` is not a layer or a range like 10-20"));
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (usize, usize) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
            if a > b {
                return Err(bad());
            }
            check_index(b)?;
            out.extend(a..=b);
        } else {
            let l = part.parse().map_err(|_| bad())?;
            check_index(l)?;
            out.push(l);
        }
    }
    if out.is_empty() {
        return Err(Error::input(format!("invalid layer list `{text}`: no layers")));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|l| seen.insert(*l));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_lists() {
        assert_eq!(parse_layer_list("0,5,10-12").unwrap(), vec![0, 5, 10, 11, 12]);
        assert_eq!(parse_layer_list("3, 3,2").unwrap(), vec![3, 2]);
        assert!(parse_layer_list("5-2").is_err());
        assert!(parse_layer_list("a").is_err());
        assert!(parse_layer_list("").is_err());
        // A huge range is refused, not materialized.
        let err = parse_layer_list("0-18446744073709551615").unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        assert_eq!(err.exit_code(), 3);
    }

    #[test]
    fn per_sequence_slots_and_positions() {
        let s = |layers: Vec<usize>, positions| {
            Some(Arc::new(Steering {
                directions: Arc::new(vec![1.0; 3 * 2]),
                hidden: 2,
                layers,
                coef: 1.0,
                op: SteerOp::Add,
                preserve_norm: false,
                positions,
            }))
        };
        let seqs = vec![s(vec![1], SteerPositions::All), None, s(vec![1, 2], SteerPositions::Generated)];
        let rows = [0u32, 0, 1, 2];
        let p = plan_point(1, &seqs, &rows, Phase::Prompt).unwrap();
        assert_eq!(p.row_slot, vec![0, 0, -1, -1]);
        let p = plan_point(1, &seqs, &rows, Phase::Generated).unwrap();
        assert_eq!(p.row_slot, vec![0, 0, -1, 1]);
        assert!(plan_point(2, &seqs, &rows, Phase::Prompt).is_none());
        assert!(plan_point(0, &seqs, &rows, Phase::Generated).is_none());
        // Each slot names its directions table and the row's offset in it.
        assert_eq!(p.index, 1);
        let (table, offset) = p.slots[1].table.unwrap();
        assert!(Arc::ptr_eq(table, &seqs[2].as_ref().unwrap().directions));
        assert_eq!(offset, 2);
        assert_eq!(&table[offset..offset + 2], p.slots[1].vector);

        let pass = plan_pass(2, &seqs, &rows, Phase::Generated);
        assert_eq!(pass.len(), 3);
        assert!(pass[0].is_none() && pass[1].is_some() && pass[2].is_some());
        assert_eq!(pass[2].as_ref().unwrap().index, 2);
        assert!(plan_pass(2, &[None, None], &[0, 1], Phase::Prompt).is_empty());
        // A mixed pass: sequence 2 decodes while 0 is still in its prompt.
        let p = plan_point(1, &seqs, &rows, Phase::PerSequence(&[false, false, true])).unwrap();
        assert_eq!(p.row_slot, vec![0, 0, -1, 1]);
        let p = plan_point(1, &seqs, &rows, Phase::PerSequence(&[true, false, false])).unwrap();
        assert_eq!(p.row_slot, vec![0, 0, -1, -1]);

        // Sequences sharing one Arc share one slot; an equal but distinct Arc gets its own.
        let shared = s(vec![1], SteerPositions::All);
        let seqs = vec![shared.clone(), None, shared.clone(), s(vec![1], SteerPositions::All)];
        let p = plan_point(1, &seqs, &[0, 1, 2, 3], Phase::Prompt).unwrap();
        assert_eq!(p.row_slot, vec![0, -1, 0, 1]);
        assert_eq!(p.slots.len(), 2);
    }
}
