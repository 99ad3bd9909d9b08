//! Model directories: config, weights, tokenizer and chat template.
pub mod arch;
pub mod config;
pub mod tokenizer;
pub mod weights;

use crate::backend::Backend;
use crate::error::{Error, Result};
use arch::{ArchSpec, LayerTensor};
use config::ModelConfig;
use std::path::{Path, PathBuf};
use tokenizer::TextTokenizer;
use weights::WeightStore;

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
    pub q: B::Matrix,
    pub k: B::Matrix,
    pub v: B::Matrix,
    pub o: B::Matrix,
    pub q_bias: Option<B::Vector>,
    pub k_bias: Option<B::Vector>,
    pub v_bias: Option<B::Vector>,
    pub o_bias: Option<B::Vector>,
    pub mlp_norm: B::Vector,
    pub gate: B::Matrix,
    pub up: B::Matrix,
    pub down: B::Matrix,
    pub gate_bias: Option<B::Vector>,
    pub up_bias: Option<B::Vector>,
    pub down_bias: Option<B::Vector>,
}

/// The weights as a backend holds them.
pub struct ModelWeights<B: Backend> {
    pub embed: B::Matrix,
    pub layers: Vec<LayerWeights<B>>,
    pub final_norm: B::Vector,
    /// None when tied to the embeddings.
    pub lm_head: Option<B::Matrix>,
}

impl<B: Backend> ModelWeights<B> {
    pub fn load(be: &B, m: &ModelDir) -> Result<Self> {
        let c = &m.config;
        let spec = &m.spec;
        let matrix = |name: &str, rows: usize, cols: usize| be.matrix(m.store.f32(name, &[rows, cols])?, rows, cols);
        let layer_matrix = |role: LayerTensor, l: usize| -> Result<B::Matrix> {
            let shape = spec.layer_tensor_shape(role, c).unwrap_or_default();
            matrix(&spec.layer_tensor_name(role, l), shape[0], shape[1])
        };
        let layer_vector = |role: LayerTensor, l: usize| -> Result<Option<B::Vector>> {
            match spec.layer_tensor_shape(role, c) {
                None => Ok(None),
                Some(shape) => Ok(Some(be.vector(m.store.f32(&spec.layer_tensor_name(role, l), &shape)?)?)),
            }
        };
        let required = |role: LayerTensor, l: usize| -> Result<B::Vector> {
            layer_vector(role, l)?.ok_or_else(|| Error::model(format!("{role:?} is required")))
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            use LayerTensor::*;
            layers.push(LayerWeights {
                attn_norm: required(AttnNorm, l)?,
                q: layer_matrix(Q, l)?,
                k: layer_matrix(K, l)?,
                v: layer_matrix(V, l)?,
                o: layer_matrix(O, l)?,
                q_bias: layer_vector(QBias, l)?,
                k_bias: layer_vector(KBias, l)?,
                v_bias: layer_vector(VBias, l)?,
                o_bias: layer_vector(OBias, l)?,
                mlp_norm: required(MlpNorm, l)?,
                gate: layer_matrix(Gate, l)?,
                up: layer_matrix(Up, l)?,
                down: layer_matrix(Down, l)?,
                gate_bias: layer_vector(GateBias, l)?,
                up_bias: layer_vector(UpBias, l)?,
                down_bias: layer_vector(DownBias, l)?,
            });
        }
        Ok(ModelWeights {
            embed: matrix(spec.embed, c.vocab_size, c.hidden_size)?,
            layers,
            final_norm: be.vector(m.store.f32(spec.final_norm, &[c.hidden_size])?)?,
            lm_head: if c.tie_word_embeddings {
                None
            } else {
                Some(matrix(spec.lm_head, c.vocab_size, c.hidden_size)?)
            },
        })
    }

    pub fn lm_head(&self) -> &B::Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
