// kernels/swiglu.cu -- SwiGLU activation (LLaMA / Qwen MLP).
//
// Entry point:
//   swiglu(const bf16_t* gate_up, bf16_t* out, int T, int I)
//     gate_up [T, 2*I] bf16: per row, the first I columns are the gate
//             projection, the next I the up projection (the host stacks
//             gate_proj and up_proj weights into one [2I, H] GEMM).
//     out     [T, I] bf16
// Launch: grid = (any, 1, 1),
//   block = (256, 1, 1); grid-stride loop, so any grid size is correct.
//   Recommended grid = ceil(T * I / 8 / 256) capped at 2^20. No smem.
//   I % 8 == 0 uses 16-byte accesses (aligned bases required), else scalar.
// CPU reference (f32 math, one rounding to bf16 at the end):
//   g = f32(gate_up[t, i]), u = f32(gate_up[t, I + i])
//   out[t, i] = bf16((g * (1.0f / (1.0f + expf(-g)))) * u)
// (HF rounds silu(g) to bf16 before multiplying; we do not.)
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
swiglu(const bf16_t* __restrict__ gate_up, bf16_t* __restrict__ out, int T, int I) {
    resid_pdl_prologue();
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t tid0 = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if ((I & 7) == 0) {
        const int per_row = I >> 3;
        const size_t n = (size_t)T * per_row;
        for (size_t k = tid0; k < n; k += stride) {
            const size_t t = k / per_row;
            const int c = (int)(k - t * per_row);
            const uint4* rowv = reinterpret_cast<const uint4*>(gate_up + t * (size_t)(2 * I));
            float g[8], u[8], y[8];
            unpack_bf16x8(rowv[c], g);
            unpack_bf16x8(rowv[per_row + c], u);
#pragma unroll
            for (int j = 0; j < 8; ++j) y[j] = silu_f32(g[j]) * u[j];
            reinterpret_cast<uint4*>(out + t * (size_t)I)[c] = pack_bf16x8(y);
        }
    } else {
        const size_t n = (size_t)T * I;
        for (size_t k = tid0; k < n; k += stride) {
            const size_t t = k / I;
            const int i = (int)(k - t * I);
            const bf16_t* row = gate_up + t * (size_t)(2 * I);
            const float g = bf16_to_f32(row[i]), u = bf16_to_f32(row[I + i]);
            out[t * (size_t)I + i] = f32_to_bf16(silu_f32(g) * u);
        }
    }
}
