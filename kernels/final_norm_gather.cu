// kernels/final_norm_gather.cu -- final norm of selected residual rows into a
// compact bf16 buffer (the LM head input).
//
// Entry points (identical argument lists):
//   final_norm_gather_rms  (norm_b ignored)
//   final_norm_gather_ln   (norm_b may be null = no bias)
// Arguments, in order:
//   const float*  resid    [T, H] f32 residual (read only)
//   const int*    rows     [nrows] int32 row indices into resid
//   const bf16_t* norm_w   [H]
//   const bf16_t* norm_b   [H] or null
//   float         eps
//   bf16_t*       out      [nrows, H] bf16; out[i, :] = norm(resid[rows[i], :])
//   int           H
//   int           nrows
// Launch: grid = (nrows, 1, 1), block = B as for fused_residual_* (multiple
//   of 32, H <= 16 * B, B = min(1024, max(128, roundup32(ceil(H/8))))),
//   static smem < 1 KiB.
// CPU reference: exactly the RMSNorm / LayerNorm formulas of rownorm.cuh.
#include "rownorm.cuh"

template <int NORM>
__device__ __forceinline__ void final_norm_gather_impl(const float* __restrict__ resid,
                                                       const int* __restrict__ rows,
                                                       const bf16_t* __restrict__ norm_w,
                                                       const bf16_t* __restrict__ norm_b,
                                                       float eps, bf16_t* __restrict__ out,
                                                       int H, int nrows) {
    row_guard(H);
    const int i = blockIdx.x;
    if (i >= nrows) return;
    const float* src = resid + (size_t)rows[i] * H;
    bf16_t* dst = out + (size_t)i * H;
    float x[RESID_ROW_ITEMS];
    if ((H & 3) == 0) {
        row_load<true>(src, H, x);
        row_norm_store<NORM, true>(x, H, norm_w, norm_b, eps, dst);
    } else {
        row_load<false>(src, H, x);
        row_norm_store<NORM, false>(x, H, norm_w, norm_b, eps, dst);
    }
}

extern "C" __global__ void __launch_bounds__(1024)
final_norm_gather_rms(const float* resid, const int* rows, const bf16_t* norm_w,
                      const bf16_t* norm_b, float eps, bf16_t* out, int H, int nrows) {
    resid_pdl_prologue();
    final_norm_gather_impl<RESID_NORM_RMS>(resid, rows, norm_w, norm_b, eps, out, H, nrows);
}

extern "C" __global__ void __launch_bounds__(1024)
final_norm_gather_ln(const float* resid, const int* rows, const bf16_t* norm_w,
                     const bf16_t* norm_b, float eps, bf16_t* out, int H, int nrows) {
    resid_pdl_prologue();
    final_norm_gather_impl<RESID_NORM_LAYER>(resid, rows, norm_w, norm_b, eps, out, H, nrows);
}
