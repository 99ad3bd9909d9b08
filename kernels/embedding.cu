// kernels/embedding.cu -- token embedding gather into the f32 residual.
//
// Entry points:
//   embedding_gather(const bf16_t* table, const int* ids, float* resid,
//                    int T, int H, int vocab, float scale)
//     table [vocab, H] bf16, ids [T] int32, resid [T, H] f32 (written).
//     Launch: grid = (T, 1, 1), block = (256, 1, 1) (any multiple of 32),
//     no smem. H % 4 == 0 uses 8-byte / 16-byte vector accesses (aligned
//     bases required), otherwise scalar.
//     CPU reference: resid[t, i] = (0 <= ids[t] < vocab)
//                                  ? f32(table[ids[t], i]) * scale : 0.0f
//     (scale = 1.0f for families that do not scale; Gemma-style scaling
//     passes the scale already rounded the way the family rounds it.)
//
//   embedding_gather_ln(const bf16_t* table, const int* ids, float* resid,
//                       int T, int H, int vocab, float scale,
//                       const bf16_t* ln_w, const bf16_t* ln_b, float eps)
//     BLOOM's word_embeddings_layernorm: gather as above, then
//     resid[t, :] = LayerNorm(e) in f32 (NOT rounded to bf16):
//       mu = sum(e)/H; var = sum((e-mu)^2)/H; r = 1/sqrtf(var+eps)
//       resid[t, i] = ((e_i - mu) * r) * f32(ln_w[i]) + f32(ln_b[i])
//     (ln_b may be null = 0.)
//     Launch: grid = (T, 1, 1), block = B as for fused_residual_*
//     (multiple of 32, H <= 16 * B, B a function of H only).
#include "rownorm.cuh"

extern "C" __global__ void __launch_bounds__(1024)
embedding_gather(const bf16_t* __restrict__ table, const int* __restrict__ ids,
                 float* __restrict__ resid, int T, int H, int vocab, float scale) {
    resid_pdl_prologue();
    const int t = blockIdx.x;
    if (t >= T) return;
    const int id = ids[t];
    const bool valid = id >= 0 && id < vocab;
    const bf16_t* src = table + (size_t)(valid ? id : 0) * H;
    float* dst = resid + (size_t)t * H;
    if ((H & 3) == 0) {
        const int nq = H >> 2;
        for (int q = threadIdx.x; q < nq; q += blockDim.x) {
            float f[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (valid) {
                unpack_bf16x4(reinterpret_cast<const uint2*>(src)[q], f);
#pragma unroll
                for (int j = 0; j < 4; ++j) f[j] = f[j] * scale;
            }
            reinterpret_cast<float4*>(dst)[q] = make_float4(f[0], f[1], f[2], f[3]);
        }
    } else {
        for (int i = threadIdx.x; i < H; i += blockDim.x)
            dst[i] = valid ? bf16_to_f32(src[i]) * scale : 0.0f;
    }
}

template <bool AL>
__device__ __forceinline__ void embedding_ln_body(const bf16_t* __restrict__ src, bool valid,
                                                  float* __restrict__ dst, int H, float scale,
                                                  const bf16_t* __restrict__ ln_w,
                                                  const bf16_t* __restrict__ ln_b, float eps) {
    const int nq = (H + 3) >> 2;
    float x[RESID_ROW_ITEMS];
#pragma unroll
    for (int it = 0; it < RESID_ROW_QUADS; ++it) {
        const int q = row_quad(it);
        float f[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (q < nq && valid) ld_bf16x4<AL>(src, q, H, f);
#pragma unroll
        for (int j = 0; j < 4; ++j) x[4 * it + j] = f[j] * scale;
    }
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < RESID_ROW_ITEMS; ++i) s += x[i];
    s = block_sum(s);
    const float mu = s / (float)H;
    float ss = 0.0f;
#pragma unroll
    for (int it = 0; it < RESID_ROW_QUADS; ++it) {
        const int q = row_quad(it);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (4 * q + j < H) {
                const float d = x[4 * it + j] - mu;
                ss += d * d;
            }
        }
    }
    ss = block_sum(ss);
    const float r = 1.0f / sqrtf(ss / (float)H + eps);
#pragma unroll
    for (int it = 0; it < RESID_ROW_QUADS; ++it) {
        const int q = row_quad(it);
        if (q < nq) {
            float wf[4], bf[4] = {0.0f, 0.0f, 0.0f, 0.0f}, y[4];
            ld_bf16x4<AL>(ln_w, q, H, wf);
            if (ln_b != nullptr) ld_bf16x4<AL>(ln_b, q, H, bf);
#pragma unroll
            for (int j = 0; j < 4; ++j) y[j] = ((x[4 * it + j] - mu) * r) * wf[j] + bf[j];
            st_f32x4<AL>(dst, q, H, y);
        }
    }
}

extern "C" __global__ void __launch_bounds__(1024)
embedding_gather_ln(const bf16_t* __restrict__ table, const int* __restrict__ ids,
                    float* __restrict__ resid, int T, int H, int vocab, float scale,
                    const bf16_t* __restrict__ ln_w, const bf16_t* __restrict__ ln_b, float eps) {
    resid_pdl_prologue();
    row_guard(H);
    const int t = blockIdx.x;
    if (t >= T) return;
    const int id = ids[t];
    const bool valid = id >= 0 && id < vocab;
    const bf16_t* src = table + (size_t)(valid ? id : 0) * H;
    float* dst = resid + (size_t)t * H;
    if ((H & 3) == 0)
        embedding_ln_body<true>(src, valid, dst, H, scale, ln_w, ln_b, eps);
    else
        embedding_ln_body<false>(src, valid, dst, H, scale, ln_w, ln_b, eps);
}
