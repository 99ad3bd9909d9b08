//! `config.json` parsing into one normalised description, whatever the family's key names.
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

use super::arch::Family;

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF "linear").
    Linear { factor: f32 },
    /// Llama 3 frequency-dependent scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: f32 },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub family: Family,
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the Q, K and V projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm on Q and K before RoPE (Qwen3).
    pub qk_norm: bool,
    /// The residual stream continues from the normed value (BLOOM's
    /// `apply_residual_connection_post_layernorm`).
    pub post_ln_residual: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub torch_dtype: Option<String>,
}

/// Reads a text file of a model directory; invalid UTF-8 is a model error (exit 4), not I/O.
pub(crate) fn read_model_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(crate::io::strip_bom(&bytes).to_vec())
        .map_err(|e| Error::model(format!("{}: invalid UTF-8 at byte {}", path.display(), e.utf8_error().valid_up_to())))
}

struct Keys<'a> {
    obj: &'a serde_json::Map<String, Value>,
    file: &'a str,
}

impl Keys<'_> {
    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| Error::model(format!("{}: missing required key `{key}`", self.file)))
    }
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 && n < (1 << 40) => Ok(Some(n as usize)),
                _ => Err(Error::model(format!("{}: `{key}` must be a positive integer, got {v}", self.file))),
            },
        }
    }
    fn f32_opt(&self, key: &str) -> Result<Option<f32>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x as f32)),
                _ => Err(Error::model(format!("{}: `{key}` must be a number, got {v}", self.file))),
            },
        }
    }
    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Error::model(format!("{}: `{key}` must be true or false, got {v}", self.file))),
        }
    }
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| Error::model(format!("{}: `{key}` must be a token id or a list of them, got {v}", self.file));
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| n as u32).ok_or_else(|| bad(v)))
                .collect(),
            Some(v) => v.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| vec![n as u32]).ok_or_else(|| bad(v)),
        }
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = read_model_text(path)?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// `file` names the source in error messages.
    pub fn from_json_str(text: &str, file: &str) -> Result<Self> {
        let config = Self::parse_json(text, file)?;
        config.check_sizes(file)?;
        Ok(config)
    }

    fn parse_json(text: &str, file: &str) -> Result<Self> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let value: Value =
            serde_json::from_str(text).map_err(|e| Error::model(format!("{file}: invalid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| Error::model(format!("{file}: expected a JSON object")))?;
        let keys = Keys { obj, file };
        let architecture = obj
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .map(str::to_owned)
            .or_else(|| obj.get("model_type").and_then(|m| m.as_str()).map(str::to_owned))
            .ok_or_else(|| Error::model(format!("{file}: no `architectures` or `model_type` entry")))?;
        let family = Family::from_architecture(&architecture).ok_or_else(|| {
            Error::model(format!(
                "{file}: unsupported architecture `{architecture}`; supported: {}",
                Family::supported_names().join(", ")
            ))
        })?;

        if family == Family::QwenChat {
            return qwen_chat(&keys, architecture);
        }
        if family == Family::Bloom {
            return bloom(&keys, architecture);
        }
        let hidden_size = keys.usize_req("hidden_size")?;
        let num_heads = keys.usize_req("num_attention_heads")?;
        let num_kv_heads = keys.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = keys.usize_opt("head_dim")?.unwrap_or(hidden_size / num_heads);
        if obj.get("sliding_window").is_some_and(|v| !v.is_null())
            && obj.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(architecture == "MistralForCausalLM")
        {
            return Err(Error::model(format!("{file}: sliding-window attention is not supported; set `sliding_window` to null")));
        }
        // transformers 5 writes `rope_parameters`; older configs `rope_scaling` (often null).
        let rope_scaling = match obj.get("rope_parameters").filter(|v| v.is_object()) {
            Some(params) => parse_rope_scaling(Some(params), file)?,
            None => parse_rope_scaling(obj.get("rope_scaling"), file)?,
        };
        let rope_theta = match keys.f32_opt("rope_theta")? {
            Some(t) => t,
            None => obj
                .get("rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .map(|t| t as f32)
                .unwrap_or(10000.0),
        };
        let attention_bias = keys.bool_opt("attention_bias")?.unwrap_or(false);
        let config = ModelConfig {
            family,
            architecture,
            vocab_size: keys.usize_req("vocab_size")?,
            hidden_size,
            intermediate_size: keys.usize_req("intermediate_size")?,
            num_layers: keys.usize_req("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            norm_eps: keys.f32_opt("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: keys.usize_opt("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: keys.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            // Qwen2 always has Q/K/V biases and never an output bias.
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family != Family::Qwen2 && attention_bias,
            mlp_bias: keys.bool_opt("mlp_bias")?.unwrap_or(false),
            qk_norm: family == Family::Qwen3,
            post_ln_residual: false,
            bos_token_id: keys.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: keys.token_ids("eos_token_id")?,
            torch_dtype: obj
                .get("torch_dtype")
                .or_else(|| obj.get("dtype"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        config.validate(file)?;
        Ok(config)
    }
}

/// Most decoder layers a config may declare (the largest published models have under 200).
pub const MAX_LAYERS: usize = 4096;

impl ModelConfig {
    /// Sizes every family must satisfy: no zero dimension, a bounded layer count, and tensor
    /// shapes whose element counts (and their total) fit in `usize`, so that no later product
    /// of config values can overflow.
    fn check_sizes(&self, file: &str) -> Result<()> {
        for (name, v) in [("head dimension", self.head_dim), ("intermediate size", self.intermediate_size)] {
            if v == 0 {
                return Err(Error::model(format!("{file}: the {name} works out to 0")));
            }
        }
        if self.num_layers > MAX_LAYERS {
            return Err(Error::model(format!("{file}: {} layers; at most {MAX_LAYERS} are supported", self.num_layers)));
        }
        let overflow = || Error::model(format!("{file}: tensor sizes overflow (hidden, heads, head_dim, vocabulary or layers too large)"));
        let q = self.num_heads.checked_mul(self.head_dim).ok_or_else(overflow)?;
        let kv = self.num_kv_heads.checked_mul(self.head_dim).ok_or_else(overflow)?;
        kv.checked_mul(2).and_then(|k| k.checked_add(q)).ok_or_else(overflow)?;
        let mut total = 0usize;
        for t in self.family.spec().expected_tensors(self) {
            let n = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(overflow)?;
            total = total.checked_add(n).ok_or_else(overflow)?;
        }
        Ok(())
    }

    fn validate(&self, file: &str) -> Result<()> {
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::model(format!(
                "{file}: num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::model(format!("{file}: head_dim ({}) must be even for rotary embeddings", self.head_dim)));
        }
        Ok(())
    }
}

/// Qwen-chat's own config keys (`kv_channels`, `layer_norm_epsilon`, `rotary_emb_base`,
/// `seq_length`; `intermediate_size` counts both MLP halves).
fn qwen_chat(keys: &Keys, architecture: String) -> Result<ModelConfig> {
    let file = keys.file;
    let obj = keys.obj;
    let hidden_size = keys.usize_req("hidden_size")?;
    let num_heads = keys.usize_req("num_attention_heads")?;
    if let Some(pct) = keys.f32_opt("rotary_pct")? {
        if pct != 1.0 {
            return Err(Error::model(format!("{file}: rotary_pct {pct} is not supported (only 1.0)")));
        }
    }
    // QWenAttention splits c_attn's output at hidden_size into heads of hidden_size / heads, so a
    // kv_channels that disagrees with that cannot be run by the model's own code either.
    let head_dim = keys.usize_opt("kv_channels")?.unwrap_or(hidden_size / num_heads);
    if head_dim.checked_mul(num_heads) != Some(hidden_size) {
        return Err(Error::model(format!(
            "{file}: kv_channels ({head_dim}) × num_attention_heads ({num_heads}) must equal hidden_size ({hidden_size}) for QWenLMHeadModel"
        )));
    }
    let inter2 = keys.usize_req("intermediate_size")?;
    // Dynamic NTK and log-n scaling act only beyond seq_length: longer inputs are refused.
    let seq_length = keys.usize_opt("seq_length")?.or(keys.usize_opt("max_position_embeddings")?).unwrap_or(2048);
    // QWenAttention and QWenMLP build c_proj, w1, w2 and the MLP's c_proj with `bias=not no_bias`.
    let biases = !keys.bool_opt("no_bias")?.unwrap_or(true);
    // Qwen's precision flags: its modelling code asserts that at most one is set and then casts
    // the weights; resid computes from the weights as stored and takes the flag as their dtype.
    let mut flagged = Vec::new();
    for (flag, dtype) in [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")] {
        if keys.bool_opt(flag)?.unwrap_or(false) {
            flagged.push((flag, dtype));
        }
    }
    if flagged.len() > 1 {
        let names: Vec<&str> = flagged.iter().map(|f| f.0).collect();
        return Err(Error::model(format!("{file}: only one of `bf16`, `fp16` and `fp32` may be true, got {}", names.join(" and "))));
    }
    let torch_dtype = obj
        .get("torch_dtype")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| flagged.first().map(|f| f.1.to_owned()));
    let config = ModelConfig {
        family: Family::QwenChat,
        architecture,
        vocab_size: keys.usize_req("vocab_size")?,
        hidden_size,
        intermediate_size: inter2 / 2,
        num_layers: keys.usize_req("num_hidden_layers")?,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        norm_eps: keys.f32_opt("layer_norm_epsilon")?.unwrap_or(1e-6),
        rope_theta: keys.f32_opt("rotary_emb_base")?.unwrap_or(10000.0),
        rope_scaling: RopeScaling::None,
        max_position_embeddings: seq_length,
        tie_word_embeddings: keys.bool_opt("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias: true,
        o_bias: biases,
        mlp_bias: biases,
        qk_norm: false,
        post_ln_residual: false,
        bos_token_id: keys.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: keys.token_ids("eos_token_id")?,
        torch_dtype,
    };
    config.validate(file)?;
    Ok(config)
}

/// BLOOM's keys (`n_layer`, `n_head`, `layer_norm_epsilon`; hidden size may be `n_embed`).
fn bloom(keys: &Keys, architecture: String) -> Result<ModelConfig> {
    let file = keys.file;
    let hidden_size = match keys.usize_opt("hidden_size")? {
        Some(h) => h,
        None => keys.usize_req("n_embed")?,
    };
    let num_heads = match keys.usize_opt("n_head")? {
        Some(n) => n,
        None => keys.usize_req("num_attention_heads")?,
    };
    let num_layers = match keys.usize_opt("n_layer")? {
        Some(n) => n,
        None => keys.usize_req("num_hidden_layers")?,
    };
    if hidden_size % num_heads != 0 {
        return Err(Error::model(format!("{file}: hidden size {hidden_size} is not a multiple of n_head {num_heads}")));
    }
    let config = ModelConfig {
        family: Family::Bloom,
        architecture,
        vocab_size: keys.usize_req("vocab_size")?,
        hidden_size,
        intermediate_size: 4 * hidden_size,
        num_layers,
        num_heads,
        num_kv_heads: num_heads,
        head_dim: hidden_size / num_heads,
        norm_eps: keys.f32_opt("layer_norm_epsilon")?.unwrap_or(1e-5),
        rope_theta: 0.0,
        rope_scaling: RopeScaling::None,
        // ALiBi has no trained context limit; this bounds memory, not the model.
        max_position_embeddings: keys.usize_opt("seq_length")?.unwrap_or(1 << 16),
        tie_word_embeddings: keys.bool_opt("tie_word_embeddings")?.unwrap_or(true),
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        qk_norm: false,
        post_ln_residual: keys.bool_opt("apply_residual_connection_post_layernorm")?.unwrap_or(false),
        bos_token_id: keys.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: keys.token_ids("eos_token_id")?,
        torch_dtype: keys.obj.get("torch_dtype").and_then(Value::as_str).map(str::to_owned),
    };
    Ok(config)
}

fn parse_rope_scaling(value: Option<&Value>, file: &str) -> Result<RopeScaling> {
    let Some(obj) = value.and_then(Value::as_object) else {
        return Ok(RopeScaling::None);
    };
    let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f32> {
        obj.get(key)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| Error::model(format!("{file}: rope_scaling of type `{kind}` needs a positive number `{key}`")))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(Error::model(format!(
            "{file}: rope_scaling type `{other}` is not supported (supported: default, linear, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":100,
        "rms_norm_eps":1e-5,"rope_theta":500000.0,"eos_token_id":[1,2],
        "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;

    #[test]
    fn parses_llama3() {
        let c = ModelConfig::from_json_str(LLAMA, "config.json").unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_kv_heads, 2);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { .. }));
    }

    #[test]
    fn rejects_unknown_architecture_listing_supported() {
        let text = LLAMA.replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
        let err = ModelConfig::from_json_str(&text, "x/config.json").unwrap_err().to_string();
        assert!(err.contains("x/config.json") && err.contains("GPTNeoXForCausalLM") && err.contains("LlamaForCausalLM"), "{err}");
    }

    #[test]
    fn rejects_bad_values() {
        let text = LLAMA.replace("\"hidden_size\":64", "\"hidden_size\":-3");
        let err = ModelConfig::from_json_str(&text, "c.json").unwrap_err().to_string();
        assert!(err.contains("hidden_size"), "{err}");
        assert!(ModelConfig::from_json_str("{", "c.json").unwrap_err().to_string().contains("invalid JSON"));
        let text = LLAMA.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        assert!(ModelConfig::from_json_str(&text, "c.json").is_err());
    }

    /// Sizes that once exhausted memory (a tensor list of 2^39 layers) or overflowed.
    #[test]
    fn rejects_impossible_sizes() {
        let cases: [(&[(&str, &str)], &str); 3] = [
            (&[("\"num_hidden_layers\":2", "\"num_hidden_layers\":549755813888")], "at most 4096"),
            (&[("\"vocab_size\":100", "\"vocab_size\":549755813888"), ("\"hidden_size\":64", "\"hidden_size\":549755813888")], "overflow"),
            (&[("\"num_attention_heads\":4", "\"num_attention_heads\":128")], "head dimension works out to 0"),
        ];
        for (edits, needle) in cases {
            let text = edits.iter().fold(LLAMA.to_string(), |t, (from, to)| t.replace(from, to));
            let err = ModelConfig::from_json_str(&text, "c.json").unwrap_err();
            assert!(err.to_string().contains(needle) && err.exit_code() == 4, "{edits:?}: {err}");
        }
    }

    const QWEN_CHAT: &str = r#"{"architectures":["QWenLMHeadModel"],"hidden_size":64,"intermediate_size":192,
        "num_hidden_layers":2,"num_attention_heads":4,"kv_channels":16,"vocab_size":100,"layer_norm_epsilon":1e-6,
        "rotary_emb_base":10000,"rotary_pct":1.0,"seq_length":512,"no_bias":true}"#;

    #[test]
    fn qwen_chat_biases_follow_no_bias_and_kv_channels_must_fit() {
        let c = ModelConfig::from_json_str(QWEN_CHAT, "c.json").unwrap();
        assert_eq!((c.head_dim, c.intermediate_size, c.qkv_bias, c.o_bias, c.mlp_bias), (16, 96, true, false, false));
        let c = ModelConfig::from_json_str(&QWEN_CHAT.replace("\"no_bias\":true", "\"no_bias\":false"), "c.json").unwrap();
        assert!(c.qkv_bias && c.o_bias && c.mlp_bias);
        let err = ModelConfig::from_json_str(&QWEN_CHAT.replace("\"kv_channels\":16", "\"kv_channels\":32"), "c.json").unwrap_err();
        assert!(err.to_string().contains("kv_channels (32) × num_attention_heads (4) must equal hidden_size (64)") && err.exit_code() == 4, "{err}");
    }

    /// Qwen-7B-Chat's own config.json (every key as published), then its precision flags.
    const QWEN_7B_CHAT: &str = r#"{"architectures":["QWenLMHeadModel"],"auto_map":{"AutoConfig":"configuration_qwen.QWenConfig",
        "AutoModelForCausalLM":"modeling_qwen.QWenLMHeadModel"},"attn_dropout_prob":0.0,"bf16":false,"emb_dropout_prob":0.0,
        "fp16":false,"fp32":false,"hidden_size":4096,"intermediate_size":22016,"initializer_range":0.02,"kv_channels":128,
        "layer_norm_epsilon":1e-06,"max_position_embeddings":8192,"model_type":"qwen","no_bias":true,"num_attention_heads":32,
        "num_hidden_layers":32,"onnx_safe":null,"rotary_emb_base":10000,"rotary_pct":1.0,"scale_attn_weights":true,
        "seq_length":8192,"softmax_in_fp32":false,"tie_word_embeddings":false,"tokenizer_class":"QWenTokenizer",
        "transformers_version":"4.32.0","use_cache":true,"use_cache_kernel":false,"use_cache_quantization":false,
        "use_dynamic_ntk":true,"use_flash_attn":"auto","use_logn_attn":true,"vocab_size":151936}"#;

    #[test]
    fn qwen_7b_chat_config_and_its_precision_flags() {
        let c = ModelConfig::from_json_str(QWEN_7B_CHAT, "c.json").unwrap();
        assert_eq!((c.family, c.hidden_size, c.intermediate_size, c.head_dim, c.vocab_size), (Family::QwenChat, 4096, 11008, 128, 151936));
        assert_eq!((c.max_position_embeddings, c.torch_dtype.as_deref()), (8192, None));
        for (flag, dtype) in [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")] {
            let text = QWEN_7B_CHAT.replace(&format!("\"{flag}\":false"), &format!("\"{flag}\":true"));
            assert_eq!(ModelConfig::from_json_str(&text, "c.json").unwrap().torch_dtype.as_deref(), Some(dtype), "{flag}");
        }
        // torch_dtype, when given, names the stored dtype.
        let text = QWEN_7B_CHAT.replace("\"bf16\":false", "\"bf16\":true,\"torch_dtype\":\"float32\"");
        assert_eq!(ModelConfig::from_json_str(&text, "c.json").unwrap().torch_dtype.as_deref(), Some("float32"));
        let text = QWEN_7B_CHAT.replace("\"bf16\":false", "\"bf16\":true").replace("\"fp16\":false", "\"fp16\":true");
        let err = ModelConfig::from_json_str(&text, "c.json").unwrap_err();
        assert_eq!(err.to_string(), "c.json: only one of `bf16`, `fp16` and `fp32` may be true, got bf16 and fp16");
        let err = ModelConfig::from_json_str(&QWEN_7B_CHAT.replace("\"bf16\":false", "\"bf16\":\"yes\""), "c.json").unwrap_err();
        assert!(err.to_string().contains("`bf16` must be true or false"), "{err}");
    }
}
