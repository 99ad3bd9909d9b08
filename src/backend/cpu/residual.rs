//! The fused residual step: steer each row, capture it, and normalise it for the next sub-layer.
use super::norm::rms_norm_row;
use crate::engine::capture::{CapturePosition, Captured};
use crate::engine::plan::BatchPlan;
use crate::engine::steer::{PointSteering, SlotSteer, SteerOp};
use rayon::prelude::*;

fn norm2(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Applies one steering slot to one residual row.
pub fn steer_row(row: &mut [f32], s: &SlotSteer) {
    let before = if s.preserve_norm { norm2(row) } else { 0.0 };
    let scale = match s.op {
        SteerOp::Add => s.coef,
        SteerOp::SignAware => {
            let d: f32 = row.iter().zip(s.vector).map(|(a, b)| a * b).sum();
            // RepE adds c·v·sign(⟨h, c·v⟩) = |c|·v·sign(⟨h, v⟩): the row moves away from the
            // hyperplane ⟨h, v⟩ = 0 whatever the sign of c. torch.sign: 0 stays 0.
            let sign = if d > 0.0 { 1.0 } else if d < 0.0 { -1.0 } else { 0.0 };
            s.coef.abs() * sign
        }
    };
    for (h, &v) in row.iter_mut().zip(s.vector) {
        *h += scale * v;
    }
    if s.preserve_norm {
        let after = norm2(row);
        if after > 0.0 {
            let r = before / after;
            row.iter_mut().for_each(|h| *h *= r);
        }
    }
}

/// Writes the rows `src` holds for each sequence of `plan` into capture slot `slot` of the
/// pass-local buffer (row = sequence for last/mean, row = packed row for all).
/// Means are summed in row order in f64, so they do not depend on the batch.
pub fn capture_rows(src: &[f32], hidden: usize, plan: &BatchPlan, out: &mut Captured, position: CapturePosition, slot: usize) {
    for (i, seq) in plan.seqs.iter().enumerate() {
        match position {
            CapturePosition::Last => {
                let r = seq.start + seq.len - 1;
                out.row_mut(i, slot).copy_from_slice(&src[r * hidden..(r + 1) * hidden]);
            }
            CapturePosition::Mean => mean_of_rows(seq.rows().map(|r| &src[r * hidden..(r + 1) * hidden]), out.row_mut(i, slot)),
            CapturePosition::All => {
                for r in seq.rows() {
                    out.row_mut(r, slot).copy_from_slice(&src[r * hidden..(r + 1) * hidden]);
                }
            }
        }
    }
}

/// The mean of `rows` into `out`: summed in f64 in row order, divided, rounded to f32 (the
/// `mean` capture position; the scheduler reduces rows it captured whole the same way).
pub fn mean_of_rows<'a>(rows: impl Iterator<Item = &'a [f32]>, out: &mut [f32]) {
    let mut acc = vec![0f64; out.len()];
    let mut n = 0usize;
    for row in rows {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v as f64;
        }
        n += 1;
    }
    for (d, a) in out.iter_mut().zip(acc) {
        *d = (a / n as f64) as f32;
    }
}

/// Below this many values a row-wise step runs on the calling thread: waking the pool costs
/// more than the work (decode steps), and more still on a loaded machine.
pub const PAR_MIN_VALUES: usize = 1 << 15;

/// Steers every row that has a slot.
pub fn steer_rows(x: &mut [f32], hidden: usize, st: &PointSteering) {
    let one = |(row, &slot): (&mut [f32], &i32)| {
        if slot >= 0 {
            steer_row(row, &st.slots[slot as usize]);
        }
    };
    if x.len() < PAR_MIN_VALUES {
        x.chunks_mut(hidden).zip(st.row_slot.iter()).for_each(one);
    } else {
        x.par_chunks_mut(hidden).zip(st.row_slot.par_iter()).for_each(one);
    }
}

/// `x += y`, element by element.
pub fn add_rows(x: &mut [f32], y: &[f32]) {
    if x.len() < PAR_MIN_VALUES {
        x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
    } else {
        x.par_chunks_mut(4096).zip(y.par_chunks(4096)).for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
    }
}

/// RMS-normalises every row of `x` into `normed`.
pub fn norm_rows(x: &[f32], hidden: usize, norm: &[f32], eps: f32, normed: &mut [f32]) {
    if x.len() < PAR_MIN_VALUES {
        normed.chunks_mut(hidden).zip(x.chunks(hidden)).for_each(|(o, r)| rms_norm_row(r, norm, eps, o));
    } else {
        normed.par_chunks_mut(hidden).zip(x.par_chunks(hidden)).for_each(|(o, r)| rms_norm_row(r, norm, eps, o));
    }
}

/// LayerNorm of every row of `x` into `normed`.
pub fn layer_norm_rows(x: &[f32], hidden: usize, w: &[f32], b: Option<&[f32]>, eps: f32, normed: &mut [f32]) {
    if x.len() < PAR_MIN_VALUES {
        normed.chunks_mut(hidden).zip(x.chunks(hidden)).for_each(|(o, r)| super::norm::layer_norm_row(r, w, b, eps, o));
    } else {
        normed.par_chunks_mut(hidden).zip(x.par_chunks(hidden)).for_each(|(o, r)| super::norm::layer_norm_row(r, w, b, eps, o));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_operators() {
        let v = [1.0f32, 0.0, 0.0];
        let add = SlotSteer { vector: &v, coef: 2.0, op: SteerOp::Add, preserve_norm: false, table: None };
        let mut row = [-1.0f32, 1.0, 0.0];
        steer_row(&mut row, &add);
        assert_eq!(row, [1.0, 1.0, 0.0]);

        let pw = SlotSteer { op: SteerOp::SignAware, ..add };
        let mut row = [-1.0f32, 1.0, 0.0];
        steer_row(&mut row, &pw);
        assert_eq!(row, [-3.0, 1.0, 0.0]);
        // RepE: c < 0 still pushes away from ⟨h, v⟩ = 0 (|c|·v·sign(⟨h, v⟩)).
        let mut row = [-1.0f32, 1.0, 0.0];
        steer_row(&mut row, &SlotSteer { coef: -2.0, ..pw });
        assert_eq!(row, [-3.0, 1.0, 0.0]);
        let mut zero_dot = [0.0f32, 1.0, 0.0];
        steer_row(&mut zero_dot, &pw);
        assert_eq!(zero_dot, [0.0, 1.0, 0.0]);

        let keep = SlotSteer { preserve_norm: true, ..add };
        let mut row = [3.0f32, 4.0, 0.0];
        steer_row(&mut row, &keep);
        assert!((norm2(&row) - 5.0).abs() < 1e-5);
        assert!(row[0] > 3.0 * 5.0 / 5.0);
    }
}
