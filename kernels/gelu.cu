// kernels/gelu.cu -- bias + tanh-approximated GELU (BLOOM MLP).
//
// Entry point:
//   gelu_tanh_bias(const bf16_t* in, const bf16_t* bias, bf16_t* out,
//                  int T, int I)
//     in   [T, I] bf16 (dense_h_to_4h GEMM output, without bias)
//     bias [I] bf16 or null (no bias)
//     out  [T, I] bf16 (may alias `in`: each element is read then written
//          by the same thread)
// Launch: block = (256, 1, 1), grid-stride loop (any grid is correct);
//   recommended grid = ceil(T * I / 8 / 256) capped at 2^20. No smem.
//   I % 8 == 0 uses 16-byte accesses (aligned bases required), else scalar.
// CPU reference (f32 math, BLOOM's bloom_gelu_forward form, one rounding):
//   x = f32(in[t, i]) + (bias ? f32(bias[i]) : 0)
//   out[t, i] = bf16(x * 0.5f * (1.0f + tanhf(0.79788456f * x * (1.0f + 0.044715f * x * x))))
#include "common.cuh"

__device__ __forceinline__ float gelu_tanh_f32(float x) {
    return x * 0.5f * (1.0f + tanhf(0.79788456f * x * (1.0f + 0.044715f * x * x)));
}

extern "C" __global__ void __launch_bounds__(1024)
gelu_tanh_bias(const bf16_t* in, const bf16_t* __restrict__ bias, bf16_t* out, int T, int I) {
    resid_pdl_prologue();
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t tid0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if ((I & 7) == 0) {
        const int per_row = I >> 3;
        const size_t n = (size_t)T * per_row;
        for (size_t k = tid0; k < n; k += stride) {
            const size_t t = k / per_row;
            const int c = (int)(k - t * per_row);
            float x[8], b[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, y[8];
            unpack_bf16x8(reinterpret_cast<const uint4*>(in + t * (size_t)I)[c], x);
            if (bias != nullptr) unpack_bf16x8(reinterpret_cast<const uint4*>(bias)[c], b);
#pragma unroll
            for (int j = 0; j < 8; ++j) y[j] = gelu_tanh_f32(x[j] + b[j]);
            reinterpret_cast<uint4*>(out + t * (size_t)I)[c] = pack_bf16x8(y);
        }
    } else {
        const size_t n = (size_t)T * I;
        for (size_t k = tid0; k < n; k += stride) {
            const size_t t = k / I;
            const int i = (int)(k - t * I);
            const float x = bf16_to_f32(in[k]) + (bias != nullptr ? bf16_to_f32(bias[i]) : 0.0f);
            out[k] = f32_to_bf16(gelu_tanh_f32(x));
        }
    }
}
