//! First-generation Qwen's `qwen.tiktoken`: byte-level BPE by rank, as `tokenization_qwen.py`
//! builds it on tiktoken (the same pre-tokenization regex, engine and merge order), with NFC
//! normalisation and the special tokens recognised inside text (`allowed_special="all"`).
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// `PAT_STR` of `tokenization_qwen.py`. tiktoken runs it with fancy-regex, as this does.
const QWEN_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub const ENDOFTEXT: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
/// `SPECIAL_START_ID`: the special tokens follow the 151643 ranks of the file.
pub const SPECIAL_START_ID: u32 = 151_643;
const EXTRA_TOKENS: u32 = 205;

pub struct QwenTiktoken {
    ranks: HashMap<Vec<u8>, u32>,
    /// Token bytes by rank.
    decoder: Vec<Box<[u8]>>,
    /// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0|>`.. from [`SPECIAL_START_ID`].
    specials: Vec<String>,
    special_ids: HashMap<String, u32>,
    longest_special: usize,
    pattern: fancy_regex::Regex,
}

impl QwenTiktoken {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, &path.display().to_string())
    }

    /// Parses the `BASE64 RANK` lines of a tiktoken file; `file` names it in errors.
    pub fn parse(bytes: &[u8], file: &str) -> Result<Self> {
        use base64::Engine;
        let mut ranks: HashMap<Vec<u8>, u32> = HashMap::new();
        // (line of each rank) to name both lines of a duplicate.
        let mut rank_line: HashMap<u32, usize> = HashMap::new();
        let mut token_line: HashMap<Vec<u8>, usize> = HashMap::new();
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let n = i + 1;
            let line = raw.strip_suffix(b"\r").unwrap_or(raw);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let at = |what: String| Error::model(format!("{file}: line {n}: {what}"));
            let fields: Vec<&[u8]> = line.split(u8::is_ascii_whitespace).filter(|f| !f.is_empty()).collect();
            let [token, rank] = fields[..] else {
                return Err(at(format!(
                    "expected `BASE64_TOKEN RANK`, got {} field{} (a truncated or corrupt line)",
                    fields.len(),
                    if fields.len() == 1 { "" } else { "s" }
                )));
            };
            let token = base64::engine::general_purpose::STANDARD
                .decode(token)
                .map_err(|e| at(format!("invalid base64 token `{}`: {e}", String::from_utf8_lossy(token))))?;
            if token.is_empty() {
                return Err(at("empty token".into()));
            }
            let rank_text = String::from_utf8_lossy(rank);
            let rank: u32 = rank_text
                .parse()
                .map_err(|_| at(format!("rank `{rank_text}` is not a non-negative integer")))?;
            if rank >= SPECIAL_START_ID {
                return Err(at(format!("rank {rank} collides with the special tokens, which start at {SPECIAL_START_ID}")));
            }
            if let Some(first) = rank_line.insert(rank, n) {
                return Err(at(format!("duplicate rank {rank} (first given on line {first})")));
            }
            if let Some(first) = token_line.insert(token.clone(), n) {
                return Err(at(format!("duplicate token (first given on line {first})")));
            }
            ranks.insert(token, rank);
        }
        if ranks.is_empty() {
            return Err(Error::model(format!("{file}: no tokens")));
        }
        // Byte-level BPE starts from single bytes: every byte must have a rank.
        if let Some(b) = (0..=255u8).find(|b| !ranks.contains_key(&[*b][..])) {
            return Err(Error::model(format!("{file}: byte 0x{b:02x} has no rank (a byte-level BPE vocabulary needs all 256 bytes)")));
        }
        let mut decoder = vec![Box::<[u8]>::default(); ranks.values().max().map_or(0, |&m| m as usize + 1)];
        for (token, &rank) in &ranks {
            decoder[rank as usize] = token.clone().into_boxed_slice();
        }
        let specials: Vec<String> = [ENDOFTEXT, IM_START, IM_END]
            .into_iter()
            .map(str::to_owned)
            .chain((0..EXTRA_TOKENS).map(|i| format!("<|extra_{i}|>")))
            .collect();
        let special_ids = specials.iter().enumerate().map(|(i, s)| (s.clone(), SPECIAL_START_ID + i as u32)).collect();
        let longest_special = specials.iter().map(String::len).max().unwrap_or(0);
        let pattern = fancy_regex::Regex::new(QWEN_PATTERN).map_err(|e| Error::model(format!("Qwen pre-tokenization pattern: {e}")))?;
        Ok(QwenTiktoken { ranks, decoder, specials, special_ids, longest_special, pattern })
    }

    /// The number of ids, special tokens included (`len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        SPECIAL_START_ID as usize + self.specials.len()
    }

    /// `tokenizer(text)["input_ids"]` of `QWenTokenizer`: NFC, then tiktoken's
    /// `encode(text, allowed_special="all")`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_nfc(text, true)
    }

    /// NFC, then every special token's text as ordinary text (`allowed_special=set()`, as
    /// `make_context` encodes roles and contents).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_nfc(text, false)
    }

    fn encode_nfc(&self, text: &str, specials: bool) -> Result<Vec<u32>> {
        let normalized;
        let text = if is_nfc_quick(text.chars()) == IsNormalized::Yes {
            text
        } else {
            normalized = text.nfc().collect::<String>();
            &normalized
        };
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut start = 0;
        loop {
            let next = if specials { self.find_special(text, start) } else { None };
            let end = next.map_or(text.len(), |(at, _, _)| at);
            self.encode_ordinary(&text[start..end], &mut out)?;
            match next {
                Some((at, len, id)) => {
                    out.push(id);
                    start = at + len;
                }
                None => return Ok(out),
            }
        }
    }

    /// The leftmost special token in `text[from..]`: (byte offset, length, id). Every special
    /// token is `<|name|>` with no `|>` inside, so the first `|>` after a `<|` decides.
    fn find_special(&self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        let bytes = text.as_bytes();
        let mut i = from;
        while let Some(p) = text[i..].find("<|") {
            let at = i + p;
            let window = &bytes[at + 2..bytes.len().min(at + self.longest_special)];
            if let Some(q) = window.windows(2).position(|w| w == b"|>") {
                let len = 2 + q + 2;
                if let Some(&id) = std::str::from_utf8(&bytes[at..at + len]).ok().and_then(|s| self.special_ids.get(s)) {
                    return Some((at, len, id));
                }
            }
            i = at + 1;
        }
        None
    }

    fn encode_ordinary(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        for piece in self.pattern.find_iter(text) {
            let piece = piece.map_err(|e| Error::input(format!("cannot tokenize text: {e}")))?.as_str().as_bytes();
            match self.ranks.get(piece) {
                Some(&rank) => out.push(rank),
                None => self.byte_pair_encode(piece, out),
            }
        }
        Ok(())
    }

    /// tiktoken's merge: repeatedly join the adjacent pair whose joined bytes have the lowest
    /// rank (the leftmost on ties) until no joined pair is a token. A heap of candidate pairs
    /// with stale entries skipped keeps it O(n log n): a 300 kB run of spaces is one piece.
    fn byte_pair_encode(&self, piece: &[u8], out: &mut Vec<u32>) {
        use std::cmp::Reverse;
        let n = piece.len();
        let rank_of = |bytes: &[u8]| self.ranks.get(bytes).copied();
        // Parts are named by their first byte; `next[p]` is the first byte of the next part.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        // (rank, left part, right part, end of right part): stale once either part changed.
        let mut heap = std::collections::BinaryHeap::new();
        let push = |heap: &mut std::collections::BinaryHeap<_>, left: usize, right: usize, end: usize| {
            if let Some(rank) = rank_of(&piece[left..end]) {
                heap.push(Reverse((rank, left, right, end)));
            }
        };
        for i in 0..n.saturating_sub(1) {
            push(&mut heap, i, i + 1, i + 2);
        }
        while let Some(Reverse((_, left, right, end))) = heap.pop() {
            if !alive[left] || next[left] != right || next[right] != end {
                continue;
            }
            alive[right] = false;
            next[left] = end;
            if end < n {
                prev[end] = left;
                push(&mut heap, left, end, next[end]);
            }
            if left > 0 {
                push(&mut heap, prev[left], left, end);
            }
        }
        let mut p = 0;
        while p < n {
            out.push(rank_of(&piece[p..next[p]]).expect("every part is a token: single bytes all have ranks"));
            p = next[p];
        }
    }

    /// The bytes of `ids` as text (invalid UTF-8 replaced by U+FFFD, as `errors="replace"`),
    /// without the special tokens (`skip_special_tokens=True`) and ids outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some(token) = self.decoder.get(id as usize) {
                bytes.extend_from_slice(token);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.special_ids.get(token).copied().or_else(|| self.ranks.get(token.as_bytes()).copied())
    }

    /// A token's surface form: the special token's text, or the token's bytes in the GPT-2
    /// byte-to-unicode alphabet that Qwen2's `tokenizer.json` uses for the same vocabulary
    /// (`Ġ` for a space), so that any token, even part of a character, prints as text.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        if id >= SPECIAL_START_ID {
            return self.specials.get((id - SPECIAL_START_ID) as usize).cloned();
        }
        let bytes = self.decoder.get(id as usize).filter(|t| !t.is_empty())?;
        Some(bytes.iter().map(|&b| byte_to_unicode(b)).collect())
    }
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the others to
/// U+0100 onwards in byte order.
fn byte_to_unicode(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return char::from(b);
    }
    let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    /// All 256 bytes, then the given multi-byte tokens, ranked in that order.
    fn vocab(extra: &[&str]) -> Vec<u8> {
        let b64 = |t: &[u8]| base64::engine::general_purpose::STANDARD.encode(t);
        let mut s = String::new();
        for b in 0..=255u8 {
            s += &format!("{} {b}\n", b64(&[b]));
        }
        for (i, t) in extra.iter().enumerate() {
            s += &format!("{} {}\n", b64(t.as_bytes()), 256 + i);
        }
        s.into_bytes()
    }

    #[test]
    fn merges_by_rank_leftmost_first() {
        // "ab" ranks before "bc": "abc" → "ab" + "c"; "aaa" → "aa" + "a" (leftmost tie).
        let t = QwenTiktoken::parse(&vocab(&["ab", "bc", "aa"]), "v").unwrap();
        assert_eq!(t.encode("abc").unwrap(), vec![256, b'c' as u32]);
        assert_eq!(t.encode("aaa").unwrap(), vec![258, b'a' as u32]);
        assert_eq!(t.encode("bcd").unwrap(), vec![257, b'd' as u32]);
        // A lower-ranked later pair wins over an earlier pair.
        let t = QwenTiktoken::parse(&vocab(&["bc", "ab"]), "v").unwrap();
        assert_eq!(t.encode("abcd").unwrap(), vec![b'a' as u32, 256, b'd' as u32]);
        // Merging goes on over merged parts: "bc" first, then "a"+"bc".
        let t = QwenTiktoken::parse(&vocab(&["bc", "ab", "abc"]), "v").unwrap();
        assert_eq!(t.encode("abcd").unwrap(), vec![258, b'd' as u32]);
        assert_eq!(t.decode(&[b'a' as u32, 256, b'd' as u32]), "abcd");
    }

    #[test]
    fn special_tokens_inside_text_and_decode_skips_them() {
        let t = QwenTiktoken::parse(&vocab(&[]), "v").unwrap();
        let ids = t.encode("a<|im_end|>b<|extra_204|><|nope|><|").unwrap();
        assert_eq!(ids[..4], [b'a' as u32, SPECIAL_START_ID + 2, b'b' as u32, SPECIAL_START_ID + 3 + 204]);
        assert_eq!(t.decode(&ids), "ab<|nope|><|");
        assert_eq!(t.encode_plain("<|im_end|>").unwrap().len(), "<|im_end|>".len());
        assert_eq!(t.vocab_size(), 151_851);
        assert_eq!(t.id_to_token(SPECIAL_START_ID + 1).as_deref(), Some(IM_START));
    }

    #[test]
    fn byte_level_surface_forms_match_gpt2() {
        let t = QwenTiktoken::parse(&vocab(&[" a"]), "v").unwrap();
        assert_eq!(t.id_to_token(b' ' as u32).as_deref(), Some("Ġ"));
        assert_eq!(t.id_to_token(b'\n' as u32).as_deref(), Some("Ċ"));
        assert_eq!(t.id_to_token(0xAD).as_deref(), Some("Ń"));
        assert_eq!(t.id_to_token(256).as_deref(), Some("Ġa"));
    }

    #[test]
    fn corrupt_files_name_the_line() {
        let mut good = vocab(&[]);
        let err = |bytes: &[u8]| QwenTiktoken::parse(bytes, "q.tiktoken").err().map(|e| e.to_string()).unwrap_or_default();
        let mut bad = good.clone();
        bad.extend_from_slice(b"@@@@ 256\n");
        assert!(err(&bad).starts_with("q.tiktoken: line 257: invalid base64"), "{}", err(&bad));
        let mut bad = good.clone();
        bad.extend_from_slice(b"YWI= 5\n");
        assert_eq!(err(&bad), "q.tiktoken: line 257: duplicate rank 5 (first given on line 6)");
        let mut bad = good.clone();
        bad.extend_from_slice(b"YWI=");
        assert!(err(&bad).starts_with("q.tiktoken: line 257: expected `BASE64_TOKEN RANK`, got 1 field"), "{}", err(&bad));
        good.truncate(good.len() - "/w== 255\n".len());
        assert!(err(&good).contains("byte 0xff has no rank"), "{}", err(&good));
    }
}
