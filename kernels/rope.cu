// kernels/rope.cu -- QKV split + optional bias + rotary embedding + KV-cache
// scatter, in one pass over the packed QKV GEMM output.
//
// Entry point:
//   rope_qkv(const bf16_t* qkv, const bf16_t* bias, const int* pos,
//            const float* inv_freq, float mscale, int rot_dim,
//            const int* kv_slot, bf16_t* q_out, bf16_t* k_cache,
//            bf16_t* v_cache, int T, int nq, int nkv, int hd)
//     qkv      [T, W] bf16, W = (nq + 2*nkv) * hd; columns: nq Q heads, then
//              nkv K heads, then nkv V heads, each hd wide (BLOOM's per-head
//              interleaved [nh, 3, hd] layout must be permuted into this one
//              when the weights are loaded).
//     bias     [W] bf16 or null (Qwen2 q/k/v bias)
//     pos      [T] int32 position ids
//     inv_freq [rot_dim/2] f32 inverse frequencies (llama3 / linear / NTK /
//              YaRN frequency scaling already applied on the host), or null:
//              no rotation at all (BLOOM / ALiBi models)
//     mscale   f32 multiplier applied to cos and sin (HF
//              "attention_scaling": 1.0 except YaRN-style scalings)
//     rot_dim  rotated dims per head (= hd for LLaMA/Qwen; partial rotary
//              rotates dims [0, rot_dim) and passes the rest through).
//              Requires rot_dim % 4 == 0, rot_dim <= hd, rot_dim <= 512.
//     kv_slot  [T] int32 cache slot of the token, or -1: K/V not stored
//     q_out    [T, nq, hd] bf16
//     k_cache, v_cache  [slots, nkv, hd] bf16
//     hd must be even.
// Launch: grid = (T, 1, 1), block = (256, 1, 1) (any multiple of 32),
//   static smem 2 KiB.
// CPU reference, token t, p = pos[t], half = rot_dim / 2, for i < half:
//   theta_i = (float)p * inv_freq[i]                  (one f32 multiply)
//   c_i = mscale * cos(theta_i), s_i = mscale * sin(theta_i)
//         (computed as: theta reduced mod 2*pi in f64, then the f32 sin/cos
//          approximation __sinf/__cosf (abs err < 2^-21); CPU: f64 sin/cos
//          of the same theta, rounded to f32, agrees to ~1e-6)
//   x_j = f32(qkv[t, col]) + f32(bias[col])   for every column col
//   for a Q or K head, dim d:
//     d <  half:          y_d = x_d * c_d - x_{d+half} * s_d
//     half <= d < rot:    y_d = x_d * c_{d-half} + x_{d-half} * s_{d-half}
//     d >= rot (or no inv_freq): y_d = x_d
//   V heads: y = x
//   q_out[t, h, d] = bf16(y) ; if kv_slot[t] >= 0:
//     k_cache[kv_slot[t], h, d] = bf16(y_K), v_cache[kv_slot[t], h, d] = bf16(x_V)
#include "rotary.cuh"

#define RESID_ROPE_MAX_HALF 256

extern "C" __global__ void __launch_bounds__(1024)
rope_qkv(const bf16_t* __restrict__ qkv, const bf16_t* __restrict__ bias,
         const int* __restrict__ pos, const float* __restrict__ inv_freq, float mscale,
         int rot_dim, const int* __restrict__ kv_slot, bf16_t* __restrict__ q_out,
         bf16_t* __restrict__ k_cache, bf16_t* __restrict__ v_cache, int T, int nq, int nkv,
         int hd) {
    resid_pdl_prologue();
    __shared__ float s_cos[RESID_ROPE_MAX_HALF], s_sin[RESID_ROPE_MAX_HALF];
    const int t = blockIdx.x;
    if (t >= T) return;
    const int rot = inv_freq != nullptr ? rot_dim : 0;
    const int half = rot >> 1;
    if (half > RESID_ROPE_MAX_HALF || (rot & 3) != 0 || rot > hd || (hd & 1) != 0) __trap();
    const float p = (float)pos[t];
    for (int i = threadIdx.x; i < half; i += blockDim.x) rope_cos_sin(p * inv_freq[i], mscale, &s_cos[i], &s_sin[i]);
    __syncthreads();

    const int slot = kv_slot != nullptr ? kv_slot[t] : -1;
    const int W = (nq + 2 * nkv) * hd;
    const int hpairs = hd >> 1;
    const unsigned* row = reinterpret_cast<const unsigned*>(qkv + (size_t)t * W);
    const unsigned* brow = reinterpret_cast<const unsigned*>(bias);
    for (int k = threadIdx.x; k < (W >> 1); k += blockDim.x) {
        const int head = k / hpairs;
        const int d = 2 * (k - head * hpairs);  // even dim within the head
        const unsigned w = row[k];
        float x0 = bf16x2_lo(w), x1 = bf16x2_hi(w);
        if (brow != nullptr) {
            const unsigned bw = brow[k];
            x0 += bf16x2_lo(bw);
            x1 += bf16x2_hi(bw);
        }
        float y0 = x0, y1 = x1;
        if (head < nq + nkv && d < rot) {
            // partner pair: d + half (first half) or d - half (second half)
            const bool first = d < half;
            const int pk = first ? k + (half >> 1) : k - (half >> 1);
            const unsigned pw = row[pk];
            float p0 = bf16x2_lo(pw), p1 = bf16x2_hi(pw);
            if (brow != nullptr) {
                const unsigned bw = brow[pk];
                p0 += bf16x2_lo(bw);
                p1 += bf16x2_hi(bw);
            }
            const int i = first ? d : d - half;
            const float c0 = s_cos[i], c1 = s_cos[i + 1], s0 = s_sin[i], s1 = s_sin[i + 1];
            if (first) {
                y0 = x0 * c0 - p0 * s0;
                y1 = x1 * c1 - p1 * s1;
            } else {
                y0 = x0 * c0 + p0 * s0;
                y1 = x1 * c1 + p1 * s1;
            }
        }
        const unsigned outw = pack_bf16x2(y0, y1);
        if (head < nq) {
            reinterpret_cast<unsigned*>(q_out + ((size_t)t * nq + head) * hd + d)[0] = outw;
        } else if (slot >= 0) {
            if (head < nq + nkv)
                reinterpret_cast<unsigned*>(k_cache + ((size_t)slot * nkv + (head - nq)) * hd + d)[0] = outw;
            else
                reinterpret_cast<unsigned*>(v_cache + ((size_t)slot * nkv + (head - nq - nkv)) * hd + d)[0] = outw;
        }
    }
}
