// kernels/capture_norm.cu -- f32 capture of normalised residual rows (the
// hidden state "after the final norm", index L), written straight into the
// capture plane, only for the captured rows.
//
// The fused residual kernel at the final point writes the norm of every row
// in bf16 for the LM head; a capture needs it in f32, and only for the last
// row of each sequence, every row, or the mean over a sequence's rows. One
// segment is rows begin..end of the residual whose normalised values are
// summed (in row order), weighted, and written as one output row: the host
// passes one-row segments with weight 1 for last/all, and one segment per
// sequence with weight 1/len for mean.
//
// Entry points (identical argument lists):
//   capture_norm_rms  (norm_b ignored)
//   capture_norm_ln   (norm_b may be null = no bias)
// Arguments, in order:
//   const float* resid      [T, H] f32 residual (read only; already steered)
//   int          H
//   const int*   seg_begin  [nseg] first row of the segment
//   const int*   seg_end    [nseg] one past its last row (begin < end)
//   const int*   seg_dst    [nseg] destination row of out, in units of H floats
//   const float* seg_weight [nseg] weight of the segment's sum
//   const float* norm_w     [H] f32 norm weight
//   const float* norm_b     [H] f32 norm bias (LN only; may be null)
//   float        eps
//   float*       out        row seg_dst[s] (H floats) written per segment
//   int          nseg
// Launch: grid = (nseg, 1, 1); block = B(H) exactly as for fused_residual_*
//   (a multiple of 32, a function of H only, H <= 16 * B); static smem
//   < 1 KiB. Traps if H > 16 * B. f32 rows 16-byte aligned when H % 4 == 0.
//   Segments must not share a destination row.
//
// CPU reference, per segment (all f32; sums as the block reductions of
// common.cuh; x = resid[t, :]):
//   acc = 0
//   for t = begin .. end-1 (ascending):
//     RMS: r = 1 / sqrtf(sum(x_i^2) / H + eps);           acc_i += x_i * r
//     LN : mu = sum(x_i) / H; var = sum((x_i - mu)^2) / H;
//          r = 1 / sqrtf(var + eps);                      acc_i += (x_i - mu) * r
//   out[dst, i] = (weight * acc_i) * w_i        (+ b_i for LN)
// With one row and weight 1 this is the f32 norm (x_i * r) * w_i of the CPU
// backend. RMS reads rows two at a time sharing one block reduction (LN one
// at a time); the result depends only on the segment's rows and blockDim,
// never on the batch.
#include "rownorm.cuh"

// Norm factors of one row, or of two rows sharing each block reduction
// (PAIR; x1 is all zeros when the second row is absent): r = 1/sqrt(...),
// mu = mean (0 for RMS).
template <int NORM, bool PAIR>
__device__ __forceinline__ void row_stats(const float* x0, const float* x1, int H, float eps,
                                          float& mu0, float& r0, float& mu1, float& r1) {
    float a = 0.0f, b = 0.0f;
    mu0 = 0.0f;
    mu1 = 0.0f;
    if (NORM == RESID_NORM_RMS) {
#pragma unroll
        for (int i = 0; i < RESID_ROW_ITEMS; ++i) {  // padding is 0
            a += x0[i] * x0[i];
            if (PAIR) b += x1[i] * x1[i];
        }
    } else {
#pragma unroll
        for (int i = 0; i < RESID_ROW_ITEMS; ++i) {
            a += x0[i];
            if (PAIR) b += x1[i];
        }
        if (PAIR) block_sum2(a, b); else a = block_sum(a);
        mu0 = a / (float)H;
        mu1 = b / (float)H;
        a = 0.0f;
        b = 0.0f;
#pragma unroll
        for (int it = 0; it < RESID_ROW_QUADS; ++it) {
            const int q = row_quad(it);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (4 * q + j < H) {  // padding is not 0 after subtracting mu
                    const float d0 = x0[4 * it + j] - mu0;
                    a += d0 * d0;
                    if (PAIR) {
                        const float d1 = x1[4 * it + j] - mu1;
                        b += d1 * d1;
                    }
                }
            }
        }
    }
    if (PAIR) block_sum2(a, b); else a = block_sum(a);
    r0 = 1.0f / sqrtf(a / (float)H + eps);
    r1 = PAIR ? 1.0f / sqrtf(b / (float)H + eps) : 0.0f;
}

// RMSNorm reads two rows per block reduction; LayerNorm one (two would need
// more than the 64 registers __launch_bounds__(1024) leaves, and spill).
template <int NORM, bool AL>
__device__ __forceinline__ void capture_norm_body(const float* __restrict__ resid, int H, int b,
                                                  int e, float weight,
                                                  const float* __restrict__ norm_w,
                                                  const float* __restrict__ norm_b, float eps,
                                                  float* __restrict__ dst) {
    constexpr bool PAIR = NORM == RESID_NORM_RMS;
    float acc[RESID_ROW_ITEMS];
#pragma unroll
    for (int i = 0; i < RESID_ROW_ITEMS; ++i) acc[i] = 0.0f;
    for (int t = b; t < e; t += PAIR ? 2 : 1) {
        const bool two = PAIR && t + 1 < e;  // block-uniform
        float x0[RESID_ROW_ITEMS], x1[RESID_ROW_ITEMS];
        row_load<AL>(resid + (size_t)t * H, H, x0);
        if (two) {
            row_load<AL>(resid + (size_t)(t + 1) * H, H, x1);
        } else {
#pragma unroll
            for (int i = 0; i < RESID_ROW_ITEMS; ++i) x1[i] = 0.0f;
        }
        float mu0, r0, mu1, r1;
        row_stats<NORM, PAIR>(x0, x1, H, eps, mu0, r0, mu1, r1);
#pragma unroll
        for (int i = 0; i < RESID_ROW_ITEMS; ++i)
            acc[i] += (NORM == RESID_NORM_RMS) ? x0[i] * r0 : (x0[i] - mu0) * r0;
        if (two) {
#pragma unroll
            for (int i = 0; i < RESID_ROW_ITEMS; ++i)
                acc[i] += (NORM == RESID_NORM_RMS) ? x1[i] * r1 : (x1[i] - mu1) * r1;
        }
    }
    const int nq = (H + 3) >> 2;
#pragma unroll
    for (int it = 0; it < RESID_ROW_QUADS; ++it) {
        const int q = row_quad(it);
        if (q < nq) {
            float wf[4], bf[4] = {0.0f, 0.0f, 0.0f, 0.0f}, y[4];
            ld_f32x4<AL>(norm_w, q, H, wf);
            if (NORM == RESID_NORM_LAYER && norm_b != nullptr) ld_f32x4<AL>(norm_b, q, H, bf);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float v = (weight * acc[4 * it + j]) * wf[j];
                y[j] = (NORM == RESID_NORM_LAYER) ? v + bf[j] : v;
            }
            st_f32x4<AL>(dst, q, H, y);
        }
    }
}

template <int NORM>
__device__ __forceinline__ void capture_norm_dispatch(
    const float* resid, int H, const int* seg_begin, const int* seg_end, const int* seg_dst,
    const float* seg_weight, const float* norm_w, const float* norm_b, float eps, float* out,
    int nseg) {
    row_guard(H);
    const int s = blockIdx.x;
    if (s >= nseg) return;
    const int b = seg_begin[s], e = seg_end[s];
    const float weight = seg_weight[s];
    float* dst = out + (size_t)seg_dst[s] * H;
    if ((H & 3) == 0)
        capture_norm_body<NORM, true>(resid, H, b, e, weight, norm_w, norm_b, eps, dst);
    else
        capture_norm_body<NORM, false>(resid, H, b, e, weight, norm_w, norm_b, eps, dst);
}

extern "C" __global__ void __launch_bounds__(1024)
capture_norm_rms(const float* resid, int H, const int* seg_begin, const int* seg_end,
                 const int* seg_dst, const float* seg_weight, const float* norm_w,
                 const float* norm_b, float eps, float* out, int nseg) {
    resid_pdl_prologue();
    capture_norm_dispatch<RESID_NORM_RMS>(resid, H, seg_begin, seg_end, seg_dst, seg_weight,
                                          norm_w, norm_b, eps, out, nseg);
}

extern "C" __global__ void __launch_bounds__(1024)
capture_norm_ln(const float* resid, int H, const int* seg_begin, const int* seg_end,
                const int* seg_dst, const float* seg_weight, const float* norm_w,
                const float* norm_b, float eps, float* out, int nseg) {
    resid_pdl_prologue();
    capture_norm_dispatch<RESID_NORM_LAYER>(resid, H, seg_begin, seg_end, seg_dst, seg_weight,
                                            norm_w, norm_b, eps, out, nseg);
}
