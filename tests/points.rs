//! Points inside blocks (TransformerLens `blocks.{l}.hook_*`): captures and steering against
//! Hugging Face forward hooks, for every tiny family of the golden fixtures
//! (`scripts/make_golden.py --only points`; Qwen-chat from its float64 numpy reference).
//!
//! Threshold: per row (one layer's point, last token or mean over tokens), ‖ours − HF‖ / ‖HF‖
//! ≤ 1e-4, f32 compute on both sides (as tests/golden.rs).
mod common;

use common::rel_err;
use resid::engine::capture::Site;
use resid::engine::steer::SiteSteer;
use resid::{CapturePoint, CapturePosition, CaptureSpec, CpuEngine, SteerOp, SteerPositions, Steering};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const REL_TOL: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn site_of(name: &str) -> Site {
    match name {
        "resid_mid" => Site::ResidMid,
        "attn_out" => Site::AttnOut,
        "mlp_out" => Site::MlpOut,
        "z" => Site::Z,
        other => panic!("unknown site {other}"),
    }
}

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn f32(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("fixture lacks {name}"));
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }
    fn ids(&self, prompt: usize) -> Vec<u32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(&format!("p{prompt}.ids")).unwrap();
        t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect()
    }
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/golden/points/points.json")).unwrap()).unwrap()
}

fn check_rows(what: &str, ours: &[f32], hf: &[f32], width: usize) {
    assert_eq!(ours.len(), hf.len(), "{what}: sizes");
    for (r, (a, b)) in ours.chunks(width).zip(hf.chunks(width)).enumerate() {
        let e = rel_err(a, b);
        assert!(e <= REL_TOL, "{what}: row {r}: relative error {e:.3e} > {REL_TOL:e}");
    }
}

/// Every point of every block, last token and mean, against HF's hooks. `hook_z` is captured
/// with the other points where it has their width, apart where it does not (tiny-mistral).
#[test]
fn every_point_matches_hf_forward_hooks() {
    let meta = meta();
    for model in meta["models"].as_array().unwrap() {
        let name = model.as_str().unwrap();
        let fx = Fixture { bytes: std::fs::read(root().join(format!("tests/fixtures/golden/points/{name}.safetensors"))).unwrap() };
        let e = CpuEngine::load(&root().join("tests/fixtures/models").join(name)).unwrap();
        let (l, h) = (e.num_layers(), e.hidden_size());
        let g = e.steer_geometry();
        let z_width = g.heads * g.head_dim;
        let groups: Vec<Vec<Site>> =
            if z_width == h { vec![Site::ALL.to_vec()] } else { vec![vec![Site::ResidMid, Site::AttnOut, Site::MlpOut], vec![Site::Z]] };
        for prompt in 0..meta["prompt_lengths"].as_array().unwrap().len() {
            let ids = fx.ids(prompt);
            for (position, tag) in [(CapturePosition::Last, "last"), (CapturePosition::Mean, "mean")] {
                for sites in &groups {
                    // Layer-major, sites interleaved: the order of the output is the order asked.
                    let points: Vec<CapturePoint> = (0..l).flat_map(|b| sites.iter().map(move |&s| CapturePoint::Block(b, s))).collect();
                    let spec = CaptureSpec { points: points.clone(), position };
                    let out = e.extract(std::slice::from_ref(&ids), &spec, &[None], 4096, |_, _| {}).unwrap();
                    let width = e.capture_width(&spec).unwrap();
                    assert_eq!(out.hidden, width);
                    for &site in sites {
                        let key = ["resid_mid", "attn_out", "mlp_out", "z"][site.index()];
                        let hf = fx.f32(&format!("p{prompt}.{key}.{tag}"));
                        let ours: Vec<f32> = (0..l).flat_map(|b| out.row(0, spec.slot(CapturePoint::Block(b, site)).unwrap()).to_vec()).collect();
                        check_rows(&format!("{name} p{prompt} {key}.{tag}"), &ours, &hf, width);
                    }
                }
            }
        }
    }
}

/// Steering at each point of block `steer_layer` (add at every point; piecewise with c < 0 at
/// resid_mid and attn_out; norm-preserving at resid_mid and mlp_out; hook_z on two heads)
/// against HF hooks that steer the same point: every hidden state, and the steered point.
#[test]
fn steering_at_each_point_matches_hf_hooks() {
    let meta = meta();
    let layer = meta["steer_layer"].as_u64().unwrap() as usize;
    for model in meta["models"].as_array().unwrap() {
        let name = model.as_str().unwrap();
        let fx = Fixture { bytes: std::fs::read(root().join(format!("tests/fixtures/golden/points/{name}.safetensors"))).unwrap() };
        let e = CpuEngine::load(&root().join("tests/fixtures/models").join(name)).unwrap();
        let (l, h) = (e.num_layers(), e.hidden_size());
        for case in meta["steer_cases"].as_array().unwrap() {
            let (site_name, mode) = (case["site"].as_str().unwrap(), case["mode"].as_str().unwrap());
            let site = site_of(site_name);
            let vector = fx.f32(&format!("steer.{site_name}"));
            let s = Arc::new(Steering {
                directions: Arc::new(Vec::new()),
                hidden: h,
                layers: Vec::new(),
                sites: vec![SiteSteer { layer, site, vector: Arc::new(vector), heads: Vec::new() }],
                coef: case["coef"].as_f64().unwrap() as f32,
                op: if mode == "pw" { SteerOp::SignAware } else { SteerOp::Add },
                preserve_norm: mode == "norm",
                positions: SteerPositions::All,
            });
            for prompt in 0..meta["prompt_lengths"].as_array().unwrap().len() {
                let ids = fx.ids(prompt);
                let what = format!("{name} p{prompt} steer {site_name} {mode}");
                let spec = CaptureSpec { points: (0..=l).map(CapturePoint::Hidden).collect(), position: CapturePosition::Last };
                let out = e.extract(std::slice::from_ref(&ids), &spec, &[Some(s.clone())], 4096, |_, _| {}).unwrap();
                check_rows(&what, &out.data, &fx.f32(&format!("p{prompt}.steer.{site_name}.{mode}.last")), h);
                // The unsteered run differs (the steering did something) ...
                let plain = fx.f32(&format!("p{prompt}.hidden.last"));
                assert!(rel_err(&out.data[l * h..], &plain[l * h..]) > 1e-3, "{what}: steering changed nothing");
                // ... and a capture at the steered point sees the steered value.
                let point = CaptureSpec { points: vec![CapturePoint::Block(layer, site)], position: CapturePosition::Last };
                let at = e.extract(std::slice::from_ref(&ids), &point, &[Some(s.clone())], 4096, |_, _| {}).unwrap();
                let hf = fx.f32(&format!("p{prompt}.steer.{site_name}.{mode}.point"));
                check_rows(&format!("{what}: the point"), &at.data, &hf, hf.len());
            }
        }
    }
}

fn resid(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_resid")).args(args).output().unwrap()
}

fn one_line_error(out: &std::process::Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure mentioning {want:?}");
    assert!(stderr.contains(want), "expected {want:?} in:\n{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line:\n{stderr}");
}

/// `--layers` mixes indices, `raw` and point names; the output lists its points in order; steer
/// files name their points; bad points, heads and widths are one-line errors with no output.
#[test]
fn cli_points_metadata_steer_files_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/models/tiny-llama-gqa");
    let m = model.to_str().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"ids\": [1, 2, 3, 4]}\n{\"ids\": [5, 6]}\n").unwrap();
    let inp = input.to_str().unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = out.to_str().unwrap();
    let run = resid(&["extract", "--model", m, "--input", inp, "--out", o, "--quiet", "--layers", "2,blocks.1.hook_mlp_out,raw,blocks.0.hook_z,blocks.0.hook_resid_post"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let md = header.metadata().clone().unwrap();
    let points: Vec<String> = serde_json::from_str(&md["points"]).unwrap();
    assert_eq!(points, ["blocks.2.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post", "blocks.0.hook_z", "blocks.1.hook_resid_pre"]);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("hidden_states").unwrap().shape(), [2, 5, 64]);
    let layers: Vec<i64> = st.tensor("layers").unwrap().data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(layers, [2, -2, -1, -2, 1]);

    let fresh = |n: &str| tmp.path().join(n).to_str().unwrap().to_owned();
    let bad = fresh("bad.safetensors");
    one_line_error(&resid(&["extract", "--model", m, "--input", inp, "--out", &bad, "--layers", "1,blocks.3.hook_mlp_out"]), "beyond the model");
    assert!(!Path::new(&bad).exists(), "no half-written output");

    // Steering files name their points; hook_z heads are chosen in --steer-layers.
    let write_steer = |name: &str, tensors: Vec<(&str, Vec<f32>)>| {
        let path = tmp.path().join(name);
        let t: Vec<resid::io::OutTensor> = tensors
            .into_iter()
            .map(|(n, v)| resid::io::OutTensor { name: n.into(), shape: vec![v.len()], data: resid::io::TensorData::F32(v) })
            .collect();
        resid::io::write_safetensors(&path, &t, Default::default()).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let v: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let good = write_steer("good.safetensors", vec![("blocks.1.hook_mlp_out", v.clone()), ("blocks.0.hook_z", v.clone())]);
    let base = |layers: &str, file: &str, out: &str| {
        resid(&["extract", "--model", m, "--input", inp, "--out", out, "--quiet", "--layers", "3", "--steer", file, "--coef", "4", "--steer-layers", layers])
    };
    let plain = fresh("plain.safetensors");
    assert!(resid(&["extract", "--model", m, "--input", inp, "--out", &plain, "--quiet", "--layers", "3"]).status.success());
    for layers in ["blocks.1.hook_mlp_out", "blocks.0.hook_z.1-2"] {
        let o = fresh(&format!("steered-{}.safetensors", layers.replace('.', "_")));
        let run = base(layers, &good, &o);
        assert!(run.status.success(), "{layers}: {}", String::from_utf8_lossy(&run.stderr));
        assert_ne!(std::fs::read(&o).unwrap(), std::fs::read(&plain).unwrap(), "{layers}: steering changed nothing");
    }
    one_line_error(&base("blocks.0.hook_z.4", &good, &fresh("x1.safetensors")), "head 4 is out of range");
    one_line_error(&base("blocks.1.hook_attn_out", &good, &fresh("x2.safetensors")), "no tensor `blocks.1.hook_attn_out`");
    let narrow = write_steer("narrow.safetensors", vec![("blocks.1.hook_mlp_out", v[..48].to_vec())]);
    one_line_error(&base("blocks.1.hook_mlp_out", &narrow, &fresh("x3.safetensors")), "has 48 values, the point is 64 wide");
    one_line_error(&base("blocks.5.hook_mlp_out", &good, &fresh("x4.safetensors")), "beyond the model");
}

/// Capturing points inside blocks changes no other captured value, bit for bit, on the CPU: the
/// branch is added into the residual in the order the projection's GEMM epilogue adds it.
#[test]
fn capturing_inside_blocks_leaves_every_other_point_unchanged() {
    let e = CpuEngine::load(&root().join("tests/fixtures/models/tiny-llama-gqa")).unwrap();
    let l = e.num_layers();
    let seqs: Vec<Vec<u32>> = vec![(0..9).map(|i| (i * 37 + 5) % 256).collect(), (0..4).map(|i| (i * 11 + 3) % 256).collect()];
    let indices: Vec<CapturePoint> = (0..=l).map(CapturePoint::Hidden).chain([CapturePoint::LastBlockRaw]).collect();
    for position in [CapturePosition::Last, CapturePosition::Mean, CapturePosition::All] {
        let plain = e.extract(&seqs, &CaptureSpec { points: indices.clone(), position }, &[None, None], 4096, |_, _| {}).unwrap();
        let mut points = indices.clone();
        points.extend((0..l).flat_map(|b| Site::ALL.map(|s| CapturePoint::Block(b, s))));
        let spec = CaptureSpec { points, position };
        let with = e.extract(&seqs, &spec, &[None, None], 4096, |_, _| {}).unwrap();
        for r in 0..plain.rows {
            for (slot, point) in indices.iter().enumerate() {
                assert_eq!(plain.row(r, slot), with.row(r, slot), "{position:?}: row {r}, point {point:?}");
            }
        }
    }
}
