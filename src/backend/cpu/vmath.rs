//! Vectorised elementwise math: `exp` and SwiGLU. On AVX-512 every element goes through the same
//! 16-lane code (row tails through masked loads), elsewhere through libm; either way an
//! element's result depends only on its own inputs, never on the batch.

/// `out[i] = silu(gate[i]) · up[i]` with silu(x) = x / (1 + e^(−x)).
pub fn swiglu_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    // SAFETY: three slices of out.len() elements.
    unsafe { swiglu_raw(gate.as_ptr(), up.as_ptr(), out.as_mut_ptr(), out.len()) }
}

/// [`swiglu_row`] written over `gate` (the fused GEMM's epilogue stores the result where the
/// gate's products were, with no copy through a buffer). The same bits as `swiglu_row`.
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    // SAFETY: element i is read before it is written, by the same lane of the same step.
    unsafe { swiglu_raw(gate.as_ptr(), up.as_ptr(), gate.as_mut_ptr(), gate.len()) }
}

/// `out` may be `gate` itself: each element is read and then written in one step.
unsafe fn swiglu_raw(gate: *const f32, up: *const f32, out: *mut f32, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::gemm::isa() == super::gemm::Isa::Avx512 {
            // SAFETY: AVX-512F checked.
            avx512::swiglu_raw(gate, up, out, n);
            return;
        }
    }
    for i in 0..n {
        let (g, u) = (*gate.add(i), *up.add(i));
        *out.add(i) = g / (1.0 + (-g).exp()) * u;
    }
}

/// BLOOM's tanh approximation of GELU, with its constant (libm's tanh on every CPU).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    x * 0.5 * (1.0 + (0.797_884_6 * x * (1.0 + 0.044715 * x * x)).tanh())
}

/// `x[i] = e^(x[i] − m)` in place; returns Σ x[i] summed in index order, lane by lane of 16
/// (then lanes in a fixed tree), so the sum depends only on the values and the length.
pub fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if super::gemm::isa() == super::gemm::Isa::Avx512 {
            // SAFETY: AVX-512F checked.
            return unsafe { avx512::exp_sub_sum(x, m) };
        }
    }
    let mut lanes = [0f32; 16];
    for (i, v) in x.iter_mut().enumerate() {
        *v = (*v - m).exp();
        lanes[i % 16] += *v;
    }
    tree16(&lanes)
}

/// `Σ a[i]·b[i]`: lane l (of 16) is the FMA chain over i ≡ l (mod 16) in order, then the lanes
/// are summed in a fixed tree. The same bits on every instruction set.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if super::gemm::isa() == super::gemm::Isa::Avx512 {
            // SAFETY: AVX-512F checked.
            return unsafe { avx512::dot(a, b) };
        }
    }
    let mut lanes = [0f32; 16];
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        lanes[i % 16] = x.mul_add(y, lanes[i % 16]);
    }
    tree16(&lanes)
}

/// `o[i] = p·v[i] + o[i]` (one FMA per element).
pub fn axpy(p: f32, v: &[f32], o: &mut [f32]) {
    assert_eq!(v.len(), o.len());
    #[cfg(target_arch = "x86_64")]
    {
        if super::gemm::isa() == super::gemm::Isa::Avx512 {
            // SAFETY: AVX-512F checked.
            unsafe { avx512::axpy(p, v, o) };
            return;
        }
    }
    for (o, &x) in o.iter_mut().zip(v) {
        *o = p.mul_add(x, *o);
    }
}

/// A fixed pairwise sum of 16 lanes.
pub fn tree16(l: &[f32; 16]) -> f32 {
    let mut a = [0f32; 8];
    for i in 0..8 {
        a[i] = l[i] + l[i + 8];
    }
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    /// e^x for 16 lanes: x = n·ln2 + r, |r| ≤ ln2/2, a degree-6 polynomial for e^r, scaled by
    /// 2^n. Relative error about 2 ulp over the normal range; 0 below −103 (and for −∞).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn exp16(x: __m512) -> __m512 {
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, _mm512_set1_ps(-103.0));
        let x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.722_83)), _mm512_set1_ps(-103.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 120.0));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 24.0));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0 / 6.0));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
        _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n))
    }

    /// The lanes of a 16-wide step at `i` over `n` values: all 16, the tail's, or none past n.
    #[inline(always)]
    pub fn mask(n: usize, i: usize) -> __mmask16 {
        let left = n.saturating_sub(i);
        if left >= 16 {
            0xffff
        } else {
            (1u32 << left) as u16 - 1
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let m = mask(n, i);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, b.as_ptr().add(i)), acc);
            i += 16;
        }
        sum_tree16(acc)
    }

    /// The sum of the 16 lanes in [`super::tree16`]'s order ((l, l+8), then (l, l+4), then
    /// (0,2)+(1,3)), without a round trip through memory.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn sum_tree16(acc: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(acc);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
        let a8 = _mm256_add_ps(lo, hi);
        let b4 = _mm_add_ps(_mm256_castps256_ps128(a8), _mm256_extractf128_ps::<1>(a8));
        let mut t = [0f32; 4];
        _mm_storeu_ps(t.as_mut_ptr(), b4);
        (t[0] + t[2]) + (t[1] + t[3])
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn axpy(p: f32, v: &[f32], o: &mut [f32]) {
        let n = v.len();
        let pv = _mm512_set1_ps(p);
        let mut i = 0;
        while i < n {
            let m = mask(n, i);
            let r = _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(m, v.as_ptr().add(i)), _mm512_maskz_loadu_ps(m, o.as_ptr().add(i)));
            _mm512_mask_storeu_ps(o.as_mut_ptr().add(i), m, r);
            i += 16;
        }
    }

    /// `out` may be `gate`: each 16 elements are loaded before they are stored.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn swiglu_raw(gate: *const f32, up: *const f32, out: *mut f32, n: usize) {
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let m = mask(n, i);
            let g = _mm512_maskz_loadu_ps(m, gate.add(i));
            let u = _mm512_maskz_loadu_ps(m, up.add(i));
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
            _mm512_mask_storeu_ps(out.add(i), m, _mm512_mul_ps(s, u));
            i += 16;
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        let n = x.len();
        let mv = _mm512_set1_ps(m);
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let k = mask(n, i);
            let v = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x.as_ptr().add(i)), mv));
            let v = _mm512_maskz_mov_ps(k, v);
            _mm512_mask_storeu_ps(x.as_mut_ptr().add(i), k, v);
            acc = _mm512_add_ps(acc, v);
            i += 16;
        }
        sum_tree16(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_is_the_portable_chain() {
        for n in [1usize, 7, 16, 20, 64, 100] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let mut lanes = [0f32; 16];
            for i in 0..n {
                lanes[i % 16] = a[i].mul_add(b[i], lanes[i % 16]);
            }
            assert_eq!(dot(&a, &b), tree16(&lanes), "n = {n}");
        }
    }

    #[test]
    fn exp_and_swiglu_match_libm() {
        let xs: Vec<f32> = (0..3801).map(|i| (i as f32 - 2000.0) * 0.05).collect();
        let mut e = xs.clone();
        let s = exp_sub_sum(&mut e, 20.0);
        let mut want_sum = 0f64;
        for (&x, &v) in xs.iter().zip(&e) {
            let w = ((x - 20.0) as f64).exp();
            want_sum += w;
            assert!(((v as f64) - w).abs() <= 4e-7 * w + 1e-38, "exp({x} - 20) = {v}, want {w}");
        }
        assert!(((s as f64) - want_sum).abs() <= 1e-4 * want_sum, "sum {s} vs {want_sum}");
        let up: Vec<f32> = xs.iter().map(|x| 0.5 - x * 0.1).collect();
        let mut out = vec![0f32; xs.len()];
        swiglu_row(&xs, &up, &mut out);
        for i in 0..xs.len() {
            let g = xs[i] as f64;
            let want = g / (1.0 + (-g).exp()) * up[i] as f64;
            // Relative (1e-6: about 8 ulp, for exp's 2 and three roundings); below −88.7, e^(−g)
            // saturates at f32's largest value, so there only a bound near zero holds.
            let bound = if g > -88.0 { 1e-6 * want.abs() } else { 1e-35 };
            assert!((out[i] as f64 - want).abs() <= bound, "{i}: silu({g}) · {} = {} vs {want}", up[i], out[i]);
        }
        // In place: the same bits, at every length's tail.
        for n in [1, 15, 16, 17, 64, 3801] {
            let mut inplace = xs[..n].to_vec();
            swiglu_in_place(&mut inplace, &up[..n]);
            let mut want = vec![0f32; n];
            swiglu_row(&xs[..n], &up[..n], &mut want);
            assert_eq!(inplace.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "n = {n}");
        }
    }
}
