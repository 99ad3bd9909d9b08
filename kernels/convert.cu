// kernels/convert.cu -- widen bf16 rows into the f32 residual (BLOOM's
// apply_residual_connection_post_layernorm: the residual continues from the normed rows),
// and back (hook_z: the heads' bf16 output is steered and captured in f32).
// Entry points:
//   bf16_to_f32(const bf16_t* in, float* out, int n)
//     in [n] bf16, out [n] f32; out[i] = f32(in[i]) (exact).
//   f32_to_bf16(const float* in, bf16_t* out, int n)
//     in [n] f32, out [n] bf16; out[i] = bf16(in[i]), round to nearest even.
// Launch: block = (256, 1, 1), grid-stride loop (any grid is correct); recommended
//   grid = ceil(n / 256) capped at 2^20. No smem.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
bf16_to_f32(const bf16_t* __restrict__ in, float* __restrict__ out, int n) {
    resid_pdl_prologue();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        out[i] = bf16_to_f32(in[i]);
    }
}

extern "C" __global__ void __launch_bounds__(1024)
f32_to_bf16(const float* __restrict__ in, bf16_t* __restrict__ out, int n) {
    resid_pdl_prologue();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        out[i] = f32_to_bf16(in[i]);
    }
}
