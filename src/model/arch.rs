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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    Rms,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionKind {
    Rope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MlpKind {
    /// down(silu(gate(x)) * up(x))
    SwiGlu,
}

/// The tensors a decoder layer may hold, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerTensor {
    AttnNorm,
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

/// Qwen-chat: `w1(x) * silu(w2(x))`, so w2 is the gate and w1 the up projection.
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
];

/// Architecture names accepted in `config.json`'s `architectures`, with their family.
const SUPPORTED: &[(&str, Family)] = &[
    ("LlamaForCausalLM", Family::Llama),
    ("MistralForCausalLM", Family::Llama),
    ("Qwen2ForCausalLM", Family::Qwen2),
    ("Qwen3ForCausalLM", Family::Qwen3),
    ("QWenLMHeadModel", Family::QwenChat),
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
        let shape = match role {
            AttnNorm | MlpNorm => vec![h],
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
    pub fn expected_tensors(&self, c: &ModelConfig) -> Vec<ExpectedTensor> {
        let mut out = vec![ExpectedTensor { name: self.embed.into(), shape: vec![c.vocab_size, c.hidden_size] }];
        for layer in 0..c.num_layers {
            for (role, _) in self.layer_names {
                if let Some(shape) = self.layer_tensor_shape(*role, c) {
                    out.push(ExpectedTensor { name: self.layer_tensor_name(*role, layer), shape });
                }
            }
        }
        out.push(ExpectedTensor { name: self.final_norm.into(), shape: vec![c.hidden_size] });
        if !c.tie_word_embeddings {
            out.push(ExpectedTensor { name: self.lm_head.into(), shape: vec![c.vocab_size, c.hidden_size] });
        }
        out
    }
}
