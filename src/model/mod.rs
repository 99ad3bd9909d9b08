//! Model directories: config, weights, tokenizer and chat template.
pub mod arch;
pub mod config;
pub mod tiktoken;
pub mod tokenizer;
pub mod weights;

use crate::backend::Backend;
use crate::error::{Error, Result};
use arch::{ArchSpec, LayerTensor, MlpKind};
use config::ModelConfig;
use std::path::{Path, PathBuf};
use tokenizer::TextTokenizer;
use weights::{MatrixSource, RawTensor, SourcePart, WeightStore};

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
        let config = open_config(dir)?;
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

/// The checks of a model directory and its parsed `config.json`.
fn open_config(dir: &Path) -> Result<ModelConfig> {
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
    ModelConfig::from_file(&config_path)
}

/// The tokenizer of a model directory, without opening its weights (`resid tokenize` works on
/// a directory with `config.json` and a tokenizer alone).
pub fn open_tokenizer(dir: &Path) -> Result<(ModelConfig, TextTokenizer)> {
    let config = open_config(dir)?;
    let tokenizer = TextTokenizer::open(dir)?
        .ok_or_else(|| Error::model(format!("{}: no tokenizer.json or qwen.tiktoken in the model directory", dir.display())))?;
    Ok((config, tokenizer))
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

impl<B: Backend> ModelWeights<B> {
    pub fn load(be: &B, m: &ModelDir) -> Result<Self> {
        let c = &m.config;
        let spec = &m.spec;
        let h = c.hidden_size;
        let tensor = |role: LayerTensor, l: usize| -> Result<Option<RawTensor>> {
            match spec.layer_tensor_shape(role, c) {
                None => Ok(None),
                Some(shape) => Ok(Some(m.store.raw(&spec.layer_tensor_name(role, l), &shape)?)),
            }
        };
        let required = |role: LayerTensor, l: usize| -> Result<RawTensor> {
            tensor(role, l)?.ok_or_else(|| Error::model(format!("{}: {role:?} is required", spec.layer_tensor_name(role, l))))
        };
        // Matrices go to the backend as stored (it converts in the precision it keeps);
        // vectors are small and go as f32.
        let vector = |t: Option<RawTensor>| t.map(|t| be.vector(t.to_f32())).transpose();
        let matrix = |role: LayerTensor, l: usize| -> Result<B::Matrix> {
            let t = required(role, l)?;
            match spec.layer_tensor_shape(role, c).as_deref() {
                Some(&[rows, cols]) => be.weight_matrix(&MatrixSource::single(t, rows, cols)?),
                _ => Err(Error::model(format!("{}: {role:?} is not a matrix", spec.layer_tensor_name(role, l)))),
            }
        };
        // Stacked matrices; a stacked bias exists when any part has one (missing parts are zero).
        let stacked = |roles: &[LayerTensor], l: usize| -> Result<B::Matrix> {
            let parts = roles.iter().map(|&r| Ok(SourcePart::Stored(required(r, l)?))).collect::<Result<Vec<_>>>()?;
            be.weight_matrix(&MatrixSource::stacked(parts, h)?)
        };
        let stacked_bias = |biases: &[(LayerTensor, usize)], l: usize| -> Result<Option<B::Vector>> {
            let mut any = false;
            let mut parts = Vec::new();
            for &(r, len) in biases {
                match tensor(r, l)? {
                    Some(t) => {
                        any = true;
                        parts.push(SourcePart::Stored(t));
                    }
                    None => parts.push(SourcePart::Zeros(len)),
                }
            }
            if any { Ok(Some(be.vector(MatrixSource::stacked(parts, 1)?.to_f32())?)) } else { Ok(None) }
        };
        let (qd, kvd, inter) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            use LayerTensor::*;
            layers.push(LayerWeights {
                attn_norm: be.vector(required(AttnNorm, l)?.to_f32())?,
                qkv: match (spec.fused_qkv, spec.qkv_interleaved) {
                    (true, true) => be.weight_matrix(&MatrixSource::interleaved_qkv(required(Qkv, l)?, c.num_heads, c.head_dim, h)?)?,
                    (true, false) => matrix(Qkv, l)?,
                    (false, _) => stacked(&[Q, K, V], l)?,
                },
                qkv_bias: if spec.fused_qkv && spec.qkv_interleaved {
                    tensor(QkvBias, l)?
                        .map(|t| be.vector(MatrixSource::interleaved_qkv(t, c.num_heads, c.head_dim, 1)?.to_f32()))
                        .transpose()?
                } else if spec.fused_qkv {
                    vector(tensor(QkvBias, l)?)?
                } else {
                    stacked_bias(&[(QBias, qd), (KBias, kvd), (VBias, kvd)], l)?
                },
                q_norm: vector(tensor(QNorm, l)?)?,
                k_norm: vector(tensor(KNorm, l)?)?,
                o: matrix(O, l)?,
                o_bias: vector(tensor(OBias, l)?)?,
                mlp_norm: be.vector(required(MlpNorm, l)?.to_f32())?,
                gate_up: match spec.mlp {
                    MlpKind::SwiGlu => stacked(&[Gate, Up], l)?,
                    MlpKind::GeluTanh => matrix(Up, l)?,
                },
                gate_up_bias: match spec.mlp {
                    MlpKind::SwiGlu => stacked_bias(&[(GateBias, inter), (UpBias, inter)], l)?,
                    MlpKind::GeluTanh => vector(tensor(UpBias, l)?)?,
                },
                attn_norm_bias: vector(tensor(AttnNormBias, l)?)?,
                mlp_norm_bias: vector(tensor(MlpNormBias, l)?)?,
                down: matrix(Down, l)?,
                down_bias: vector(tensor(DownBias, l)?)?,
            });
        }
        let embed_norm = match spec.embed_norm {
            Some((w, b)) => Some((be.vector(m.store.f32(w, &[h])?)?, be.vector(m.store.f32(b, &[h])?)?)),
            None => None,
        };
        let final_norm_bias = spec.final_norm_bias.map(|b| be.vector(m.store.f32(b, &[h])?)).transpose()?;
        Ok(ModelWeights {
            embed_norm,
            final_norm_bias,
            embed: be.matrix(&MatrixSource::single(m.store.raw(spec.embed, &[c.vocab_size, h])?, c.vocab_size, h)?)?,
            layers,
            final_norm: be.vector(m.store.f32(spec.final_norm, &[c.hidden_size])?)?,
            lm_head: if c.tie_word_embeddings {
                None
            } else {
                Some(be.matrix(&MatrixSource::single(m.store.raw(spec.lm_head, &[c.vocab_size, h])?, c.vocab_size, h)?)?)
            },
        })
    }

    pub fn lm_head(&self) -> &B::Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
