//! Text out of a stream of tokens: incremental detokenization and stop strings, shared by the
//! server and Python so that streamed and whole answers are the same text.
use crate::error::Result;
use crate::model::tokenizer::TextTokenizer;

/// Turns one sequence's tokens into text as they arrive. Each push returns only text that can
/// no longer change: an incomplete UTF-8 character at the end, and a tail that could still
/// become a stop string, are held back until the next token or [`TextStream::finish`].
pub struct TextStream {
    stops: Vec<String>,
    /// Tokens that end generation and are not shown (EOS and friends).
    hidden: Vec<u32>,
    tokens: Vec<u32>,
    /// Text handed out so far.
    emitted: String,
    stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>, hidden: Vec<u32>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        TextStream { stops, hidden, tokens: Vec::new(), emitted: String::new(), stopped: false }
    }

    /// Whether a stop string was met: the caller ends the sequence.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// All text handed out so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }

    /// Adds a token; returns the new text that is final.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        if self.stopped || self.hidden.contains(&id) {
            return Ok(String::new());
        }
        self.tokens.push(id);
        self.advance(tok, false)
    }

    /// The text held back, at the end of the sequence.
    pub fn finish(&mut self, tok: &TextTokenizer) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.advance(tok, true)
    }

    fn advance(&mut self, tok: &TextTokenizer, end: bool) -> Result<String> {
        let text = tok.decode(&self.tokens)?;
        // Decoding is not always prefix-stable (cleanup of spaces): never take text back.
        if !text.starts_with(&self.emitted) {
            return Ok(String::new());
        }
        let from = self.emitted.len();
        // A stop string may straddle what was emitted and what is new.
        let search_from = from.saturating_sub(self.stops.iter().map(String::len).max().unwrap_or(0));
        let search_from = (0..=search_from).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        let hit = self.stops.iter().filter_map(|s| text[search_from..].find(s.as_str()).map(|p| search_from + p)).min();
        let until = match hit {
            Some(p) => {
                self.stopped = true;
                p.max(from)
            }
            None if end => text.len(),
            None => {
                let mut safe = text.len();
                if text.ends_with('\u{FFFD}') {
                    safe -= '\u{FFFD}'.len_utf8();
                }
                // Hold back the longest tail that begins some stop string.
                let held = (1..=safe - from.min(safe))
                    .rev()
                    .find(|&k| text.is_char_boundary(safe - k) && self.stops.iter().any(|s| s.starts_with(&text[safe - k..safe])))
                    .unwrap_or(0);
                safe - held
            }
        };
        if until <= from {
            return Ok(String::new());
        }
        let new = text[from..until].to_string();
        self.emitted.push_str(&new);
        Ok(new)
    }
}
