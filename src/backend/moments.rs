//! The running per-point statistics of `resid stats` ([`PointMoments`]) and their CPU fold,
//! which is also the reference of the CUDA kernel `kernels/stats_accumulate.cu`: a backend that
//! accumulates on its device hands these back (`Backend::stats_moments`), so the type belongs to
//! the backend's interface. `store::stats` drives the runs, checkpoints and writes.
use rayon::prelude::*;

/// Rows folded into an accumulator between its load and store (the block of shifted rows,
/// 256 × hidden f64, packed, stays in the L2 cache: 1.2 MB at hidden 576).
const ROW_BLOCK: usize = 256;

/// The running statistics of one capture point.
#[derive(Debug, Clone, PartialEq)]
pub struct PointMoments {
    pub hidden: usize,
    pub count: u64,
    /// The first row (the shift `k`); empty before any row.
    pub shift: Vec<f64>,
    /// `Σ (x − k)`.
    pub sum: Vec<f64>,
    /// `Σ (x − k)(x − k)ᵀ`, `[hidden, hidden]` row-major, upper triangle only (empty when
    /// second moments are not wanted).
    pub sq: Vec<f64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
}

impl PointMoments {
    pub fn new(hidden: usize, second_moments: bool) -> Self {
        PointMoments {
            hidden,
            count: 0,
            shift: Vec::new(),
            sum: vec![0.0; hidden],
            sq: if second_moments { vec![0.0; hidden * hidden] } else { Vec::new() },
            min: vec![f64::INFINITY; hidden],
            max: vec![f64::NEG_INFINITY; hidden],
        }
    }

    /// Folds `rows` (each `hidden` long, in input order) into the statistics.
    pub fn add_rows(&mut self, rows: &[&[f32]]) {
        let h = self.hidden;
        if rows.is_empty() {
            return;
        }
        if self.shift.is_empty() {
            self.shift = rows[0].iter().map(|&v| v as f64).collect();
        }
        // The shifted rows, `[n, h]` in f64, in a buffer reused from batch to batch (fresh
        // pages for every point and batch cost page faults comparable to the fold).
        let mut y = SHIFTED.with(|b| std::mem::take(&mut *b.borrow_mut()));
        y.clear();
        y.resize(rows.len() * h, 0.0);
        for (yr, r) in y.chunks_exact_mut(h).zip(rows) {
            for (j, (o, &v)) in yr.iter_mut().zip(r.iter()).enumerate() {
                let v = v as f64;
                *o = v - self.shift[j];
                self.sum[j] += *o;
                self.min[j] = self.min[j].min(v);
                self.max[j] = self.max[j].max(v);
            }
        }
        self.count += rows.len() as u64;
        if !self.sq.is_empty() {
            accumulate_outer(&mut self.sq, &y, rows.len(), h);
        }
        SHIFTED.with(|b| *b.borrow_mut() = y);
    }

    /// The mean `k + Σ(x − k)/n`.
    pub fn mean(&self) -> Vec<f64> {
        let n = self.count as f64;
        self.sum.iter().zip(&self.shift).map(|(s, k)| k + s / n).collect()
    }

    /// The covariance with n − 1 normalisation (numpy.cov), full symmetric.
    pub fn cov(&self) -> Vec<f64> {
        let (h, n) = (self.hidden, self.count as f64);
        let mut c = vec![0.0; h * h];
        for i in 0..h {
            for j in i..h {
                let v = (self.sq[i * h + j] - self.sum[i] * self.sum[j] / n) / (n - 1.0);
                c[i * h + j] = v;
                c[j * h + i] = v;
            }
        }
        c
    }

    /// The Gram matrix `Σ x xᵀ`, full symmetric.
    pub fn gram(&self) -> Vec<f64> {
        let (h, n) = (self.hidden, self.count as f64);
        let (k, s) = (&self.shift, &self.sum);
        let mut g = vec![0.0; h * h];
        for i in 0..h {
            for j in i..h {
                let v = self.sq[i * h + j] + k[i] * s[j] + s[i] * k[j] + n * k[i] * k[j];
                g[i * h + j] = v;
                g[j * h + i] = v;
            }
        }
        g
    }
}

/// `sq[i, j] += Σ_r y[r, i]·y[r, j]` for j ≥ i (and a few elements left of the diagonal),
/// each element one fused multiply-add chain over the rows in order,
/// `acc = fma(y[r, i], y[r, j], acc)`, so the result does not depend on how the rows were
/// batched or on the threads, and every instruction set gives the same bits.
///
/// Blocked like a GEMM: a block of [`ROW_BLOCK`] rows is packed into panels of
/// [`PANEL`] columns (`[rows][24]`, contiguous, in L2); threads take bands of [`TILE_ROWS`]
/// rows of `sq`, and each 8 × 24 tile of a band keeps its accumulators in registers over the
/// block's rows, broadcasting the band's own eight columns from their panel.
fn accumulate_outer(sq: &mut [f64], y: &[f64], n: usize, h: usize) {
    #[cfg(target_arch = "x86_64")]
    if h >= TILE_ROWS && std::arch::is_x86_feature_detected!("avx512f") {
        let panels = h.div_ceil(PANEL);
        let mut packed = PACKED.with(|b| std::mem::take(&mut *b.borrow_mut()));
        // Zeros in the last panel's padding columns (never stored, but multiplied).
        packed.clear();
        packed.resize(panels * ROW_BLOCK * PANEL, 0.0);
        for r0 in (0..n).step_by(ROW_BLOCK) {
            let kc = (n - r0).min(ROW_BLOCK);
            let block = &y[r0 * h..(r0 + kc) * h];
            packed.par_chunks_mut(ROW_BLOCK * PANEL).enumerate().for_each(|(p, panel)| {
                let (c0, w) = (p * PANEL, (h - p * PANEL).min(PANEL));
                for (dst, yr) in panel.chunks_exact_mut(PANEL).zip(block.chunks_exact(h)) {
                    dst[..w].copy_from_slice(&yr[c0..c0 + w]);
                }
            });
            let packed = &packed;
            sq.par_chunks_mut(TILE_ROWS * h).enumerate().for_each(|(bi, band)| {
                let i0 = bi * TILE_ROWS;
                if band.len() < TILE_ROWS * h {
                    columns_any(band, i0, block, h, i0);
                    return;
                }
                let a = &packed[i0 / PANEL * ROW_BLOCK * PANEL + i0 % PANEL..];
                for p in i0 / PANEL..panels {
                    let b = &packed[p * ROW_BLOCK * PANEL..];
                    // SAFETY: AVX-512F is present (checked above); the tile's columns
                    // p·24..p·24 + w and the band's eight rows lie inside `band`, and `a`, `b`
                    // hold kc rows of 24.
                    unsafe { outer512::tile(band.as_mut_ptr().add(p * PANEL), h, a.as_ptr(), b.as_ptr(), kc, (h - p * PANEL).min(PANEL)) };
                }
            });
        }
        PACKED.with(|b| *b.borrow_mut() = packed);
        return;
    }
    sq.par_chunks_mut(TILE_ROWS * h).enumerate().for_each(|(bi, band)| {
        let i0 = bi * TILE_ROWS;
        for r0 in (0..n).step_by(ROW_BLOCK) {
            columns_any(band, i0, &y[r0 * h..(r0 + ROW_BLOCK).min(n) * h], h, i0);
        }
    });
}

thread_local! {
    /// [`PointMoments::add_rows`]' shifted rows and [`accumulate_outer`]'s packed panels.
    static SHIFTED: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
    static PACKED: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows of `sq` per band (and per register tile).
const TILE_ROWS: usize = 8;
/// Columns of a register tile and of a packed panel: three vectors of eight f64.
const PANEL: usize = 24;

/// [`columns`], with hardware FMA where the CPU has it.
fn columns_any(band: &mut [f64], i0: usize, block: &[f64], h: usize, j0: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA (checked just above).
        unsafe { columns_fma(band, i0, block, h, j0) };
        return;
    }
    columns(band, i0, block, h, j0)
}

/// [`columns`] compiled with hardware FMA (the same operations, so the same bits).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_fma(band: &mut [f64], i0: usize, block: &[f64], h: usize, j: usize) {
    columns(band, i0, block, h, j)
}

/// The portable path (and a last band of fewer than eight rows): from column `j0`, eight
/// columns at a time (eight independent chains per row), then one.
#[inline(always)]
fn columns(band: &mut [f64], i0: usize, block: &[f64], h: usize, j0: usize) {
    for (di, row) in band.chunks_exact_mut(h).enumerate() {
        let i = i0 + di;
        let mut j = j0;
        while j < h {
            let w = if j + 8 <= h { 8 } else { 1 };
            let mut acc = [0.0f64; 8];
            acc[..w].copy_from_slice(&row[j..j + w]);
            for yr in block.chunks_exact(h) {
                let a = yr[i];
                for (s, &b) in acc[..w].iter_mut().zip(&yr[j..j + w]) {
                    *s = a.mul_add(b, *s);
                }
            }
            row[j..j + w].copy_from_slice(&acc[..w]);
            j += w;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod outer512 {
    use super::{PANEL, TILE_ROWS};
    use std::arch::x86_64::*;

    /// `band[ii, 0..w] += Σ_r a[r, ii]·b[r, 0..w]` for the [`TILE_ROWS`] rows of the band
    /// (`band` at the tile's first column, rows `h` apart; `a` and `b` rows 24 apart, `a` at the
    /// band's own columns in their panel): 24 accumulators in registers over the `kc` rows, one
    /// FMA chain per element, rows in order. Columns past `w` (the last panel's padding) are
    /// neither read nor written.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(band: *mut f64, h: usize, a: *const f64, b: *const f64, kc: usize, w: usize) {
        let mask = |v: usize| -> __mmask8 { (((1u32 << w.saturating_sub(8 * v).min(8)) - 1) & 0xff) as u8 };
        let m = [mask(0), mask(1), mask(2)];
        let mut acc = [[_mm512_setzero_pd(); 3]; TILE_ROWS];
        for (ii, row) in acc.iter_mut().enumerate() {
            for (v, c) in row.iter_mut().enumerate() {
                *c = _mm512_maskz_loadu_pd(m[v], band.add(ii * h + 8 * v));
            }
        }
        for r in 0..kc {
            let (ar, br) = (a.add(r * PANEL), b.add(r * PANEL));
            let bv = [_mm512_loadu_pd(br), _mm512_loadu_pd(br.add(8)), _mm512_loadu_pd(br.add(16))];
            for (ii, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_pd(*ar.add(ii));
                for (c, &bb) in row.iter_mut().zip(&bv) {
                    *c = _mm512_fmadd_pd(x, bb, *c);
                }
            }
        }
        for (ii, row) in acc.iter().enumerate() {
            for (v, &c) in row.iter().enumerate() {
                _mm512_mask_storeu_pd(band.add(ii * h + 8 * v), m[v], c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The register tiles, their column tails and the portable path against the plain triple
    /// loop with the same FMA chain: bit-identical on every element j ≥ i, whatever the
    /// blocking of the rows.
    #[test]
    fn folding_outer_products_is_the_plain_fma_chain() {
        let mut seed = 12345u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        for h in [1, 5, 8, 13, 24, 40, 64, 77, 100] {
            for n in [1, 3, 130, 300] {
                let y: Vec<f64> = (0..n * h).map(|_| next()).collect();
                let start: Vec<f64> = (0..h * h).map(|_| next()).collect();
                let mut want = start.clone();
                for r in 0..n {
                    for i in 0..h {
                        for j in i..h {
                            want[i * h + j] = y[r * h + i].mul_add(y[r * h + j], want[i * h + j]);
                        }
                    }
                }
                // All rows at once, then the same rows in uneven batches.
                let mut once = start.clone();
                accumulate_outer(&mut once, &y, n, h);
                let mut batched = start.clone();
                let mut r = 0;
                for step in [1, 7, 129].iter().cycle() {
                    if r >= n {
                        break;
                    }
                    let e = (r + step).min(n);
                    accumulate_outer(&mut batched, &y[r * h..e * h], e - r, h);
                    r = e;
                }
                for i in 0..h {
                    for j in i..h {
                        let (w, a, b) = (want[i * h + j], once[i * h + j], batched[i * h + j]);
                        assert!(w.to_bits() == a.to_bits() && w.to_bits() == b.to_bits(), "h {h} n {n} [{i},{j}]: {w} vs {a} / {b}");
                    }
                }
            }
        }
    }
}
