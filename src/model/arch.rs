//! Declarative descriptions of the supported architectures. The forward pass reads these;
//! adding a family means adding a description (and kernels for genuinely new operations).
use super::config::ModelConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    /// Qwen2 / Qwen2.5: the LLaMA block with biases on Q, K and V.
    Qwen2,
    /// Qwen3: per-head RMSNorm on Q and K before RoPE.
    Qwen3,
    /// First-generation Qwen-chat (`QWenLMHeadModel`, remote code in HF): fused `c_attn`.
    QwenChat,
    /// BLOOM / BLOOMZ: LayerNorms with biases, ALiBi, GELU MLP, per-head interleaved QKV.
    Bloom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
    /// LayerNorm with weight and bias.
    Layer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionKind {
    Rope,
    /// Linear attention biases per head (BLOOM); no rotation.
    Alibi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// down(silu(gate(x)) * up(x))
    SwiGlu,
    /// down(gelu_tanh(up(x) + b) + b) (BLOOM)
    GeluTanh,
}

/// The tensors a decoder layer may hold, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerTensor {
    AttnNorm,
    AttnNormBias,
    MlpNormBias,
    /// Q, K and V stacked in one checkpoint tensor.
    Qkv,
    QkvBias,
    /// Per-head RMSNorm weights applied to Q and K before RoPE.
    QNorm,
    KNorm,
    Q,
    K,
    V,
    O,
    QBias,
    KBias,
    VBias,
    OBias,
    MlpNorm,
    Gate,
    Up,
    Down,
    GateBias,
    UpBias,
    DownBias,
}

#[derive(Debug, Clone)]
pub struct ArchSpec {
    pub family: Family,
    pub norm: NormKind,
    pub position: PositionKind,
    pub mlp: MlpKind,
    pub embed: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
    /// `{}` is replaced by the layer index.
    pub layer_prefix: &'static str,
    pub layer_names: &'static [(LayerTensor, &'static str)],
    /// The checkpoint stores Q, K, V as one tensor (`Qkv`) rather than three.
    pub fused_qkv: bool,
    /// The fused QKV rows are interleaved per head (`[heads, 3, head_dim]`, BLOOM) rather than
    /// stacked `[q; k; v]`; the loader reorders them.
    pub qkv_interleaved: bool,
    /// LayerNorm (weight, bias) applied to the embeddings (BLOOM).
    pub embed_norm: Option<(&'static str, &'static str)>,
    pub final_norm_bias: Option<&'static str>,
}

const LLAMA_LAYER_NAMES: &[(LayerTensor, &str)] = &[
    (LayerTensor::AttnNorm, "input_layernorm.weight"),
    (LayerTensor::Q, "self_attn.q_proj.weight"),
    (LayerTensor::K, "self_attn.k_proj.weight"),
    (LayerTensor::V, "self_attn.v_proj.weight"),
    (LayerTensor::O, "self_attn.o_proj.weight"),
    (LayerTensor::QBias, "self_attn.q_proj.bias"),
    (LayerTensor::KBias, "self_attn.k_proj.bias"),
    (LayerTensor::VBias, "self_attn.v_proj.bias"),
    (LayerTensor::OBias, "self_attn.o_proj.bias"),
    (LayerTensor::MlpNorm, "post_attention_layernorm.weight"),
    (LayerTensor::Gate, "mlp.gate_proj.weight"),
    (LayerTensor::Up, "mlp.up_proj.weight"),
    (LayerTensor::Down, "mlp.down_proj.weight"),
    (LayerTensor::GateBias, "mlp.gate_proj.bias"),
    (LayerTensor::UpBias, "mlp.up_proj.bias"),
    (LayerTensor::DownBias, "mlp.down_proj.bias"),
    (LayerTensor::QNorm, "self_attn.q_norm.weight"),
    (LayerTensor::KNorm, "self_attn.k_norm.weight"),
];

const BLOOM_LAYER_NAMES: &[(LayerTensor, &str)] = &[
    (LayerTensor::AttnNorm, "input_layernorm.weight"),
    (LayerTensor::AttnNormBias, "input_layernorm.bias"),
    (LayerTensor::Qkv, "self_attention.query_key_value.weight"),
    (LayerTensor::QkvBias, "self_attention.query_key_value.bias"),
    (LayerTensor::O, "self_attention.dense.weight"),
    (LayerTensor::OBias, "self_attention.dense.bias"),
    (LayerTensor::MlpNorm, "post_attention_layernorm.weight"),
    (LayerTensor::MlpNormBias, "post_attention_layernorm.bias"),
    (LayerTensor::Up, "mlp.dense_h_to_4h.weight"),
    (LayerTensor::UpBias, "mlp.dense_h_to_4h.bias"),
    (LayerTensor::Down, "mlp.dense_4h_to_h.weight"),
    (LayerTensor::DownBias, "mlp.dense_4h_to_h.bias"),
];

/// Qwen-chat: `w1(x) * silu(w2(x))`, so w2 is the gate and w1 the up projection. With
/// `no_bias: false` the output projection and all three MLP projections have biases.
const QWEN_CHAT_LAYER_NAMES: &[(LayerTensor, &str)] = &[
    (LayerTensor::AttnNorm, "ln_1.weight"),
    (LayerTensor::Qkv, "attn.c_attn.weight"),
    (LayerTensor::QkvBias, "attn.c_attn.bias"),
    (LayerTensor::O, "attn.c_proj.weight"),
    (LayerTensor::OBias, "attn.c_proj.bias"),
    (LayerTensor::MlpNorm, "ln_2.weight"),
    (LayerTensor::Gate, "mlp.w2.weight"),
    (LayerTensor::Up, "mlp.w1.weight"),
    (LayerTensor::Down, "mlp.c_proj.weight"),
    (LayerTensor::GateBias, "mlp.w2.bias"),
    (LayerTensor::UpBias, "mlp.w1.bias"),
    (LayerTensor::DownBias, "mlp.c_proj.bias"),
];

/// Architecture names accepted in `config.json`'s `architectures`, with their family.
const SUPPORTED: &[(&str, Family)] = &[
    ("LlamaForCausalLM", Family::Llama),
    ("MistralForCausalLM", Family::Llama),
    ("Qwen2ForCausalLM", Family::Qwen2),
    ("Qwen3ForCausalLM", Family::Qwen3),
    ("QWenLMHeadModel", Family::QwenChat),
    ("BloomForCausalLM", Family::Bloom),
    ("bloom", Family::Bloom),
    ("llama", Family::Llama),
    ("mistral", Family::Llama),
    ("qwen2", Family::Qwen2),
    ("qwen3", Family::Qwen3),
    ("qwen", Family::QwenChat),
];

impl Family {
    pub fn from_architecture(name: &str) -> Option<Family> {
        SUPPORTED.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    pub fn supported_names() -> Vec<&'static str> {
        SUPPORTED.iter().map(|(n, _)| *n).filter(|n| n.chars().any(char::is_uppercase)).collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::QwenChat => "qwen-chat",
            Family::Bloom => "bloom",
        }
    }

    pub fn spec(self) -> ArchSpec {
        let llama_like = ArchSpec {
            family: self,
            norm: NormKind::Rms,
            position: PositionKind::Rope,
            mlp: MlpKind::SwiGlu,
            embed: "model.embed_tokens.weight",
            final_norm: "model.norm.weight",
            lm_head: "lm_head.weight",
            layer_prefix: "model.layers.{}.",
            layer_names: LLAMA_LAYER_NAMES,
            fused_qkv: false,
            qkv_interleaved: false,
            embed_norm: None,
            final_norm_bias: None,
        };
        match self {
            Family::Llama | Family::Qwen2 | Family::Qwen3 => llama_like,
            Family::QwenChat => ArchSpec {
                embed: "transformer.wte.weight",
                final_norm: "transformer.ln_f.weight",
                layer_prefix: "transformer.h.{}.",
                layer_names: QWEN_CHAT_LAYER_NAMES,
                fused_qkv: true,
                ..llama_like
            },
            Family::Bloom => ArchSpec {
                norm: NormKind::Layer,
                position: PositionKind::Alibi,
                mlp: MlpKind::GeluTanh,
                embed: "transformer.word_embeddings.weight",
                final_norm: "transformer.ln_f.weight",
                final_norm_bias: Some("transformer.ln_f.bias"),
                embed_norm: Some(("transformer.word_embeddings_layernorm.weight", "transformer.word_embeddings_layernorm.bias")),
                layer_prefix: "transformer.h.{}.",
                layer_names: BLOOM_LAYER_NAMES,
                fused_qkv: true,
                qkv_interleaved: true,
                ..llama_like
            },
        }
    }
}

/// One tensor the checkpoint must (or may) hold.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ArchSpec {
    pub fn layer_tensor_name(&self, role: LayerTensor, layer: usize) -> String {
        let suffix = self
            .layer_names
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, s)| *s)
            .unwrap_or_else(|| unreachable!("every family names every role it uses"));
        format!("{}{}", self.layer_prefix.replace("{}", &layer.to_string()), suffix)
    }

    /// Shape of a layer tensor, or None when this config does not use it.
    pub fn layer_tensor_shape(&self, role: LayerTensor, c: &ModelConfig) -> Option<Vec<usize>> {
        let (h, q, kv, i) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        use LayerTensor::*;
        let fused = self.fused_qkv;
        let gelu = self.mlp == MlpKind::GeluTanh;
        let shape = match role {
            AttnNorm | MlpNorm => vec![h],
            AttnNormBias | MlpNormBias if self.norm == NormKind::Layer => vec![h],
            Gate | GateBias if gelu => return None,
            Qkv if fused => vec![q + 2 * kv, h],
            QkvBias if fused && c.qkv_bias => vec![q + 2 * kv],
            Q if !fused => vec![q, h],
            K | V if !fused => vec![kv, h],
            QBias if !fused && c.qkv_bias => vec![q],
            KBias | VBias if !fused && c.qkv_bias => vec![kv],
            QNorm | KNorm if c.qk_norm => vec![c.head_dim],
            O => vec![h, q],
            Gate | Up => vec![i, h],
            Down => vec![h, i],
            OBias if c.o_bias => vec![h],
            GateBias | UpBias if c.mlp_bias => vec![i],
            DownBias if c.mlp_bias => vec![h],
            _ => return None,
        };
        Some(shape)
    }

    /// Every tensor a checkpoint of this config must hold, in load order.
    /// Rows of the matrix the MLP's input goes through: gate and up stacked (SwiGLU), or the up
    /// projection alone (GELU).
    pub fn mlp_input_rows(&self, c: &ModelConfig) -> usize {
        match self.mlp {
            MlpKind::SwiGlu => 2 * c.intermediate_size,
            MlpKind::GeluTanh => c.intermediate_size,
        }
    }

    /// Elements of one decoder layer's weight matrices (its 2-D tensors): the multiply-adds each
    /// token costs in that layer's projections.
    pub fn layer_matrix_elements(&self, c: &ModelConfig) -> usize {
        let roles = self.layer_names.iter().filter_map(|(role, _)| self.layer_tensor_shape(*role, c));
        roles.filter(|shape| shape.len() == 2).map(|shape| shape.iter().product::<usize>()).sum()
    }

    pub fn expected_tensors(&self, c: &ModelConfig) -> Vec<ExpectedTensor> {
        let mut out = vec![ExpectedTensor { name: self.embed.into(), shape: vec![c.vocab_size, c.hidden_size] }];
        for layer in 0..c.num_layers {
            for (role, _) in self.layer_names {
                if let Some(shape) = self.layer_tensor_shape(*role, c) {
                    out.push(ExpectedTensor { name: self.layer_tensor_name(*role, layer), shape });
                }
            }
        }
        if let Some((w, b)) = self.embed_norm {
            out.push(ExpectedTensor { name: w.into(), shape: vec![c.hidden_size] });
            out.push(ExpectedTensor { name: b.into(), shape: vec![c.hidden_size] });
        }
        out.push(ExpectedTensor { name: self.final_norm.into(), shape: vec![c.hidden_size] });
        if let Some(b) = self.final_norm_bias {
            out.push(ExpectedTensor { name: b.into(), shape: vec![c.hidden_size] });
        }
        if !c.tie_word_embeddings {
            out.push(ExpectedTensor { name: self.lm_head.into(), shape: vec![c.vocab_size, c.hidden_size] });
        }
        out
    }
}

/// ALiBi slopes as BLOOM computes them: for the largest power of two p ≤ n, 2^(-8i/p) for
/// i = 1..p, then for the remaining heads the odd powers of 2^(-4/p).
pub fn alibi_slopes(n: usize) -> Vec<f32> {
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let base = 2f64.powf(-8.0 / p as f64);
    let mut out: Vec<f32> = (1..=p).map(|i| base.powi(i as i32) as f32).collect();
    if p != n {
        let extra = 2f64.powf(-4.0 / p as f64);
        out.extend((0..(n - p).min(p)).map(|i| extra.powi(2 * i as i32 + 1) as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn alibi_slopes_match_bloom() {
        assert_eq!(super::alibi_slopes(4), vec![0.25, 0.0625, 0.015625, 0.00390625]);
        // 5 heads: the power-of-two slopes of 4, then 2^(-4/4)^1.
        assert_eq!(super::alibi_slopes(5), vec![0.25, 0.0625, 0.015625, 0.00390625, 0.5]);
        assert_eq!(super::alibi_slopes(6)[4..], [0.5, 0.125]);
    }
}
