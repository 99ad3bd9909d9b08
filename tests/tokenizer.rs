//! First-generation Qwen's `qwen.tiktoken` against tiktoken (Qwen's own `tokenization_qwen.py`,
//! tests/fixtures/qwen-tokenizer/reference.json), the Qwen-chat checkpoint layout, and
//! `resid tokenize` on every family.
mod common;

use common::*;
use resid::model::tokenizer::TextTokenizer;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn resid(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_resid")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real vocabulary, fetched by `scripts/fetch-qwen-vocab.sh` (scripts/test.sh runs it).
fn real_vocab() -> Option<PathBuf> {
    let path = root().join("models/qwen-vocab/qwen.tiktoken");
    fetched_or_skip(&path, "bash scripts/fetch-qwen-vocab.sh").then_some(path)
}

/// A Qwen-chat tokenizer directory (config.json of the tiny fixture, `vocab` as qwen.tiktoken,
/// tokenizer_config.json naming QWenTokenizer as the real checkpoints do); no weights.
fn qwen_dir(tmp: &Path, vocab: &[u8]) -> PathBuf {
    let dir = tmp.join("qwen");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(root().join("tests/fixtures/models/tiny-qwen-chat/config.json"), dir.join("config.json")).unwrap();
    std::fs::write(dir.join("qwen.tiktoken"), vocab).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"model_max_length": 8192, "tokenizer_class": "QWenTokenizer"}"#).unwrap();
    dir
}

/// The 256 single bytes, ranked in byte order (a valid, tiny byte-level vocabulary).
fn byte_vocab() -> String {
    use base64::Engine;
    (0..=255u8).map(|b| format!("{} {b}\n", base64::engine::general_purpose::STANDARD.encode([b]))).collect()
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/qwen-tokenizer/reference.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// GPT-2's byte-level alphabet back to bytes: the tokens of a byte-level vocabulary, joined,
/// are the text's bytes.
fn unbyte(tokens: &[String]) -> String {
    let printable = |b: u32| (33..=126).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let others: Vec<u32> = (0..256).filter(|&b| !printable(b)).collect();
    let bytes: Vec<u8> = tokens
        .concat()
        .chars()
        .map(|c| {
            let c = c as u32;
            if printable(c) { c as u8 } else { others[(c - 256) as usize] as u8 }
        })
        .collect();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn qwen_tokenization_is_tiktokens_on_every_text() {
    let Some(vocab) = real_vocab() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = qwen_dir(tmp.path(), &std::fs::read(vocab).unwrap());
    let tok = TextTokenizer::open(&dir).unwrap().unwrap();
    assert_eq!(tok.source(), "qwen.tiktoken");
    let r = reference();
    let texts = r["texts"].as_array().unwrap();
    // All 16 languages and every kind of text the reference script writes.
    assert!(texts.len() >= 40, "{}", texts.len());
    for t in texts {
        let (name, text) = (t["name"].as_str().unwrap(), t["text"].as_str().unwrap());
        let want = ids(&t["ids"]);
        assert_eq!(tok.encode(text).unwrap(), want, "{name}: {text:?}");
        assert_eq!(tok.decode(&want).unwrap(), t["decoded"].as_str().unwrap(), "{name}: decode");
    }
    for c in r["chat"].as_array().unwrap() {
        let (name, query) = (c["name"].as_str().unwrap(), c["query"].as_str().unwrap());
        assert_eq!(tok.encode_chat(&[("user", query)]).unwrap(), ids(&c["ids"]), "chat {name}");
        assert_eq!(tok.render_messages(&[("user", query)]).unwrap(), c["text"].as_str().unwrap(), "chat {name}");
        // A system message replaces make_context's default one.
        let own = tok.render_messages(&[("system", "Be brief."), ("user", query)]).unwrap();
        assert!(own.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"), "{own:?}");
    }
    // Generation stops on <|endoftext|> and <|im_end|> (and <|im_start|>, as Qwen's chat()).
    let mut stops = tok.stop_token_ids();
    stops.sort_unstable();
    stops.dedup();
    assert_eq!(stops, vec![151643, 151644, 151645]);
    assert_eq!(tok.token_id("<|extra_204|>"), Some(151643 + 3 + 204));
}

#[test]
fn the_tokenizer_file_is_chosen_as_transformers_would() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = qwen_dir(tmp.path(), byte_vocab().as_bytes());
    let hf = root().join("models/smollm2-135m/tokenizer.json");
    // qwen.tiktoken alone, without tokenizer_config.json, is read too.
    std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
    assert_eq!(TextTokenizer::open(&dir).unwrap().unwrap().source(), "qwen.tiktoken");
    if real_model_present(hf.parent().unwrap()) {
        // Both files and no QWenTokenizer: tokenizer.json, as AutoTokenizer's fast path.
        std::fs::copy(&hf, dir.join("tokenizer.json")).unwrap();
        assert_eq!(TextTokenizer::open(&dir).unwrap().unwrap().source(), "tokenizer.json");
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"tokenizer_class": "QWenTokenizer"}"#).unwrap();
        assert_eq!(TextTokenizer::open(&dir).unwrap().unwrap().source(), "qwen.tiktoken");
        std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    }
    // QWenTokenizer named but its file missing.
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"tokenizer_class": "QWenTokenizer"}"#).unwrap();
    std::fs::remove_file(dir.join("qwen.tiktoken")).unwrap();
    let err = TextTokenizer::open(&dir).err().unwrap().to_string();
    assert!(err.contains("names QWenTokenizer but there is no qwen.tiktoken"), "{err}");
}

/// A corrupt qwen.tiktoken: a one-line error naming the file and the line, exit 4, nothing
/// printed on stdout.
#[test]
fn corrupt_qwen_tiktoken_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let good = byte_vocab();
    let cases: Vec<(String, &str)> = vec![
        (good.replace("QQ== 65\n", "QQ=* 65\n"), "line 66: invalid base64 token `QQ=*`"),
        (good.clone() + "YWI= 7\n", "line 257: duplicate rank 7 (first given on line 8)"),
        (good.clone() + "QQ== 300\n", "line 257: duplicate token (first given on line 66)"),
        (good.clone() + "YWJj", "line 257: expected `BASE64_TOKEN RANK`, got 1 field (a truncated or corrupt line)"),
        (good.clone() + "YWJj 2x\n", "line 257: rank `2x` is not a non-negative integer"),
        (good.clone() + "YWJj 151643\n", "line 257: rank 151643 collides with the special tokens"),
        (good.replace("QQ== 65\n", ""), "byte 0x41 has no rank"),
        (String::new(), "no tokens"),
    ];
    for (vocab, needle) in cases {
        let dir = qwen_dir(tmp.path(), vocab.as_bytes());
        let file = dir.join("qwen.tiktoken").display().to_string();
        let o = resid(&["tokenize", "--model", dir.to_str().unwrap(), "--text", "hi"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(4), "{needle}: {err}");
        assert!(err.contains(&format!("{file}: {needle}")), "expected `{file}: {needle}` in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        assert!(o.stdout.is_empty());
    }
}

/// `resid tokenize --json` on every family of the test fixtures (their config.json with a
/// tokenizer and no weights), on SmolLM2 against HF's ids, and on the real Qwen vocabulary
/// against tiktoken's.
#[test]
fn tokenize_prints_ids_and_tokens_on_every_family() {
    let smol = root().join("models/smollm2-135m");
    if !real_model_present(&smol) {
        return;
    }
    let Some(vocab) = real_vocab() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let texts = ["Hello world", "Honesty is the best policy.\n\n  诚实 é<|im_end|>", ""];
    let mut input = String::new();
    for t in texts {
        input += &serde_json::json!({ "text": t }).to_string();
        input.push('\n');
    }
    input += "{\"ids\": [1, 2, 3]}\n";
    let input_path = tmp.path().join("in.jsonl");
    std::fs::write(&input_path, &input).unwrap();
    let mut families = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(root().join("tests/fixtures/models")).unwrap().flatten() {
        let config = entry.path().join("config.json");
        let c = resid::model::config::ModelConfig::from_file(&config).unwrap();
        let dir = tmp.path().join(entry.file_name());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&config, dir.join("config.json")).unwrap();
        if c.family.name() == "qwen-chat" {
            std::fs::copy(&vocab, dir.join("qwen.tiktoken")).unwrap();
        } else {
            for f in ["tokenizer.json", "tokenizer_config.json"] {
                std::fs::copy(smol.join(f), dir.join(f)).unwrap();
            }
        }
        families.insert(c.family.name());
        let o = resid(&["tokenize", "--model", dir.to_str().unwrap(), "--input", input_path.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}: {}", dir.display(), stderr(&o));
        let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), texts.len() + 1);
        let (_, tok) = resid::model::open_tokenizer(&dir).unwrap();
        for (line, text) in lines.iter().zip(texts) {
            let tokens: Vec<String> = line["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect();
            assert_eq!(ids(&line["ids"]), tok.encode(text).unwrap(), "{}: {text:?}", dir.display());
            // Byte-level tokens joined are the text (both vocabularies are byte-level).
            assert_eq!(unbyte(&tokens), text, "{}", dir.display());
        }
        assert_eq!(ids(&lines[3]["ids"]), vec![1, 2, 3]);
    }
    assert_eq!(families.into_iter().collect::<Vec<_>>(), ["bloom", "llama", "qwen-chat", "qwen2", "qwen3"]);

    // SmolLM2 itself, against HF's ids (tests/fixtures/golden/smollm2-135m.json).
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/golden/smollm2-135m.json")).unwrap()).unwrap();
    let cases = golden["tokenizer_cases"].as_array().unwrap();
    let mut args = vec!["tokenize".to_owned(), "--model".into(), smol.display().to_string(), "--json".into()];
    for c in cases {
        args.extend(["--text".into(), c["text"].as_str().unwrap().to_owned()]);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_resid")).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(out.lines().count(), cases.len());
    for (line, c) in out.lines().zip(cases) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(ids(&v["ids"]), ids(&c["ids"]), "{}", c["text"]);
    }
    // --chat shows what `generate --chat` feeds the model: the rendered template.
    let o = resid(&["tokenize", "--model", smol.to_str().unwrap(), "--chat", "--json", "--text", "What is the capital of France?"]);
    let v: serde_json::Value = serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap();
    let tokens: Vec<String> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect();
    assert_eq!(unbyte(&tokens), golden["chat_rendered"].as_str().unwrap());

    // The real Qwen vocabulary through the command, against tiktoken, and make_context's ids.
    let qwen = tmp.path().join("tiny-qwen-chat");
    let r = reference();
    let mut input = String::new();
    for t in r["texts"].as_array().unwrap() {
        input += &serde_json::json!({ "text": t["text"] }).to_string();
        input.push('\n');
    }
    std::fs::write(&input_path, &input).unwrap();
    let o = resid(&["tokenize", "--model", qwen.to_str().unwrap(), "--input", input_path.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    for (line, t) in out.lines().zip(r["texts"].as_array().unwrap()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(ids(&v["ids"]), ids(&t["ids"]), "{}", t["name"]);
    }
    assert_eq!(out.lines().count(), r["texts"].as_array().unwrap().len());
    let chat = &r["chat"][0];
    let o = resid(&["tokenize", "--model", qwen.to_str().unwrap(), "--chat", "--json", "--text", chat["query"].as_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap();
    assert_eq!(ids(&v["ids"]), ids(&chat["ids"]));
    // The default output is a table: a header per input, then id, token and its text.
    let o = resid(&["tokenize", "--model", qwen.to_str().unwrap(), "--text", "Hello world<|im_end|>"]);
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        "--text 1: 3 tokens\n    9707  \"Hello\"                  \"Hello\"\n    1879  \"Ġworld\"                 \" world\"\n  151645  \"<|im_end|>\"             \"<|im_end|>\"\n"
    );
}

#[test]
fn tokenize_bad_input_is_one_line_and_prints_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = qwen_dir(tmp.path(), byte_vocab().as_bytes());
    let d = dir.to_str().unwrap();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, "{\"text\": \"ok\"}\n{\"ids\": [1, 999999]}\n").unwrap();
    let i = input.to_str().unwrap();
    let no_tok = tmp.path().join("no-tokenizer");
    std::fs::create_dir_all(&no_tok).unwrap();
    std::fs::copy(dir.join("config.json"), no_tok.join("config.json")).unwrap();
    let (nope, missing) = (tmp.path().join("nope").display().to_string(), tmp.path().join("missing.jsonl").display().to_string());
    let cases: Vec<(Vec<&str>, i32, String)> = vec![
        (vec!["--model", d, "--input", i], 3, format!("{i}: line 2: token id 999999 is not in the vocabulary")),
        (vec!["--model", d, "--input", i, "--chat"], 3, format!("{i}: line 2: --chat needs `text`, not `ids`")),
        (vec!["--model", no_tok.to_str().unwrap(), "--text", "x"], 4, "no tokenizer.json or qwen.tiktoken".into()),
        (vec!["--model", &nope, "--text", "x"], 4, "no such model directory".into()),
        (vec!["--model", d, "--input", &missing], 6, "missing.jsonl".into()),
    ];
    for (args, code, needle) in cases {
        let mut all = vec!["tokenize"];
        all.extend(&args);
        let o = resid(&all);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(&needle), "{args:?}: expected `{needle}` in {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(o.stdout.is_empty(), "{args:?}: partial output");
    }
}

/// The real Qwen-chat checkpoint layout: sharded `model.safetensors.index.json` in bf16 with
/// Qwen's own config keys (`bf16: true`) gives the hidden states of the same bf16 weights in
/// one file, bit for bit.
#[test]
fn qwen_chat_sharded_bf16_checkpoint_loads_as_one_file() {
    use resid::engine::capture::{CapturePoint, CapturePosition, CaptureSpec};
    use resid::io::{OutTensor, TensorData};
    use resid::testing::{RandomLlama, TestArch};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let model = RandomLlama { arch: TestArch::QwenChat, kv_heads: 4, heads: 4, head_dim: 16, hidden: 64, intermediate: 96, layers: 2, vocab: 300, ..RandomLlama::small(7) };
    model.write(&src).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    for (k, v) in [("bf16", true), ("fp16", false), ("fp32", false), ("use_dynamic_ntk", true), ("use_logn_attn", true)] {
        config[k] = serde_json::Value::Bool(v);
    }
    config["use_flash_attn"] = "auto".into();
    config["onnx_safe"] = serde_json::Value::Null;
    config.as_object_mut().unwrap().remove("torch_dtype");
    // The weights in bf16 (as the real checkpoints store them, and as RandomLlama writes them).
    let st = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let tensors: Vec<OutTensor> = names
        .iter()
        .map(|n| {
            let t = st.tensor(n).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::BF16);
            let f: Vec<f32> = t.data().chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
            OutTensor { name: n.clone(), shape: t.shape().to_vec(), data: TensorData::F32(f) }
        })
        .collect();
    let single = tmp.path().join("single");
    let sharded = tmp.path().join("sharded");
    for d in [&single, &sharded] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    }
    resid::io::write_safetensors_typed(&single.join("model.safetensors"), &tensors, Default::default(), true).unwrap();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        for t in part {
            map.insert(t.name.clone(), file.into());
        }
        resid::io::write_safetensors_typed(&sharded.join(file), part, Default::default(), true).unwrap();
    }
    std::fs::write(sharded.join("model.safetensors.index.json"), serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map}).to_string())
        .unwrap();
    let a = resid::CpuEngine::load(&single).unwrap();
    let b = resid::CpuEngine::load(&sharded).unwrap();
    assert_eq!(b.model.config.torch_dtype.as_deref(), Some("bfloat16"));
    assert_eq!((b.model.store.dominant_dtype(), a.model.store.dominant_dtype()), ("bf16".into(), "bf16".into()));
    let seqs = vec![random_ids(9, 300, 1), random_ids(4, 300, 2)];
    let spec = CaptureSpec { points: (0..=2).map(CapturePoint::Hidden).collect(), position: CapturePosition::Last };
    let none = vec![None; seqs.len()];
    let ha = a.extract(&seqs, &spec, &none, 4096, |_, _| {}).unwrap().data;
    assert_eq!(ha, b.extract(&seqs, &spec, &none, 4096, |_, _| {}).unwrap().data);
    assert!(ha.iter().all(|x| x.is_finite()) && ha.iter().any(|&x| x != 0.0));
}

/// Throughput of the qwen.tiktoken reader against the `tokenizers` path (SmolLM2's
/// tokenizer.json) on the same text, interleaved: `cargo test --release --test tokenizer
/// -- --ignored --nocapture tokenizer_speed`. Numbers only; it asserts nothing.
#[test]
#[ignore]
fn tokenizer_speed() {
    let Some(vocab) = real_vocab() else { return };
    let smol = root().join("models/smollm2-135m");
    if !real_model_present(&smol) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let qwen = TextTokenizer::open(&qwen_dir(tmp.path(), &std::fs::read(vocab).unwrap())).unwrap().unwrap();
    let hf = TextTokenizer::open(&smol).unwrap().unwrap();
    // Every reference text, as one text per language group, repeated to ~1 MB.
    let r = reference();
    let all: Vec<&str> = r["texts"].as_array().unwrap().iter().map(|t| t["text"].as_str().unwrap()).collect();
    let latin: String = all.iter().filter(|t| t.is_ascii()).copied().collect::<Vec<_>>().join("\n");
    let mixed = all.join("\n");
    for (name, text) in [("ascii", latin), ("all texts", mixed)] {
        let text = text.repeat((1 << 20) / text.len() + 1);
        for round in 0..3 {
            for (which, tok) in [("qwen.tiktoken", &qwen), ("tokenizer.json", &hf)] {
                let t0 = std::time::Instant::now();
                let n = tok.encode(&text).unwrap().len();
                let s = t0.elapsed().as_secs_f64();
                let ids = tok.encode(&text).unwrap();
                let t1 = std::time::Instant::now();
                let back = tok.decode(&ids).unwrap();
                let d = t1.elapsed().as_secs_f64();
                println!(
                    "{name:>9} round {round} {which:>14}: encode {:.2} MB/s ({n} tokens, {:.0} ktok/s), decode {:.1} MB/s",
                    text.len() as f64 / s / 1e6,
                    n as f64 / s / 1e3,
                    back.len() as f64 / d / 1e6
                );
            }
        }
    }
}

/// `generate --chat` on a Qwen-chat model with the real vocabulary: the prompt is
/// make_context's ids, and generation stops on `<|im_end|>` and `<|endoftext|>`.
#[test]
fn qwen_chat_generate_uses_make_context_and_stops_on_im_end() {
    use resid::testing::{RandomLlama, TestArch};
    let Some(vocab) = real_vocab() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen-chat");
    // The real vocabulary's size (151936 rows, padded past the 151851 ids) on a tiny body.
    let model = RandomLlama { arch: TestArch::QwenChat, vocab: 151_936, hidden: 16, heads: 1, kv_heads: 1, head_dim: 16, intermediate: 32, layers: 1, ..RandomLlama::small(3) };
    model.write(&dir).unwrap();
    std::fs::copy(&vocab, dir.join("qwen.tiktoken")).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"tokenizer_class": "QWenTokenizer"}"#).unwrap();
    let engine = resid::CpuEngine::load(&dir).unwrap();
    assert_eq!(engine.summary()["tokenizer_file"], "qwen.tiktoken");
    let stops = resid::repe::control::stop_tokens(&engine);
    assert!(stops.contains(&151_643) && stops.contains(&151_645), "{stops:?}");
    // Leading newlines: tokenized whole, the rendered text would merge them with the role's.
    let chat = &reference()["chat"][2];
    assert_eq!(chat["name"], "leading_newlines");
    let o = resid(&["generate", "--model", dir.to_str().unwrap(), "--chat", "--json", "--max-new-tokens", "2", "--prompt", chat["query"].as_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap();
    assert_eq!(v["prompt_tokens"].as_u64().unwrap() as usize, ids(&chat["ids"]).len());
}
