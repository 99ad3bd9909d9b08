//! Random-weight models for self-tests and benchmarks: a Llama-family model directory written
//! with deterministic pseudo-random weights.
use crate::error::Result;
use crate::io::{write_safetensors_typed, OutTensor, TensorData};
use std::path::Path;

/// Which family's names and config keys to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestArch {
    Llama,
    /// Q/K/V biases, no output bias.
    Qwen2,
    /// Per-head RMSNorm on Q and K.
    Qwen3,
    /// LayerNorms, ALiBi, GELU, interleaved fused QKV (heads = kv_heads, intermediate = 4·hidden).
    Bloom,
    /// The paper's first-generation Qwen-chat names and config keys (`QWenLMHeadModel`): fused
    /// `c_attn` with bias, `w1`/`w2`/`c_proj` MLP (heads = kv_heads).
    QwenChat,
}

#[derive(Debug, Clone)]
pub struct RandomLlama {
    pub arch: TestArch,
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub bias: bool,
    pub tie: bool,
    pub context: usize,
    pub seed: u64,
}

/// xorshift values in [-scale, scale).
pub fn pseudo_random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(0x2545F4914F6CDD1D) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

impl RandomLlama {
    /// A one-layer random Llama with heads of 64 (hidden 128, vocab 128, context 64): the
    /// emulator tests' base, which they change field by field.
    pub fn small(seed: u64) -> Self {
        RandomLlama {
            arch: TestArch::Llama,
            vocab: 128,
            hidden: 128,
            intermediate: 256,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            head_dim: 64,
            bias: false,
            tie: true,
            context: 64,
            seed,
        }
    }

    pub fn config_json(&self) -> String {
        match self.arch {
            TestArch::Bloom => {
                return serde_json::json!({
                    "architectures": ["BloomForCausalLM"], "vocab_size": self.vocab, "hidden_size": self.hidden,
                    "n_layer": self.layers, "n_head": self.heads, "layer_norm_epsilon": 1e-5,
                    "apply_residual_connection_post_layernorm": false, "bos_token_id": 1, "eos_token_id": 2,
                    "torch_dtype": "bfloat16"
                })
                .to_string()
            }
            TestArch::Qwen2 | TestArch::Qwen3 => {
                let name = if self.arch == TestArch::Qwen2 { "Qwen2ForCausalLM" } else { "Qwen3ForCausalLM" };
                return serde_json::json!({
                    "architectures": [name], "head_dim": self.head_dim,
                    "vocab_size": self.vocab, "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                    "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                    "num_key_value_heads": self.kv_heads, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                    "max_position_embeddings": self.context, "tie_word_embeddings": self.tie,
                    "use_sliding_window": false, "sliding_window": null, "torch_dtype": "bfloat16"
                })
                .to_string()
            }
            TestArch::QwenChat => {
                return serde_json::json!({
                    "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
                    "vocab_size": self.vocab, "hidden_size": self.hidden, "intermediate_size": 2 * self.intermediate,
                    "num_hidden_layers": self.layers, "num_attention_heads": self.heads, "kv_channels": self.head_dim,
                    "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": self.context,
                    "no_bias": true, "tie_word_embeddings": false, "use_dynamic_ntk": true, "use_logn_attn": true,
                    "torch_dtype": "bfloat16"
                })
                .to_string()
            }
            TestArch::Llama => {}
        }
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab, "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": self.context,
            "tie_word_embeddings": self.tie, "attention_bias": self.bias, "mlp_bias": self.bias,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"
        })
        .to_string()
    }

    /// Writes `config.json` and `model.safetensors` (bf16 weights) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        std::fs::write(dir.join("config.json"), self.config_json()).map_err(|e| crate::Error::io(dir.join("config.json"), e))?;
        let (h, q, kv, i) = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate);
        // Scales keep activations O(1) through the layers.
        let (sh, si) = (1.0 / (h as f32).sqrt(), 1.0 / (i as f32).sqrt());
        if self.arch == TestArch::Bloom {
            return self.write_bloom(dir);
        }
        if self.arch == TestArch::QwenChat {
            return self.write_qwen_chat(dir);
        }
        let mut specs: Vec<(String, Vec<usize>, f32)> = vec![("model.embed_tokens.weight".into(), vec![self.vocab, h], 1.0)];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}.");
            specs.push((format!("{p}input_layernorm.weight"), vec![h], -1.0));
            specs.push((format!("{p}post_attention_layernorm.weight"), vec![h], -1.0));
            specs.push((format!("{p}self_attn.q_proj.weight"), vec![q, h], 2.0 * sh));
            specs.push((format!("{p}self_attn.k_proj.weight"), vec![kv, h], 2.0 * sh));
            specs.push((format!("{p}self_attn.v_proj.weight"), vec![kv, h], sh));
            specs.push((format!("{p}self_attn.o_proj.weight"), vec![h, q], sh));
            specs.push((format!("{p}mlp.gate_proj.weight"), vec![i, h], sh));
            specs.push((format!("{p}mlp.up_proj.weight"), vec![i, h], sh));
            specs.push((format!("{p}mlp.down_proj.weight"), vec![h, i], si));
            if self.arch == TestArch::Qwen3 {
                specs.push((format!("{p}self_attn.q_norm.weight"), vec![self.head_dim], -1.0));
                specs.push((format!("{p}self_attn.k_norm.weight"), vec![self.head_dim], -1.0));
            }
            if self.arch == TestArch::Qwen2 {
                for (n, d) in [("self_attn.q_proj.bias", q), ("self_attn.k_proj.bias", kv), ("self_attn.v_proj.bias", kv)] {
                    specs.push((format!("{p}{n}"), vec![d], 0.05));
                }
            } else if self.bias {
                for (n, d) in [("self_attn.q_proj.bias", q), ("self_attn.k_proj.bias", kv), ("self_attn.v_proj.bias", kv), ("self_attn.o_proj.bias", h), ("mlp.gate_proj.bias", i), ("mlp.up_proj.bias", i), ("mlp.down_proj.bias", h)] {
                    specs.push((format!("{p}{n}"), vec![d], 0.05));
                }
            }
        }
        specs.push(("model.norm.weight".into(), vec![h], -1.0));
        if !self.tie {
            specs.push(("lm_head.weight".into(), vec![self.vocab, h], 4.0 * sh));
        }
        self.write_tensors(dir, specs)
    }

    fn write_bloom(&self, dir: &Path) -> Result<()> {
        let h = self.hidden;
        let sh = 1.0 / (h as f32).sqrt();
        let mut specs: Vec<(String, Vec<usize>, f32)> = vec![
            ("transformer.word_embeddings.weight".into(), vec![self.vocab, h], 1.0),
            ("transformer.word_embeddings_layernorm.weight".into(), vec![h], -1.0),
            ("transformer.word_embeddings_layernorm.bias".into(), vec![h], 0.05),
        ];
        for l in 0..self.layers {
            let p = format!("transformer.h.{l}.");
            for (n, shape, scale) in [
                ("input_layernorm.weight", vec![h], -1.0),
                ("input_layernorm.bias", vec![h], 0.05),
                ("self_attention.query_key_value.weight", vec![3 * h, h], 2.0 * sh),
                ("self_attention.query_key_value.bias", vec![3 * h], 0.05),
                ("self_attention.dense.weight", vec![h, h], sh),
                ("self_attention.dense.bias", vec![h], 0.05),
                ("post_attention_layernorm.weight", vec![h], -1.0),
                ("post_attention_layernorm.bias", vec![h], 0.05),
                ("mlp.dense_h_to_4h.weight", vec![4 * h, h], sh),
                ("mlp.dense_h_to_4h.bias", vec![4 * h], 0.05),
                ("mlp.dense_4h_to_h.weight", vec![h, 4 * h], 0.5 * sh),
                ("mlp.dense_4h_to_h.bias", vec![h], 0.05),
            ] {
                specs.push((format!("{p}{n}"), shape, scale));
            }
        }
        specs.push(("transformer.ln_f.weight".into(), vec![h], -1.0));
        specs.push(("transformer.ln_f.bias".into(), vec![h], 0.05));
        self.write_tensors(dir, specs)
    }

    fn write_qwen_chat(&self, dir: &Path) -> Result<()> {
        let (h, i) = (self.hidden, self.intermediate);
        let q = self.heads * self.head_dim;
        let (sh, si) = (1.0 / (h as f32).sqrt(), 1.0 / (i as f32).sqrt());
        let mut specs: Vec<(String, Vec<usize>, f32)> = vec![("transformer.wte.weight".into(), vec![self.vocab, h], 1.0)];
        for l in 0..self.layers {
            let p = format!("transformer.h.{l}.");
            for (n, shape, scale) in [
                ("ln_1.weight", vec![h], -1.0),
                ("ln_2.weight", vec![h], -1.0),
                ("attn.c_attn.weight", vec![3 * q, h], 2.0 * sh),
                ("attn.c_attn.bias", vec![3 * q], 0.05),
                ("attn.c_proj.weight", vec![h, q], sh),
                ("mlp.w1.weight", vec![i, h], sh),
                ("mlp.w2.weight", vec![i, h], sh),
                ("mlp.c_proj.weight", vec![h, i], si),
            ] {
                specs.push((format!("{p}{n}"), shape, scale));
            }
        }
        specs.push(("transformer.ln_f.weight".into(), vec![h], -1.0));
        specs.push(("lm_head.weight".into(), vec![self.vocab, h], 4.0 * sh));
        self.write_tensors(dir, specs)
    }

    fn write_tensors(&self, dir: &Path, specs: Vec<(String, Vec<usize>, f32)>) -> Result<()> {
        let tensors: Vec<OutTensor> = specs
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape, scale))| {
                let n = shape.iter().product();
                let seed = self.seed.wrapping_mul(1000).wrapping_add(k as u64);
                let data = if scale < 0.0 {
                    pseudo_random(n, seed, 0.2).into_iter().map(|v| 1.0 + v).collect()
                } else {
                    pseudo_random(n, seed, scale)
                };
                OutTensor { name, shape, data: TensorData::F32(data) }
            })
            .collect();
        write_safetensors_typed(&dir.join("model.safetensors"), &tensors, Default::default(), true)
    }
}
