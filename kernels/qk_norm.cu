// kernels/qk_norm.cu -- per-head RMSNorm of the Q and K heads (Qwen3), in place in the packed
// QKV GEMM output, before rope_qkv rotates them.
// Entry point:
//   qk_norm(bf16_t* qkv, const bf16_t* bias, const bf16_t* q_w, const bf16_t* k_w, float eps,
//           int T, int nq, int nkv, int hd)
//     qkv  [T, (nq + 2*nkv)*hd] bf16, in/out: Q heads, then K heads, then V heads (V untouched
//          except for the bias)
//     bias [(nq + 2*nkv)*hd] bf16 or null; added here (before the norm, as HF's q_proj/k_proj
//          do), so the host passes a null bias to rope_qkv afterwards
//     q_w, k_w [hd] bf16 norm weights shared by all heads
// Launch: grid = (T, 1, 1), block = (32 * W, 1, 1) for any W >= 1 (one warp per head, heads
//   strided over the warps); hd <= 1024. No smem.
// CPU reference, token t, head h of Q or K (w = q_w or k_w), f32 math:
//   x_d = f32(qkv[t, h, d]) + f32(bias[h, d]);  r = 1 / sqrt(mean_d(x_d^2) + eps)
//   qkv[t, h, d] = bf16(w_d * (x_d * r))
//   V heads: qkv[t, h, d] = bf16(x_d)
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
qk_norm(bf16_t* __restrict__ qkv, const bf16_t* __restrict__ bias, const bf16_t* __restrict__ q_w,
        const bf16_t* __restrict__ k_w, float eps, int T, int nq, int nkv, int hd) {
    resid_pdl_prologue();
    const int t = blockIdx.x;
    if (t >= T) return;
    const int lane = threadIdx.x & 31;
    const int warps = blockDim.x >> 5;
    const int heads = nq + 2 * nkv;
    bf16_t* row = qkv + (size_t)t * heads * hd;
    for (int h = threadIdx.x >> 5; h < heads; h += warps) {
        bf16_t* x = row + (size_t)h * hd;
        const bf16_t* b = bias != nullptr ? bias + (size_t)h * hd : nullptr;
        if (h >= nq + nkv) {
            if (b != nullptr)
                for (int d = lane; d < hd; d += 32) x[d] = f32_to_bf16(bf16_to_f32(x[d]) + bf16_to_f32(b[d]));
            continue;
        }
        float ss = 0.0f;
        for (int d = lane; d < hd; d += 32) {
            const float v = bf16_to_f32(x[d]) + (b != nullptr ? bf16_to_f32(b[d]) : 0.0f);
            ss += v * v;
        }
        ss = warp_sum(ss);
        const float r = rsqrtf(ss / (float)hd + eps);
        const bf16_t* w = h < nq ? q_w : k_w;
        for (int d = lane; d < hd; d += 32) {
            const float v = bf16_to_f32(x[d]) + (b != nullptr ? bf16_to_f32(b[d]) : 0.0f);
            x[d] = f32_to_bf16(bf16_to_f32(w[d]) * (v * r));
        }
    }
}
