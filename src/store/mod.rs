//! Crash-safe, resumable extraction output: numbered safetensors shards plus a manifest.
//!
//! Every file is written to a temporary name, flushed and renamed, shard first and manifest
//! second, so a killed run leaves only complete shards that the manifest lists with their
//! checksums. A rerun with the same input and options resumes after the last listed shard; one
//! with different input or options refuses to mix results. Every writer holds an exclusive lock
//! on its output for the whole run ([`lock`]), and removes what dead runs left there.
pub mod extract;
pub mod lock;
pub mod stats;

use crate::error::{Error, Result};
use crate::io::AtomicPath;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardEntry {
    pub file: String,
    /// Input sequences `start..end` (0-based line indices of the whole input).
    pub start: usize,
    pub end: usize,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub input: String,
    pub input_sha256: String,
    /// Sequences in the whole input.
    pub input_sequences: usize,
    /// The part of the input this output covers (all of it unless run with `--shard i/N`).
    pub range_start: usize,
    pub range_end: usize,
    /// `i/N` when this output is one part of a data-parallel run.
    pub part: Option<String>,
    /// Model identity and extraction options; results are only ever mixed when these agree.
    pub options: serde_json::Value,
    pub shard_sequences: usize,
    pub shards: Vec<ShardEntry>,
    pub complete: bool,
}

/// Lower-case hexadecimal of `bytes` (digests in manifests and cache keys).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 12 characters of a digest for messages (a manifest may hold a shorter one).
fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 of a file, read in pieces (shards can be large).
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Writes `bytes` to `path` through a flushed temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let out = AtomicPath::new(path);
    let mut f = std::fs::File::create(out.tmp()).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))?;
    drop(f);
    out.commit()?;
    if let Some(dir) = path.parent() {
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl Manifest {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(MANIFEST)
    }

    pub fn load(dir: &Path) -> Result<Option<Manifest>> {
        let path = Self::path(dir);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse(&bytes, &path.display().to_string()).map(Some)
    }

    /// Parses manifest bytes; `file` names the source in errors.
    pub fn parse(bytes: &[u8], file: &str) -> Result<Manifest> {
        crate::io::json_from_slice(bytes).map_err(|e| Error::input(format!("{file}: not a resid extraction manifest: {e}")))
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::input(format!("manifest: {e}")))?;
        write_atomic(&Self::path(dir), text.as_bytes())
    }

    /// Explains why `self` (found on disk) cannot be continued by a run described by `new`.
    pub fn incompatibility(&self, new: &Manifest) -> Option<String> {
        if self.input_sha256 != new.input_sha256 {
            return Some(format!("the input changed (sha256 {} on disk, {} now)", short(&self.input_sha256), short(&new.input_sha256)));
        }
        if self.options != new.options {
            return Some(format!("the model or options differ (on disk: {}; now: {})", self.options, new.options));
        }
        if (self.range_start, self.range_end, &self.part) != (new.range_start, new.range_end, &new.part) {
            return Some(format!("the --shard part differs ({:?} on disk, {:?} now)", self.part, new.part));
        }
        if self.shard_sequences != new.shard_sequences {
            return Some(format!("--shard-sequences differs ({} on disk, {} now)", self.shard_sequences, new.shard_sequences));
        }
        None
    }

    /// Next input sequence to process.
    pub fn resume_point(&self) -> usize {
        self.shards.last().map_or(self.range_start, |s| s.end)
    }
}

/// Checks a finished output against its manifest: every shard present with its checksum, the
/// shards contiguous and covering the manifest's range, the manifest marked complete, and no
/// other file in the directory (a temporary file or an unlisted shard is an interrupted run's).
pub fn verify(dir: &Path) -> Result<Manifest> {
    let m = Manifest::load(dir)?.ok_or_else(|| Error::input(format!("{}: no {MANIFEST} (not a resid extraction directory)", dir.display())))?;
    let listed: std::collections::HashSet<&str> = m.shards.iter().map(|s| s.file.as_str()).collect();
    let mut stray: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MANIFEST && n != lock::DIR_LOCK && !listed.contains(n.as_str()))
        .collect();
    if !stray.is_empty() {
        stray.sort();
        return Err(Error::input(format!(
            "{}: {} file(s) not listed in the manifest: {} (left by an interrupted run: rerun the extraction, which removes them, or delete them)",
            dir.display(),
            stray.len(),
            stray.join(", ")
        )));
    }
    let mut next = m.range_start;
    for s in &m.shards {
        if s.start != next || s.end <= s.start {
            return Err(Error::input(format!("{}: shard {} covers sequences {}..{}, expected to start at {next}", dir.display(), s.file, s.start, s.end)));
        }
        let path = dir.join(&s.file);
        if s.file.contains('/') || s.file.contains("..") {
            return Err(Error::input(format!("{}: shard name `{}` is not a plain file name", dir.display(), s.file)));
        }
        let sum = sha256_file(&path)?;
        if sum != s.sha256 {
            return Err(Error::input(format!("{}: checksum mismatch (manifest {}, file {})", path.display(), short(&s.sha256), short(&sum))));
        }
        next = s.end;
    }
    if next != m.range_end {
        return Err(Error::input(format!("{}: shards cover sequences {}..{next} of {}..{}", dir.display(), m.range_start, m.range_start, m.range_end)));
    }
    if !m.complete {
        return Err(Error::input(format!("{}: the extraction is not complete (rerun the same command to resume)", dir.display())));
    }
    Ok(m)
}

/// Splits `n` sequences into `parts` contiguous ranges; part `i` gets `i*n/parts..(i+1)*n/parts`.
pub fn part_range(n: usize, i: usize, parts: usize) -> (usize, usize) {
    (i * n / parts, (i + 1) * n / parts)
}

/// Parses `i/N`.
pub fn parse_part(text: &str) -> Result<(usize, usize)> {
    let bad = || Error::input(format!("--shard `{text}`: expected i/N with 0 <= i < N, e.g. 0/4"));
    let (i, n) = text.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Joins the outputs of the parts of a data-parallel run into one directory: validates that
/// they come from the same input and options, are complete, and tile the whole input. Holds
/// the lock of `out` throughout (waiting for it if `wait`); interrupted, it removes what it
/// had copied, so a rerun starts afresh.
pub fn merge(out: &Path, inputs: &[PathBuf], wait: bool) -> Result<Manifest> {
    if inputs.is_empty() {
        return Err(Error::input("merge: no input directories"));
    }
    let _lock = lock::lock_output_dir(out, wait, &[])?;
    let mut parts: Vec<(PathBuf, Manifest)> = Vec::new();
    for dir in inputs {
        parts.push((dir.clone(), verify(dir)?));
    }
    parts.sort_by_key(|(_, m)| m.range_start);
    let first = &parts[0].1;
    let mut next = 0;
    for (dir, m) in &parts {
        if m.input_sha256 != first.input_sha256 {
            return Err(Error::input(format!("{}: extracted from a different input than {}", dir.display(), parts[0].0.display())));
        }
        if m.options != first.options {
            return Err(Error::input(format!("{}: different model or options than {}", dir.display(), parts[0].0.display())));
        }
        if m.range_start != next {
            return Err(Error::input(format!("{}: covers sequences {}..{}, expected to start at {next} (a part is missing or overlaps)", dir.display(), m.range_start, m.range_end)));
        }
        next = m.range_end;
    }
    if next != first.input_sequences {
        return Err(Error::input(format!("merge: the parts cover sequences 0..{next} of {}", first.input_sequences)));
    }
    if Manifest::load(out)?.is_some() {
        return Err(Error::input(format!("{}: already holds an extraction; merge into a new directory", out.display())));
    }
    let mut shards: Vec<ShardEntry> = Vec::new();
    let copied = (|| -> Result<()> {
        for (dir, m) in &parts {
            for s in &m.shards {
                crate::interrupt::check()?;
                let file = format!("shard-{:05}.safetensors", shards.len());
                let bytes = std::fs::read(dir.join(&s.file)).map_err(|e| Error::io(dir.join(&s.file), e))?;
                write_atomic(&out.join(&file), &bytes)?;
                shards.push(ShardEntry { file, ..s.clone() });
            }
        }
        Ok(())
    })();
    if let Err(e) = copied {
        // Without a manifest the copies are not an output: leave the directory as it was.
        for s in &shards {
            let _ = std::fs::remove_file(out.join(&s.file));
        }
        return Err(e.interrupted_keeping(format!("nothing merged into {}", out.display())));
    }
    let merged = Manifest {
        range_start: 0,
        range_end: first.input_sequences,
        part: None,
        shards,
        complete: true,
        ..first.clone()
    };
    merged.save(out)?;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_tile_the_input() {
        let n = 10;
        let ranges: Vec<_> = (0..3).map(|i| part_range(n, i, 3)).collect();
        assert_eq!(ranges, vec![(0, 3), (3, 6), (6, 10)]);
        assert_eq!(parse_part("2/4").unwrap(), (2, 4));
        assert!(parse_part("4/4").is_err());
        assert!(parse_part("x").is_err());
        assert!(parse_part("1/0").is_err());
    }
}
