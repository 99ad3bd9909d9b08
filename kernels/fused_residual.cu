// kernels/fused_residual.cu -- steering + last-token capture + next-sub-layer
// norm, in one read and (at most) one write of each residual row.
//
// Runs at every "residual point": after the embedding (point 0) and after
// each sub-layer, once the sub-layer's output GEMM has accumulated into the
// residual (cuBLASLt epilogue, beta = 1). Mean capture is NOT done here: see
// mean_capture.cu (deterministic, no atomics), which the host launches right
// after this kernel when a mean capture is requested at this point. Nor is
// the f32 capture of the normalised rows (hidden-state index L): see
// capture_norm.cu, launched after this kernel at the final point.
//
// Entry points (identical argument lists):
//   fused_residual_rms  -- norm = RMSNorm   (norm_b ignored)
//   fused_residual_ln   -- norm = LayerNorm (norm_b may be null = no bias)
//
// Arguments, in order:
//   float*        resid        [T, H] f32 residual stream, in/out (row-major)
//   int           T            rows (tokens)
//   int           H            hidden size, H <= 16 * blockDim.x (<= 16384)
//   const int*    steer_slot   [T] slot index or -1 (no steering); null = none
//   const steer_slot_t* steer_table [nslots] one descriptor per slot (below)
//   const int*    capture_row  [T] row in capture_buf or -1; null = none
//   float*        capture_buf  [ncap, H] f32
//   const bf16_t* norm_w       [H] bf16 norm weight
//   const bf16_t* norm_b       [H] bf16 norm bias (LN only; may be null)
//   float         eps
//   bf16_t*       norm_out     [T, H] bf16; null = skip the norm entirely
//   float*        add_to       [T, H] f32; null = none. When given, the (steered)
//                              row is added into it: the kernel then serves a
//                              sub-layer's output before its residual add
//                              (hook_attn_out, hook_mlp_out; hook_z without
//                              add_to), with norm_out null.
//
// Launch: grid = (T, 1, 1); block = (B, 1, 1) with B a multiple of 32,
//   B = min(1024, max(128, roundup32(ceil(H / 8)))) recommended; B must be a
//   function of H only (never of T) so results do not depend on the batch.
//   Shared memory: static only (< 1 KiB). Traps if H > 16 * B.
//   f32 row pointers must be 16-byte aligned and bf16 ones 8-byte aligned
//   (cudaMalloc bases) -- the float4 path is used when H % 4 == 0. That
//   includes each slot's steering vector.
//
// steer_slot_t, 16 bytes, 16-byte aligned, little-endian as the host writes it:
//   bytes  0..8   const float* vec  [H] f32 steering vector (any allocation:
//                 the host keeps vectors resident across passes)
//   bytes  8..12  float coef
//   bytes 12..16  int   mode  bit 0: sign-aware add (RepE piecewise_linear),
//                             bit 1: preserve L2 norm
//
// CPU reference, per row t (h = resid[t, :], f32; "sum" = f32 sum, order
// unspecified; fmaf = single-rounding fused multiply-add):
//   s = steer_slot[t]
//   if s >= 0:
//     v = steer_table[s].vec[0:H], c = steer_table[s].coef, m = steer_table[s].mode
//     n0 = sqrtf(sum_i h_i^2)                      (only needed if m & 2)
//     k  = (m & 1) ? |c| * sign(sum_i h_i * v_i) : c (sign(0) = 0)
//     h_i = fmaf(k, v_i, h_i)
//     if m & 2: n1 = sqrtf(sum_i h_i^2); if n1 > 0: h_i = h_i * (n0 / n1)
//     resid[t, :] = h                              (row written only if s >= 0)
//   r = capture_row[t]; if r >= 0: capture_buf[r, :] = h
//   if norm_out: norm_out[t, :] = RMSNorm/LayerNorm(h) as in rownorm.cuh
//   if add_to:   add_to[t, :] = add_to[t, :] + h  (f32 add, the GEMM epilogue's
//                order y + (acc + b) when it accumulates)
// (RepE's piecewise_linear adds c*v*sign(dot(h, c*v)) = |c|*v*sign(dot(h, v)):
// with c < 0 the row still moves away from dot(h, v) = 0.)
#include "rownorm.cuh"

struct __align__(16) steer_slot_t {
    const float* vec;
    float coef;
    int mode;
};

template <int NORM, bool AL>
__device__ __forceinline__ void fused_residual_body(
    float* __restrict__ resid, int H, int t,
    const int* __restrict__ steer_slot, const steer_slot_t* __restrict__ steer_table,
    const int* __restrict__ capture_row, float* __restrict__ capture_buf,
    const bf16_t* __restrict__ norm_w, const bf16_t* __restrict__ norm_b, float eps,
    bf16_t* __restrict__ norm_out, float* __restrict__ add_to) {
    const int nq = (H + 3) >> 2;
    float* row = resid + (size_t)t * H;
    float x[RESID_ROW_ITEMS];
    row_load<AL>(row, H, x);

    const int slot = steer_slot != nullptr ? steer_slot[t] : -1;  // block-uniform
    if (slot >= 0) {
        const steer_slot_t desc = steer_table[slot];
        const float* v = desc.vec;
        const float c = desc.coef;
        const int mode = desc.mode;
        const bool sign_aware = (mode & 1) != 0;
        const bool keep_norm = (mode & 2) != 0;
        float n0sq = 0.0f, dot = 0.0f;
        if (sign_aware || keep_norm) {
#pragma unroll
            for (int it = 0; it < RESID_ROW_QUADS; ++it) {
                const int q = row_quad(it);
                if (q < nq) {
                    float vv[4];
                    ld_f32x4<AL>(v, q, H, vv);  // 0 beyond H, as x
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float h = x[4 * it + j];
                        dot += h * vv[j];
                        n0sq += h * h;
                    }
                }
            }
            block_sum2(n0sq, dot);
        }
        const float k = sign_aware ? fabsf(c) * resid_signf(dot) : c;
        float n1sq = 0.0f;
#pragma unroll
        for (int it = 0; it < RESID_ROW_QUADS; ++it) {
            const int q = row_quad(it);
            if (q < nq) {
                float vv[4];
                ld_f32x4<AL>(v, q, H, vv);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float h = fmaf(k, vv[j], x[4 * it + j]);  // padding stays 0
                    x[4 * it + j] = h;
                    n1sq += h * h;
                }
            }
        }
        if (keep_norm) {
            n1sq = block_sum(n1sq);
            if (n1sq > 0.0f) {
                const float scale = sqrtf(n0sq) / sqrtf(n1sq);
#pragma unroll
                for (int i = 0; i < RESID_ROW_ITEMS; ++i) x[i] = x[i] * scale;
            }
        }
        row_store<AL>(row, H, x);
    }

    const int cap = capture_row != nullptr ? capture_row[t] : -1;
    if (cap >= 0) row_store<AL>(capture_buf + (size_t)cap * H, H, x);

    if (norm_out != nullptr)
        row_norm_store<NORM, AL>(x, H, norm_w, norm_b, eps, norm_out + (size_t)t * H);

    if (add_to != nullptr) {
        float* dst = add_to + (size_t)t * H;
        float y[RESID_ROW_ITEMS];
        row_load<AL>(dst, H, y);
#pragma unroll
        for (int i = 0; i < RESID_ROW_ITEMS; ++i) y[i] = y[i] + x[i];
        row_store<AL>(dst, H, y);
    }
}

template <int NORM>
__device__ __forceinline__ void fused_residual_dispatch(
    float* resid, int T, int H, const int* steer_slot, const steer_slot_t* steer_table,
    const int* capture_row, float* capture_buf, const bf16_t* norm_w, const bf16_t* norm_b,
    float eps, bf16_t* norm_out, float* add_to) {
    row_guard(H);
    const int t = blockIdx.x;
    if (t >= T) return;
    if ((H & 3) == 0)
        fused_residual_body<NORM, true>(resid, H, t, steer_slot, steer_table, capture_row,
                                        capture_buf, norm_w, norm_b, eps, norm_out, add_to);
    else
        fused_residual_body<NORM, false>(resid, H, t, steer_slot, steer_table, capture_row,
                                         capture_buf, norm_w, norm_b, eps, norm_out, add_to);
}

extern "C" __global__ void __launch_bounds__(1024)
fused_residual_rms(float* resid, int T, int H, const int* steer_slot,
                   const steer_slot_t* steer_table, const int* capture_row, float* capture_buf,
                   const bf16_t* norm_w, const bf16_t* norm_b, float eps, bf16_t* norm_out,
                   float* add_to) {
    resid_pdl_prologue();
    fused_residual_dispatch<RESID_NORM_RMS>(resid, T, H, steer_slot, steer_table, capture_row,
                                            capture_buf, norm_w, norm_b, eps, norm_out, add_to);
}

extern "C" __global__ void __launch_bounds__(1024)
fused_residual_ln(float* resid, int T, int H, const int* steer_slot,
                  const steer_slot_t* steer_table, const int* capture_row, float* capture_buf,
                  const bf16_t* norm_w, const bf16_t* norm_b, float eps, bf16_t* norm_out,
                  float* add_to) {
    resid_pdl_prologue();
    fused_residual_dispatch<RESID_NORM_LAYER>(resid, T, H, steer_slot, steer_table, capture_row,
                                              capture_buf, norm_w, norm_b, eps, norm_out, add_to);
}
