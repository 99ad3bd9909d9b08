//! Family descriptions: Qwen-chat's tensor names and config keys map onto the same forward pass
//! as Qwen2 (checked bit for bit), and family detection in `resid info`.
mod common;

use common::*;
use resid::io::{write_safetensors, OutTensor, TensorData};
use resid::{CapturePoint, CapturePosition, CaptureSpec, CpuEngine};
use std::collections::HashMap;

fn f32s(t: &OutTensor) -> &Vec<f32> {
    match &t.data {
        TensorData::F32(v) => v,
        TensorData::I64(_) | TensorData::F64(_) => unreachable!(),
    }
}

#[test]
fn qwen_chat_names_and_keys_match_qwen2() {
    let spec = TinySpec { kv_heads: 4, bias: false, tie: false, ..TinySpec::default() };
    let tmp = tempfile::tempdir().unwrap();
    // A Qwen2 model: the LLaMA tensors plus Q/K/V biases (no output bias).
    let mut tensors = tensors(&spec);
    let (hidden, inter, layers) = (spec.hidden, spec.inter, spec.layers);
    for l in 0..layers {
        for (n, seed) in [("q", 1u64), ("k", 2), ("v", 3)] {
            tensors.push(OutTensor {
                name: format!("model.layers.{l}.self_attn.{n}_proj.bias"),
                shape: vec![hidden],
                data: TensorData::F32(pseudo_random(hidden, 100 * l as u64 + seed, 0.1)),
            });
        }
    }
    let qwen2 = tmp.path().join("qwen2");
    std::fs::create_dir_all(&qwen2).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&config_json(&spec)).unwrap();
    let mut cfg = cfg.as_object().unwrap().clone();
    cfg.insert("architectures".into(), serde_json::json!(["Qwen2ForCausalLM"]));
    cfg.remove("attention_bias");
    cfg.remove("mlp_bias");
    std::fs::write(qwen2.join("config.json"), serde_json::Value::Object(cfg).to_string()).unwrap();
    write_safetensors(&qwen2.join("model.safetensors"), &tensors, HashMap::new()).unwrap();

    // The same weights under Qwen-chat's names and config keys.
    let by_name: HashMap<String, &OutTensor> = tensors.iter().map(|t| (t.name.clone(), t)).collect();
    let get = |n: &str| f32s(by_name[n]).clone();
    let mut chat = vec![
        OutTensor { name: "transformer.wte.weight".into(), shape: vec![spec.vocab, hidden], data: TensorData::F32(get("model.embed_tokens.weight")) },
        OutTensor { name: "transformer.ln_f.weight".into(), shape: vec![hidden], data: TensorData::F32(get("model.norm.weight")) },
        OutTensor { name: "lm_head.weight".into(), shape: vec![spec.vocab, hidden], data: TensorData::F32(get("lm_head.weight")) },
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        let q = format!("transformer.h.{l}.");
        let cat = |names: &[&str]| names.iter().flat_map(|n| get(&format!("{p}{n}"))).collect::<Vec<f32>>();
        let mut add = |name: &str, shape: Vec<usize>, data: Vec<f32>| chat.push(OutTensor { name: format!("{q}{name}"), shape, data: TensorData::F32(data) });
        add("ln_1.weight", vec![hidden], get(&format!("{p}input_layernorm.weight")));
        add("ln_2.weight", vec![hidden], get(&format!("{p}post_attention_layernorm.weight")));
        add("attn.c_attn.weight", vec![3 * hidden, hidden], cat(&["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]));
        add("attn.c_attn.bias", vec![3 * hidden], cat(&["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]));
        add("attn.c_proj.weight", vec![hidden, hidden], get(&format!("{p}self_attn.o_proj.weight")));
        add("mlp.w2.weight", vec![inter, hidden], get(&format!("{p}mlp.gate_proj.weight")));
        add("mlp.w1.weight", vec![inter, hidden], get(&format!("{p}mlp.up_proj.weight")));
        add("mlp.c_proj.weight", vec![hidden, inter], get(&format!("{p}mlp.down_proj.weight")));
    }
    let qwen_chat = tmp.path().join("qwen-chat");
    std::fs::create_dir_all(&qwen_chat).unwrap();
    let chat_cfg = serde_json::json!({
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "vocab_size": spec.vocab, "hidden_size": hidden, "intermediate_size": 2 * inter,
        "num_hidden_layers": layers, "num_attention_heads": spec.heads, "kv_channels": hidden / spec.heads,
        "layer_norm_epsilon": 1e-5, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 256,
        "no_bias": true, "tie_word_embeddings": false, "use_dynamic_ntk": true, "use_logn_attn": true
    });
    std::fs::write(qwen_chat.join("config.json"), chat_cfg.to_string()).unwrap();
    write_safetensors(&qwen_chat.join("model.safetensors"), &chat, HashMap::new()).unwrap();

    let a = CpuEngine::load(&qwen2).unwrap();
    let b = CpuEngine::load(&qwen_chat).unwrap();
    assert_eq!(a.model.config.family.name(), "qwen2");
    assert_eq!(b.model.config.family.name(), "qwen-chat");
    let seqs: Vec<Vec<u32>> = [3usize, 40, 1].iter().enumerate().map(|(i, &n)| random_ids(n, spec.vocab, i as u64)).collect();
    let mut points: Vec<CapturePoint> = (0..=layers).map(CapturePoint::Hidden).collect();
    points.push(CapturePoint::LastBlockRaw);
    let cap = CaptureSpec { points, position: CapturePosition::Mean };
    let none = vec![None; seqs.len()];
    let x = a.extract(&seqs, &cap, &none, 4096, |_, _| {}).unwrap();
    let y = b.extract(&seqs, &cap, &none, 4096, |_, _| {}).unwrap();
    assert_eq!(x.data, y.data, "Qwen-chat mapping differs from Qwen2");
    assert_eq!(a.last_logits(&seqs).unwrap(), b.last_logits(&seqs).unwrap());
    // Inputs beyond seq_length are refused rather than computed without dynamic NTK / log-n.
    let long = vec![random_ids(257, spec.vocab, 9)];
    let err = b.extract(&long, &cap, &[None], 4096, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("exceed the model's context of 256"), "{err}");
}

#[test]
fn unsupported_architecture_lists_supported_families() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinySpec::default();
    let dir = write_tiny(&tmp.path().join("m"), &spec);
    std::fs::write(dir.join("config.json"), config_json(&spec).replace("LlamaForCausalLM", "FalconForCausalLM")).unwrap();
    let err = CpuEngine::load(&dir).err().unwrap().to_string();
    for name in ["FalconForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "QWenLMHeadModel"] {
        assert!(err.contains(name), "{name} missing from: {err}");
    }
}

/// The random models `resid selftest` builds for each family load and run on the CPU.
#[test]
fn selftest_random_models_of_every_family_run() {
    use resid::testing::{RandomLlama, TestArch};
    let tmp = tempfile::tempdir().unwrap();
    for (arch, heads, kv, name) in [(TestArch::Llama, 4, 2, "llama"), (TestArch::Qwen2, 4, 2, "qwen2"), (TestArch::Qwen3, 4, 2, "qwen3"), (TestArch::Bloom, 5, 5, "bloom")] {
        let spec = RandomLlama {
            arch,
            vocab: 64,
            hidden: 80,
            intermediate: 320,
            layers: 2,
            heads,
            kv_heads: kv,
            head_dim: 80 / heads,
            bias: false,
            tie: true,
            context: 128,
            seed: 1,
        };
        let dir = tmp.path().join(name);
        spec.write(&dir).unwrap();
        let e = CpuEngine::load(&dir).unwrap();
        assert_eq!(e.model.config.family.name(), name);
        let seqs = vec![random_ids(9, 64, 1), random_ids(30, 64, 2)];
        let cap = CaptureSpec { points: vec![CapturePoint::Hidden(2)], position: CapturePosition::Last };
        let c = e.extract(&seqs, &cap, &[None, None], 4096, |_, _| {}).unwrap();
        assert!(c.data.iter().all(|v| v.is_finite()) && c.data.iter().any(|v| *v != 0.0));
    }
}

/// `resid bench` counts a token's projection FLOPs as 2 · `layer_matrix_elements` per layer. The
/// reference is each fixture checkpoint itself: every 2-D tensor but the embeddings and the LM
/// head. (Before 2026-12-06 the bench counted a gate matrix for GELU MLPs too: BLOOM a third over.)
#[test]
fn layer_matrix_elements_match_every_family_checkpoint() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let mut families = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let m = resid::model::ModelDir::open(&dir).unwrap();
        let c = &m.config;
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let mut in_file = 0;
        for (name, info) in meta.tensors() {
            let shape = &info.shape;
            let vocab_rows = shape.len() == 2 && shape[0] == c.vocab_size && shape[1] == c.hidden_size;
            assert!(!vocab_rows || !name.contains(".0."), "{}: {name} looks like a layer tensor of vocabulary rows", dir.display());
            if shape.len() == 2 && !vocab_rows {
                in_file += shape.iter().product::<usize>();
            }
        }
        assert_eq!(m.spec.layer_matrix_elements(c) * c.num_layers, in_file, "{}", dir.display());
        let up = if m.spec.mlp == resid::model::arch::MlpKind::SwiGlu { 2 } else { 1 };
        assert_eq!(m.spec.mlp_input_rows(c), up * c.intermediate_size, "{}", dir.display());
        families.insert(c.family.name());
    }
    assert!(families.len() >= 5, "fixtures of every family: {families:?}");
}
