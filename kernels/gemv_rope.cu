// kernels/gemv_rope.cu -- the attention input of a decode step of 1 to 4 tokens in one kernel:
// the stacked QKV projection (gemv.cu's weight streaming), the QKV bias, the rotary embedding
// and the KV-cache store of rope.cu. The unfused path writes the projection to a [T, W] bf16
// buffer and reads it back in rope_qkv, a kernel launch and a round trip per layer.
//
// Entry points (identical argument lists), one per token count T:
//   gemv_rope_t1, gemv_rope_t2, gemv_rope_t3, gemv_rope_t4
// Arguments, in order:
//   const bf16_t* W         [W, k] bf16, W = (nq + 2*nkv) * hd rows: the Q heads, the K heads,
//                           then the V heads, each hd rows (rope.cu's column layout)
//   const bf16_t* X         [T, k] bf16
//   const bf16_t* bias      [W] bf16 or null (the QKV bias)
//   const int*    pos       [T] position ids
//   const float*  inv_freq  [rot_dim/2] or null (no rotation: ALiBi models), as in rope.cu
//   float mscale, int rot_dim      as in rope.cu (rot_dim % 4 == 0, rot_dim <= hd, hd even)
//   const int*    kv_slot   [T] cache slot of the token, or -1: K/V not stored
//   bf16_t* q_out [T, nq, hd];  bf16_t* k_cache, v_cache [slots, nkv, hd]
//   int nq, int nkv, int hd, int k     k % 8 == 0; W and X bases 16-byte aligned
// Launch: grid = (ceil(W / 2 / 8), 1, 1), block = (256, 1, 1); no smem. Warp w of block b
//   takes task p = 8·b + w of the W/2 column pairs: head = p / (hd/2), i = p % (hd/2).
//   In a Q or K head with i < rot_dim/2 the pair is the rotary pair (i, i + rot_dim/2);
//   otherwise it is two neighbours (d, d + 1), d = rot_dim + 2·(i − rot_dim/2) in Q and K heads
//   and d = 2·i in V heads. Launched with programmatic dependent launch like gemv.cu.
// CPU reference, for each token t and column j of the pair:
//   x_j = f32(bf16(sum_i f32(X[t, i]) · f32(W[j, i]))) + f32(bias[j])
//   (the value rope_qkv reads when gemv_t stored the projection in bf16, bias added after), then
//   exactly rope.cu's rotation (rope_cos_sin of rotary.cuh) and stores.
// Summation order: that of gemv.cu for each row; so this kernel's outputs equal those of
//   gemv_t<T> followed by rope_qkv up to the contraction of the rotation's products.
#include "gemv.cuh"
#include "rotary.cuh"

template <int T>
__device__ __forceinline__ void gemv_rope_impl(const bf16_t* __restrict__ W, const bf16_t* __restrict__ X,
                                               const bf16_t* __restrict__ bias, const int* __restrict__ pos,
                                               const float* __restrict__ inv_freq, float mscale, int rot_dim,
                                               const int* __restrict__ kv_slot, bf16_t* __restrict__ q_out,
                                               bf16_t* __restrict__ k_cache, bf16_t* __restrict__ v_cache,
                                               int nq, int nkv, int hd, int k) {
    const int rot = inv_freq != nullptr ? rot_dim : 0;
    if ((rot & 3) != 0 || rot > hd || (hd & 1) != 0) __trap();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int half = rot >> 1, hpairs = hd >> 1;
    const int tasks = (nq + 2 * nkv) * hpairs;
    const int task = blockIdx.x * RESID_GEMV_WARPS + warp;
    // Warps past the last pair redo it and store nothing, as in gemv.cu.
    const bool store = task < tasks;
    const int p = store ? task : tasks - 1;
    const int head = p / hpairs, i = p - head * hpairs;
    const bool qk = head < nq + nkv;
    const bool rotated = qk && i < half;
    const int d0 = rotated ? i : (qk ? rot + 2 * (i - half) : 2 * i);
    const int d1 = rotated ? i + half : d0 + 1;
    const int j0 = head * hd + d0, j1 = head * hd + d1;
    float a[T], b[T];
    gemv_row_pair<T>(reinterpret_cast<const uint4*>(W + (size_t)j0 * k), reinterpret_cast<const uint4*>(W + (size_t)j1 * k), X, k, a, b);
    if (lane != 0 || !store) return;
    const float b0 = bias ? bf16_to_f32(bias[j0]) : 0.0f, b1 = bias ? bf16_to_f32(bias[j1]) : 0.0f;
#pragma unroll
    for (int t = 0; t < T; ++t) {
        const float x0 = bf16_to_f32(f32_to_bf16(a[t])) + b0, x1 = bf16_to_f32(f32_to_bf16(b[t])) + b1;
        float y0 = x0, y1 = x1;
        if (rotated) {
            float c, s;
            rope_cos_sin((float)pos[t] * inv_freq[i], mscale, &c, &s);
            y0 = x0 * c - x1 * s;
            y1 = x1 * c + x0 * s;
        }
        bf16_t* dst;
        if (head < nq) {
            dst = q_out + ((size_t)t * nq + head) * hd;
        } else {
            const int slot = kv_slot != nullptr ? kv_slot[t] : -1;
            if (slot < 0) continue;
            dst = qk ? k_cache + ((size_t)slot * nkv + (head - nq)) * hd : v_cache + ((size_t)slot * nkv + (head - nq - nkv)) * hd;
        }
        dst[d0] = f32_to_bf16(y0);
        dst[d1] = f32_to_bf16(y1);
    }
}

#define RESID_GEMV_ROPE_ENTRY(T)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256)                                                                 \
        gemv_rope_t##T(const bf16_t* __restrict__ W, const bf16_t* __restrict__ X, const bf16_t* __restrict__ bias,   \
                       const int* __restrict__ pos, const float* __restrict__ inv_freq, float mscale, int rot_dim,   \
                       const int* __restrict__ kv_slot, bf16_t* __restrict__ q_out, bf16_t* __restrict__ k_cache,    \
                       bf16_t* __restrict__ v_cache, int nq, int nkv, int hd, int k) {                               \
        gemv_rope_impl<T>(W, X, bias, pos, inv_freq, mscale, rot_dim, kv_slot, q_out, k_cache, v_cache, nq, nkv, hd, \
                          k);                                                                                         \
    }

RESID_GEMV_ROPE_ENTRY(1)
RESID_GEMV_ROPE_ENTRY(2)
RESID_GEMV_ROPE_ENTRY(3)
RESID_GEMV_ROPE_ENTRY(4)
