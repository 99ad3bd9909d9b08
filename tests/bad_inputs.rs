//! A catalogue of bad inputs, one row each: how to build it, the command line, the documented
//! exit code (README: 2 usage, 3 input, 4 model, 5 device, 6 I/O) and a piece of the one-line
//! error. Every row also checks that the failed command left nothing behind: no output file,
//! no temporary file, no file at all that was not there before it ran.
mod common;

use common::*;
use resid::io::{serialize_safetensors, OutTensor, TensorData};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory with a good tiny model (`model/`, vocabulary 97, hidden 32, 3 layers,
/// context 256, no tokenizer) and helpers to build bad variants next to it.
struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        write_tiny(&dir.join("model"), &TinySpec::default());
        Env { _tmp: tmp, dir }
    }

    fn p(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn write(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        self.p(name)
    }

    fn model(&self) -> String {
        self.p("model")
    }

    fn out(&self) -> String {
        self.p("out.safetensors")
    }

    /// A model directory `bad/` with the good config and these weights.
    fn model_with_weights(&self, weights: &[u8]) -> String {
        self.write("bad/config.json", config_json(&TinySpec::default()).as_bytes());
        self.write("bad/model.safetensors", weights);
        self.p("bad")
    }

    /// A model directory `bad/` with the good weights and this config.
    fn model_with_config(&self, config: &[u8]) -> String {
        self.write("bad/model.safetensors", &good_weights());
        self.write("bad/config.json", config);
        self.p("bad")
    }

    /// The good model plus a word-level `tokenizer.json` (`w1` .. `w96` are ids 1 .. 96).
    fn model_with_tokenizer(&self) -> String {
        let vocab: serde_json::Map<String, serde_json::Value> =
            (0..97).map(|i| (if i == 0 { "<unk>".to_string() } else { format!("w{i}") }, i.into())).collect();
        let tok = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        write_tiny(&self.dir.join("tok"), &TinySpec::default());
        self.write("tok/tokenizer.json", tok.to_string().as_bytes());
        self.p("tok")
    }

    fn input(&self, bytes: &[u8]) -> String {
        self.write("in.jsonl", bytes)
    }

    fn good_input(&self) -> String {
        self.input(b"{\"ids\": [3, 4, 5]}\n{\"ids\": [7]}\n")
    }

    /// A steering-vector file `vec.safetensors` holding one tensor.
    fn vector(&self, name: &str, shape: Vec<usize>, data: TensorData) -> String {
        let t = OutTensor { name: name.into(), shape, data };
        self.write("vec.safetensors", &serialize_safetensors(&[t], &HashMap::new(), false).unwrap())
    }

    /// A well-shaped `[4, 32]` vector file with `poison` at row 1, column 5.
    fn vector_with(&self, poison: f32) -> String {
        let mut v = vec![0.25f32; 4 * 32];
        v[32 + 5] = poison;
        self.vector("directions", vec![4, 32], TensorData::F32(v))
    }

    /// A llama.cpp control vector `vec.gguf` with tensors `direction.k`.
    fn gguf(&self, tensors: &[(usize, Vec<f32>)]) -> String {
        let refs: Vec<(usize, &[f32])> = tensors.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        self.write("vec.gguf", &resid::repe::gguf::control_vector_bytes(&refs, "llama"))
    }

    /// Every file under the scratch directory (relative paths).
    fn files(&self) -> BTreeSet<PathBuf> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let path = e.path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    out.insert(path.strip_prefix(root).unwrap().to_owned());
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(&self.dir, &self.dir, &mut out);
        out
    }
}

fn good_weights() -> Vec<u8> {
    serialize_safetensors(&tensors(&TinySpec::default()), &HashMap::new(), false).unwrap()
}

/// Rewrites the JSON header of a safetensors file, keeping its data bytes.
fn edit_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut head = serde_json::to_vec(&header).unwrap();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

fn set(header: &mut serde_json::Map<String, serde_json::Value>, tensor: &str, key: &str, value: serde_json::Value) {
    header.get_mut(tensor).unwrap_or_else(|| panic!("no tensor {tensor}"))[key] = value;
}

const EMBED: &str = "model.embed_tokens.weight";
const K_PROJ: &str = "model.layers.0.self_attn.k_proj.weight";

fn extract(e: &Env, model: &str, input: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["extract", "--quiet", "--model", model, "--input", input, "--out", &e.out()].map(String::from).into();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn extract_good(e: &Env, extra: &[&str]) -> Vec<String> {
    let (model, input) = (e.model(), e.good_input());
    extract(e, &model, &input, extra)
}

fn with_steer(e: &Env, vec: &str) -> Vec<String> {
    extract_good(e, &["--steer", vec, "--steer-layers", "1-2"])
}

struct Row {
    what: &'static str,
    build: fn(&Env) -> Vec<String>,
    code: i32,
    needle: &'static str,
}

/// Runs `resid ARGS`; an argument list starting with `@fsize=N` runs it under `ulimit -f N`
/// (512-byte blocks) with SIGXFSZ ignored, so that writing past N blocks fails with EFBIG as on
/// a full disk.
fn run(args: &[String]) -> Output {
    let bin = env!("CARGO_BIN_EXE_resid");
    match args.first().and_then(|a| a.strip_prefix("@fsize=")) {
        Some(blocks) => Command::new("sh")
            .arg("-c")
            .arg(format!("trap '' XFSZ; ulimit -f {blocks} && exec \"$0\" \"$@\""))
            .arg(bin)
            .args(&args[1..])
            .output()
            .unwrap(),
        None => Command::new(bin).args(args).output().unwrap(),
    }
}

fn catalogue() -> Vec<Row> {
    vec![
        // ---- model directory (exit 4) ----
        Row { what: "safetensors truncated in its data", code: 4, needle: "not a valid safetensors file: incomplete metadata",
            build: |e| { let w = good_weights(); let m = e.model_with_weights(&w[..w.len() - 100]); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "safetensors truncated in its header", code: 4, needle: "not a valid safetensors file: invalid header length",
            build: |e| { let m = e.model_with_weights(&good_weights()[..40]); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "safetensors shorter than its length field", code: 4, needle: "not a valid safetensors file: header too small",
            build: |e| { let m = e.model_with_weights(b"\x10\0\0"); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "empty safetensors file", code: 4, needle: "not a valid safetensors file",
            build: |e| { let m = e.model_with_weights(b""); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "header length claiming 2^64-1 bytes", code: 4, needle: "not a valid safetensors file: header too large",
            build: |e| { let mut w = good_weights(); w[..8].copy_from_slice(&u64::MAX.to_le_bytes()); let m = e.model_with_weights(&w); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "header length past the end of the file", code: 4, needle: "not a valid safetensors file: invalid header length",
            build: |e| { let mut w = good_weights(); let n = (w.len() as u64 + 8).to_le_bytes(); w[..8].copy_from_slice(&n); let m = e.model_with_weights(&w); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "corrupted header bytes (invalid UTF-8)", code: 4, needle: "not a valid safetensors file: invalid UTF-8 in header",
            build: |e| { let mut w = good_weights(); w[12] = 0xff; let m = e.model_with_weights(&w); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "corrupted header bytes (not JSON)", code: 4, needle: "not a valid safetensors file: invalid JSON in header",
            build: |e| { let mut w = good_weights(); w[8] = b'['; let m = e.model_with_weights(&w); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "tensor shape claiming 2^62 x 2^62 elements", code: 4, needle: "not a valid safetensors file: overflow",
            build: |e| { let w = edit_header(&good_weights(), |h| set(h, EMBED, "shape", serde_json::json!([1u64 << 62, 1u64 << 62]))); let m = e.model_with_weights(&w); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "tensor offsets beyond the end of the file", code: 4, needle: "not a valid safetensors file",
            build: |e| { let w = edit_header(&good_weights(), |h| { let end = 1u64 << 40; set(h, "lm_head.weight", "data_offsets", serde_json::json!([h["lm_head.weight"]["data_offsets"][0], end])); }); let m = e.model_with_weights(&w); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "overlapping tensor offsets", code: 4, needle: "not a valid safetensors file: invalid offset for tensor",
            build: |e| { let w = edit_header(&good_weights(), |h| { let (s, t) = (h[K_PROJ]["data_offsets"][0].as_u64().unwrap(), h[K_PROJ]["data_offsets"][1].as_u64().unwrap()); set(h, K_PROJ, "data_offsets", serde_json::json!([s - 64, t - 64])); }); let m = e.model_with_weights(&w); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "shape disagreeing with the byte range", code: 4, needle: "not a valid safetensors file: invalid shape, data type, or offset",
            build: |e| { let w = edit_header(&good_weights(), |h| set(h, K_PROJ, "shape", serde_json::json!([16, 31]))); let m = e.model_with_weights(&w); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "unknown dtype in the header", code: 4, needle: "not a valid safetensors file: invalid JSON in header",
            build: |e| { let w = edit_header(&good_weights(), |h| set(h, K_PROJ, "dtype", "Q4_K".into())); let m = e.model_with_weights(&w); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "weight stored as i32", code: 4, needle: "tensor `model.layers.0.self_attn.k_proj.weight` has unsupported dtype i32",
            build: |e| { let w = edit_header(&good_weights(), |h| set(h, K_PROJ, "dtype", "I32".into())); let m = e.model_with_weights(&w); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "weight with the wrong shape (transposed)", code: 4, needle: "has shape [32, 16], expected [16, 32]",
            build: |e| { let w = edit_header(&good_weights(), |h| set(h, K_PROJ, "shape", serde_json::json!([32, 16]))); let m = e.model_with_weights(&w); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "missing tensor", code: 4, needle: "missing tensor `lm_head.weight`",
            build: |e| { let mut t = tensors(&TinySpec::default()); t.retain(|t| t.name != "lm_head.weight"); let m = e.model_with_weights(&serialize_safetensors(&t, &HashMap::new(), false).unwrap()); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "config.json not JSON", code: 4, needle: "config.json: invalid JSON",
            build: |e| { let m = e.model_with_config(b"{\"architectures\": [\"LlamaForCausalLM\""); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "config.json with invalid UTF-8", code: 4, needle: "config.json: invalid UTF-8",
            build: |e| { let m = e.model_with_config(b"{\"architectures\": [\"Llama\xff\"]}"); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "config claiming sizes whose product overflows", code: 4, needle: "tensor sizes overflow",
            build: |e| { let c = config_json(&TinySpec::default()).replace("\"vocab_size\":97", &format!("\"vocab_size\":{}", (1u64 << 40) - 1)).replace("\"hidden_size\":32", &format!("\"hidden_size\":{}", (1u64 << 40) - 8)); let m = e.model_with_config(c.as_bytes()); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "config claiming 2^39 layers", code: 4, needle: "layers; at most 4096 are supported",
            build: |e| { let c = config_json(&TinySpec::default()).replace("\"num_hidden_layers\":3", "\"num_hidden_layers\":549755813888"); let m = e.model_with_config(c.as_bytes()); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "config with more heads than hidden units", code: 4, needle: "head dimension works out to 0",
            build: |e| { let c = config_json(&TinySpec::default()).replace("\"num_attention_heads\":4", "\"num_attention_heads\":64"); let m = e.model_with_config(c.as_bytes()); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "unsupported architecture", code: 4, needle: "unsupported architecture `GPT2LMHeadModel`",
            build: |e| { let c = config_json(&TinySpec::default()).replace("LlamaForCausalLM", "GPT2LMHeadModel"); let m = e.model_with_config(c.as_bytes()); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "corrupted tokenizer.json", code: 4, needle: "cannot load tokenizer",
            build: |e| { let m = e.model_with_tokenizer(); e.write("tok/tokenizer.json", b"{\"model\": 1}"); extract(e, &m, &e.good_input(), &[]) } },
        // ---- input (exit 3) ----
        Row { what: "NaN in the weights: reported with the line and layer", code: 3, needle: "line 1: NaN or Inf in captured activations at layer",
            build: |e| { let mut t = tensors(&TinySpec::default()); for x in &mut t { if x.name == "model.layers.1.post_attention_layernorm.weight" { x.data = TensorData::F32(vec![f32::NAN; 32]); } } let m = e.model_with_weights(&serialize_safetensors(&t, &HashMap::new(), false).unwrap()); extract(e, &m, &e.good_input(), &[]) } },
        Row { what: "Inf in the weights: reported with the line and layer", code: 3, needle: "NaN or Inf in captured activations at layer Hidden(1)",
            build: |e| { let mut t = tensors(&TinySpec::default()); for x in &mut t { if x.name == "model.layers.0.mlp.down_proj.bias" { x.data = TensorData::F32(vec![f32::INFINITY; 32]); } } let m = e.model_with_weights(&serialize_safetensors(&t, &HashMap::new(), false).unwrap()); extract(e, &m, &e.good_input(), &["--layers", "0,1"]) } },
        Row { what: "NaN in a steering vector", code: 3, needle: "vec.safetensors: `directions` contains NaN or Inf (row 1, column 5)",
            build: |e| { let v = e.vector_with(f32::NAN); with_steer(e, &v) } },
        Row { what: "Inf in a steering vector", code: 3, needle: "`directions` contains NaN or Inf (row 1, column 5)",
            build: |e| { let v = e.vector_with(f32::NEG_INFINITY); with_steer(e, &v) } },
        Row { what: "steering vector with the wrong hidden size", code: 3, needle: "has shape [4, 16], expected [4, 32]",
            build: |e| { let v = e.vector("directions", vec![4, 16], TensorData::F32(vec![0.5; 64])); with_steer(e, &v) } },
        Row { what: "steering vector with too few rows", code: 3, needle: "`directions` has 3 rows, expected 4",
            build: |e| { let v = e.vector("directions", vec![3, 32], TensorData::F32(vec![0.5; 96])); with_steer(e, &v) } },
        Row { what: "steering vector of integers", code: 3, needle: "has dtype I64, expected f32, bf16 or f16",
            build: |e| { let v = e.vector("directions", vec![4, 32], TensorData::I64(vec![1; 128])); with_steer(e, &v) } },
        Row { what: "steering file without `directions`", code: 3, needle: "no tensor `directions` (found: vectors)",
            build: |e| { let v = e.vector("vectors", vec![4, 32], TensorData::F32(vec![0.5; 128])); with_steer(e, &v) } },
        Row { what: "truncated steering file", code: 3, needle: "vec.safetensors: not a valid safetensors file",
            build: |e| { let v = e.vector_with(0.5); let b = std::fs::read(&v).unwrap(); std::fs::write(&v, &b[..b.len() - 9]).unwrap(); with_steer(e, &v) } },
        Row { what: "truncated GGUF control vector", code: 3, needle: "vec.gguf: tensor `direction.2`: data lies outside the file",
            build: |e| { let v = e.gguf(&[(1, vec![0.5; 32]), (2, vec![0.5; 32])]); let b = std::fs::read(&v).unwrap(); std::fs::write(&v, &b[..b.len() - 40]).unwrap(); with_steer(e, &v) } },
        Row { what: "GGUF control vector cut inside its header", code: 3, needle: "vec.gguf: byte",
            build: |e| { let v = e.gguf(&[(1, vec![0.5; 32])]); let b = std::fs::read(&v).unwrap(); std::fs::write(&v, &b[..60]).unwrap(); with_steer(e, &v) } },
        Row { what: "NaN in a GGUF control vector", code: 3, needle: "vec.gguf: direction.1 contains NaN or Inf (column 3)",
            build: |e| { let mut d = vec![0.5; 32]; d[3] = f32::NAN; let v = e.gguf(&[(1, d)]); with_steer(e, &v) } },
        Row { what: "GGUF control vector for another hidden size", code: 3, needle: "has shape [16], expected [32]",
            build: |e| { let v = e.gguf(&[(1, vec![0.5; 16])]); with_steer(e, &v) } },
        Row { what: "GGUF control vector for a deeper model", code: 3, needle: "targets decoder block 7",
            build: |e| { let v = e.gguf(&[(7, vec![0.5; 32])]); with_steer(e, &v) } },
        Row { what: "safetensors bytes named .gguf", code: 3, needle: "vec.gguf: not a GGUF file",
            build: |e| { let v = e.vector_with(0.5); std::fs::rename(&v, e.dir.join("vec.gguf")).unwrap(); with_steer(e, &e.p("vec.gguf")) } },
        Row { what: "non-finite steering coefficient", code: 3, needle: "steering coefficient inf is not finite",
            build: |e| { let v = e.vector_with(0.5); extract_good(e, &["--steer", &v, "--steer-layers", "1", "--coef", "inf"]) } },
        Row { what: "empty input file", code: 3, needle: "in.jsonl: no input lines",
            build: |e| { let i = e.input(b""); extract(e, &e.model(), &i, &[]) } },
        Row { what: "input with a blank line", code: 3, needle: "in.jsonl: line 2: empty line",
            build: |e| { let i = e.input(b"{\"ids\": [1]}\n   \n"); extract(e, &e.model(), &i, &[]) } },
        Row { what: "invalid UTF-8 in the input", code: 3, needle: "in.jsonl: line 3: invalid UTF-8",
            build: |e| { let i = e.input(b"{\"ids\": [1]}\n{\"ids\": [2]}\n{\"text\": \"caf\xe9\"}\n"); extract(e, &e.model(), &i, &[]) } },
        Row { what: "malformed JSON line", code: 3, needle: "in.jsonl: line 1: malformed JSON",
            build: |e| { let i = e.input(b"{\"ids\": [1,]}\n"); extract(e, &e.model(), &i, &[]) } },
        Row { what: "negative token id", code: 3, needle: "`ids` must be a list of non-negative integers",
            build: |e| { let i = e.input(b"{\"ids\": [1, -1]}\n"); extract(e, &e.model(), &i, &[]) } },
        Row { what: "token id outside the vocabulary", code: 3, needle: "line 2: token id 97 is outside the vocabulary of 97",
            build: |e| { let i = e.input(b"{\"ids\": [1]}\n{\"ids\": [96, 97]}\n"); extract(e, &e.model(), &i, &[]) } },
        Row { what: "empty token list", code: 3, needle: "line 1: no tokens",
            build: |e| { let i = e.input(b"{\"ids\": []}\n"); extract(e, &e.model(), &i, &[]) } },
        Row { what: "ids beyond the context length", code: 3, needle: "line 2: 257 tokens exceed the model's context of 256",
            build: |e| { let i = e.input(format!("{{\"ids\": [1]}}\n{{\"ids\": {:?}}}\n", vec![3; 257]).as_bytes()); extract(e, &e.model(), &i, &[]) } },
        Row { what: "text beyond the context length", code: 3, needle: "line 1: 300 tokens exceed the model's context of 256",
            build: |e| { let m = e.model_with_tokenizer(); let i = e.input(format!("{{\"text\": \"{}\"}}\n", vec!["w5"; 300].join(" ")).as_bytes()); extract(e, &m, &i, &[]) } },
        Row { what: "generate: prompt beyond the context length", code: 3, needle: "prompt 1: 300 tokens exceed the model's context of 256",
            build: |e| { let m = e.model_with_tokenizer(); ["generate", "--model", &m, "--prompt", &vec!["w7"; 300].join(" ")].map(String::from).into() } },
        Row { what: "text when the model has no tokenizer", code: 3, needle: "no tokenizer.json; give `ids` instead",
            build: |e| { let i = e.input(b"{\"text\": \"hello\"}\n"); extract(e, &e.model(), &i, &[]) } },
        Row { what: "capture layer out of range", code: 3, needle: "capture layer 4 is out of range",
            build: |e| extract_good(e, &["--layers", "0,4"]) },
        Row { what: "capture layer range of 2^64 layers", code: 3, needle: "layer 18446744073709551615 is out of range",
            build: |e| extract_good(e, &["--layers", "0-18446744073709551615"]) },
        Row { what: "capture layer beyond u64", code: 3, needle: "is not a layer or a range",
            build: |e| extract_good(e, &["--layers", "99999999999999999999999"]) },
        Row { what: "reversed layer range", code: 3, needle: "invalid layer list `3-1`",
            build: |e| extract_good(e, &["--layers", "3-1"]) },
        Row { what: "steering layer out of range", code: 3, needle: "steering layer 5 is out of range",
            build: |e| { let v = e.vector_with(0.5); extract_good(e, &["--steer", &v, "--steer-layers", "2,5"]) } },
        Row { what: "unknown capture position", code: 3, needle: "unknown position `first`",
            build: |e| extract_good(e, &["--position", "first"]) },
        Row { what: "--shard with a single-file output", code: 3, needle: "--shard needs a directory output",
            build: |e| extract_good(e, &["--shard", "0/2"]) },
        // ---- I/O (exit 6) ----
        Row { what: "input file missing", code: 6, needle: "missing.jsonl: No such file",
            build: |e| extract(e, &e.model(), &e.p("missing.jsonl"), &[]) },
        Row { what: "steering file missing", code: 6, needle: "missing.safetensors: No such file",
            build: |e| with_steer(e, &e.p("missing.safetensors")) },
        Row { what: "output directory does not exist", code: 6, needle: "No such file or directory",
            build: |e| replace_out(extract_good(e, &[]), &e.p("no/such/dir/out.safetensors")) },
        Row { what: "output below a regular file", code: 6, needle: "Not a directory",
            build: |e| { e.write("file", b"x"); replace_out(extract_good(e, &[]), &e.p("file/out.safetensors")) } },
        Row { what: "output path is a directory", code: 6, needle: "is a directory, expected an output file path",
            build: |e| { std::fs::create_dir_all(e.dir.join("d.safetensors")).unwrap(); replace_out(extract_good(e, &[]), &e.p("d.safetensors")) } },
        Row { what: "sharded output directory below a regular file", code: 6, needle: "Not a directory",
            build: |e| { e.write("file", b"x"); replace_out(extract_good(e, &[]), &e.p("file/parts")) } },
        Row { what: "full disk (file size limit): single-file output", code: 6, needle: "out.safetensors: File too large",
            build: |e| { let i = e.input(format!("{{\"ids\": {:?}}}\n", vec![3; 200]).as_bytes()); let mut a = vec!["@fsize=40".to_string()]; a.extend(extract(e, &e.model(), &i, &["--position", "all"])); a } },
        Row { what: "full disk (file size limit): sharded output", code: 6, needle: "File too large",
            build: |e| { let i = e.input(format!("{{\"ids\": {:?}}}\n", vec![3; 200]).as_bytes()); let mut a = vec!["@fsize=40".to_string()]; a.extend(replace_out(extract(e, &e.model(), &i, &["--position", "all"]), &e.p("parts"))); a } },
        // ---- outputs in use by another run (exit 6); the test process holds the lock ----
        Row { what: "directory output locked by another run", code: 6, needle: "in use by another resid run (pid",
            build: |e| { let d = e.dir.join("parts"); std::fs::create_dir_all(&d).unwrap(); hold(resid::store::lock::OutputLock::dir(&d, false)); replace_out(extract_good(e, &[]), &e.p("parts")) } },
        Row { what: "file output locked by another run", code: 6, needle: "out.safetensors: in use by another resid run (pid",
            build: |e| { hold(resid::store::lock::OutputLock::file(Path::new(&e.out()), false)); extract_good(e, &[]) } },
        Row { what: "merge output locked by another run", code: 6, needle: "merged: in use by another resid run",
            build: |e| { let d = e.dir.join("merged"); std::fs::create_dir_all(&d).unwrap(); hold(resid::store::lock::OutputLock::dir(&d, false)); ["merge", "--out", &e.p("merged"), &e.p("part0")].map(String::from).into() } },
        Row { what: "study output locked by another run", code: 6, needle: "study-out: in use by another resid run",
            build: |e| { let m = e.model_with_tokenizer(); common::study::write_values(&e.dir.join("values")); let d = e.dir.join("study-out"); std::fs::create_dir_all(&d).unwrap(); hold(resid::store::lock::OutputLock::dir(&d, false)); ["study", "--model", &m, "--data", &e.p("values"), "--out", &e.p("study-out"), "--quiet"].map(String::from).into() } },
        Row { what: "vector output locked by another run", code: 6, needle: "v.safetensors: in use by another resid run",
            build: |e| { let m = e.model_with_tokenizer(); let t = e.write("pairs.jsonl", b"{\"pos\": \"w1 w2\", \"neg\": \"w3 w4\"}\n"); hold(resid::store::lock::OutputLock::file(&e.dir.join("v.safetensors"), false)); ["vectors", "--model", &m, "--train", &t, "--out", &e.p("v.safetensors"), "--quiet"].map(String::from).into() } },
        Row { what: "bench plot directory locked by another run", code: 6, needle: "plots: in use by another resid run",
            build: |e| { let d = e.dir.join("plots"); std::fs::create_dir_all(&d).unwrap(); hold(resid::store::lock::OutputLock::dir(&d, false)); ["bench", "--model", &e.model(), "--workload", "scaling", "--plot-dir", &e.p("plots"), "--quiet"].map(String::from).into() } },
        // ---- usage (exit 2) ----
        Row { what: "missing --out", code: 2, needle: "--out <OUT>",
            build: |e| ["extract", "--model", &e.model(), "--input", &e.good_input()].map(String::from).into() },
        Row { what: "unknown flag", code: 2, needle: "unexpected argument '--layer'",
            build: |e| extract_good(e, &["--layer", "1"]) },
        Row { what: "non-numeric --batch-tokens", code: 2, needle: "invalid value 'many'",
            build: |e| extract_good(e, &["--batch-tokens", "many"]) },
    ]
}

/// Keeps a lock held for the rest of the test process, as a concurrent run would.
fn hold(lock: resid::Result<resid::store::lock::OutputLock>) {
    std::mem::forget(lock.expect("lock for the catalogue row"));
}

/// Replaces the value of `--out` in an argument list.
fn replace_out(mut args: Vec<String>, out: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == "--out").unwrap();
    args[i + 1] = out.to_string();
    args
}

#[test]
fn every_bad_input_fails_cleanly_with_its_documented_code() {
    let mut failures = Vec::new();
    let rows = catalogue();
    for row in &rows {
        let env = Env::new();
        let args = (row.build)(&env);
        let before = env.files();
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let mut problems = Vec::new();
        if o.status.code() != Some(row.code) {
            problems.push(format!("exit {:?}, expected {}", o.status.code(), row.code));
        }
        if !err.contains(row.needle) {
            problems.push(format!("no `{}` in the error", row.needle));
        }
        // Clap's usage errors add a usage block; every other error is exactly one line.
        if row.code != 2 && err.trim().lines().count() != 1 {
            problems.push("the error is not one line".into());
        }
        let new: Vec<_> = env.files().difference(&before).cloned().collect();
        if !new.is_empty() {
            problems.push(format!("left files behind: {new:?}"));
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}\n    stderr: {}", row.what, problems.join("; "), err.trim()));
        }
    }
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), rows.len(), failures.join("\n"));
}

/// The catalogue's own sanity: the good model, input and vector file succeed, so each row fails
/// for its one defect.
#[test]
fn the_unmodified_inputs_succeed() {
    let e = Env::new();
    let v = e.vector_with(0.5);
    let o = run(&with_steer(&e, &v));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(Path::new(&e.out()).is_file());
    let m = e.model_with_tokenizer();
    let i = e.input(b"{\"text\": \"w1 w2 w3\"}\n");
    let o = run(&extract(&e, &m, &i, &[]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The same size limit that fails the large output lets a small one through.
    let e = Env::new();
    let mut a = vec!["@fsize=40".to_string()];
    a.extend(extract_good(&e, &["--layers", "1"]));
    let o = run(&a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
