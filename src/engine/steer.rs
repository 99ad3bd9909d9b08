//! Writing the residual stream: steering vectors, operators, and the per-point plan a kernel reads.
use super::capture::Site;
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
/// the layers it acts on, the points inside blocks it acts on, and how.
#[derive(Debug, Clone)]
pub struct Steering {
    /// `[num_layers + 1, hidden]`, row-major.
    pub directions: Arc<Vec<f32>>,
    pub hidden: usize,
    pub layers: Vec<usize>,
    /// Points inside blocks (`hook_resid_mid`, `hook_attn_out`, `hook_mlp_out`, heads of
    /// `hook_z`), each with its own vector.
    pub sites: Vec<SiteSteer>,
    pub coef: f32,
    pub op: SteerOp,
    pub preserve_norm: bool,
    pub positions: SteerPositions,
}

/// Steering at a point inside block `layer`.
#[derive(Debug, Clone)]
pub struct SiteSteer {
    pub layer: usize,
    pub site: Site,
    /// `[hidden]`, or for `hook_z` `[heads·head_dim]`, zero outside the chosen heads (ITI's
    /// per-head additions).
    pub vector: Arc<Vec<f32>>,
    /// `hook_z` only: the chosen heads (for descriptions; the vector is already masked).
    pub heads: Vec<usize>,
}

/// What steering needs to know of a model to check and place its vectors.
#[derive(Debug, Clone, Copy)]
pub struct SteerGeometry {
    pub num_layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// The key of a steered point in a pass's plan ([`plan_pass`]): hidden-state index l is l,
/// point `site` of block l comes after every index.
pub fn steer_key(num_layers: usize, layer: usize, site: Option<Site>) -> usize {
    match site {
        None => layer,
        Some(s) => num_layers + 1 + Site::ALL.len() * layer + s.index(),
    }
}

/// A steering target as `--steer-layers` and the server's `layers` name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SteerTarget {
    /// Hidden-state index l: row l of `directions`.
    Index(usize),
    /// A point inside a block: the vector file's tensor of that name (`blocks.3.hook_mlp_out`).
    Site(usize, Site),
    /// Heads of `hook_z` in a block: those heads' parts of the tensor `blocks.{l}.hook_z`.
    Heads(usize, Vec<usize>),
}

/// Parses steering targets: hidden-state indices and ranges (`10-15`) as before, `raw` (index
/// L, the last block's output before the final norm), and TransformerLens names:
/// `blocks.{l}.hook_resid_pre|resid_post` (indices l and l + 1), `hook_resid_mid`,
/// `hook_attn_out`, `hook_mlp_out`, `hook_z` (every head) and `hook_z.{h}` or `hook_z.{a-b}`
/// (chosen heads). Errors name the bad part: a layer beyond the model, a head out of range.
pub fn parse_steer_targets(text: &str, g: SteerGeometry) -> Result<Vec<SteerTarget>> {
    use crate::engine::capture::{parse_points, CapturePoint};
    let mut out: Vec<SteerTarget> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        // `blocks.L.hook_z.HEADS`: the heads after the point's name.
        let heads = part.strip_prefix("blocks.").and_then(|r| r.split_once(".hook_z."));
        if let Some((layers, heads)) = heads {
            let heads = parse_layer_list(heads).map_err(|_| {
                Error::input(format!("invalid steering point `{part}`: heads of hook_z are a head or a range, e.g. blocks.3.hook_z.0-3"))
            })?;
            if let Some(&h) = heads.iter().find(|&&h| h >= g.heads) {
                return Err(Error::input(format!(
                    "steering point `{part}`: head {h} is out of range: the model has heads 0..={}",
                    g.heads.saturating_sub(1)
                )));
            }
            for p in parse_points(&format!("blocks.{layers}.hook_z"), g.num_layers)? {
                if let CapturePoint::Block(l, _) = p {
                    out.push(SteerTarget::Heads(l, heads.clone()));
                }
            }
            continue;
        }
        if !part.starts_with("blocks.") && part != "raw" {
            let layers = parse_layer_list(part)?;
            if let Some(l) = layers.iter().find(|&&l| l > g.num_layers) {
                return Err(Error::input(format!(
                    "steering layer {l} is out of range: this model has hidden-state indices 0..={}",
                    g.num_layers
                )));
            }
            out.extend(layers.into_iter().map(SteerTarget::Index));
            continue;
        }
        for p in parse_points(part, g.num_layers)? {
            out.push(match p {
                CapturePoint::Hidden(l) => SteerTarget::Index(l),
                CapturePoint::LastBlockRaw => SteerTarget::Index(g.num_layers),
                CapturePoint::Block(l, Site::Z) => SteerTarget::Heads(l, (0..g.heads).collect()),
                CapturePoint::Block(l, site) => SteerTarget::Site(l, site),
            });
        }
    }
    let mut seen = Vec::new();
    out.retain(|t| {
        let new = !seen.contains(t);
        seen.push(t.clone());
        new
    });
    Ok(out)
}

impl Steering {
    /// Places `targets`: indices use rows of `directions` (`[L+1, hidden]`, may be empty when
    /// no index is steered); a point inside a block uses `tensor(name)`, the vector file's
    /// tensor of that name, `[hidden]` (`[heads·head_dim]` for `hook_z`). `file` names the
    /// source in errors. The settings (`coef`, `op`, ...) are left at add/1/all.
    pub fn for_targets(
        directions: Arc<Vec<f32>>,
        targets: &[SteerTarget],
        g: SteerGeometry,
        file: &str,
        mut tensor: impl FnMut(&str) -> Option<Vec<f32>>,
    ) -> Result<Steering> {
        let (mut layers, mut sites) = (Vec::new(), Vec::new());
        let z_width = g.heads * g.head_dim;
        for t in targets {
            let (l, site) = match t {
                SteerTarget::Index(l) => {
                    layers.push(*l);
                    continue;
                }
                SteerTarget::Site(l, site) => (l, *site),
                SteerTarget::Heads(l, _) => (l, Site::Z),
            };
            let name = format!("blocks.{l}.{}", site.hook());
            let width = if site == Site::Z { z_width } else { g.hidden };
            let mut v = tensor(&name).ok_or_else(|| Error::input(format!("{file}: no tensor `{name}` for the steering point")))?;
            if v.len() != width {
                return Err(Error::input(format!(
                    "{file}: tensor `{name}` has {} values, the point is {width} wide{}",
                    v.len(),
                    if site == Site::Z { " (heads·head_dim)" } else { " (hidden size)" }
                )));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::input(format!("{file}: tensor `{name}` contains NaN or Inf (value {i})")));
            }
            let heads = match t {
                SteerTarget::Heads(_, heads) => {
                    for h in (0..g.heads).filter(|h| !heads.contains(h)) {
                        v[h * g.head_dim..(h + 1) * g.head_dim].fill(0.0);
                    }
                    heads.clone()
                }
                _ => Vec::new(),
            };
            sites.push(SiteSteer { layer: *l, site, vector: Arc::new(v), heads });
        }
        Ok(Steering {
            directions,
            hidden: g.hidden,
            layers,
            sites,
            coef: 1.0,
            op: SteerOp::Add,
            preserve_norm: false,
            positions: SteerPositions::All,
        })
    }

    /// [`Steering::validate`] plus the points inside blocks: their layers, widths, values and
    /// operators (`hook_z` takes `add` only: ITI's per-head additions).
    pub fn validate_for(&self, g: SteerGeometry) -> Result<()> {
        if !self.layers.is_empty() || self.sites.is_empty() {
            self.validate(g.num_layers, g.hidden)?;
        } else if !self.coef.is_finite() {
            return Err(Error::input(format!("steering coefficient {} is not finite", self.coef)));
        }
        for s in &self.sites {
            let name = format!("blocks.{}.{}", s.layer, s.site.hook());
            if s.layer >= g.num_layers {
                return Err(Error::input(format!(
                    "steering point {name} is beyond the model: it has blocks 0..={}",
                    g.num_layers.saturating_sub(1)
                )));
            }
            let width = if s.site == Site::Z { g.heads * g.head_dim } else { g.hidden };
            if s.vector.len() != width {
                return Err(Error::input(format!("steering vector for {name} has {} values, the point is {width} wide", s.vector.len())));
            }
            if s.vector.iter().any(|v| !v.is_finite()) {
                return Err(Error::input(format!("steering vector for {name} contains NaN or Inf")));
            }
            if s.site == Site::Z && (self.op != SteerOp::Add || self.preserve_norm) {
                return Err(Error::input(format!("steering at {name}: hook_z takes per-head additions only (op add, no preserve_norm)")));
            }
        }
        Ok(())
    }

    /// Whether anything is steered at a point inside a block.
    pub fn has_sites(&self) -> bool {
        !self.sites.is_empty()
    }

    fn site(&self, layer: usize, site: Site) -> Option<&SiteSteer> {
        self.sites.iter().find(|s| s.layer == layer && s.site == site)
    }

    /// The names of the steered points, in order (indices as numbers).
    pub fn point_names(&self) -> Vec<String> {
        self.sites
            .iter()
            .map(|s| match s.site {
                Site::Z if !s.heads.is_empty() => format!("blocks.{}.hook_z.{}", s.layer, s.heads.iter().map(|h| h.to_string()).collect::<Vec<_>>().join("+")),
                site => format!("blocks.{}.{}", s.layer, site.hook()),
            })
            .collect()
    }

}

impl Steering {
    /// Whether `other` steers every row exactly as this does (the same vectors bit for bit,
    /// targets, coefficient, operation and positions), so that keys and values computed under
    /// one serve the other: the scheduler's prefix cache reuses a sequence's only then.
    pub fn same_as(&self, other: &Steering) -> bool {
        let same_bits = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        let same_vec = |a: &Arc<Vec<f32>>, b: &Arc<Vec<f32>>| Arc::ptr_eq(a, b) || same_bits(a, b);
        self.hidden == other.hidden
            && self.layers == other.layers
            && self.coef.to_bits() == other.coef.to_bits()
            && self.op == other.op
            && self.preserve_norm == other.preserve_norm
            && self.positions == other.positions
            && same_vec(&self.directions, &other.directions)
            && self.sites.len() == other.sites.len()
            && self.sites.iter().zip(&other.sites).all(|(a, b)| a.layer == b.layer && a.site == b.site && a.heads == b.heads && same_vec(&a.vector, &b.vector))
    }

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
                "points": s.point_names(),
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
    plan_with(layer, seq_steering, row_seq, phase, |s| {
        s.layers.contains(&layer).then(|| SlotSteer {
            vector: s.direction(layer),
            coef: s.coef,
            op: s.op,
            preserve_norm: s.preserve_norm,
            table: Some((&s.directions, layer * s.hidden)),
        })
    })
}

/// As [`plan_point`] for point `site` of block `layer`; the plan's index is its
/// [`steer_key`].
pub fn plan_site<'a>(
    num_layers: usize,
    layer: usize,
    site: Site,
    seq_steering: &'a [Option<Arc<Steering>>],
    row_seq: &[u32],
    phase: Phase,
) -> Option<PointSteering<'a>> {
    plan_with(steer_key(num_layers, layer, Some(site)), seq_steering, row_seq, phase, |s| {
        s.site(layer, site).map(|t| SlotSteer {
            vector: &t.vector[..],
            coef: s.coef,
            op: s.op,
            preserve_norm: s.preserve_norm,
            table: Some((&t.vector, 0)),
        })
    })
}

fn plan_with<'a>(
    index: usize,
    seq_steering: &'a [Option<Arc<Steering>>],
    row_seq: &[u32],
    phase: Phase,
    slot_of_steering: impl Fn(&'a Steering) -> Option<SlotSteer<'a>>,
) -> Option<PointSteering<'a>> {
    let mut slots: Vec<SlotSteer<'a>> = Vec::new();
    let mut seq_slot = vec![-1i32; seq_steering.len()];
    // Sequences sharing one intervention (the usual case) share its slot.
    let mut slot_of: std::collections::HashMap<*const Steering, i32> = std::collections::HashMap::new();
    for (i, s) in seq_steering.iter().enumerate() {
        let Some(s) = s else { continue };
        if !s.positions.applies(phase.generated(i)) {
            continue;
        }
        if let Some(&k) = slot_of.get(&Arc::as_ptr(s)) {
            seq_slot[i] = k;
            continue;
        }
        let Some(slot) = slot_of_steering(s) else { continue };
        seq_slot[i] = slots.len() as i32;
        slot_of.insert(Arc::as_ptr(s), seq_slot[i]);
        slots.push(slot);
    }
    if slots.is_empty() {
        return None;
    }
    Some(PointSteering { index, row_slot: row_seq.iter().map(|&s| seq_slot[s as usize]).collect(), slots })
}

/// The plans of every point of one pass up to hidden-state index `last`, made once before the
/// pass so a device backend can upload them together: entry [`steer_key`] for each point
/// (indices `0..=last`, then, when some sequence steers inside blocks, every block point).
/// Empty when no sequence is steered.
pub fn plan_pass<'a>(
    last: usize,
    num_layers: usize,
    seq_steering: &'a [Option<Arc<Steering>>],
    row_seq: &[u32],
    phase: Phase,
) -> Vec<Option<PointSteering<'a>>> {
    if seq_steering.iter().all(Option::is_none) {
        return Vec::new();
    }
    let mut plans: Vec<Option<PointSteering<'a>>> = (0..=last).map(|l| plan_point(l, seq_steering, row_seq, phase)).collect();
    if seq_steering.iter().flatten().any(|s| s.has_sites()) {
        plans.resize_with(steer_key(num_layers, 0, Some(Site::ResidMid)), || None);
        for l in 0..num_layers {
            for site in Site::ALL {
                plans.push(if l < last { plan_site(num_layers, l, site, seq_steering, row_seq, phase) } else { None });
            }
        }
    }
    plans
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
                sites: Vec::new(),
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

        let pass = plan_pass(2, 2, &seqs, &rows, Phase::Generated);
        assert_eq!(pass.len(), 3);
        assert!(pass[0].is_none() && pass[1].is_some() && pass[2].is_some());
        assert_eq!(pass[2].as_ref().unwrap().index, 2);
        assert!(plan_pass(2, 2, &[None, None], &[0, 1], Phase::Prompt).is_empty());
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
