// kernels/attention_prefill.cu -- causal variable-length attention over
// packed sequences, flash-attention-2 style (tiled keys, online softmax, f32
// accumulation, bf16 tensor-core mma.sync m16n8k16), with GQA and optional
// ALiBi. Queries may continue after a cached prefix (chunked prefill / prefix
// reuse): the queries of a sequence are its LAST q_len positions.
//
// Entry points, one per head dim (identical argument lists):
//   attn_prefill_hd32, attn_prefill_hd48, attn_prefill_hd64,
//   attn_prefill_hd80, attn_prefill_hd96, attn_prefill_hd128
// Arguments, in order:
//   const bf16_t* q          [T, nq, HD] bf16 (rope.cu q_out)
//   const bf16_t* k_cache    [slots, nkv, HD] bf16
//   const bf16_t* v_cache    [slots, nkv, HD] bf16
//   bf16_t*       out        [T, nq*HD] bf16
//   const int*    cu_seqlens [nseq+1] query rows: sequence s owns rows
//                            cu_seqlens[s] .. cu_seqlens[s+1]-1 of q / out
//   const int*    kv_start   [nseq] cache slot of the sequence's key 0; its
//                            keys occupy slots kv_start[s] .. + kv_len[s]-1
//   const int*    kv_len     [nseq] number of keys (cached prefix + the new
//                            tokens, whose K/V rope.cu already wrote);
//                            must be >= q_len = cu_seqlens[s+1]-cu_seqlens[s]
//   int nseq, int nq, int nkv   (nq % nkv == 0)
//   float         scale      softmax scale (usually 1/sqrt(HD))
//   const float*  alibi      [nq] f32 ALiBi slopes, or null
// Launch: grid = (ceil(max_q_len / 64), nq, nseq), block = (128, 1, 1);
//   static smem = 2 * 64 * (HD + 8) * 2 bytes (34 KiB at HD = 128); no
//   dynamic smem. Blocks past a sequence's q_len exit immediately.
//   Pointers: q/out/caches 16-byte aligned (cudaMalloc bases).
// CPU reference, sequence s, query i (0 <= i < q_len), head h:
//   p = kv_len - q_len + i (absolute position), kh = h / (nq / nkv)
//   for keys j = 0..p:  K_j = k_cache[kv_start + j, kh, :], V_j likewise
//     score_j = scale * dot(f32(q[row, h, :]), f32(K_j))
//               + (alibi ? alibi[h] * (float)(j - p) : 0)
//   w_j = softmax_j(score)   (f32)
//   out[row, h*HD + d] = bf16(sum_j w_j * f32(V_j[d]))
// Implementation notes (differences of rounding only): scores are kept in
// the log2 domain (scale * log2(e) folded in, exp2f), probabilities are
// rounded to bf16 before the P*V tensor-core product (as flash-attention
// does), the normaliser uses the unrounded f32 probabilities.
// Determinism: each (query row, head) result depends only on its own
// sequence's data and kv_len, never on the other sequences in the batch.
#include "common.cuh"

#define RESID_PF_BM 64    // query rows per block (16 per warp, 4 warps)
#define RESID_PF_BN 64    // keys per tile
#define RESID_PF_THREADS 128

template <int HD>
__device__ __forceinline__ void attn_prefill_impl(
    const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,
    const bf16_t* __restrict__ v_cache, bf16_t* __restrict__ out,
    const int* __restrict__ cu_seqlens, const int* __restrict__ kv_start,
    const int* __restrict__ kv_len, int nseq, int nq, int nkv, float scale,
    const float* __restrict__ alibi) {
    constexpr int BM = RESID_PF_BM, BN = RESID_PF_BN;
    constexpr int KSTEPS = HD / 16;   // k-steps of Q*K^T
    constexpr int NT_O = HD / 8;      // n-tiles of O (8 dims each)
    constexpr int NT_S = BN / 8;      // n-tiles of S (8 keys each)
    constexpr int LDS = HD + 8;       // smem row stride (bf16), conflict-free
    constexpr int VPR = HD / 8;       // 16-byte vectors per K/V row
    static_assert(HD % 16 == 0, "HD must be a multiple of 16");
    __shared__ __align__(16) bf16_t Ks[BN * LDS];
    __shared__ __align__(16) bf16_t Vs[BN * LDS];

    resid_pdl_prologue();
    const int s = blockIdx.z, h = blockIdx.y, mt = blockIdx.x;
    if (s >= nseq) return;
    const int q0 = cu_seqlens[s];
    const int qlen = cu_seqlens[s + 1] - q0;
    if (mt * BM >= qlen) return;
    const int kvs = kv_start[s], kvl = kv_len[s];
    const int off = kvl - qlen;  // absolute position of query 0
    const int kvh = h / (nq / nkv);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;

    // query rows (within the sequence) owned by this thread
    const int r0 = mt * BM + warp * 16 + g, r1 = r0 + 8;
    const int p0 = off + r0, p1 = off + r1;  // their absolute positions

    // ---- Q fragments (A operand), straight from global memory ----
    unsigned qf[KSTEPS][4];
    {
        const unsigned* qr0 = reinterpret_cast<const unsigned*>(q + ((size_t)(q0 + r0) * nq + h) * HD);
        const unsigned* qr1 = reinterpret_cast<const unsigned*>(q + ((size_t)(q0 + r1) * nq + h) * HD);
        const bool v0 = r0 < qlen, v1 = r1 < qlen;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
            const int cw = ks * 8 + tq;  // word index of column ks*16 + 2*tq
            qf[ks][0] = v0 ? qr0[cw] : 0u;
            qf[ks][1] = v1 ? qr1[cw] : 0u;
            qf[ks][2] = v0 ? qr0[cw + 4] : 0u;
            qf[ks][3] = v1 ? qr1[cw + 4] : 0u;
        }
    }

    float o[NT_O][4];
#pragma unroll
    for (int i = 0; i < NT_O; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m0 = RESID_NEG_INF, m1 = RESID_NEG_INF, l0 = 0.0f, l1 = 0.0f;

    const float sl2 = scale * RESID_LOG2E;
    const float slope = alibi != nullptr ? alibi[h] * RESID_LOG2E : 0.0f;
    const bool use_alibi = alibi != nullptr;

    const int last_row = min(qlen, (mt + 1) * BM) - 1;
    const int kend = off + last_row + 1;          // keys needed by this block
    const int first_pos = off + mt * BM;          // smallest query position here

    for (int kb = 0; kb < kend; kb += BN) {
        __syncthreads();  // previous tile fully consumed
        // ---- load K/V tile (zero-filled past kv_len) ----
#pragma unroll
        for (int i = 0; i < (BN * VPR + RESID_PF_THREADS - 1) / RESID_PF_THREADS; ++i) {
            const int idx = i * RESID_PF_THREADS + tid;
            if (idx < BN * VPR) {
                const int r = idx / VPR, c = idx - r * VPR;
                uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = make_uint4(0u, 0u, 0u, 0u);
                if (kb + r < kvl) {
                    const size_t goff = ((size_t)(kvs + kb + r) * nkv + kvh) * HD + c * 8;
                    kv = *reinterpret_cast<const uint4*>(k_cache + goff);
                    vv = *reinterpret_cast<const uint4*>(v_cache + goff);
                }
                *reinterpret_cast<uint4*>(&Ks[r * LDS + c * 8]) = kv;
                *reinterpret_cast<uint4*>(&Vs[r * LDS + c * 8]) = vv;
            }
        }
        __syncthreads();

        // ---- S = Q K^T (16 rows x 64 keys per warp) ----
        float sc[NT_S][4];
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
            for (int nt = 0; nt < NT_S; ++nt) {
                const bf16_t* kr = &Ks[(nt * 8 + g) * LDS + ks * 16 + 2 * tq];
                const unsigned b0 = *reinterpret_cast<const unsigned*>(kr);
                const unsigned b1 = *reinterpret_cast<const unsigned*>(kr + 8);
                mma_bf16_16816(sc[nt], qf[ks], b0, b1);
            }
        }

        // ---- scale, ALiBi, mask (log2 domain) ----
        const bool need_mask = (kb + BN - 1 > first_pos) || (kb + BN > kvl);
        float mx0 = RESID_NEG_INF, mx1 = RESID_NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = kb + nt * 8 + 2 * tq + (e & 1);
                const int pp = e < 2 ? p0 : p1;
                float v = sc[nt][e] * sl2;
                if (use_alibi) v += slope * (float)(j - pp);
                if (need_mask && (j > pp || j >= kvl)) v = RESID_NEG_INF;
                sc[nt][e] = v;
                if (e < 2) mx0 = resid_fmaxf(mx0, v); else mx1 = resid_fmaxf(mx1, v);
            }
        }
        // row max across the quad (4 threads share a row)
        mx0 = resid_fmaxf(mx0, __shfl_xor_sync(RESID_FULL_MASK, mx0, 1));
        mx0 = resid_fmaxf(mx0, __shfl_xor_sync(RESID_FULL_MASK, mx0, 2));
        mx1 = resid_fmaxf(mx1, __shfl_xor_sync(RESID_FULL_MASK, mx1, 1));
        mx1 = resid_fmaxf(mx1, __shfl_xor_sync(RESID_FULL_MASK, mx1, 2));
        const float mn0 = resid_fmaxf(m0, mx0), mn1 = resid_fmaxf(m1, mx1);
        // key 0 is visible to every row, so after the first tile mn is finite;
        // guard anyway so that exp2(-inf - -inf) never happens.
        const float a0 = mn0 == RESID_NEG_INF ? 1.0f : exp2f(m0 - mn0);
        const float a1 = mn1 == RESID_NEG_INF ? 1.0f : exp2f(m1 - mn1);
        const float sub0 = mn0 == RESID_NEG_INF ? 0.0f : mn0;
        const float sub1 = mn1 == RESID_NEG_INF ? 0.0f : mn1;
        m0 = mn0;
        m1 = mn1;
        float ls0 = 0.0f, ls1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT_S; ++nt) {
            sc[nt][0] = exp2f(sc[nt][0] - sub0);
            sc[nt][1] = exp2f(sc[nt][1] - sub0);
            sc[nt][2] = exp2f(sc[nt][2] - sub1);
            sc[nt][3] = exp2f(sc[nt][3] - sub1);
            ls0 += sc[nt][0] + sc[nt][1];
            ls1 += sc[nt][2] + sc[nt][3];
        }
        l0 = l0 * a0 + ls0;  // per-thread partial; quad-reduced at the end
        l1 = l1 * a1 + ls1;
#pragma unroll
        for (int i = 0; i < NT_O; ++i) {
            o[i][0] *= a0; o[i][1] *= a0;
            o[i][2] *= a1; o[i][3] *= a1;
        }

        // ---- O += P V ----
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned pa[4];
            pa[0] = pack_bf16x2(sc[2 * kk][0], sc[2 * kk][1]);
            pa[1] = pack_bf16x2(sc[2 * kk][2], sc[2 * kk][3]);
            pa[2] = pack_bf16x2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
            pa[3] = pack_bf16x2(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
            const bf16_t* vr = &Vs[(kk * 16 + 2 * tq) * LDS + g];
#pragma unroll
            for (int nd = 0; nd < NT_O; ++nd) {
                const bf16_t* vp = vr + nd * 8;
                const unsigned b0 = (unsigned)vp[0] | ((unsigned)vp[LDS] << 16);
                const unsigned b1 = (unsigned)vp[8 * LDS] | ((unsigned)vp[9 * LDS] << 16);
                mma_bf16_16816(o[nd], pa, b0, b1);
            }
        }
    }

    // ---- finalize: full row sums, normalise, store ----
    l0 += __shfl_xor_sync(RESID_FULL_MASK, l0, 1);
    l0 += __shfl_xor_sync(RESID_FULL_MASK, l0, 2);
    l1 += __shfl_xor_sync(RESID_FULL_MASK, l1, 1);
    l1 += __shfl_xor_sync(RESID_FULL_MASK, l1, 2);
    const float il0 = l0 > 0.0f ? __frcp_rn(l0) : 0.0f;
    const float il1 = l1 > 0.0f ? __frcp_rn(l1) : 0.0f;
    const size_t ostride = (size_t)nq * HD;
    if (r0 < qlen) {
        unsigned* orow = reinterpret_cast<unsigned*>(out + (size_t)(q0 + r0) * ostride + (size_t)h * HD);
#pragma unroll
        for (int nd = 0; nd < NT_O; ++nd) orow[nd * 4 + tq] = pack_bf16x2(o[nd][0] * il0, o[nd][1] * il0);
    }
    if (r1 < qlen) {
        unsigned* orow = reinterpret_cast<unsigned*>(out + (size_t)(q0 + r1) * ostride + (size_t)h * HD);
#pragma unroll
        for (int nd = 0; nd < NT_O; ++nd) orow[nd * 4 + tq] = pack_bf16x2(o[nd][2] * il1, o[nd][3] * il1);
    }
}

#define RESID_PF_ENTRY(HDV)                                                                      \
    extern "C" __global__ void __launch_bounds__(RESID_PF_THREADS, 1) attn_prefill_hd##HDV(      \
        const bf16_t* q, const bf16_t* k_cache, const bf16_t* v_cache, bf16_t* out,            \
        const int* cu_seqlens, const int* kv_start, const int* kv_len, int nseq, int nq,       \
        int nkv, float scale, const float* alibi) {                                            \
        attn_prefill_impl<HDV>(q, k_cache, v_cache, out, cu_seqlens, kv_start, kv_len, nseq,   \
                               nq, nkv, scale, alibi);                                         \
    }

RESID_PF_ENTRY(32)
RESID_PF_ENTRY(48)
RESID_PF_ENTRY(64)
RESID_PF_ENTRY(80)
RESID_PF_ENTRY(96)
RESID_PF_ENTRY(128)
