// emu/emu.h -- lets the CUDA sources in kernels/ compile as C++ for the CPU emulator. Included
// before each kernel file (which is wrapped in a namespace of its own); RESID_EMU swaps the few
// inline-PTX helpers of common.cuh for the functions below.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include "bf16.h"
#include "runtime.h"

#define RESID_EMU 1
// The build lists each file's kernels by preprocessing it with RESID_EMU_LIST.
#ifdef RESID_EMU_LIST
#define __global__ RESID_EMU_KERNEL_MARK
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#ifndef RESID_EMU_LIST  // the listing keeps it, to read each kernel's thread limit
#define __launch_bounds__(...)
#endif
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time on one OS thread, so a static is exactly a block's shared memory. The
// build moves each kernel file's .bss (these statics) into a section of its own, which the
// runtime poisons before every block. RESID_EMU_SHARED_SECTION does the same with an attribute
// for test_runtime.cpp, whose .bss holds other data (GCC ignores the attribute on statics in
// function templates, hence the build's way).
#ifdef RESID_EMU_SHARED_SECTION
#define __shared__ static __attribute__((section(RESID_EMU_SHARED_SECTION)))
#else
#define __shared__ static
#endif

#define threadIdx (resid_emu::current_coords->thread_idx)
#define blockIdx (resid_emu::current_coords->block_idx)
#define blockDim (resid_emu::current_coords->block_dim)
#define gridDim (resid_emu::current_coords->grid_dim)

struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __expf(float a) { return std::exp(a); }
inline float __sinf(float a) { return std::sin(a); }
inline float __cosf(float a) { return std::cos(a); }
inline void __sincosf(float a, float* s, float* c) { *s = std::sin(a); *c = std::cos(a); }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline void __syncthreads() { resid_emu::sync_threads(); }
[[noreturn]] inline void __trap() { resid_emu::trap("__trap() in a kernel"); }

template <typename T>
inline T resid_emu_shfl(unsigned mask, T v, int src, const char* what) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    if (mask != 0xffffffffu) resid_emu::trap("shuffle with a partial mask (the emulator models full warps only)");
    unsigned valid = 0;
    const unsigned char* slots = resid_emu::warp_exchange(&v, sizeof(T), &valid);
    if (!(valid >> src & 1u)) resid_emu::trap(what);
    T out;
    std::memcpy(&out, slots + 64 * src, sizeof(T));
    return out;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    const int lane = threadIdx.x & 31;
    return resid_emu_shfl(mask, v, (lane ^ lane_mask) & 31, "__shfl_xor_sync read a lane that has exited or does not exist");
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
    const int lane = threadIdx.x & 31;
    const int src = lane - (int)delta;
    T got = resid_emu_shfl(mask, v, src < 0 ? lane : src, "__shfl_up_sync read a lane that has exited or does not exist");
    return src < 0 ? v : got;
}

// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 for the calling lane, from every lane's fragments
// (the PTX ISA layout quoted in common.cuh; g = lane >> 2, t = lane & 3):
//   A[r][k] is half (k & 1) of register (r >= 8) + 2·(k >= 8) of lane 4·(r % 8) + (k % 8) / 2;
//   B[k][n] is half (k & 1) of register b0 (k < 8) or b1 of lane 4·n + (k % 8) / 2.
inline void resid_emu_mma_bf16_16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    unsigned mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    unsigned valid = 0;
    const unsigned char* slots = resid_emu::warp_exchange(mine, sizeof(mine), &valid);
    if (valid != 0xffffffffu) resid_emu::trap("mma.sync with inactive lanes");
    auto reg = [slots](int lane, int r) { unsigned v; std::memcpy(&v, slots + 64 * lane + 4 * r, 4); return v; };
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float A[2][16], B[16][2];  // this lane's rows g, g + 8 and columns 2t, 2t + 1
    for (int q = 0; q < 4; ++q) {
        for (int hi = 0; hi < 2; ++hi) {
            for (int rr = 0; rr < 2; ++rr) {
                const unsigned w = reg(4 * g + q, rr + 2 * hi);
                A[rr][8 * hi + 2 * q] = __uint_as_float(w << 16);
                A[rr][8 * hi + 2 * q + 1] = __uint_as_float(w & 0xffff0000u);
            }
            for (int cc = 0; cc < 2; ++cc) {
                const unsigned w = reg(4 * (2 * t + cc) + q, 4 + hi);
                B[8 * hi + 2 * q][cc] = __uint_as_float(w << 16);
                B[8 * hi + 2 * q + 1][cc] = __uint_as_float(w & 0xffff0000u);
            }
        }
    }
    for (int i = 0; i < 4; ++i) {
        const int rr = i >> 1, cc = i & 1;
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += A[rr][k] * B[k][cc];
        c[i] = acc;
    }
}
