//! `resid._resid.Steering`: a steering intervention not yet tied to a model. It becomes the
//! library's one [`resid::Steering`] when a call hands it to a model.
use crate::{input_err, to_py};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use resid::engine::steer::{SteerOp, SteerPositions};
use resid::io::{OutTensor, TensorData};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

#[pyclass(frozen, module = "resid._resid")]
pub struct Steering {
    /// `[rows, hidden]`, row l used at hidden-state index l.
    table: Arc<Vec<f32>>,
    rows: usize,
    hidden: usize,
    /// Built from `{layer: vector}` or a GGUF file: a model with more layers gets zero rows.
    sparse: bool,
    layers: Vec<usize>,
    /// Points inside blocks: (`--steer-layers` text such as `blocks.3.hook_z.0-1`, its vector).
    points: Vec<(String, Arc<Vec<f32>>)>,
    coef: f32,
    op: SteerOp,
    positions: SteerPositions,
    preserve_norm: bool,
}

impl Steering {
    /// The library's steering for a model of geometry `g`, checked.
    pub fn for_model(&self, g: resid::engine::steer::SteerGeometry) -> resid::Result<resid::Steering> {
        let (num_layers, hidden) = (g.num_layers, g.hidden);
        let mut table = self.table.clone();
        if self.sparse && self.rows < num_layers + 1 && self.hidden == hidden {
            let mut t = (*table).clone();
            t.resize((num_layers + 1) * hidden, 0.0);
            table = Arc::new(t);
        }
        // Each point's text names its targets (heads of hook_z included); its vector is the
        // tensor of the point's name, as in a steering file.
        let mut targets = Vec::new();
        let mut tensors = resid::io::SteeringTensors::default();
        for (text, v) in &self.points {
            for t in resid::engine::steer::parse_steer_targets(text, g)? {
                let name = match &t {
                    resid::engine::steer::SteerTarget::Index(_) => {
                        return Err(resid::Error::input(format!("points: `{text}` is a hidden-state index; give it in `directions`")))
                    }
                    resid::engine::steer::SteerTarget::Site(l, site) => format!("blocks.{l}.{}", site.hook()),
                    resid::engine::steer::SteerTarget::Heads(l, _) => format!("blocks.{l}.hook_z"),
                };
                tensors.points.insert(name, v.clone());
                targets.push(t);
            }
        }
        let sites = if targets.is_empty() { Vec::new() } else { tensors.steering(&targets, g, "points")?.sites };
        let s = resid::Steering {
            directions: table,
            hidden: self.hidden.max(if self.rows == 0 { hidden } else { 0 }),
            layers: self.layers.clone(),
            sites,
            coef: self.coef,
            op: self.op,
            preserve_norm: self.preserve_norm,
            positions: self.positions,
        };
        s.validate_for(g)?;
        Ok(s)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(table: Vec<f32>, rows: usize, hidden: usize, sparse: bool, layers: Option<Vec<usize>>, coef: f32, op: &str, positions: &str, preserve_norm: bool) -> PyResult<Self> {
        Self::build_with_points(table, rows, hidden, sparse, layers, Vec::new(), coef, op, positions, preserve_norm)
    }

    #[allow(clippy::too_many_arguments)]
    fn build_with_points(
        table: Vec<f32>,
        rows: usize,
        hidden: usize,
        sparse: bool,
        layers: Option<Vec<usize>>,
        points: Vec<(String, Vec<f32>)>,
        coef: f32,
        op: &str,
        positions: &str,
        preserve_norm: bool,
    ) -> PyResult<Self> {
        let points: Vec<(String, Arc<Vec<f32>>)> = points.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        if let Some((k, _)) = points.iter().find(|(_, v)| v.iter().any(|x| !x.is_finite())) {
            return Err(input_err(format!("points[{k:?}] contains NaN or Inf")));
        }
        if rows == 0 && !points.is_empty() {
            // Only points inside blocks: no per-index rows.
            let op: SteerOp = op.parse().map_err(to_py)?;
            let positions: SteerPositions = positions.parse().map_err(to_py)?;
            if !coef.is_finite() {
                return Err(input_err(format!("steering coefficient {coef} is not finite")));
            }
            return Ok(Steering { table: Arc::new(Vec::new()), rows: 0, hidden: 0, sparse: false, layers: Vec::new(), points, coef, op, positions, preserve_norm });
        }
        if rows == 0 || hidden == 0 {
            return Err(input_err(format!("directions: shape [{rows}, {hidden}] is empty (expected [L+1, hidden])")));
        }
        if let Some(i) = table.iter().position(|v| !v.is_finite()) {
            return Err(input_err(format!("directions contain NaN or Inf (row {}, column {})", i / hidden, i % hidden)));
        }
        if !coef.is_finite() {
            return Err(input_err(format!("steering coefficient {coef} is not finite")));
        }
        let op: SteerOp = op.parse().map_err(to_py)?;
        let positions: SteerPositions = positions.parse().map_err(to_py)?;
        // Default layers: every row that steers at all.
        let layers = match layers {
            Some(l) => l,
            None => (0..rows).filter(|&l| table[l * hidden..(l + 1) * hidden].iter().any(|&v| v != 0.0)).collect(),
        };
        if layers.is_empty() {
            return Err(input_err("steering: no layers (every direction is zero and no layers were given)"));
        }
        let mut seen = Vec::with_capacity(layers.len());
        for &l in &layers {
            if l >= rows {
                return Err(input_err(format!("steering layer {l} has no direction (directions has rows 0..{rows})")));
            }
            if !seen.contains(&l) {
                seen.push(l);
            }
        }
        Ok(Steering { table: Arc::new(table), rows, hidden, sparse, layers: seen, points, coef, op, positions, preserve_norm })
    }
}

#[pymethods]
impl Steering {
    /// `directions` is a C-contiguous float32 `[rows, hidden]` array (the Python face converts).
    /// `points`: (point text, float32 vector) for points inside blocks; `directions` may then
    /// have no rows.
    #[new]
    #[pyo3(signature = (directions, sparse, layers, coef, op, positions, preserve_norm, points=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        directions: PyReadonlyArray2<'_, f32>,
        sparse: bool,
        layers: Option<Vec<usize>>,
        coef: f32,
        op: &str,
        positions: &str,
        preserve_norm: bool,
        points: Vec<(String, Vec<f32>)>,
    ) -> PyResult<Self> {
        let [rows, hidden] = [directions.shape()[0], directions.shape()[1]];
        let table = directions.as_slice().map_err(|_| input_err("directions: not contiguous"))?.to_vec();
        Self::build_with_points(table, rows, hidden, sparse, layers, points, coef, op, positions, preserve_norm)
    }

    /// The points inside blocks steered, in order.
    #[getter]
    fn points(&self) -> Vec<String> {
        self.points.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Reads a safetensors vector file (`directions` [L+1, hidden]) or a llama.cpp control-vector GGUF.
    #[staticmethod]
    #[pyo3(signature = (path, layers, coef, op, positions, preserve_norm))]
    fn load(py: Python<'_>, path: PathBuf, layers: Option<Vec<usize>>, coef: f32, op: &str, positions: &str, preserve_norm: bool) -> PyResult<Self> {
        let gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let t = py
            .detach(|| if gguf { resid::repe::gguf::read_control_vector_unsized(&path) } else { resid::io::read_f32_tensor(&path, "directions") })
            .map_err(to_py)?;
        if t.shape.len() != 2 {
            return Err(input_err(format!("{}: `directions` has shape {:?}, expected [L+1, hidden]", path.display(), t.shape)));
        }
        Self::build(t.data, t.shape[0], t.shape[1], gguf, layers, coef, op, positions, preserve_norm)
            .map_err(|e| Python::attach(|py| input_err(format!("{}: {}", path.display(), e.value(py)))))
    }

    /// Writes the directions: safetensors (`directions`, with the settings as metadata) or,
    /// with `gguf`, a llama.cpp control vector (`direction.k` = hidden-state index k+1).
    fn save(&self, py: Python<'_>, path: PathBuf, gguf: bool) -> PyResult<()> {
        py.detach(|| {
            if gguf {
                if self.rows < 2 {
                    return Err(resid::Error::input("a control vector needs at least 2 rows (index 0 is the embeddings, which llama.cpp cannot steer)"));
                }
                resid::repe::gguf::write_control_vector(&path, &self.table, self.rows - 1, self.hidden, "resid").map(|_| ())
            } else {
                let meta: HashMap<String, String> = [
                    ("layers", serde_json::json!(self.layers).to_string()),
                    ("coef", self.coef.to_string()),
                    ("op", self.op.name().to_string()),
                    ("positions", self.positions.name().to_string()),
                    ("preserve_norm", self.preserve_norm.to_string()),
                    ("resid_version", env!("CARGO_PKG_VERSION").to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
                let t = OutTensor { name: "directions".into(), shape: vec![self.rows, self.hidden], data: TensorData::F32((*self.table).clone()) };
                resid::io::write_safetensors(&path, &[t], meta)
            }
        })
        .map_err(to_py)
    }

    /// A copy of the directions, `[rows, hidden]` float32.
    #[getter]
    fn directions<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(PyArray1::from_vec(py, (*self.table).clone()).reshape([self.rows, self.hidden])?.into_any())
    }
    #[getter]
    fn layers(&self) -> Vec<usize> {
        self.layers.clone()
    }
    #[getter]
    fn coef(&self) -> f32 {
        self.coef
    }
    #[getter]
    fn op(&self) -> &'static str {
        self.op.name()
    }
    #[getter]
    fn positions(&self) -> &'static str {
        self.positions.name()
    }
    #[getter]
    fn preserve_norm(&self) -> bool {
        self.preserve_norm
    }
    #[getter]
    fn sparse(&self) -> bool {
        self.sparse
    }
}
