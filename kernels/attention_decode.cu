// kernels/attention_decode.cu -- single-token (decode) attention over each
// sequence's KV-cache range, flash-decoding style: the keys are cut into
// fixed splits of RESID_DEC_SPLIT = 256 keys, one block per (split, kv head,
// group of <= 8 query heads, sequence), and a second kernel combines the
// splits. Sequences with kv_len <= 256 (one split) are finished by the first
// kernel, which then writes `out` directly.
// GQA: one block serves up to 8 query heads sharing the kv head, so K/V are
// read once per group. Optional ALiBi.
//
// Entry points:
//   attn_decode_hd32 / hd48 / hd64 / hd80 / hd96 / hd128 (identical args):
//     const bf16_t* q          [nseq, nq, HD] bf16 (one query token per sequence)
//     const bf16_t* k_cache    [slots, nkv, HD] bf16
//     const bf16_t* v_cache    [slots, nkv, HD] bf16
//     bf16_t*       out        [nseq, nq*HD] bf16
//     float*        part_o     [nseq, nq, max_splits, HD] f32 scratch
//     float*        part_ml    [nseq, nq, max_splits, 2] f32 scratch (m, l)
//     const int*    kv_start   [nseq] slot of key 0 of the sequence
//     const int*    kv_len     [nseq] keys (including the current token,
//                              whose K/V rope.cu already wrote); >= 1
//     int nseq, int nq, int nkv          (nq % nkv == 0)
//     int           max_splits >= ceil(max_s kv_len[s] / 256)
//     float         scale
//     const float*  alibi      [nq] f32 slopes, or null
//   Launch: grid = (max_splits, nkv * ceil((nq/nkv) / 8), nseq),
//     block = (128, 1, 1), static smem (HD=128: 20 KiB; at most ~21 KiB).
//     Blocks whose split is past their sequence's kv_len exit at once.
//
//   attn_decode_reduce(const float* part_o, const float* part_ml,
//                      const int* kv_len, bf16_t* out, int nseq, int nq,
//                      int hd, int max_splits)
//     Launch: grid = (nq, nseq, 1), block = (128, 1, 1), no smem. Needed
//     only when some kv_len > 256 (it skips sequences with one split).
//
// CPU reference (query position p = kv_len - 1, kh = h / (nq/nkv)):
//   score_j = scale * dot(f32(q[s, h, :]), f32(K_j)) + (alibi ? alibi[h] * (float)(j - p) : 0)
//   out[s, h*HD + d] = bf16(sum_j softmax_j(score) * f32(V_j[d])),  j = 0..p
// Implementation (rounding-level differences only): log2-domain scores;
//   per split i: m_i = max score, P_j = exp2(score_j - m_i), l_i = sum P_j,
//   O_i[d] = sum_j P_j V_j[d] (f32, keys in increasing order per thread
//   stripe, stripes summed in fixed order); combine: M = max m_i,
//   w_i = exp2(m_i - M), out = bf16((sum_i w_i O_i) * (1 / sum_i w_i l_i)).
// Determinism: the split size is a constant, so a sequence's result depends
//   only on its own kv_len and data, not on the batch.
#include "common.cuh"

#define RESID_DEC_SPLIT 256
#define RESID_DEC_GMAX 8
#define RESID_DEC_THREADS 128

template <int HD>
__device__ __forceinline__ void attn_decode_impl(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,
    const bf16_t* __restrict__ v_cache, bf16_t* __restrict__ out, float* __restrict__ part_o,
    float* __restrict__ part_ml, const int* __restrict__ kv_start,
    const int* __restrict__ kv_len, int nseq, int nq, int nkv, int max_splits, float scale,
    const float* __restrict__ alibi) {
    constexpr int SPLIT = RESID_DEC_SPLIT, GM = RESID_DEC_GMAX, NT = RESID_DEC_THREADS;
    constexpr int TPR = HD / 2;        // threads per V row (2 dims each)
    constexpr int NPART = NT / TPR;    // key stripes in the P*V phase
    static_assert(HD % 16 == 0 && NPART >= 1, "bad HD");
    __shared__ __align__(16) float qs[GM][HD];
    __shared__ float ps[GM][SPLIT];
    __shared__ __align__(8) float red[NPART][GM][HD];
    __shared__ float sm_m[GM], sm_l[GM];

    resid_pdl_prologue();
    const int s = blockIdx.z, split = blockIdx.x;
    if (s >= nseq) return;
    const int kvl = kv_len[s];
    const int nsplit = (kvl + SPLIT - 1) / SPLIT;
    if (split >= nsplit) return;
    const int G = nq / nkv;
    const int gpk = (G + GM - 1) / GM;
    const int kvh = blockIdx.y / gpk;
    if (kvh >= nkv) return;
    const int g0 = (blockIdx.y - kvh * gpk) * GM;
    const int ng = min(GM, G - g0);
    const int h0 = kvh * G + g0;
    const int kvs = kv_start[s];
    const int k0 = split * SPLIT;
    const int kn = min(SPLIT, kvl - k0);
    const int qpos = kvl - 1;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float sl2 = scale * RESID_LOG2E;

    for (int idx = tid; idx < GM * HD; idx += NT) {
        const int g = idx / HD, d = idx - g * HD;
        qs[g][d] = g < ng ? bf16_to_f32(q[((size_t)s * nq + h0 + g) * HD + d]) : 0.0f;
    }
    __syncthreads();

    // ---- phase A: scores, one key per thread per pass ----
#pragma unroll 1
    for (int jj = 0; jj < SPLIT / NT; ++jj) {
        const int j = jj * NT + tid;
        if (j < kn) {
            float acc[GM];
#pragma unroll
            for (int g = 0; g < GM; ++g) acc[g] = 0.0f;
            const uint4* kp = reinterpret_cast<const uint4*>(
                k_cache + ((size_t)(kvs + k0 + j) * nkv + kvh) * HD);
#pragma unroll 2
            for (int c = 0; c < HD / 8; ++c) {
                float kf[8];
                unpack_bf16x8(kp[c], kf);
#pragma unroll
                for (int g = 0; g < GM; ++g) {
                    const float4 qa = *reinterpret_cast<const float4*>(&qs[g][c * 8]);
                    const float4 qb = *reinterpret_cast<const float4*>(&qs[g][c * 8 + 4]);
                    float a = acc[g];
                    a = fmaf(qa.x, kf[0], a); a = fmaf(qa.y, kf[1], a);
                    a = fmaf(qa.z, kf[2], a); a = fmaf(qa.w, kf[3], a);
                    a = fmaf(qb.x, kf[4], a); a = fmaf(qb.y, kf[5], a);
                    a = fmaf(qb.z, kf[6], a); a = fmaf(qb.w, kf[7], a);
                    acc[g] = a;
                }
            }
            const float rel = (float)(k0 + j - qpos);
#pragma unroll
            for (int g = 0; g < GM; ++g) {
                float v = acc[g] * sl2;
                if (alibi != nullptr && g < ng) v += alibi[h0 + g] * RESID_LOG2E * rel;
                ps[g][j] = v;
            }
        } else {
#pragma unroll
            for (int g = 0; g < GM; ++g) ps[g][j] = RESID_NEG_INF;
        }
    }
    __syncthreads();

    // ---- phase B: per head max / exp / sum over the split (one warp per head) ----
    for (int g = warp; g < GM; g += NT / 32) {
        float mx = RESID_NEG_INF;
        for (int j = lane; j < SPLIT; j += 32) mx = resid_fmaxf(mx, ps[g][j]);
        mx = warp_max(mx);  // finite: kn >= 1
        float l = 0.0f;
        for (int j = lane; j < SPLIT; j += 32) {
            const float e = exp2f(ps[g][j] - mx);  // -inf -> 0
            ps[g][j] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) { sm_m[g] = mx; sm_l[g] = l; }
    }
    __syncthreads();

    // ---- phase C: O = P V, NPART key stripes x TPR dim pairs ----
    {
        const int part = tid / TPR, dp = tid - part * TPR;
        if (part < NPART) {
            float acc0[GM], acc1[GM];
#pragma unroll
            for (int g = 0; g < GM; ++g) acc0[g] = acc1[g] = 0.0f;
            const bf16_t* vbase = v_cache + ((size_t)(kvs + k0) * nkv + kvh) * HD + 2 * dp;
            const size_t vstride = (size_t)nkv * HD;
            for (int j = part; j < kn; j += NPART) {
                const unsigned w = *reinterpret_cast<const unsigned*>(vbase + (size_t)j * vstride);
                const float v0 = bf16x2_lo(w), v1 = bf16x2_hi(w);
#pragma unroll
                for (int g = 0; g < GM; ++g) {
                    const float p = ps[g][j];
                    acc0[g] = fmaf(p, v0, acc0[g]);
                    acc1[g] = fmaf(p, v1, acc1[g]);
                }
            }
#pragma unroll
            for (int g = 0; g < GM; ++g)
                *reinterpret_cast<float2*>(&red[part][g][2 * dp]) = make_float2(acc0[g], acc1[g]);
        }
    }
    __syncthreads();

    for (int idx = tid; idx < ng * HD; idx += NT) {
        const int g = idx / HD, d = idx - g * HD;
        float o = red[0][g][d];
#pragma unroll
        for (int p = 1; p < NPART; ++p) o += red[p][g][d];
        const int h = h0 + g;
        if (nsplit == 1) {
            out[((size_t)s * nq + h) * HD + d] = f32_to_bf16(o * __frcp_rn(sm_l[g]));
        } else {
            const size_t pi = ((size_t)s * nq + h) * max_splits + split;
            part_o[pi * HD + d] = o;
            if (d == 0) {
                part_ml[pi * 2 + 0] = sm_m[g];
                part_ml[pi * 2 + 1] = sm_l[g];
            }
        }
    }
}

#define RESID_DEC_ENTRY(HDV)                                                                    \
    extern "C" __global__ void __launch_bounds__(RESID_DEC_THREADS, 1) attn_decode_hd##HDV(    \
        const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, bf16_t* out,           \
        float* part_o, float* part_ml, const int* kv_start, const int* kv_len, int nseq,      \
        int nq, int nkv, int max_splits, float scale, const float* alibi) {                   \
        attn_decode_impl<HDV>(q, k_cache, v_cache, out, part_o, part_ml, kv_start, kv_len,    \
                              nseq, nq, nkv, max_splits, scale, alibi);                       \
    }

RESID_DEC_ENTRY(32)
RESID_DEC_ENTRY(48)
RESID_DEC_ENTRY(64)
RESID_DEC_ENTRY(80)
RESID_DEC_ENTRY(96)
RESID_DEC_ENTRY(128)

extern "C" __global__ void __launch_bounds__(1024)
attn_decode_reduce(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                   const int* __restrict__ kv_len, bf16_t* __restrict__ out, int nseq, int nq,
                   int hd, int max_splits) {
    resid_pdl_prologue();
    const int h = blockIdx.x, s = blockIdx.y;
    if (s >= nseq || h >= nq) return;
    const int nsplit = (kv_len[s] + RESID_DEC_SPLIT - 1) / RESID_DEC_SPLIT;
    if (nsplit <= 1) return;  // finished by attn_decode_hd*
    const size_t base = ((size_t)s * nq + h) * max_splits;
    float M = RESID_NEG_INF;
    for (int i = 0; i < nsplit; ++i) M = resid_fmaxf(M, part_ml[(base + i) * 2]);
    float L = 0.0f;
    for (int i = 0; i < nsplit; ++i)
        L += exp2f(part_ml[(base + i) * 2] - M) * part_ml[(base + i) * 2 + 1];
    const float il = __frcp_rn(L);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < nsplit; ++i)
            acc += exp2f(part_ml[(base + i) * 2] - M) * part_o[(base + i) * hd + d];
        out[((size_t)s * nq + h) * hd + d] = f32_to_bf16(acc * il);
    }
}
