// kernels/sampling.cu -- greedy argmax and temperature / top-p sampling,
// one block per logits row, deterministic given the host's uniform number.
//
// Entry points:
//   argmax_rows(const float* logits, int V, int* out_ids, int nrows)
//     logits [nrows, V] f32, out_ids [nrows] int32.
//     out_ids[r] = smallest i with logits[r, i] == max (NaN ignored);
//                  0 when no entry is > -inf.
//   sample_rows(const float* logits, int V, float* work,
//               const float* temperature, const float* top_p,
//               const float* uniform, int* out_ids, int nrows)
//     work        [nrows, V] f32 scratch; may be the logits buffer itself
//                 (logits are then overwritten by the unnormalised probs)
//     temperature [nrows] f32; <= 0 (or NaN) -> greedy (argmax_rows rule)
//     top_p       [nrows] f32; <= 0 -> greedy; >= 1 -> no nucleus cut
//     uniform     [nrows] f32 in [0, 1), drawn by the host
//     out_ids     [nrows] int32
// Launch (both): grid = (nrows, 1, 1), block = (1024, 1, 1) (any multiple
//   of 32 up to 1024 works; keep it fixed -- sums depend on it), static
//   smem < 3 KiB.
//
// sample_rows semantics (CPU reference), row r, T = temperature, P = top_p:
//   z_i = logits[i] / T (IEEE f32 division); m = max_i z_i (NaN ignored);
//   if m is not finite -> greedy.
//   e_i = expf(z_i - m)  (NaN -> 0), Z = sum_i e_i
//   Nucleus: order the e_i by their f32 value; tau = the largest f32 value
//   (compared as bit patterns, i.e. as non-negative floats) such that
//   S(tau) = sum_{i: e_i >= tau} e_i >= P * Z. Kept set K = {i : e_i >= tau}
//   (all tokens tied at tau are kept). P >= 1: K = everything, S = Z.
//   Draw: target = uniform * S(tau); walk i = 0, 1, ..., V-1 (index order,
//   not probability order) over K accumulating c += e_i; the answer is the
//   first i with c > target; if rounding leaves none, the last i in K with
//   e_i > 0.
// Summation order: all sums are f32 in a fixed order that depends only on V
//   and blockDim (strided per-thread partials + the block butterfly of
//   common.cuh for Z and S; for the walk, thread k owns the contiguous index
//   range [k*ceil(V/B), (k+1)*ceil(V/B)) and starts from the exclusive
//   prefix of the per-thread kept sums). The result is therefore
//   bit-reproducible on the GPU for a given uniform; a plain sequential CPU
//   reference agrees except when `target` falls within rounding distance
//   (~1e-7 relative) of a cumulative boundary, or when a token sits exactly
//   at the nucleus boundary.
// Cost: 2 passes (max, exp) + 8 radix passes (4 bits of tau each, 16
//   candidate thresholds per pass) when P < 1 + 2 walk passes.
#include "common.cuh"

// 15 simultaneous block sums (deterministic, like block_sum).
__device__ __forceinline__ void block_sum15(float* v) {
    __shared__ float s_red15[15][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < 15; ++k) v[k] = warp_sum(v[k]);
    __syncthreads();
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < 15; ++k) s_red15[k][warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 15; ++k) v[k] = warp_sum(lane < nw ? s_red15[k][lane] : 0.0f);
}

// Block argmax with the "first maximal index" rule; returns the index in
// every thread (V as "none" sentinel mapped to 0).
__device__ __forceinline__ int block_argmax(const float* x, int V) {
    float bv = RESID_NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = x[i];
        if (v > bv) { bv = v; bi = i; }  // NaN never wins; ascending i keeps the first
    }
    // warp butterfly on (value, index) pairs: total order -> same result in all lanes
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(RESID_FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(RESID_FULL_MASK, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    __shared__ float s_av[32];
    __shared__ int s_ai[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) { s_av[warp] = bv; s_ai[warp] = bi; }
    __syncthreads();
    bv = lane < nw ? s_av[lane] : RESID_NEG_INF;
    bi = lane < nw ? s_ai[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(RESID_FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(RESID_FULL_MASK, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    return bi >= V ? 0 : bi;
}

extern "C" __global__ void __launch_bounds__(1024)
argmax_rows(const float* __restrict__ logits, int V, int* __restrict__ out_ids, int nrows) {
    resid_pdl_prologue();
    const int r = blockIdx.x;
    if (r >= nrows) return;
    const int idx = block_argmax(logits + (size_t)r * V, V);
    if (threadIdx.x == 0) out_ids[r] = idx;
}

extern "C" __global__ void __launch_bounds__(1024)
sample_rows(const float* logits, int V, float* work, const float* __restrict__ temperature,
            const float* __restrict__ top_p, const float* __restrict__ uniform,
            int* __restrict__ out_ids, int nrows) {
    resid_pdl_prologue();
    const int r = blockIdx.x;
    if (r >= nrows) return;
    const float* x = logits + (size_t)r * V;
    float* e = work + (size_t)r * V;
    const float T = temperature[r], P = top_p[r], u = uniform[r];
    const int tid = threadIdx.x, B = blockDim.x;

    if (!(T > 0.0f) || !(P > 0.0f)) {
        const int idx = block_argmax(x, V);
        if (tid == 0) out_ids[r] = idx;
        return;
    }

    // ---- pass 1: max of z = logit / T ----
    float mx = RESID_NEG_INF;
    for (int i = tid; i < V; i += B) {
        const float z = x[i] / T;
        if (z > mx) mx = z;
    }
    mx = block_max(mx);
    if (!(mx > RESID_NEG_INF) || !(mx < __int_as_float(0x7f800000))) {
        const int idx = block_argmax(x, V);
        if (tid == 0) out_ids[r] = idx;
        return;
    }

    // ---- pass 2: e = exp(z - m), Z = sum e (work may alias logits) ----
    float z_sum = 0.0f;
    for (int i = tid; i < V; i += B) {
        float ev = expf(x[i] / T - mx);
        if (!(ev >= 0.0f)) ev = 0.0f;  // NaN logits
        e[i] = ev;
        z_sum += ev;
    }
    const float Z = block_sum(z_sum);  // also orders the e[] writes before the reads below

    // ---- nucleus threshold tau: radix search on the f32 bit pattern ----
    unsigned tau = 0u;
    float S = Z;  // S(tau); S(0) == Z bit-exactly (same order, same terms)
    if (P < 1.0f) {
        const float target = P * Z;
#pragma unroll 1
        for (int shift = 28; shift >= 0; shift -= 4) {
            float acc[15];
#pragma unroll
            for (int k = 0; k < 15; ++k) acc[k] = 0.0f;
            for (int i = tid; i < V; i += B) {
                const float ev = e[i];
                const unsigned bits = __float_as_uint(ev);
#pragma unroll
                for (int k = 0; k < 15; ++k)
                    acc[k] += bits >= (tau | ((unsigned)(k + 1) << shift)) ? ev : 0.0f;
            }
            block_sum15(acc);
            // largest candidate whose kept mass still reaches the target
            // (candidate 0 = current tau always does: S(tau) >= target)
#pragma unroll
            for (int k = 14; k >= 0; --k) {
                if (acc[k] >= target) {
                    tau |= (unsigned)(k + 1) << shift;
                    S = acc[k];
                    break;
                }
            }
        }
    }

    // ---- draw: index-order walk over the kept set ----
    const float target = u * S;
    const int chunk = (V + B - 1) / B;
    const int beg = min(V, tid * chunk), end = min(V, beg + chunk);
    float cs = 0.0f;
    int last = -1;
    for (int i = beg; i < end; ++i) {
        const float ev = e[i];
        if (__float_as_uint(ev) >= tau) {
            cs += ev;
            if (ev > 0.0f) last = i;
        }
    }
    // exclusive prefix of cs over threads (warp shfl_up scan + warp totals)
    __shared__ float s_wtot[32];
    const int lane = tid & 31, warp = tid >> 5;
    float inc = cs;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float y = __shfl_up_sync(RESID_FULL_MASK, inc, o);
        if (lane >= o) inc += y;
    }
    float exc = __shfl_up_sync(RESID_FULL_MASK, inc, 1);
    if (lane == 0) exc = 0.0f;
    if (lane == 31) s_wtot[warp] = inc;
    __syncthreads();
    float base = 0.0f;
    for (int w = 0; w < warp; ++w) base += s_wtot[w];
    float c = base + exc;
    int pick = 0x7fffffff;
    for (int i = beg; i < end; ++i) {
        const float ev = e[i];
        if (__float_as_uint(ev) >= tau) {
            c += ev;
            if (c > target) { pick = i; break; }
        }
    }
    pick = block_min_int(pick);
    if (pick == 0x7fffffff) {
        pick = block_max_int(last);
        if (pick < 0) pick = 0;
    }
    if (tid == 0) out_ids[r] = pick;
}
