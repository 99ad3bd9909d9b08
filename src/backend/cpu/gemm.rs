//! `y = x · Wᵀ (+ b)` for row-major activations x [T, K] and HF-layout weights W [N, K].
//!
//! Every output element is one dot product computed in exactly the same order whatever
//! the batch: 8 accumulation lanes over K in steps of 8, a fixed pairwise lane sum, then the
//! K tail in sequence. The register blocking (which tokens and rows share a pass) never changes
//! that order, so a sentence's activations are bit-identical whatever shares its batch.
use rayon::prelude::*;

/// Weight rows handled by one parallel task: enough to stream a panel per thread.
const ROWS_PER_TASK: usize = 16;

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges of y.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Computes `y[t, n] = Σ_k x[t, k]·w[n, k] + bias[n]`, adding to y instead when `accumulate`.
pub fn linear(x: &[f32], tokens: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32], accumulate: bool) {
    assert_eq!(x.len(), tokens * k, "x shape");
    assert_eq!(w.len(), n * k, "w shape");
    assert_eq!(y.len(), tokens * n, "y shape");
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "bias shape");
    }
    let out = SendPtr(y.as_mut_ptr());
    let tasks = n.div_ceil(ROWS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|task| {
        let n0 = task * ROWS_PER_TASK;
        let n1 = (n0 + ROWS_PER_TASK).min(n);
        let out = out;
        // SAFETY: each task owns columns n0..n1 of every row; indices are bounded by the asserts above.
        unsafe { panel(x, tokens, k, w, n, n0, n1, bias, out.0, accumulate) };
    });
}

#[allow(clippy::too_many_arguments)]
unsafe fn panel(x: &[f32], tokens: usize, k: usize, w: &[f32], n: usize, n0: usize, n1: usize, bias: Option<&[f32]>, y: *mut f32, accumulate: bool) {
    let mut t = 0;
    while t < tokens {
        let mt = (tokens - t).min(4);
        let mut j = n0;
        while j < n1 {
            let nt = (n1 - j).min(2);
            let mut dots = [[0f32; 2]; 4];
            dot_block(x, k, w, t, mt, j, nt, &mut dots);
            for (i, row) in dots.iter().enumerate().take(mt) {
                for (jj, &d) in row.iter().enumerate().take(nt) {
                    let col = j + jj;
                    let v = d + bias.map_or(0.0, |b| b[col]);
                    let dst = y.add((t + i) * n + col);
                    *dst = if accumulate { *dst + v } else { v };
                }
            }
            j += nt;
        }
        t += mt;
    }
}

/// Dot products of x rows t..t+mt with w rows j..j+nt.
#[allow(clippy::too_many_arguments)]
fn dot_block(x: &[f32], k: usize, w: &[f32], t: usize, mt: usize, j: usize, nt: usize, out: &mut [[f32; 2]; 4]) {
    #[cfg(target_arch = "x86_64")]
    {
        if simd::has_avx2_fma() {
            // SAFETY: feature presence checked at run time.
            unsafe { simd::dot_block_avx2(x, k, w, t, mt, j, nt, out) };
            return;
        }
    }
    dot_block_portable(x, k, w, t, mt, j, nt, out);
}

fn lane_sum(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

#[allow(clippy::too_many_arguments)]
fn dot_block_portable(x: &[f32], k: usize, w: &[f32], t: usize, mt: usize, j: usize, nt: usize, out: &mut [[f32; 2]; 4]) {
    let k8 = k / 8 * 8;
    for i in 0..mt {
        let xr = &x[(t + i) * k..(t + i + 1) * k];
        for jj in 0..nt {
            let wr = &w[(j + jj) * k..(j + jj + 1) * k];
            let mut lanes = [0f32; 8];
            for (xc, wc) in xr[..k8].chunks_exact(8).zip(wr[..k8].chunks_exact(8)) {
                for l in 0..8 {
                    lanes[l] += xc[l] * wc[l];
                }
            }
            let mut s = lane_sum(&lanes);
            for kk in k8..k {
                s += xr[kk] * wr[kk];
            }
            out[i][jj] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn has_avx2_fma() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dot_block_avx2(x: &[f32], k: usize, w: &[f32], t: usize, mt: usize, j: usize, nt: usize, out: &mut [[f32; 2]; 4]) {
        match (mt, nt) {
            (4, 2) => block::<4, 2>(x, k, w, t, j, out),
            (4, 1) => block::<4, 1>(x, k, w, t, j, out),
            (3, 2) => block::<3, 2>(x, k, w, t, j, out),
            (3, 1) => block::<3, 1>(x, k, w, t, j, out),
            (2, 2) => block::<2, 2>(x, k, w, t, j, out),
            (2, 1) => block::<2, 1>(x, k, w, t, j, out),
            (1, 2) => block::<1, 2>(x, k, w, t, j, out),
            _ => block::<1, 1>(x, k, w, t, j, out),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const MT: usize, const NT: usize>(x: &[f32], k: usize, w: &[f32], t: usize, j: usize, out: &mut [[f32; 2]; 4]) {
        let k8 = k / 8 * 8;
        let xp = x.as_ptr().add(t * k);
        let wp = w.as_ptr().add(j * k);
        let mut acc = [[_mm256_setzero_ps(); NT]; MT];
        let mut kk = 0;
        while kk < k8 {
            let mut wv = [_mm256_setzero_ps(); NT];
            for (jj, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(wp.add(jj * k + kk));
            }
            for (i, acc_row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(xp.add(i * k + kk));
                for (jj, a) in acc_row.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(xv, wv[jj], *a);
                }
            }
            kk += 8;
        }
        for i in 0..MT {
            for jj in 0..NT {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[i][jj]);
                let mut s = super::lane_sum(&lanes);
                for kt in k8..k {
                    s += *xp.add(i * k + kt) * *wp.add(jj * k + kt);
                }
                out[i][jj] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], t: usize, k: usize, w: &[f32], n: usize, b: Option<&[f32]>) -> Vec<f32> {
        let mut y = vec![0f32; t * n];
        for i in 0..t {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    s += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                y[i * n + j] = s as f32 + b.map_or(0.0, |b| b[j]);
            }
        }
        y
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_reference_on_odd_shapes() {
        for &(t, k, n) in &[(1, 1, 1), (3, 7, 5), (5, 17, 33), (9, 64, 19), (4, 576, 40)] {
            let x = pseudo(t * k, 1);
            let w = pseudo(n * k, 2);
            let b = pseudo(n, 3);
            let want = reference(&x, t, k, &w, n, Some(&b));
            let mut y = vec![0f32; t * n];
            linear(&x, t, k, &w, n, Some(&b), &mut y, false);
            for (a, e) in y.iter().zip(&want) {
                assert!((a - e).abs() <= 1e-5 * (1.0 + e.abs()), "{t}x{k}x{n}: {a} vs {e}");
            }
            let mut acc = vec![1f32; t * n];
            linear(&x, t, k, &w, n, Some(&b), &mut acc, true);
            for (a, e) in acc.iter().zip(&want) {
                assert!((a - (e + 1.0)).abs() <= 1e-5 * (1.0 + e.abs()));
            }
        }
    }

    #[test]
    fn rows_are_batch_invariant() {
        let (k, n) = (100, 23);
        let x = pseudo(7 * k, 4);
        let w = pseudo(n * k, 5);
        let mut all = vec![0f32; 7 * n];
        linear(&x, 7, k, &w, n, None, &mut all, false);
        for t in 0..7 {
            let mut one = vec![0f32; n];
            linear(&x[t * k..(t + 1) * k], 1, k, &w, n, None, &mut one, false);
            assert_eq!(one, all[t * n..(t + 1) * n], "row {t} differs when computed alone");
        }
    }
}
