// kernels/convert.cu -- widen bf16 rows into the f32 residual (BLOOM's
// apply_residual_connection_post_layernorm: the residual continues from the normed rows).
// Entry point:
//   bf16_to_f32(const bf16_t* in, float* out, int n)
//     in [n] bf16, out [n] f32; out[i] = f32(in[i]) (exact).
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
