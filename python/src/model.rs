//! `resid._resid.Model`: a loaded model on a device, and the calls the Python `resid.Model`
//! makes on it.
use crate::run::run;
use crate::steering::Steering as PySteering;
use crate::{input_err, to_py, ModelError};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use resid::backend::any::AnyEngine;
use resid::backend::Backend;
use resid::engine::capture::{CapturePoint, CapturePosition, CaptureSpec};
use resid::engine::steer::Steering;
use resid::io::{InputItem, OutputDtype};
use resid::model::tokenizer::TextTokenizer;
use resid::store::extract::{ExtractJob, ExtractOutput};
use resid::{with_engine, Engine, GenerateOptions, Sampling};
use std::path::PathBuf;
use std::sync::Arc;

/// Sets the CPU backend's worker threads for this process (once, before the first compute).
#[pyfunction]
pub fn set_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(input_err("threads must be at least 1"));
    }
    if rayon::ThreadPoolBuilder::new().num_threads(n).build_global().is_err() && rayon::current_num_threads() != n {
        return Err(input_err(format!(
            "threads={n}: this process already computes with {} threads (set threads on the first Model only)",
            rayon::current_num_threads()
        )));
    }
    Ok(())
}

/// A loaded model: immutable, shared by every Python thread that uses it.
#[pyclass(frozen, module = "resid._resid")]
pub struct Model {
    engine: Arc<AnyEngine>,
}

/// Tokenized, checked inputs of one call (kept in Rust between the batches of `extract_iter`).
#[pyclass(frozen, module = "resid._resid")]
pub struct Inputs {
    seqs: Vec<Vec<u32>>,
    /// Name and SHA-256 of the input for `extract_to`'s manifest.
    name: String,
    sha256: String,
}

#[pymethods]
impl Inputs {
    fn __len__(&self) -> usize {
        self.seqs.len()
    }

    /// Token count of every input.
    fn lengths(&self) -> Vec<usize> {
        self.seqs.iter().map(Vec::len).collect()
    }

    /// The batches extraction packs these inputs into: `(start, end)` ranges.
    fn batch_ranges(&self, batch_tokens: usize) -> PyResult<Vec<(usize, usize)>> {
        check_batch_tokens(batch_tokens)?;
        let lens = self.lengths();
        Ok(resid::engine::batch_ranges(&lens, batch_tokens).into_iter().map(|r| (r.start, r.end)).collect())
    }
}

fn check_batch_tokens(batch_tokens: usize) -> PyResult<()> {
    if batch_tokens == 0 {
        return Err(input_err("batch_tokens must be at least 1"));
    }
    Ok(())
}

fn tokenizer<B: Backend>(engine: &Engine<B>) -> PyResult<&TextTokenizer> {
    engine
        .model
        .tokenizer
        .as_ref()
        .ok_or_else(|| ModelError::new_err(format!("{}: no tokenizer.json; give token ids instead of text", engine.model.dir.display())))
}

/// One input: a str, or a sequence of token ids (a list, a tuple, a 1-D integer array).
fn input_item(item: &Bound<'_, PyAny>, at: &str) -> PyResult<InputItem> {
    if let Ok(s) = item.cast::<PyString>() {
        return Ok(InputItem::Text(s.to_cow()?.into_owned()));
    }
    let ids: Vec<Bound<'_, PyAny>> = item
        .try_iter()
        .map_err(|_| input_err(format!("{at}: expected a str or a list of token ids, got {}", type_name(item))))?
        .collect::<PyResult<_>>()?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        // Python ints of any size, numpy integers; floats and bools are refused.
        if id.is_instance_of::<pyo3::types::PyBool>() || id.is_instance_of::<pyo3::types::PyFloat>() {
            return Err(input_err(format!("{at}: token id {} is not an integer", id.repr()?)));
        }
        let repr = || id.repr().map(|r| r.to_string()).unwrap_or_default();
        let v: i128 = match id.extract() {
            Ok(v) => v,
            Err(_) if id.is_instance_of::<pyo3::types::PyInt>() => return Err(input_err(format!("{at}: token id {} is outside the vocabulary", repr()))),
            Err(_) => return Err(input_err(format!("{at}: token id {} is not an integer", repr()))),
        };
        let v = u32::try_from(v).map_err(|_| input_err(format!("{at}: token id {v} is outside the vocabulary")))?;
        out.push(v);
    }
    Ok(InputItem::Ids(out))
}

fn type_name(o: &Bound<'_, PyAny>) -> String {
    o.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// The layer axis: Hugging Face indices (0 = embeddings .. L), `"raw"` (the last block's
/// output before the final norm) and point names (`"blocks.3.hook_mlp_out"`, any string
/// `resid extract --layers` takes); `None` is every index 0..=L.
fn capture_points(layers: Option<&Bound<'_, PyAny>>, num_layers: usize) -> PyResult<Vec<CapturePoint>> {
    let Some(layers) = layers.filter(|l| !l.is_none()) else {
        return Ok((0..=num_layers).map(CapturePoint::Hidden).collect());
    };
    if layers.is_instance_of::<PyString>() {
        return Err(input_err("layers: expected a list of layer indices, \"raw\" and point names, not a string"));
    }
    let mut points = Vec::new();
    let items = layers.try_iter().map_err(|_| input_err(format!("layers: expected a list of layer indices, got {}", type_name(layers))))?;
    for item in items {
        let item = item?;
        let p = if let Ok(s) = item.extract::<String>() {
            for p in resid::engine::capture::parse_points(&s, num_layers).map_err(|e| input_err(format!("layers: {e}")))? {
                if !points.contains(&p) {
                    points.push(p);
                }
            }
            continue;
        } else if item.is_instance_of::<pyo3::types::PyBool>() {
            return Err(input_err("layers: a bool is not a layer index"));
        } else {
            let l: i128 = item.extract().map_err(|_| input_err(format!("layers: `{}` is not a layer index", item.repr().map(|r| r.to_string()).unwrap_or_default())))?;
            let l = usize::try_from(l).ok().filter(|&l| l <= num_layers).ok_or_else(|| {
                input_err(format!("capture layer {l} is out of range: this model has hidden-state indices 0..={num_layers}"))
            })?;
            CapturePoint::Hidden(l)
        };
        if !points.contains(&p) {
            points.push(p);
        }
    }
    Ok(points)
}

fn parse_position(p: &str) -> PyResult<CapturePosition> {
    p.parse::<CapturePosition>().map_err(to_py)
}

fn steering_for<B: Backend>(engine: &Engine<B>, s: Option<&Bound<'_, PySteering>>) -> PyResult<Option<Arc<Steering>>> {
    s.map(|s| s.get().for_model(engine.steer_geometry()).map(Arc::new)).transpose().map_err(to_py)
}

fn numpy_rows<'py>(py: Python<'py>, data: Vec<f32>, rows: usize, points: usize, hidden: usize, dtype: OutputDtype) -> PyResult<Bound<'py, PyAny>> {
    use half::slice::HalfFloatSliceExt;
    let shape = [rows, points, hidden];
    Ok(match dtype {
        // The engine's buffer becomes the array's memory: no copy on the way out.
        OutputDtype::F32 => PyArray1::from_vec(py, data).reshape(shape)?.into_any(),
        // Half precision goes out as its bits (uint16); the Python side views them as
        // float16 (or ml_dtypes.bfloat16): numpy has no bfloat16 of its own.
        OutputDtype::F16 => {
            let mut h = vec![half::f16::ZERO; data.len()];
            h.convert_from_f32_slice(&data);
            PyArray1::from_vec(py, h.iter().map(|v| v.to_bits()).collect::<Vec<u16>>()).reshape(shape)?.into_any()
        }
        OutputDtype::Bf16 => {
            let mut h = vec![half::bf16::ZERO; data.len()];
            h.convert_from_f32_slice(&data);
            PyArray1::from_vec(py, h.iter().map(|v| v.to_bits()).collect::<Vec<u16>>()).reshape(shape)?.into_any()
        }
    })
}

fn parse_dtype(d: &str) -> PyResult<OutputDtype> {
    d.parse::<OutputDtype>().map_err(to_py)
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, device = "cpu", compute = None))]
    fn new(py: Python<'_>, path: PathBuf, device: &str, compute: Option<&str>) -> PyResult<Self> {
        let compute = compute.map(|c| c.parse::<resid::backend::cpu::Compute>().map_err(|e| to_py(resid::Error::input(format!("compute: {e}"))))).transpose()?;
        if let Some(note) = resid::backend::any::choose_compute(device, compute).map_err(to_py)? {
            // The same note the CLI prints: the model loads, in f32.
            PyErr::warn(py, &py.get_type::<pyo3::exceptions::PyUserWarning>(), &std::ffi::CString::new(note).unwrap_or_default(), 1)?;
        }
        let device = device.to_owned();
        let engine = run(py, None, move |_| AnyEngine::load(&device, &path).map(|(e, _)| e))?;
        Ok(Model { engine: Arc::new(engine) })
    }

    /// `resid info --json` as a JSON string.
    fn info_json(&self) -> String {
        with_engine!(&*self.engine, e => e.summary().to_string())
    }

    #[getter]
    fn num_layers(&self) -> usize {
        with_engine!(&*self.engine, e => e.num_layers())
    }

    #[getter]
    fn hidden_size(&self) -> usize {
        with_engine!(&*self.engine, e => e.hidden_size())
    }

    fn tokenize(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        with_engine!(&*self.engine, e => {
            let tok = tokenizer(e)?;
            py.detach(|| texts.iter().map(|t| tok.encode(t)).collect::<resid::Result<Vec<_>>>()).map_err(to_py)
        })
    }

    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        with_engine!(&*self.engine, e => tokenizer(e)?.decode(&ids).map_err(to_py))
    }

    fn apply_chat_template(&self, messages: Vec<(String, String)>) -> PyResult<String> {
        with_engine!(&*self.engine, e => {
            let turns: Vec<(&str, &str)> = messages.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            tokenizer(e)?.render_messages(&turns).map_err(to_py)
        })
    }

    /// Tokenizes and checks `inputs` (a list of str or of token-id lists) once, for the calls below.
    #[pyo3(signature = (inputs, name = None))]
    fn prepare(&self, py: Python<'_>, inputs: &Bound<'_, PyAny>, name: Option<String>) -> PyResult<Inputs> {
        if inputs.is_instance_of::<PyString>() {
            return Err(input_err("inputs: expected a list of str or of token-id lists, not a single str"));
        }
        let list: Vec<Bound<'_, PyAny>> = inputs
            .try_iter()
            .map_err(|_| input_err(format!("inputs: expected a list, got {}", type_name(inputs))))?
            .collect::<PyResult<_>>()?;
        if list.is_empty() {
            return Err(input_err("inputs: empty list (nothing to extract)"));
        }
        let items = list.iter().enumerate().map(|(i, x)| input_item(x, &format!("inputs[{i}]"))).collect::<PyResult<Vec<_>>>()?;
        // The same bytes `resid extract` would hash for this input as JSONL, so that a rerun
        // with the same list resumes and one with another list refuses to mix results.
        let mut jsonl = String::new();
        for it in &items {
            let line = match it {
                InputItem::Text(t) => serde_json::json!({ "text": t }),
                InputItem::Ids(ids) => serde_json::json!({ "ids": ids }),
            };
            jsonl.push_str(&line.to_string());
            jsonl.push('\n');
        }
        let engine = self.engine.clone();
        let seqs = py.detach(|| with_engine!(&*engine, e => e.input_ids(items, |i| format!("inputs[{i}]")))).map_err(to_py)?;
        Ok(Inputs { seqs, name: name.unwrap_or_else(|| "<python list>".into()), sha256: resid::store::sha256_hex(jsonl.as_bytes()) })
    }

    /// Reads a JSONL input file (`text` or `ids` per line), as `resid extract --input` does.
    fn prepare_jsonl(&self, py: Python<'_>, path: PathBuf) -> PyResult<Inputs> {
        let engine = self.engine.clone();
        py.detach(|| {
            let bytes = std::fs::read(&path).map_err(|e| resid::Error::io(&path, e))?;
            let name = path.display().to_string();
            let items = resid::io::parse_jsonl(&bytes, &name)?;
            let seqs = with_engine!(&*engine, e => e.input_ids(items, |i| format!("{name}: line {}", i + 1)))?;
            Ok(Inputs { seqs, name, sha256: resid::store::sha256_hex(&bytes) })
        })
        .map_err(to_py)
    }

    /// Captures `inputs.seqs[start..end]`: `(array [rows, n_layers, hidden], offsets or None)`;
    /// for f16/bf16 the array holds the bits (uint16).
    #[pyo3(signature = (inputs, start, end, layers, position, steer, batch_tokens, progress = None, dtype = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn extract<'py>(
        &self,
        py: Python<'py>,
        inputs: &Inputs,
        start: usize,
        end: usize,
        layers: Option<&Bound<'py, PyAny>>,
        position: &str,
        steer: Option<&Bound<'py, PySteering>>,
        batch_tokens: usize,
        progress: Option<&Bound<'py, PyAny>>,
        dtype: &str,
    ) -> PyResult<(Bound<'py, PyAny>, Option<Bound<'py, PyAny>>)> {
        check_batch_tokens(batch_tokens)?;
        let dtype = parse_dtype(dtype)?;
        let seqs = inputs.seqs.get(start..end).ok_or_else(|| input_err(format!("range {start}..{end} outside 0..{}", inputs.seqs.len())))?;
        let engine = &*self.engine;
        with_engine!(engine, e => {
            let spec = CaptureSpec { points: capture_points(layers, e.num_layers())?, position: parse_position(position)? };
            let steering = vec![steering_for(e, steer)?; seqs.len()];
            let total = seqs.len();
            let c = run(py, progress, |p| {
                let mut done = 0;
                let c = e.extract(seqs, &spec, &steering, batch_tokens, |n, _| {
                    done += n;
                    p.set(done, total);
                })?;
                // Overflow to f16 infinity is refused as NaN is in files.
                resid::store::extract::check_finite(&c, &spec, dtype, &inputs.name, start)?;
                Ok(c)
            })?;
            let offsets = (spec.position == CapturePosition::All)
                .then(|| PyArray1::from_vec(py, c.offsets.iter().map(|&o| o as i64).collect()).into_any());
            Ok((numpy_rows(py, c.data, c.rows, c.points, c.hidden, dtype)?, offsets))
        })
    }

    /// The resumable, sharded writer of `resid extract --out`; returns its summary as JSON.
    #[pyo3(signature = (out, inputs, layers, position, steer, batch_tokens, shard_sequences, part, wait_lock, progress = None, dtype = "f32"))]
    #[allow(clippy::too_many_arguments)]
    fn extract_to<'py>(
        &self,
        py: Python<'py>,
        out: PathBuf,
        inputs: &Inputs,
        layers: Option<&Bound<'py, PyAny>>,
        position: &str,
        steer: Option<&Bound<'py, PySteering>>,
        batch_tokens: usize,
        shard_sequences: usize,
        part: Option<(usize, usize)>,
        wait_lock: bool,
        progress: Option<&Bound<'py, PyAny>>,
        dtype: &str,
    ) -> PyResult<String> {
        check_batch_tokens(batch_tokens)?;
        let dtype = parse_dtype(dtype)?;
        if shard_sequences == 0 {
            return Err(input_err("shard_sequences must be at least 1"));
        }
        let engine = &*self.engine;
        with_engine!(engine, e => {
            let spec = CaptureSpec { points: capture_points(layers, e.num_layers())?, position: parse_position(position)? };
            let steering = steering_for(e, steer)?;
            let job = ExtractJob {
                seqs: &inputs.seqs,
                spec: &spec,
                steering_description: Steering::describe(steering.as_deref(), None),
                steering,
                steering_file_sha256: None,
                batch_tokens,
                input_name: inputs.name.clone(),
                input_sha256: inputs.sha256.clone(),
                part,
                shard_sequences,
                dtype,
            };
            let summary = run(py, progress, |p| {
                let output = ExtractOutput::open(&out, wait_lock)?;
                output.write(e, &job, &mut |x| p.set(x.done_sequences, x.total_sequences))
            })?;
            serde_json::to_string(&summary).map_err(|e| input_err(format!("summary: {e}")))
        })
    }

    /// Reads JSONL pairs (`pos` and `neg` per line, as `resid stats --pairs --input`): the
    /// sequences pos, neg of every pair in turn.
    fn prepare_pairs_jsonl(&self, py: Python<'_>, path: PathBuf) -> PyResult<Inputs> {
        let engine = self.engine.clone();
        py.detach(|| {
            let bytes = std::fs::read(&path).map_err(|e| resid::Error::io(&path, e))?;
            let pairs = resid::repe::data::load_jsonl(&path)?;
            let (items, origins): (Vec<InputItem>, Vec<String>) =
                pairs.into_iter().flat_map(|p| [(InputItem::Text(p.pos), p.origin.clone()), (InputItem::Text(p.neg), p.origin)]).unzip();
            let seqs = with_engine!(&*engine, e => e.input_ids(items, |i| origins[i].clone()))?;
            Ok(Inputs { seqs, name: path.display().to_string(), sha256: resid::store::sha256_hex(&bytes) })
        })
        .map_err(to_py)
    }

    /// `resid stats`: per-point statistics of `inputs` into `out`; returns the summary as JSON.
    #[pyo3(signature = (out, inputs, layers, position, stats, pairs, batch_tokens, checkpoint_seconds, stop_after, wait_lock, progress = None))]
    #[allow(clippy::too_many_arguments)]
    fn stats<'py>(
        &self,
        py: Python<'py>,
        out: PathBuf,
        inputs: &Inputs,
        layers: Option<&Bound<'py, PyAny>>,
        position: &str,
        stats: &str,
        pairs: bool,
        batch_tokens: usize,
        checkpoint_seconds: f64,
        stop_after: Option<usize>,
        wait_lock: bool,
        progress: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<String> {
        check_batch_tokens(batch_tokens)?;
        let selection: resid::store::stats::StatsSelection = stats.parse().map_err(to_py)?;
        if out.extension().is_none_or(|e| e != "safetensors") {
            return Err(input_err(format!("out {}: expected a .safetensors file", out.display())));
        }
        if !(checkpoint_seconds.is_finite() && checkpoint_seconds >= 0.0) {
            return Err(input_err(format!("checkpoint_seconds {checkpoint_seconds}: must be a non-negative number")));
        }
        let engine = &*self.engine;
        with_engine!(engine, e => {
            let spec = CaptureSpec { points: capture_points(layers, e.num_layers())?, position: parse_position(position)? };
            let name = inputs.name.clone();
            let origin = move |i: usize| format!("{name}: {} {}", if pairs { "pair" } else { "input" }, i + 1);
            let job = resid::store::stats::StatsJob {
                seqs: &inputs.seqs,
                spec: &spec,
                stats: selection,
                pairs,
                batch_tokens,
                input_name: inputs.name.clone(),
                input_sha256: inputs.sha256.clone(),
                origin: &origin,
                checkpoint_seconds,
                stop_after,
            };
            let summary = run(py, progress, |p| resid::store::stats::run(e, &job, &out, wait_lock, &mut |x| p.set(x.done_sequences, x.total_sequences)))?;
            serde_json::to_string(&summary).map_err(|e| input_err(format!("summary: {e}")))
        })
    }

    /// Generates for every prompt in one batch; returns dicts with text, tokens, finish_reason.
    #[pyo3(signature = (prompts, max_new_tokens, temperature, top_p, top_k, seed, chat, stop, steer))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompts: &Bound<'py, PyAny>,
        max_new_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: Option<usize>,
        seed: u64,
        chat: bool,
        stop: Vec<String>,
        steer: Vec<Option<Bound<'py, PySteering>>>,
    ) -> PyResult<Bound<'py, PyList>> {
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(input_err(format!("temperature {temperature}: must be a non-negative number")));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(input_err(format!("top_p {top_p}: must be in (0, 1]")));
        }
        if top_k == Some(0) {
            return Err(input_err("top_k must be at least 1 (or None)"));
        }
        let sampling = if temperature == 0.0 {
            if top_k.is_some() || top_p != 1.0 {
                return Err(input_err("top_p and top_k need temperature > 0 (temperature 0 is greedy)"));
            }
            Sampling::Greedy
        } else {
            Sampling::Sample { temperature, top_k: top_k.unwrap_or(0), top_p, seed }
        };
        if prompts.is_instance_of::<PyString>() {
            return Err(input_err("prompts: expected a list of str, not a single str"));
        }
        let list: Vec<Bound<'py, PyAny>> =
            prompts.try_iter().map_err(|_| input_err(format!("prompts: expected a list, got {}", type_name(prompts))))?.collect::<PyResult<_>>()?;
        if list.is_empty() {
            return Err(input_err("prompts: empty list"));
        }
        if steer.len() != list.len() {
            return Err(input_err(format!("steer: {} entries for {} prompts", steer.len(), list.len())));
        }
        let engine = &*self.engine;
        with_engine!(engine, e => {
            // Token-id prompts generate without a tokenizer (`text` is then None).
            let tok = e.model.tokenizer.as_ref();
            if tok.is_none() && !stop.is_empty() {
                return Err(input_err("stop strings need the model's tokenizer.json"));
            }
            let mut ids = Vec::with_capacity(list.len());
            for (i, p) in list.iter().enumerate() {
                let at = format!("prompts[{i}]");
                ids.push(match input_item(p, &at)? {
                    InputItem::Text(text) => {
                        let tok = tokenizer(e)?;
                        if chat { tok.encode_chat(&[("user", &text)]) } else { tok.encode(&text) }.map_err(|err| to_py(err.prefixed(&at)))?
                    }
                    InputItem::Ids(_) if chat => return Err(input_err(format!("{at}: chat=True needs text prompts"))),
                    InputItem::Ids(v) => v,
                });
            }
            let steering = steer.iter().map(|s| steering_for(e, s.as_ref())).collect::<PyResult<Vec<_>>>()?;
            let opts = GenerateOptions { max_new_tokens, sampling, stop_tokens: resid::repe::control::stop_tokens(e) };
            let gens = run(py, None, |_| {
                // Stop strings end a sequence at the step they appear, as in the server.
                let gens = e.generate_text(&ids, &steering, &opts, &stop)?;
                Ok(gens
                    .into_iter()
                    .map(|g| {
                        let reason = if matches!(g.finish, resid::FinishReason::Stop) { "stop" } else { "length" };
                        (g.text, g.tokens, reason)
                    })
                    .collect::<Vec<_>>())
            })?;
            let out = PyList::empty(py);
            for ((text, tokens, reason), p) in gens.into_iter().zip(&ids) {
                let d = PyDict::new(py);
                d.set_item("text", text)?;
                d.set_item("tokens", tokens)?;
                d.set_item("prompt_tokens", p.len())?;
                d.set_item("finish_reason", reason)?;
                out.append(d)?;
            }
            Ok(out)
        })
    }
}

impl Model {
    pub fn engine(&self) -> &AnyEngine {
        &self.engine
    }
}
