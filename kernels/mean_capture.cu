// kernels/mean_capture.cu -- deterministic mean capture of residual rows.
//
// Design choice (determinism): the fused residual kernel does not accumulate
// means (that would need float atomics, whose order -- and hence result --
// would depend on the batch composition). Instead the host launches this
// kernel right after fused_residual_* at the same residual point (same
// stream, before the next GEMM writes the residual), and it sums each
// segment's contiguous token rows straight from the (already steered)
// residual, in increasing token order, one thread per column. The result for
// a segment depends only on that segment's rows, never on the other
// sequences in the batch.
//
// Entry point:
//   mean_capture(const float* resid, int H, const int* seg_begin,
//                const int* seg_end, const int* seg_dst,
//                const float* seg_weight, float* mean_buf, int accumulate,
//                int nseg)
//     resid       [T, H] f32 residual (read only)
//     seg_begin   [nseg] first token row of the segment
//     seg_end     [nseg] one past the last token row (begin <= end)
//     seg_dst     [nseg] destination row in mean_buf
//     seg_weight  [nseg] f32 weight, normally 1 / (number of tokens averaged
//                 over the whole sequence, possibly across several launches)
//     mean_buf    [nrows, H] f32
//     accumulate  0: overwrite the destination row, 1: add to it (chunked
//                 prefill / decode steps of the same sequence)
//     nseg        number of segments
//
// Launch: grid = (ceil(H / 256), nseg, 1), block = (256, 1, 1), no smem.
//   (any blockDim works; results do not depend on it.)
//
// CPU reference (exact: no FMA contraction, every op rounded in f32):
//   for each segment s, column c:
//     acc = 0.0f; for t in begin..end (ascending): acc = acc + resid[t, c]
//     val = weight * acc
//     mean_buf[dst, c] = accumulate ? mean_buf[dst, c] + val : val
// Segments must not share a destination row within one launch.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
mean_capture(const float* __restrict__ resid, int H, const int* __restrict__ seg_begin,
             const int* __restrict__ seg_end, const int* __restrict__ seg_dst,
             const float* __restrict__ seg_weight, float* __restrict__ mean_buf, int accumulate,
             int nseg) {
    resid_pdl_prologue();
    const int s = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= nseg || c >= H) return;
    const int b = seg_begin[s], e = seg_end[s];
    const float* p = resid + c;
    float acc = 0.0f;
    int t = b;
    // 4 loads in flight, adds kept in order (__fadd_rn: never contracted)
    for (; t + 4 <= e; t += 4) {
        const float a0 = p[(size_t)t * H], a1 = p[(size_t)(t + 1) * H];
        const float a2 = p[(size_t)(t + 2) * H], a3 = p[(size_t)(t + 3) * H];
        acc = __fadd_rn(acc, a0);
        acc = __fadd_rn(acc, a1);
        acc = __fadd_rn(acc, a2);
        acc = __fadd_rn(acc, a3);
    }
    for (; t < e; ++t) acc = __fadd_rn(acc, p[(size_t)t * H]);
    float* dst = mean_buf + (size_t)seg_dst[s] * H + c;
    const float val = __fmul_rn(seg_weight[s], acc);
    *dst = accumulate ? __fadd_rn(*dst, val) : val;
}
