// kernels/common.cuh -- shared device helpers for the resid CUDA kernels.
//
// Every kernel file includes this header (and nothing from the system): the
// kernels are compiled at run time by NVRTC, which is handed only the
// contents of kernels/ as headers. In particular we do NOT include
// <cuda_bf16.h>: NVRTC does not ship it (it lives in the CUDA toolkit /
// the nvidia-cuda-runtime wheel), so requiring it would make the run-time
// compile depend on a full toolkit install. bf16 values are therefore
// carried as raw 16-bit patterns (bf16_t = unsigned short) and converted
// with the two PTX instructions below (sm_80+ only, which is our floor).
//
// Conventions used by all kernels:
//   * bf16_t  : raw IEEE bfloat16 bits (upper half of an f32).
//   * f32 -> bf16 conversion is round-to-nearest-even (cvt.rn.bf16.f32),
//     NaN stays NaN; bf16 -> f32 is exact (shift left by 16).
//   * Block reductions are deterministic: a fixed xor-butterfly inside each
//     warp, then the per-warp partials are combined by another butterfly in
//     warp-index order. The result depends only on blockDim (which the host
//     picks from the problem shape, never from the batch composition) and is
//     bit-identical in every thread of the block.
//   * No atomics on floating-point values anywhere.
// RESID_EMU is never defined under NVRTC: it swaps the inline PTX for plain
// C++ so that the same sources run on the CPU emulator (emu/, built by
// scripts/build-emu.sh, run by tests/cuda_emulator.rs).
#pragma once

typedef unsigned short bf16_t;

#define RESID_LOG2E 1.4426950408889634f
#define RESID_NEG_INF (__int_as_float(0xff800000))
#define RESID_FULL_MASK 0xffffffffu

// ---------------------------------------------------------------------------
// bf16 <-> f32
// ---------------------------------------------------------------------------
__device__ __forceinline__ float bf16_to_f32(bf16_t x) {
    return __uint_as_float(((unsigned)x) << 16);
}

__device__ __forceinline__ bf16_t f32_to_bf16(float x) {
#ifdef RESID_EMU
    return resid_emu_f32_to_bf16(x);
#else
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
#endif
}

// Two bf16 in one 32-bit word: element 0 in the low half, element 1 high.
__device__ __forceinline__ float bf16x2_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16x2_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
#ifdef RESID_EMU
    return (unsigned)resid_emu_f32_to_bf16(lo) | ((unsigned)resid_emu_f32_to_bf16(hi) << 16);
#else
    unsigned r;
    // cvt.rn.bf16x2.f32 d, a, b: d.hi = bf16(a), d.lo = bf16(b)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

// SiLU as swiglu.cu and the fused GEMV apply it: g * (1/(1+e)) rather than
// g/(1+e): same accuracy class, and IEEE division's out-of-line slow path
// would force a (tiny) local-memory spill.
__device__ __forceinline__ float silu_f32(float g) { return g * __frcp_rn(1.0f + expf(-g)); }

// 4 bf16 (8 bytes, as uint2) <-> 4 floats
__device__ __forceinline__ void unpack_bf16x4(uint2 w, float* f) {
    f[0] = bf16x2_lo(w.x); f[1] = bf16x2_hi(w.x);
    f[2] = bf16x2_lo(w.y); f[3] = bf16x2_hi(w.y);
}
__device__ __forceinline__ uint2 pack_bf16x4(const float* f) {
    uint2 w;
    w.x = pack_bf16x2(f[0], f[1]);
    w.y = pack_bf16x2(f[2], f[3]);
    return w;
}
// 8 bf16 (16 bytes, as uint4) -> 8 floats
__device__ __forceinline__ void unpack_bf16x8(uint4 w, float* f) {
    f[0] = bf16x2_lo(w.x); f[1] = bf16x2_hi(w.x);
    f[2] = bf16x2_lo(w.y); f[3] = bf16x2_hi(w.y);
    f[4] = bf16x2_lo(w.z); f[5] = bf16x2_hi(w.z);
    f[6] = bf16x2_lo(w.w); f[7] = bf16x2_hi(w.w);
}
__device__ __forceinline__ uint4 pack_bf16x8(const float* f) {
    uint4 w;
    w.x = pack_bf16x2(f[0], f[1]);
    w.y = pack_bf16x2(f[2], f[3]);
    w.z = pack_bf16x2(f[4], f[5]);
    w.w = pack_bf16x2(f[6], f[7]);
    return w;
}

// ---------------------------------------------------------------------------
// Small math helpers (IEEE, no fast-math intrinsics unless stated)
// ---------------------------------------------------------------------------
__device__ __forceinline__ float resid_fmaxf(float a, float b) { return a > b ? a : b; }

// sign with sign(0) = 0 and sign(NaN) = 0
__device__ __forceinline__ float resid_signf(float x) {
    return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
}

// ---------------------------------------------------------------------------
// Warp reductions (xor butterfly: every lane ends with the identical value,
// because IEEE addition/max are commutative and each level pairs the same
// two operands in every lane).
// ---------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(RESID_FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = resid_fmaxf(v, __shfl_xor_sync(RESID_FULL_MASK, v, o));
    return v;
}
__device__ __forceinline__ int warp_min_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        int u = __shfl_xor_sync(RESID_FULL_MASK, v, o);
        v = u < v ? u : v;
    }
    return v;
}
__device__ __forceinline__ int warp_max_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        int u = __shfl_xor_sync(RESID_FULL_MASK, v, o);
        v = u > v ? u : v;
    }
    return v;
}

// ---------------------------------------------------------------------------
// Block reductions. Requirements: blockDim.x is a multiple of 32 and <= 1024,
// every thread of the block calls them (they contain __syncthreads). Scratch
// is a static __shared__ array; the leading __syncthreads makes back-to-back
// calls safe. Result is returned to every thread (bit-identical).
// ---------------------------------------------------------------------------
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float s_red_sum[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) s_red_sum[warp] = v;
    __syncthreads();
    float t = lane < nw ? s_red_sum[lane] : 0.0f;
    return warp_sum(t);
}

__device__ __forceinline__ void block_sum2(float& a, float& b) {
    __shared__ float s_red_sum2[2][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();
    if (lane == 0) { s_red_sum2[0][warp] = a; s_red_sum2[1][warp] = b; }
    __syncthreads();
    float ta = lane < nw ? s_red_sum2[0][lane] : 0.0f;
    float tb = lane < nw ? s_red_sum2[1][lane] : 0.0f;
    a = warp_sum(ta);
    b = warp_sum(tb);
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float s_red_max[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) s_red_max[warp] = v;
    __syncthreads();
    float t = lane < nw ? s_red_max[lane] : RESID_NEG_INF;
    return warp_max(t);
}

__device__ __forceinline__ int block_min_int(int v) {
    __shared__ int s_red_imin[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_min_int(v);
    __syncthreads();
    if (lane == 0) s_red_imin[warp] = v;
    __syncthreads();
    int t = lane < nw ? s_red_imin[lane] : 0x7fffffff;
    return warp_min_int(t);
}

__device__ __forceinline__ int block_max_int(int v) {
    __shared__ int s_red_imax[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max_int(v);
    __syncthreads();
    if (lane == 0) s_red_imax[warp] = v;
    __syncthreads();
    int t = lane < nw ? s_red_imax[lane] : (int)0x80000000;
    return warp_max_int(t);
}

// ---------------------------------------------------------------------------
// Tensor-core MMA: D = A * B + D, m16n8k16, bf16 inputs, f32 accumulate.
// Fragment layout (PTX ISA, mma.m16n8k16 .bf16), g = lane>>2, t = lane&3:
//   A (16x16 row-major): a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]
//                        a[2] = A[g][2t+8..+9]   a[3] = A[g+8][2t+8..+9]
//   B (16x8, k x n):     b0 = B[2t..2t+1][g]     b1 = B[2t+8..2t+9][g]
//   C/D (16x8 f32):      c[0],c[1] = C[g][2t..2t+1]   c[2],c[3] = C[g+8][2t..2t+1]
// Each 32-bit register holds two bf16, lower k (or column) index in the low half.
// ---------------------------------------------------------------------------
__device__ __forceinline__ void mma_bf16_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#ifdef RESID_EMU
    resid_emu_mma_bf16_16816(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ---------------------------------------------------------------------------
// Programmatic dependent launch (sm_90+; no-ops below; the emulator checks every thread waits)
// ---------------------------------------------------------------------------
// A kernel the host launches with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (every
// kernel, on sm_90) may start before the kernel ahead of it in the stream has finished.
// It must call resid_pdl_wait() before it reads anything an earlier kernel wrote (and before
// it writes anything an earlier kernel reads); what it does before that may touch only memory
// no kernel writes (the weights). The wait returns when the kernel ahead has completed and its
// writes are visible. resid_pdl_trigger() lets such a dependent kernel start early (once every
// block of this one has triggered or exited); it has no effect on kernels launched normally.
__device__ __forceinline__ void resid_pdl_wait() {
#if defined(RESID_EMU)
    ::resid_emu::pdl_wait();  // checks that every thread of a programmatic launch waits
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void resid_pdl_trigger() {
#if !defined(RESID_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// The first statement of every kernel but the GEMVs (which load weights before they wait): on
// sm_90 the host launches every kernel with programmatic dependent launch, so each waits for the
// kernel ahead before touching memory, and lets the kernel behind it launch meanwhile. Every
// thread of every block executes both (no thread returns before them), so a kernel completes
// only after the one ahead has, and waiting on the kernel just ahead covers all earlier ones.
__device__ __forceinline__ void resid_pdl_prologue() {
    resid_pdl_wait();
    resid_pdl_trigger();
}
