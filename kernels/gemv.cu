// kernels/gemv.cu -- skinny GEMM for decode steps of 1 to 4 sequences:
//   Y[T, n] (+)= X[T, k] · W[n, k]ᵀ (+ bias),  bf16 inputs, f32 accumulation.
// A decode step reads every weight once and does 2·T FLOPs per weight element, so it is bound
// by memory bandwidth; this streams each row of W once, 16 bytes per load, four loads in flight
// per lane, and keeps X (a few KB, shared by every warp) in L1.
//
// Entry points (identical argument lists), one per token count T:
//   gemv_t1, gemv_t2, gemv_t3, gemv_t4
// Arguments, in order:
//   const bf16_t* W          [n, k] bf16, row-major (the HF [out, in] layout)
//   const bf16_t* X          [T, k] bf16
//   const void*   bias       [n]: f32 when out_f32, bf16 otherwise; or null
//   void*         Y          [T, n]: f32 when out_f32, bf16 otherwise
//   int n, int k             k % 8 == 0; W, X and Y bases 16-byte aligned (cudaMalloc'd)
//   int out_f32              1: Y is f32, 0: Y is bf16
//   int accumulate           1: Y += result (f32 Y only: the residual add), 0: Y = result
// Launch: grid = (ceil(n / 8), 1, 1), block = (256, 1, 1); warp w of block b computes output
//   column j = 8·b + w for every token row. No smem. On sm_90 the host launches every entry
//   point here with programmatic dependent launch (common.cuh): unlike the other kernels, each
//   loads its first weights before it waits for the kernel ahead, then reads X and touches Y.
// CPU reference, for t < T, j < n:
//   r = sum_i f32(X[t, i]) · f32(W[j, i]) + (bias ? bias[j] : 0)     (f32)
//   Y[t, j] = accumulate ? Y[t, j] + r : r    (rounded to bf16 when !out_f32)
// Summation order (fixed for a given k, whatever T or n): lane l adds the 8 products of the
//   16-byte chunks l, l + 32, l + 64, ... in that order, left to right within a chunk; then the
//   warp butterfly of common.cuh; then the bias; then Y.
//
// gemv_swiglu_t1 .. gemv_swiglu_t4: the MLP input of a decode step in one kernel, the gate and
// up projections (stacked in W as for swiglu.cu) and SwiGLU:
//   const bf16_t* W     [2I, k] bf16: rows 0..I-1 the gate projection, I..2I-1 the up one
//   const bf16_t* X     [T, k] bf16
//   const bf16_t* bias  [2I] bf16, or null
//   bf16_t*       Y     [T, I] bf16
//   int I, int k        k % 8 == 0; bases 16-byte aligned
// Launch: grid = (ceil(I / 8), 1, 1), block = (256, 1, 1); warp w of block b computes column
//   i = 8·b + w from rows i and I + i of W.
// CPU reference: g = bf16(gate·x + bias[i]), u = bf16(up·x + bias[I + i]) (the values the
//   unfused path stores in its bf16 gate_up buffer), Y[t, i] = bf16(silu(g) · u) as swiglu.cu.
#include "gemv.cuh"

template <int T>
__device__ __forceinline__ void gemv_impl(const bf16_t* __restrict__ W, const bf16_t* __restrict__ X,
                                          const void* __restrict__ bias, void* __restrict__ Y, int n,
                                          int k, int out_f32, int accumulate) {
    resid_pdl_trigger();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // Warps past the last column redo the last one and store nothing: every thread runs the
    // whole kernel, the PDL wait included, which the hardware expects of each block.
    const int col = blockIdx.x * RESID_GEMV_WARPS + warp;
    const bool store = col < n;
    const int j = store ? col : n - 1;
    const int chunks = k >> 3;
    const uint4* row = reinterpret_cast<const uint4*>(W + (size_t)j * k);
    float acc[T];
#pragma unroll
    for (int t = 0; t < T; ++t) acc[t] = 0.0f;
    int c = lane;
    if (c + 96 < chunks) {
        // The first round of weights is in flight before the wait: under programmatic
        // dependent launch it overlaps the end of the kernel ahead.
        uint4 w0 = load_streaming(row + c), w1 = load_streaming(row + c + 32);
        uint4 w2 = load_streaming(row + c + 64), w3 = load_streaming(row + c + 96);
        resid_pdl_wait();
        for (;;) {
            gemv_chunk<T>(w0, X, k, c, acc);
            gemv_chunk<T>(w1, X, k, c + 32, acc);
            gemv_chunk<T>(w2, X, k, c + 64, acc);
            gemv_chunk<T>(w3, X, k, c + 96, acc);
            c += 128;
            if (c + 96 >= chunks) break;
            w0 = load_streaming(row + c), w1 = load_streaming(row + c + 32);
            w2 = load_streaming(row + c + 64), w3 = load_streaming(row + c + 96);
        }
    } else {
        resid_pdl_wait();
    }
    for (; c < chunks; c += 32) gemv_chunk<T>(load_streaming(row + c), X, k, c, acc);
#pragma unroll
    for (int t = 0; t < T; ++t) acc[t] = warp_sum(acc[t]);
    if (lane != 0 || !store) return;
    float b = 0.0f;
    if (bias) b = out_f32 ? static_cast<const float*>(bias)[j] : bf16_to_f32(static_cast<const bf16_t*>(bias)[j]);
#pragma unroll
    for (int t = 0; t < T; ++t) {
        const float r = acc[t] + b;
        const size_t at = (size_t)t * n + j;
        if (out_f32) {
            float* y = static_cast<float*>(Y) + at;
            *y = accumulate ? *y + r : r;
        } else {
            static_cast<bf16_t*>(Y)[at] = f32_to_bf16(r);
        }
    }
}

template <int T>
__device__ __forceinline__ void gemv_swiglu_impl(const bf16_t* __restrict__ W, const bf16_t* __restrict__ X,
                                                 const bf16_t* __restrict__ bias, bf16_t* __restrict__ Y,
                                                 int I, int k) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int col = blockIdx.x * RESID_GEMV_WARPS + warp;
    const bool store = col < I;
    const int i = store ? col : I - 1;  // as in gemv_impl
    float g[T], u[T];
    gemv_row_pair<T>(reinterpret_cast<const uint4*>(W + (size_t)i * k), reinterpret_cast<const uint4*>(W + (size_t)(I + i) * k), X, k, g, u);
    if (lane != 0 || !store) return;
    const float bg = bias ? bf16_to_f32(bias[i]) : 0.0f, bu = bias ? bf16_to_f32(bias[I + i]) : 0.0f;
#pragma unroll
    for (int t = 0; t < T; ++t) {
        const float gr = bf16_to_f32(f32_to_bf16(g[t] + bg)), ur = bf16_to_f32(f32_to_bf16(u[t] + bu));
        Y[(size_t)t * I + i] = f32_to_bf16(silu_f32(gr) * ur);
    }
}

// Entry points, one per token count (the host lists the names in modules.rs).
#define RESID_GEMV_ENTRY(T)                                                                       \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        gemv_t##T(const bf16_t* __restrict__ W, const bf16_t* __restrict__ X,                     \
                  const void* __restrict__ bias, void* __restrict__ Y, int n, int k, int out_f32, \
                  int accumulate) {                                                               \
        gemv_impl<T>(W, X, bias, Y, n, k, out_f32, accumulate);                                   \
    }
#define RESID_GEMV_SWIGLU_ENTRY(T)                                                                \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        gemv_swiglu_t##T(const bf16_t* __restrict__ W, const bf16_t* __restrict__ X,              \
                         const bf16_t* __restrict__ bias, bf16_t* __restrict__ Y, int I, int k) { \
        gemv_swiglu_impl<T>(W, X, bias, Y, I, k);                                                 \
    }

RESID_GEMV_ENTRY(1)
RESID_GEMV_ENTRY(2)
RESID_GEMV_ENTRY(3)
RESID_GEMV_ENTRY(4)
RESID_GEMV_SWIGLU_ENTRY(1)
RESID_GEMV_SWIGLU_ENTRY(2)
RESID_GEMV_SWIGLU_ENTRY(3)
RESID_GEMV_SWIGLU_ENTRY(4)
