//! A tiny study setup: a word-level tokenizer and MVALUE data over its words.
use resid::repe::data::SplitMix64;
use std::path::Path;

pub const WORDS: [&str; 40] = [
    "i", "you", "we", "they", "helped", "hurt", "gave", "stole", "shared", "hid", "the", "a", "old", "young", "man", "woman",
    "child", "friend", "money", "food", "kindly", "cruelly", "honest", "lied", "answer", "question", "yes", "no", "is", "was",
    "good", "bad", "fair", "unfair", "safe", "harmful", "true", "false", "but", "because",
];

/// A word-level `tokenizer.json` over [`WORDS`] (ids 3..), with `[UNK]`, `<s>`, `</s>` first.
pub fn write_tokenizer(dir: &Path) {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["[UNK]", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for (i, w) in WORDS.iter().enumerate() {
        vocab.insert(w.to_string(), (i + 3).into());
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

pub fn sentence(rng: &mut SplitMix64, words: &[&str], len: usize) -> String {
    (0..len).map(|_| words[(rng.next_u64() % words.len() as u64) as usize]).collect::<Vec<_>>().join(" ")
}

/// MVALUE data for two concepts in three languages (the "languages" share words; only the
/// structure matters here), 20 pairs each, plus one identical pair to drop.
pub fn write_values(dir: &Path) {
    let mut rng = SplitMix64::new(9);
    for concept in ["morality", "truthfulness"] {
        std::fs::create_dir_all(dir.join(concept)).unwrap();
        for lang in ["en", "fr", "sw"] {
            let mut group = serde_json::Map::new();
            for id in 0..20 {
                let common = sentence(&mut rng, &WORDS[..20], 4);
                let mut e = serde_json::json!({
                    "pos": format!("{common} {}", sentence(&mut rng, &["good", "kindly", "helped", "honest", "fair"], 3)),
                    "neg": if id == 19 { format!("{common} same") } else { format!("{common} {}", sentence(&mut rng, &["bad", "cruelly", "hurt", "lied", "unfair"], 3)) },
                });
                if id == 19 {
                    e["pos"] = e["neg"].clone();
                }
                if concept == "truthfulness" {
                    e["question"] = serde_json::json!(sentence(&mut rng, &WORDS[20..30], 3));
                }
                group.insert(id.to_string(), e);
            }
            let body = serde_json::json!({ "demo": group });
            std::fs::write(dir.join(concept).join(format!("{concept}_{lang}.json")), body.to_string()).unwrap();
        }
    }
}
