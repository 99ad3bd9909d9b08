// kernels/stats_accumulate.cu -- `resid stats` on the device: fold a pass's captured rows into
// f64 accumulators that stay on the GPU, so no captured row is copied to the host.
//
// Design choice (determinism): no atomics. Every accumulator element is owned by one thread,
// which loops over the batch's rows in input order, so a sum is the same chain of roundings
// whatever the batching (and equals the CPU fold, src/backend/moments.rs PointMoments::add_rows).
// Per point s (a capture slot) the accumulators are, each [slots, H] f64 row-major:
//   shift k (the first row ever folded), sum Σ(x − k), min, max,
// and, when second moments are wanted, sq [slots, H, H] f64: Σ(x − k)_i (x − k)_j for j >= i
// (elements below the diagonal are never touched).
//
// Entry points (launch stats_rows, then stats_outer, on the same stream):
//
//   stats_rows(const float* plane, int rows, int slots, int H, int pairs,
//              float* pending, int has_pending, int first,
//              double* shift, double* sum, double* minv, double* maxv,
//              double* y, int* bad)
//     plane       [rows, slots, H] f32, the pass's capture plane (read only)
//     pairs       0: every plane row is a statistics row. 1: the rows alternate pos, neg and a
//                 statistics row is the f32 difference pos − neg; `has_pending` (0/1) says
//                 that `pending` [slots, H] f32 holds a pos left over from the last batch,
//                 which pairs with plane row 0. When the rows of this batch (plus the pending
//                 one) are odd in number, the last plane row is stored into `pending`.
//     first       1 when nothing has been folded before: the shift is set to the batch's
//                 first statistics row.
//     y           [slots, n, H] f64 out: the shifted rows x − k, for stats_outer, where
//                 n = pairs ? (rows + has_pending) / 2 : rows.
//     bad         [slots, gridDim.x] int out: per slot and block of columns, the first plane
//                 row (0-based, in this batch) holding a NaN or Inf, or 0x7fffffff; the host
//                 reads back these few ints, not the rows.
//   Launch: grid = (ceil(H / 128), slots, 1), block = (128, 1, 1), no dynamic smem.
//
//   stats_outer(const double* y, int n, int slots, int H, double* sq)
//     sq[s, i, j] = fma-chain over r in 0..n ascending of y[s, r, i] · y[s, r, j], j >= i.
//   Launch: grid = (ceil(H / 64), ceil(H / 64), slots), block = (256, 1, 1); a block covers
//   columns j in 64·blockIdx.x .. and rows i in 64·blockIdx.y .. (4 x 4 per thread); blocks
//   wholly below the diagonal return at once. Static smem 2·32·64·8 B = 32 KiB (32 rows of y
//   per stage).
//
// CPU reference (exact, bit for bit: no contraction but the explicit fma):
//   for each slot s, column c, statistics row r in order (x in f32, pos − neg rounded in f32):
//     if first and r == 0: k[c] = (double)x
//     yv = (double)x − k[c];  sum[c] = sum[c] + yv
//     min[c] = fmin(min[c], (double)x);  max[c] = fmax(max[c], (double)x)
//   for j >= i: acc = sq[i, j]; for r in order: acc = fma(y[r, i], y[r, j], acc); sq[i, j] = acc
// i.e. PointMoments::add_rows with accumulate_outer computing f64::mul_add(y_i, y_j, acc).
#include "common.cuh"

#define STATS_ROWS_BLOCK 128
#define STATS_TILE 64
#define STATS_STAGE 32

extern "C" __global__ void __launch_bounds__(STATS_ROWS_BLOCK)
stats_rows(const float* __restrict__ plane, int rows, int slots, int H, int pairs,
           float* __restrict__ pending, int has_pending, int first,
           double* __restrict__ shift, double* __restrict__ sum, double* __restrict__ minv,
           double* __restrict__ maxv, double* __restrict__ y, int* __restrict__ bad) {
    resid_pdl_prologue();
    const int s = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    int first_bad = 0x7fffffff;
    if (c < H) {
        const size_t stride = (size_t)slots * H;
        const float* x = plane + (size_t)s * H + c;
        for (int r = 0; r < rows; ++r) {
            const float v = x[r * stride];
            if (v - v != 0.0f) {  // NaN or Inf (v − v is 0 for every finite v)
                first_bad = r;
                break;
            }
        }
        const int n = pairs ? (rows + has_pending) / 2 : rows;
        const size_t at = (size_t)s * H + c;
        double k = first ? 0.0 : shift[at];
        double acc = sum[at], lo = minv[at], hi = maxv[at];
        double* yc = y + (size_t)s * n * H + c;
        for (int r = 0; r < n; ++r) {
            float v;
            if (pairs) {
                const int a = 2 * r - has_pending;  // the pos row; -1 is the pending one
                const float pos = a < 0 ? pending[at] : x[a * stride];
                v = __fadd_rn(pos, -x[(a + 1) * stride]);
            } else {
                v = x[r * stride];
            }
            const double xd = (double)v;
            if (first && r == 0) k = xd;
            const double yv = xd - k;
            yc[(size_t)r * H] = yv;
            acc = acc + yv;
            lo = fmin(lo, xd);
            hi = fmax(hi, xd);
        }
        if (n > 0) {
            if (first) shift[at] = k;
            sum[at] = acc;
            minv[at] = lo;
            maxv[at] = hi;
        }
        if (pairs && ((rows + has_pending) & 1) && rows > 0) pending[at] = x[(rows - 1) * stride];
    }
    first_bad = block_min_int(first_bad);
    if (threadIdx.x == 0) bad[s * gridDim.x + blockIdx.x] = first_bad;
}

extern "C" __global__ void __launch_bounds__(256)
stats_outer(const double* __restrict__ y, int n, int slots, int H, double* __restrict__ sq) {
    resid_pdl_prologue();
    // Each thread owns 4 x 4 elements (rows ty + 16a, columns tx + 16b of the block's 64 x 64
    // tile): 8 shared loads per 16 fma, and every element still one chain in row order.
    __shared__ double yi[STATS_STAGE][STATS_TILE];
    __shared__ double yj[STATS_STAGE][STATS_TILE];
    const int j0 = blockIdx.x * STATS_TILE, i0 = blockIdx.y * STATS_TILE, s = blockIdx.z;
    if (j0 + STATS_TILE <= i0) return;  // every j < every i: below the diagonal (whole block)
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    double acc[4][4];
    for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) {
            const int i = i0 + ty + 16 * a, j = j0 + tx + 16 * b;
            acc[a][b] = (i < H && j < H && j >= i) ? sq[((size_t)s * H + i) * H + j] : 0.0;
        }
    }
    const double* ys = y + (size_t)s * n * H;
    for (int r0 = 0; r0 < n; r0 += STATS_STAGE) {
        for (int e = threadIdx.x; e < STATS_STAGE * STATS_TILE; e += blockDim.x) {
            const int rr = e / STATS_TILE, cc = e % STATS_TILE, r = r0 + rr;
            yi[rr][cc] = (r < n && i0 + cc < H) ? ys[(size_t)r * H + i0 + cc] : 0.0;
            yj[rr][cc] = (r < n && j0 + cc < H) ? ys[(size_t)r * H + j0 + cc] : 0.0;
        }
        __syncthreads();
        const int stage = min(STATS_STAGE, n - r0);
        for (int rr = 0; rr < stage; ++rr) {
            double vi[4], vj[4];
            for (int a = 0; a < 4; ++a) vi[a] = yi[rr][ty + 16 * a];
            for (int b = 0; b < 4; ++b) vj[b] = yj[rr][tx + 16 * b];
            for (int a = 0; a < 4; ++a) {
                for (int b = 0; b < 4; ++b) acc[a][b] = fma(vi[a], vj[b], acc[a][b]);
            }
        }
        __syncthreads();
    }
    for (int a = 0; a < 4; ++a) {
        for (int b = 0; b < 4; ++b) {
            const int i = i0 + ty + 16 * a, j = j0 + tx + 16 * b;
            if (i < H && j < H && j >= i) sq[((size_t)s * H + i) * H + j] = acc[a][b];
        }
    }
}
