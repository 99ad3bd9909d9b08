//! Model directories: config, weights, tokenizer and chat template.
pub mod arch;
pub mod config;
pub mod tokenizer;
pub mod weights;

use crate::backend::Backend;
use crate::error::{Error, Result};
use arch::{ArchSpec, LayerTensor, MlpKind};
use config::ModelConfig;
use std::path::{Path, PathBuf};
use tokenizer::TextTokenizer;
use weights::{F32Data, WeightStore};

/// A checked model directory: everything but the backend's copy of the weights.
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub spec: ArchSpec,
    pub store: WeightStore,
    pub tokenizer: Option<TextTokenizer>,
}

impl ModelDir {
    /// Opens a Hugging Face model directory and checks every expected tensor before any compute.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.exists() {
            return Err(Error::model(format!("{}: no such model directory", dir.display())));
        }
        if !dir.is_dir() {
            return Err(Error::model(format!("{}: not a directory (expected a Hugging Face model directory)", dir.display())));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::model(format!("{}: no config.json in the model directory", dir.display())));
        }
        let config = ModelConfig::from_file(&config_path)?;
        let spec = config.family.spec();
        let store = WeightStore::open(dir)?;
        store.check(&spec.expected_tensors(&config))?;
        let tokenizer = TextTokenizer::open(dir)?;
        Ok(ModelDir { dir: dir.to_owned(), config, spec, store, tokenizer })
    }

    pub fn parameter_count(&self) -> usize {
        self.spec.expected_tensors(&self.config).iter().map(|t| t.shape.iter().product::<usize>()).sum()
    }
}

pub struct LayerWeights<B: Backend> {
    pub attn_norm: B::Vector,
    /// LayerNorm biases (BLOOM).
    pub attn_norm_bias: Option<B::Vector>,
    pub mlp_norm_bias: Option<B::Vector>,
    /// Q, K and V projections stacked into one `[(nq + 2·nkv)·hd, H]` matrix (one GEMM).
    pub qkv: B::Matrix,
    pub qkv_bias: Option<B::Vector>,
    /// Per-head RMSNorm weights for Q and K (Qwen3).
    pub q_norm: Option<B::Vector>,
    pub k_norm: Option<B::Vector>,
    pub o: B::Matrix,
    pub o_bias: Option<B::Vector>,
    pub mlp_norm: B::Vector,
    /// Gate and up projections stacked into one `[2·I, H]` matrix (one GEMM); for a GELU MLP
    /// the up projection alone.
    pub gate_up: B::Matrix,
    pub gate_up_bias: Option<B::Vector>,
    pub down: B::Matrix,
    pub down_bias: Option<B::Vector>,
}

/// The weights as a backend holds them.
pub struct ModelWeights<B: Backend> {
    pub embed: B::Matrix,
    /// LayerNorm (weight, bias) on the embeddings (BLOOM).
    pub embed_norm: Option<(B::Vector, B::Vector)>,
    pub final_norm_bias: Option<B::Vector>,
    pub layers: Vec<LayerWeights<B>>,
    pub final_norm: B::Vector,
    /// None when tied to the embeddings.
    pub lm_head: Option<B::Matrix>,
}

/// Reorders a fused QKV tensor whose rows are interleaved per head (`[heads, 3, head_dim, ..]`)
/// into stacked `[q; k; v]` rows. `row_len` is 1 for a bias.
fn deinterleave_qkv(data: &[f32], heads: usize, head_dim: usize, row_len: usize) -> F32Data {
    let block = head_dim * row_len;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for part in 0..3 {
            let src = (h * 3 + part) * block;
            let dst = (part * heads + h) * block;
            out[dst..dst + block].copy_from_slice(&data[src..src + block]);
        }
    }
    F32Data::Owned(out)
}

/// Stacks tensors along their first axis into one owned buffer.
fn stack(parts: Vec<F32Data>) -> F32Data {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in &parts {
        out.extend_from_slice(p);
    }
    F32Data::Owned(out)
}

impl<B: Backend> ModelWeights<B> {
    pub fn load(be: &B, m: &ModelDir) -> Result<Self> {
        let c = &m.config;
        let spec = &m.spec;
        let tensor = |role: LayerTensor, l: usize| -> Result<Option<(F32Data, Vec<usize>)>> {
            match spec.layer_tensor_shape(role, c) {
                None => Ok(None),
                Some(shape) => Ok(Some((m.store.f32(&spec.layer_tensor_name(role, l), &shape)?, shape))),
            }
        };
        let required = |role: LayerTensor, l: usize| -> Result<(F32Data, Vec<usize>)> {
            tensor(role, l)?.ok_or_else(|| Error::model(format!("{}: {role:?} is required", spec.layer_tensor_name(role, l))))
        };
        let matrix = |(data, shape): (F32Data, Vec<usize>)| be.weight_matrix(data, shape[0], shape[1]);
        let vector = |t: Option<(F32Data, Vec<usize>)>| t.map(|(d, _)| be.vector(d)).transpose();
        // Stacked matrices; a stacked bias exists when any part has one (missing parts are zero).
        let stacked = |roles: &[LayerTensor], l: usize| -> Result<B::Matrix> {
            let mut rows = 0;
            let mut parts = Vec::new();
            for &r in roles {
                let (d, shape) = required(r, l)?;
                rows += shape[0];
                parts.push(d);
            }
            be.weight_matrix(stack(parts), rows, c.hidden_size)
        };
        let stacked_bias = |biases: &[(LayerTensor, usize)], l: usize| -> Result<Option<B::Vector>> {
            let mut any = false;
            let mut parts = Vec::new();
            for &(r, len) in biases {
                match tensor(r, l)? {
                    Some((d, _)) => {
                        any = true;
                        parts.push(d);
                    }
                    None => parts.push(F32Data::Owned(vec![0.0; len])),
                }
            }
            if any { Ok(Some(be.vector(stack(parts))?)) } else { Ok(None) }
        };
        let (qd, kvd, inter) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            use LayerTensor::*;
            layers.push(LayerWeights {
                attn_norm: be.vector(required(AttnNorm, l)?.0)?,
                qkv: match (spec.fused_qkv, spec.qkv_interleaved) {
                    (true, true) => {
                        let (d, shape) = required(Qkv, l)?;
                        be.weight_matrix(deinterleave_qkv(&d, c.num_heads, c.head_dim, c.hidden_size), shape[0], shape[1])?
                    }
                    (true, false) => matrix(required(Qkv, l)?)?,
                    (false, _) => stacked(&[Q, K, V], l)?,
                },
                qkv_bias: if spec.fused_qkv && spec.qkv_interleaved {
                    tensor(QkvBias, l)?.map(|(d, _)| be.vector(deinterleave_qkv(&d, c.num_heads, c.head_dim, 1))).transpose()?
                } else if spec.fused_qkv {
                    vector(tensor(QkvBias, l)?)?
                } else {
                    stacked_bias(&[(QBias, qd), (KBias, kvd), (VBias, kvd)], l)?
                },
                q_norm: vector(tensor(QNorm, l)?)?,
                k_norm: vector(tensor(KNorm, l)?)?,
                o: matrix(required(O, l)?)?,
                o_bias: vector(tensor(OBias, l)?)?,
                mlp_norm: be.vector(required(MlpNorm, l)?.0)?,
                gate_up: match spec.mlp {
                    MlpKind::SwiGlu => stacked(&[Gate, Up], l)?,
                    MlpKind::GeluTanh => matrix(required(Up, l)?)?,
                },
                gate_up_bias: match spec.mlp {
                    MlpKind::SwiGlu => stacked_bias(&[(GateBias, inter), (UpBias, inter)], l)?,
                    MlpKind::GeluTanh => vector(tensor(UpBias, l)?)?,
                },
                attn_norm_bias: vector(tensor(AttnNormBias, l)?)?,
                mlp_norm_bias: vector(tensor(MlpNormBias, l)?)?,
                down: matrix(required(Down, l)?)?,
                down_bias: vector(tensor(DownBias, l)?)?,
            });
        }
        let h = c.hidden_size;
        let embed_norm = match spec.embed_norm {
            Some((w, b)) => Some((be.vector(m.store.f32(w, &[h])?)?, be.vector(m.store.f32(b, &[h])?)?)),
            None => None,
        };
        let final_norm_bias = spec.final_norm_bias.map(|b| be.vector(m.store.f32(b, &[h])?)).transpose()?;
        Ok(ModelWeights {
            embed_norm,
            final_norm_bias,
            embed: be.matrix(m.store.f32(spec.embed, &[c.vocab_size, c.hidden_size])?, c.vocab_size, c.hidden_size)?,
            layers,
            final_norm: be.vector(m.store.f32(spec.final_norm, &[c.hidden_size])?)?,
            lm_head: if c.tie_word_embeddings {
                None
            } else {
                Some(be.matrix(m.store.f32(spec.lm_head, &[c.vocab_size, c.hidden_size])?, c.vocab_size, c.hidden_size)?)
            },
        })
    }

    pub fn lm_head(&self) -> &B::Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
