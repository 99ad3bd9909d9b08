// emu/test_runtime.cpp -- the emulator's own checks (run by scripts/build-emu.sh): an mma tile
// against a plain matrix product, shuffles against their definitions, and the errors a broken
// kernel must produce instead of silently passing.
#include <cstdio>
#include <string>
#include <vector>

#include "emu.h"

namespace {

int failures = 0;
void expect(bool ok, const std::string& what) {
    if (!ok) {
        std::fprintf(stderr, "test_runtime: FAIL %s\n", what.c_str());
        ++failures;
    }
}

unsigned short to_bf16(float x) { return resid_emu_f32_to_bf16(x); }
float from_bf16(unsigned short b) { return __uint_as_float((unsigned)b << 16); }
unsigned pack(float lo, float hi) { return (unsigned)to_bf16(lo) | ((unsigned)to_bf16(hi) << 16); }

float A[16][16], B[16][8], C[16][8], D[16][8];

// Each lane loads its fragments by the PTX layout, multiplies, and stores its four results.
__global__ void mma_tile() {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    unsigned a[4] = {pack(A[g][2 * t], A[g][2 * t + 1]), pack(A[g + 8][2 * t], A[g + 8][2 * t + 1]),
                     pack(A[g][2 * t + 8], A[g][2 * t + 9]), pack(A[g + 8][2 * t + 8], A[g + 8][2 * t + 9])};
    unsigned b0 = pack(B[2 * t][g], B[2 * t + 1][g]), b1 = pack(B[2 * t + 8][g], B[2 * t + 9][g]);
    float c[4] = {C[g][2 * t], C[g][2 * t + 1], C[g + 8][2 * t], C[g + 8][2 * t + 1]};
    resid_emu_mma_bf16_16816(c, a, b0, b1);
    D[g][2 * t] = c[0];
    D[g][2 * t + 1] = c[1];
    D[g + 8][2 * t] = c[2];
    D[g + 8][2 * t + 1] = c[3];
}

int shuffled[64];
__global__ void shuffles() {
    const int x = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x * 10, 5);
    __syncthreads();
    const int up = __shfl_up_sync(0xffffffffu, x, 3);
    shuffled[threadIdx.x] = up;
}

// Half a warp at the barrier, the other half in a full-warp shuffle: neither can finish.
__global__ void divergent_barrier() {
    if ((threadIdx.x & 31) < 16)
        __syncthreads();
    else
        (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
__global__ void shuffle_from_exited_lane() {
    if ((threadIdx.x & 31) == 7) return;
    (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
__global__ void traps() { __trap(); }

}  // namespace

int main() {
    using resid_emu::Dim3;
    for (int i = 0; i < 16; ++i)
        for (int k = 0; k < 16; ++k) A[i][k] = from_bf16(to_bf16(std::sin(0.7f * i + 0.31f * k)));
    for (int k = 0; k < 16; ++k)
        for (int j = 0; j < 8; ++j) B[k][j] = from_bf16(to_bf16(std::cos(0.5f * k - 0.9f * j)));
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) C[i][j] = 0.25f * i - 0.125f * j;
    expect(resid_emu::run_grid({1, 1, 1}, {32, 1, 1}, [] { mma_tile(); }).empty(), "mma kernel ran");
    double worst = 0;
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
            double want = C[i][j];
            for (int k = 0; k < 16; ++k) want += (double)A[i][k] * B[k][j];
            worst = std::fmax(worst, std::fabs(want - D[i][j]));
        }
    expect(worst < 1e-5, "mma tile matches the matrix product (worst " + std::to_string(worst) + ")");

    expect(resid_emu::run_grid({1, 1, 1}, {64, 1, 1}, [] { shuffles(); }).empty(), "shuffle kernel ran");
    for (int tid = 0; tid < 64; ++tid) {
        const int lane = tid & 31, base = tid & ~31;
        const int src = lane >= 3 ? lane - 3 : lane;
        expect(shuffled[tid] == ((base + src) ^ 5) * 10, "shuffle result of thread " + std::to_string(tid));
    }

    const std::string deadlock = resid_emu::run_grid({1, 1, 1}, {64, 1, 1}, [] { divergent_barrier(); });
    expect(deadlock.find("deadlock") != std::string::npos, "a barrier in divergent code is reported: got `" + deadlock + "`");
    const std::string exited = resid_emu::run_grid({2, 1, 1}, {32, 1, 1}, [] { shuffle_from_exited_lane(); });
    expect(exited.find("exited") != std::string::npos, "a shuffle from an exited lane is reported: got `" + exited + "`");
    const std::string trapped = resid_emu::run_grid({1, 1, 1}, {32, 1, 1}, [] { traps(); });
    expect(trapped.find("__trap") != std::string::npos, "__trap is reported: got `" + trapped + "`");
    // The emulator still works after failed launches.
    expect(resid_emu::run_grid({1, 1, 1}, {32, 1, 1}, [] { mma_tile(); }).empty(), "mma kernel runs after failures");

    if (failures) return 1;
    std::printf("test_runtime: mma tile (worst %.1e), shuffles, deadlock, exited-lane and trap reports: ok\n", worst);
    return 0;
}
