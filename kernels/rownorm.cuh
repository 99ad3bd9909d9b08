// kernels/rownorm.cuh -- one-block-per-row helpers: keep an f32 row of
// length H in registers (at most RESID_ROW_ITEMS = 16 elements per thread),
// reduce over it, and write an RMSNorm / LayerNorm of it as bf16.
//
// Element -> thread mapping ("quads" of 4 consecutive elements):
//   quad q = it * blockDim.x + threadIdx.x  (it = 0 .. 3)
//   elements 4q .. 4q+3 are held in x[4*it .. 4*it+3]; elements >= H are 0.
// Requirement: H <= 16 * blockDim.x (the kernels __trap otherwise).
// AL (aligned) = (H % 4 == 0): rows are then accessed with float4 / 8-byte
// bf16x4 vectors, which needs 16-byte aligned f32 buffers and 8-byte aligned
// bf16 buffers (cudaMalloc bases are 256-byte aligned). Otherwise scalar
// accesses are used (same mapping).
//
// Norm formulas (all f32; FMA contraction allowed by the compiler):
//   RMSNorm : r = 1 / sqrtf(sum(x_i^2) / H + eps);  y_i = bf16((x_i * r) * w_i)
//   LayerNorm: mu = sum(x_i) / H;  var = sum((x_i - mu)^2) / H;
//              r = 1 / sqrtf(var + eps);  y_i = bf16(((x_i - mu) * r) * w_i + b_i)
//              (b may be null: b_i = 0)
// (sums are block reductions, see common.cuh; sqrtf and '/' are IEEE.)
#pragma once
#include "common.cuh"

#define RESID_ROW_ITEMS 16
#define RESID_ROW_QUADS 4
#define RESID_NORM_RMS 0
#define RESID_NORM_LAYER 1

// ---- quad accessors (q = quad index; valid elements are those < H) ----
template <bool AL>
__device__ __forceinline__ void ld_f32x4(const float* __restrict__ p, int q, int H, float* f) {
    if (AL) {
        const float4 v = reinterpret_cast<const float4*>(p)[q];
        f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) f[j] = (4 * q + j < H) ? p[4 * q + j] : 0.0f;
    }
}
template <bool AL>
__device__ __forceinline__ void st_f32x4(float* __restrict__ p, int q, int H, const float* f) {
    if (AL) {
        reinterpret_cast<float4*>(p)[q] = make_float4(f[0], f[1], f[2], f[3]);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (4 * q + j < H) p[4 * q + j] = f[j];
    }
}
template <bool AL>
__device__ __forceinline__ void ld_bf16x4(const bf16_t* __restrict__ p, int q, int H, float* f) {
    if (AL) {
        unpack_bf16x4(reinterpret_cast<const uint2*>(p)[q], f);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) f[j] = (4 * q + j < H) ? bf16_to_f32(p[4 * q + j]) : 0.0f;
    }
}
template <bool AL>
__device__ __forceinline__ void st_bf16x4(bf16_t* __restrict__ p, int q, int H, const float* f) {
    if (AL) {
        reinterpret_cast<uint2*>(p)[q] = pack_bf16x4(f);
    } else {
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (4 * q + j < H) p[4 * q + j] = f32_to_bf16(f[j]);
    }
}

__device__ __forceinline__ int row_quad(int it) { return it * blockDim.x + threadIdx.x; }

template <bool AL>
__device__ __forceinline__ void row_load(const float* __restrict__ row, int H, float* x) {
    const int nq = (H + 3) >> 2;
#pragma unroll
    for (int it = 0; it < RESID_ROW_QUADS; ++it) {
        const int q = row_quad(it);
        if (q < nq) {
            ld_f32x4<AL>(row, q, H, x + 4 * it);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) x[4 * it + j] = 0.0f;
        }
    }
}

template <bool AL>
__device__ __forceinline__ void row_store(float* __restrict__ row, int H, const float* x) {
    const int nq = (H + 3) >> 2;
#pragma unroll
    for (int it = 0; it < RESID_ROW_QUADS; ++it) {
        const int q = row_quad(it);
        if (q < nq) st_f32x4<AL>(row, q, H, x + 4 * it);
    }
}

// Writes norm(x) (x = the row held in registers, zero-padded) as bf16 to
// out_row. Must be called by all threads of the block (block reductions).
template <int NORM, bool AL>
__device__ __forceinline__ void row_norm_store(const float* x, int H,
                                               const bf16_t* __restrict__ w,
                                               const bf16_t* __restrict__ b,
                                               float eps, bf16_t* __restrict__ out_row) {
    const int nq = (H + 3) >> 2;
    float mu = 0.0f, r;
    if (NORM == RESID_NORM_RMS) {
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < RESID_ROW_ITEMS; ++i) ss += x[i] * x[i];  // padding is 0
        ss = block_sum(ss);
        r = 1.0f / sqrtf(ss / (float)H + eps);
    } else {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < RESID_ROW_ITEMS; ++i) s += x[i];
        s = block_sum(s);
        mu = s / (float)H;
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
        r = 1.0f / sqrtf(ss / (float)H + eps);
    }
#pragma unroll
    for (int it = 0; it < RESID_ROW_QUADS; ++it) {
        const int q = row_quad(it);
        if (q < nq) {
            float wf[4], y[4];
            ld_bf16x4<AL>(w, q, H, wf);
            if (NORM == RESID_NORM_RMS) {
#pragma unroll
                for (int j = 0; j < 4; ++j) y[j] = (x[4 * it + j] * r) * wf[j];
            } else {
                float bf[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                if (b != nullptr) ld_bf16x4<AL>(b, q, H, bf);
#pragma unroll
                for (int j = 0; j < 4; ++j) y[j] = ((x[4 * it + j] - mu) * r) * wf[j] + bf[j];
            }
            st_bf16x4<AL>(out_row, q, H, y);
        }
    }
}

// Guard used by every row kernel: the register cache must cover the row.
__device__ __forceinline__ void row_guard(int H) {
    if (H > RESID_ROW_ITEMS * (int)blockDim.x || (blockDim.x & 31) != 0) __trap();
}
