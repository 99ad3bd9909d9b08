//! candle-extract MODEL_DIR INPUT.jsonl OUT.json
//!
//! Runs every `text` line of INPUT through candle-transformers' Llama, one sentence at a time
//! (candle's Llama has no packed batches), f32 on the CPU, and writes tokens/s as JSON for
//! scripts/compare_hf.py. Candle's Llama returns last-position logits only, not hidden states:
//! this row is the cost of the forward pass, without capture.
use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
use std::io::BufRead;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, input, out] = args.as_slice() else {
        return Err(anyhow!("usage: candle-extract MODEL_DIR INPUT.jsonl OUT.json"));
    };
    let model = std::path::Path::new(model);
    let config: LlamaConfig = serde_json::from_slice(&std::fs::read(model.join("config.json")).context("config.json")?)?;
    let config = config.into_config(false);
    let tokenizer = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).map_err(|e| anyhow!("tokenizer.json: {e}"))?;
    let device = Device::Cpu;
    // SAFETY: the weights file is not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[model.join("model.safetensors")], DType::F32, &device)? };
    let llama = Llama::load(vb, &config)?;

    let mut seqs = Vec::new();
    for line in std::io::BufReader::new(std::fs::File::open(input).context("input")?).lines() {
        let line = line?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let text = v["text"].as_str().ok_or_else(|| anyhow!("a line without `text`"))?;
        seqs.push(tokenizer.encode(text, true).map_err(|e| anyhow!("tokenize: {e}"))?.get_ids().to_vec());
    }
    if seqs.is_empty() {
        return Err(anyhow!("{input}: no sentences"));
    }
    let tokens: usize = seqs.iter().map(Vec::len).sum();
    // Warm-up on the first sentence (not timed).
    let run = |ids: &[u32]| -> Result<()> {
        let mut cache = Cache::new(false, DType::F32, &config, &device)?;
        let x = Tensor::new(ids, &device)?.unsqueeze(0)?;
        llama.forward(&x, 0, &mut cache)?.to_vec2::<f32>()?;
        Ok(())
    };
    run(&seqs[0])?;
    let t = Instant::now();
    for ids in &seqs {
        run(ids)?;
    }
    let seconds = t.elapsed().as_secs_f64();
    let res = serde_json::json!({
        "engine": "candle 0.9 (f32, one sentence at a time, last logits only)",
        "sequences": seqs.len(), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens as f64 / seconds,
    });
    std::fs::write(out, res.to_string())?;
    println!("{res}");
    Ok(())
}
