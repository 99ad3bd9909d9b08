//! Contrastive pairs: the MVALUE layout and JSONL files, stimulus construction, prompt
//! templates and the seeded train/test split.
//!
//! **MVALUE layout**: `DIR/{concept}/{concept}_{lang}.json`, one JSON object
//! `{group: {id: {"pos": .., "neg": .., "scenario"?: .., "question"?: ..}}}`.
//!
//! **JSONL pairs**: one object per line, `{"pos": .., "neg": ..}` plus optional `scenario` or
//! `question` and an optional `id` (string or number; default: the line number).
//!
//! **Stimuli** (as the paper's code builds them): deontology joins `scenario + " " + text`,
//! truthfulness is `"Question: " + question + " Answer: " + text`, the other concepts use the
//! text as is. In JSONL files the presence of `scenario` or `question` on a line decides.
//! A prompt template then wraps every stimulus (`{input}` is replaced by it). Pairs whose two
//! stimuli are identical are dropped.
//!
//! **Split** ([`train_keys`]): the pair keys (group, id) of a file are sorted (groups and ids
//! compare as numbers when both are decimal integers, as strings otherwise), shuffled by a
//! Fisher–Yates pass driven by SplitMix64 seeded with the seed (`j = next_u64() % (i + 1)` for
//! `i = n-1 ..= 1`), and the first `round(0.8·n)` keys (at least 1 and at most n−1 when n ≥ 2)
//! are the training set. The split depends only on the set of keys and the seed, never on the
//! language or on which pairs are later dropped, so files of different languages that share ids
//! get the same split and their test sets align.
use crate::error::{Error, Result};
use crate::io::json_kind;
use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The seven concepts of the paper, in its order.
pub const PAPER_CONCEPTS: [&str; 7] =
    ["morality", "deontology", "utilitarianism", "fairness", "truthfulness", "toxicity", "harmfulness"];

/// The sixteen languages of the paper, in its order.
pub const PAPER_LANGS: [&str; 16] =
    ["en", "fr", "zh", "es", "pt", "vi", "ca", "id", "ja", "ko", "fi", "hu", "ta", "te", "sw", "ny"];

/// Default training fraction of the split.
pub const TRAIN_FRACTION: f64 = 0.8;

/// How a pair's text becomes a stimulus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StimulusKind {
    /// The text as is.
    Plain,
    /// `scenario + " " + text` (deontology).
    Scenario,
    /// `"Question: " + question + " Answer: " + text` (truthfulness).
    Question,
}

impl StimulusKind {
    pub fn for_concept(concept: &str) -> Self {
        match concept {
            "deontology" => StimulusKind::Scenario,
            "truthfulness" => StimulusKind::Question,
            _ => StimulusKind::Plain,
        }
    }
}

/// Builds a stimulus from a pair side and its context field.
pub fn stimulus(kind: StimulusKind, context: Option<&str>, text: &str) -> String {
    match (kind, context) {
        (StimulusKind::Scenario, Some(s)) => format!("{s} {text}"),
        (StimulusKind::Question, Some(q)) => format!("Question: {q} Answer: {text}"),
        _ => text.to_owned(),
    }
}

/// A pair's identity within a file: (group, id). JSONL pairs have group "".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PairKey {
    pub group: String,
    pub id: String,
}

/// Numeric ids (up to 19 digits) first, in numeric order, then every other id in byte order.
/// Which of the two classes an id is in depends on it alone, so this is a total order; comparing
/// numbers numerically and everything else by bytes is not ("2" < "10" < "1a" < "2"), and the
/// standard sorts may panic on such an order (found by fuzzing).
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let num = |s: &str| if !s.is_empty() && s.len() < 20 && s.bytes().all(|c| c.is_ascii_digit()) { s.parse::<u64>().ok() } else { None };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

impl Ord for PairKey {
    fn cmp(&self, other: &Self) -> Ordering {
        natural_cmp(&self.group, &other.group).then_with(|| natural_cmp(&self.id, &other.id))
    }
}

impl PartialOrd for PairKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.group.is_empty() {
            write!(f, "{}", self.id)
        } else {
            write!(f, "{}/{}", self.group, self.id)
        }
    }
}

/// One contrastive pair with its stimuli built (before the template).
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub key: PairKey,
    pub pos: String,
    pub neg: String,
    /// Where it came from, for messages: `FILE: group g, id i` or `FILE: line n`.
    pub origin: String,
}

/// SplitMix64: the small, fully specified generator behind the split, PCA sign flips and random
/// directions (so that any other implementation can reproduce them).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller, one value per call).
    pub fn gaussian(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Mixes a seed with a label (FNV-1a of the label), for independent streams per use.
pub fn derive_seed(seed: u64, label: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in label.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    SplitMix64::new(seed ^ h).next_u64()
}

/// The training keys of the deterministic split (see the module documentation).
pub fn train_keys(keys: &[PairKey], seed: u64, train_fraction: f64) -> BTreeSet<PairKey> {
    let mut sorted: Vec<PairKey> = keys.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
    let n = sorted.len();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        sorted.swap(i, j);
    }
    let mut n_train = (n as f64 * train_fraction).round() as usize;
    if n >= 2 {
        n_train = n_train.clamp(1, n - 1);
    } else {
        n_train = n;
    }
    sorted.truncate(n_train);
    sorted.into_iter().collect()
}

/// Pairs split into train and test, with identical pairs dropped.
#[derive(Debug, Clone, Default)]
pub struct Split {
    pub train: Vec<Pair>,
    pub test: Vec<Pair>,
    /// Origins of the pairs dropped because both stimuli were identical.
    pub dropped: Vec<String>,
}

fn drop_identical(pairs: Vec<Pair>, dropped: &mut Vec<String>) -> Vec<Pair> {
    pairs
        .into_iter()
        .filter(|p| {
            if p.pos == p.neg {
                dropped.push(p.origin.clone());
                false
            } else {
                true
            }
        })
        .collect()
}

/// Splits one file's pairs with the seeded split, then drops identical pairs.
pub fn split_pairs(pairs: Vec<Pair>, seed: u64, train_fraction: f64) -> Split {
    let keys: Vec<PairKey> = pairs.iter().map(|p| p.key.clone()).collect();
    let train = train_keys(&keys, seed, train_fraction);
    let mut pairs = pairs;
    pairs.sort_by(|a, b| a.key.cmp(&b.key));
    let (tr, te): (Vec<Pair>, Vec<Pair>) = pairs.into_iter().partition(|p| train.contains(&p.key));
    let mut dropped = Vec::new();
    let train = drop_identical(tr, &mut dropped);
    let test = drop_identical(te, &mut dropped);
    Split { train, test, dropped }
}

/// Explicit train and test sets (no split), identical pairs dropped.
pub fn explicit_split(train: Vec<Pair>, test: Vec<Pair>) -> Split {
    let mut dropped = Vec::new();
    let train = drop_identical(train, &mut dropped);
    let test = drop_identical(test, &mut dropped);
    Split { train, test, dropped }
}

/// Checks a prompt template: it must contain `{input}`.
pub fn check_template(template: &str) -> Result<()> {
    if !template.contains("{input}") {
        return Err(Error::input(format!("--template `{template}`: must contain the placeholder {{input}}")));
    }
    Ok(())
}

/// Wraps a stimulus in the template (every `{input}` is replaced).
pub fn apply_template(template: &str, stimulus: &str) -> String {
    template.replace("{input}", stimulus)
}

fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(crate::io::strip_bom(&bytes).to_vec()).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
        Error::input(format!("{}: line {line}: invalid UTF-8", path.display()))
    })
}

fn string_field<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    name: &str,
    at: &dyn Fn() -> String,
    required: bool,
) -> Result<Option<&'a str>> {
    match obj.get(name) {
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Error::input(format!("{}: `{name}` must be a string, got {}", at(), json_kind(other)))),
        None if required => Err(Error::input(format!("{}: missing `{name}`", at()))),
        None => Ok(None),
    }
}

/// Path of a concept/language file in the MVALUE layout.
pub fn mvalue_path(dir: &Path, concept: &str, lang: &str) -> PathBuf {
    dir.join(concept).join(format!("{concept}_{lang}.json"))
}

/// Reads one MVALUE file; the concept decides how stimuli are built.
pub fn load_mvalue_file(path: &Path, kind: StimulusKind) -> Result<Vec<Pair>> {
    let text = read_utf8(path)?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::input(format!("{}: malformed JSON: {e}", path.display())))?;
    let groups = value.as_object().ok_or_else(|| {
        Error::input(format!(
            "{}: expected a JSON object {{group: {{id: {{\"pos\", \"neg\"}}}}}}, got {}",
            path.display(),
            json_kind(&value)
        ))
    })?;
    let mut pairs = Vec::new();
    for (group, entries) in groups {
        let entries = entries.as_object().ok_or_else(|| {
            Error::input(format!(
                "{}: group `{group}`: expected an object of pairs keyed by id, got {}",
                path.display(),
                json_kind(entries)
            ))
        })?;
        for (id, entry) in entries {
            let at = || format!("{}: group `{group}`, id `{id}`", path.display());
            let obj = entry.as_object().ok_or_else(|| {
                Error::input(format!("{}: expected an object with `pos` and `neg`, got {}", at(), json_kind(entry)))
            })?;
            let pos = string_field(obj, "pos", &at, true)?.unwrap_or_default();
            let neg = string_field(obj, "neg", &at, true)?.unwrap_or_default();
            let context = match kind {
                StimulusKind::Plain => None,
                StimulusKind::Scenario => string_field(obj, "scenario", &at, true)?,
                StimulusKind::Question => string_field(obj, "question", &at, true)?,
            };
            pairs.push(Pair {
                key: PairKey { group: group.clone(), id: id.clone() },
                pos: stimulus(kind, context, pos),
                neg: stimulus(kind, context, neg),
                origin: at(),
            });
        }
    }
    if pairs.is_empty() {
        return Err(Error::input(format!("{}: no pairs", path.display())));
    }
    Ok(pairs)
}

/// Reads the MVALUE file of `concept` in `lang` under `dir`.
pub fn load_mvalue(dir: &Path, concept: &str, lang: &str) -> Result<Vec<Pair>> {
    let path = mvalue_path(dir, concept, lang);
    if !path.is_file() {
        return Err(Error::input(format!("{}: no such file (MVALUE layout DIR/{{concept}}/{{concept}}_{{lang}}.json)", path.display())));
    }
    load_mvalue_file(&path, StimulusKind::for_concept(concept))
}

/// Reads a JSONL file of pairs.
pub fn load_jsonl(path: &Path) -> Result<Vec<Pair>> {
    let text = read_utf8(path)?;
    let mut pairs: Vec<Pair> = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}: line {n}", path.display());
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| Error::input(format!("{}: malformed JSON: {e}", at())))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::input(format!("{}: expected a JSON object with `pos` and `neg`, got {}", at(), json_kind(&value))))?;
        let pos = string_field(obj, "pos", &at, true)?.unwrap_or_default();
        let neg = string_field(obj, "neg", &at, true)?.unwrap_or_default();
        let scenario = string_field(obj, "scenario", &at, false)?;
        let question = string_field(obj, "question", &at, false)?;
        let (kind, context) = match (scenario, question) {
            (Some(_), Some(_)) => {
                return Err(Error::input(format!("{}: has both `scenario` and `question`; give at most one", at())))
            }
            (Some(s), None) => (StimulusKind::Scenario, Some(s)),
            (None, Some(q)) => (StimulusKind::Question, Some(q)),
            (None, None) => (StimulusKind::Plain, None),
        };
        let id = match obj.get("id") {
            None => n.to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Number(x)) => x.to_string(),
            Some(other) => return Err(Error::input(format!("{}: `id` must be a string or a number, got {}", at(), json_kind(other)))),
        };
        if let Some(first) = seen.insert(id.clone(), n) {
            return Err(Error::input(format!("{}: duplicate id `{id}` (first on line {first})", at())));
        }
        pairs.push(Pair {
            key: PairKey { group: String::new(), id },
            pos: stimulus(kind, context, pos),
            neg: stimulus(kind, context, neg),
            origin: at(),
        });
    }
    if pairs.is_empty() {
        return Err(Error::input(format!("{}: no pairs", path.display())));
    }
    Ok(pairs)
}

/// Concepts and languages present under an MVALUE directory: for each concept directory, the
/// languages of its `{concept}_{lang}.json` files. Concepts and languages are ordered as in the
/// paper, then alphabetically.
pub fn discover(dir: &Path) -> Result<Vec<(String, Vec<String>)>> {
    if !dir.is_dir() {
        return Err(Error::input(format!("{}: no such data directory", dir.display())));
    }
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let concept = entry.file_name().to_string_lossy().into_owned();
        let prefix = format!("{concept}_");
        let mut langs = Vec::new();
        for f in std::fs::read_dir(&path).map_err(|e| Error::io(&path, e))? {
            let f = f.map_err(|e| Error::io(&path, e))?;
            let name = f.file_name().to_string_lossy().into_owned();
            if let Some(lang) = name.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".json")) {
                if !lang.is_empty() && f.path().is_file() {
                    langs.push(lang.to_owned());
                }
            }
        }
        if !langs.is_empty() {
            sort_paper_order(&mut langs, &PAPER_LANGS);
            out.push((concept, langs));
        }
    }
    out.sort_by(|a, b| paper_rank(&a.0, &PAPER_CONCEPTS).cmp(&paper_rank(&b.0, &PAPER_CONCEPTS)).then_with(|| a.0.cmp(&b.0)));
    Ok(out)
}

fn paper_rank(x: &str, order: &[&str]) -> usize {
    order.iter().position(|o| *o == x).unwrap_or(order.len())
}

/// Sorts names by their position in `order` (names not in it last, alphabetically).
pub fn sort_paper_order(names: &mut [String], order: &[&str]) {
    names.sort_by(|a, b| paper_rank(a, order).cmp(&paper_rank(b, order)).then_with(|| a.cmp(b)));
}

/// Splits a comma-separated list, trimming and dropping empty parts.
pub fn parse_list(text: &str) -> Vec<String> {
    text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(g: &str, i: &str) -> PairKey {
        PairKey { group: g.into(), id: i.into() }
    }

    #[test]
    fn natural_order_and_split_sizes() {
        let mut keys: Vec<PairKey> = ["10", "9", "1", "a"].iter().map(|i| key("g", i)).collect();
        keys.sort();
        assert_eq!(keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["1", "9", "10", "a"]);
        // Numbers before other ids, so that the order is transitive: "1a" after "10" and "2".
        let mut keys: Vec<PairKey> = ["1a", "10", "2", "007", "7", "b"].iter().map(|i| key("g", i)).collect();
        keys.sort();
        assert_eq!(keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), ["2", "007", "7", "10", "1a", "b"]);
        let ids = ["2", "10", "1a", "01", "1", "x", "", "99999999999999999999", "9", "a1", "10a", "0"];
        for a in ids {
            for b in ids {
                assert_eq!(natural_cmp(a, b), natural_cmp(b, a).reverse(), "{a:?} {b:?}");
                for c in ids {
                    if natural_cmp(a, b).is_le() && natural_cmp(b, c).is_le() {
                        assert!(natural_cmp(a, c).is_le(), "{a:?} <= {b:?} <= {c:?} but not {a:?} <= {c:?}");
                    }
                }
            }
        }
        let keys: Vec<PairKey> = (0..40).map(|i| key("demo", &i.to_string())).collect();
        assert_eq!(train_keys(&keys, 0, 0.8).len(), 32);
        let two = vec![key("", "1"), key("", "2")];
        assert_eq!(train_keys(&two, 0, 0.8).len(), 1);
    }

    #[test]
    fn stimuli() {
        assert_eq!(stimulus(StimulusKind::Scenario, Some("I am a nurse."), "So I help."), "I am a nurse. So I help.");
        assert_eq!(stimulus(StimulusKind::Question, Some("Q?"), "A."), "Question: Q? Answer: A.");
        assert_eq!(apply_template("[INST] {input} [/INST] ", "x"), "[INST] x [/INST] ");
        assert!(check_template("nothing").is_err());
    }
}
