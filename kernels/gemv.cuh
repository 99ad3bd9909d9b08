// kernels/gemv.cuh -- the weight-streaming core shared by the decode-step GEMV kernels
// (gemv.cu, gemv_rope.cu): each warp streams whole rows of W with 16-byte loads and keeps X in
// L1. See gemv.cu for the layout rules and the summation order, which every user inherits.
#pragma once
#include "common.cuh"

#define RESID_GEMV_WARPS 8

// Weights are read exactly once per step: do not let them evict X from L1. They are never
// written by a kernel, so they may be read before resid_pdl_wait().
__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
#ifdef RESID_EMU
    return *p;
#else
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
#endif
}

// X is the previous kernel's output, which a GEMV launched with programmatic dependent launch
// may start before: a plain coherent load, never the read-only (.nc) path, and only after
// resid_pdl_wait().
__device__ __forceinline__ uint4 load_activation(const uint4* p) {
#ifdef RESID_EMU
    return *p;
#else
    uint4 v;
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
    return v;
#endif
}

template <int T>
__device__ __forceinline__ void gemv_chunk(uint4 w, const bf16_t* __restrict__ X, int k, int c, float* acc) {
    float wf[8];
    unpack_bf16x8(w, wf);
#pragma unroll
    for (int t = 0; t < T; ++t) {
        float xf[8];
        unpack_bf16x8(load_activation(reinterpret_cast<const uint4*>(X + (size_t)t * k) + c), xf);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[t] = fmaf(xf[i], wf[i], acc[t]);
    }
}

// Row pairs: a warp streams rows A and B of W (two loads of each in flight per lane) and
// returns in every lane a[t] = X[t]·A and b[t] = X[t]·B, each summed in the order gemv.cu
// documents. It carries the whole programmatic-dependent-launch protocol of the kernel: the
// trigger, the first round of weights before the wait, every read of X after it. Every thread
// of the block must call it (the wait is per thread).
template <int T>
__device__ __forceinline__ void gemv_row_pair(const uint4* __restrict__ A, const uint4* __restrict__ B,
                                              const bf16_t* __restrict__ X, int k, float* a, float* b) {
    resid_pdl_trigger();
    const int lane = threadIdx.x & 31;
    const int chunks = k >> 3;
#pragma unroll
    for (int t = 0; t < T; ++t) a[t] = b[t] = 0.0f;
    int c = lane;
    if (c + 32 < chunks) {
        uint4 a0 = load_streaming(A + c), a1 = load_streaming(A + c + 32);
        uint4 b0 = load_streaming(B + c), b1 = load_streaming(B + c + 32);
        resid_pdl_wait();  // after the first round of weights, as in gemv_impl
        for (;;) {
            gemv_chunk<T>(a0, X, k, c, a);
            gemv_chunk<T>(a1, X, k, c + 32, a);
            gemv_chunk<T>(b0, X, k, c, b);
            gemv_chunk<T>(b1, X, k, c + 32, b);
            c += 64;
            if (c + 32 >= chunks) break;
            a0 = load_streaming(A + c), a1 = load_streaming(A + c + 32);
            b0 = load_streaming(B + c), b1 = load_streaming(B + c + 32);
        }
    } else {
        resid_pdl_wait();
    }
    for (; c < chunks; c += 32) {
        gemv_chunk<T>(load_streaming(A + c), X, k, c, a);
        gemv_chunk<T>(load_streaming(B + c), X, k, c, b);
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
        a[t] = warp_sum(a[t]);
        b[t] = warp_sum(b[t]);
    }
}
