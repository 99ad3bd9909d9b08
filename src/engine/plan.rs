//! Host-side description of one packed batch: where each sequence's tokens sit in the packed
//! rows, their positions, and where their keys and values live in the KV arena. Shared by every
//! backend, so the index maps are tested once on the CPU.

/// One sequence within a packed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSpan {
    /// First packed row of this sequence's new tokens.
    pub start: usize,
    /// Number of new tokens in this pass.
    pub len: usize,
    /// Tokens of this sequence already in the KV cache (their positions precede the new ones).
    pub past: usize,
    /// KV-arena slot holding this sequence's position 0.
    pub kv_start: usize,
}

impl SeqSpan {
    pub fn rows(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.len
    }
}

#[derive(Debug, Clone, Default)]
pub struct BatchPlan {
    pub seqs: Vec<SeqSpan>,
    /// Absolute position of each packed row.
    pub positions: Vec<u32>,
    /// Sequence index of each packed row.
    pub row_seq: Vec<u32>,
}

impl BatchPlan {
    /// `lens[i]` new tokens for sequence i, with `past[i]` cached tokens and its arena start.
    pub fn new(lens: &[usize], past: &[usize], kv_starts: &[usize]) -> Self {
        let mut plan = BatchPlan::default();
        let mut start = 0;
        for (i, &len) in lens.iter().enumerate() {
            plan.seqs.push(SeqSpan { start, len, past: past[i], kv_start: kv_starts[i] });
            for j in 0..len {
                plan.positions.push((past[i] + j) as u32);
                plan.row_seq.push(i as u32);
            }
            start += len;
        }
        plan
    }

    /// Fresh sequences (nothing cached) laid out back to back in a KV arena of their own.
    pub fn fresh(lens: &[usize]) -> Self {
        let mut kv_starts = Vec::with_capacity(lens.len());
        let mut acc = 0;
        for l in lens {
            kv_starts.push(acc);
            acc += l;
        }
        Self::new(lens, &vec![0; lens.len()], &kv_starts)
    }

    pub fn rows(&self) -> usize {
        self.positions.len()
    }

    /// Packed row of the last new token of every sequence.
    pub fn last_rows(&self) -> Vec<usize> {
        self.seqs.iter().map(|s| s.start + s.len - 1).collect()
    }

    /// The plan of [`Self::last_rows`] alone: row i is sequence i's last new token, with its
    /// position and arena slot (its earlier new tokens count as cached).
    pub fn last_rows_only(&self) -> Self {
        let past: Vec<usize> = self.seqs.iter().map(|s| s.past + s.len - 1).collect();
        let kv_starts: Vec<usize> = self.seqs.iter().map(|s| s.kv_start).collect();
        Self::new(&vec![1; self.seqs.len()], &past, &kv_starts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_rows_positions_and_slots() {
        let plan = BatchPlan::new(&[2, 3], &[0, 4], &[0, 10]);
        assert_eq!(plan.rows(), 5);
        assert_eq!(plan.positions, vec![0, 1, 4, 5, 6]);
        assert_eq!(plan.row_seq, vec![0, 0, 1, 1, 1]);
        assert_eq!(plan.last_rows(), vec![1, 4]);
        assert_eq!(plan.seqs[1].rows(), 2..5);
        let last = plan.last_rows_only();
        assert_eq!(last.positions, vec![1, 6]);
        assert_eq!(last.row_seq, vec![0, 1]);
        assert_eq!(last.seqs[1], SeqSpan { start: 1, len: 1, past: 6, kv_start: 10 });
    }
}
