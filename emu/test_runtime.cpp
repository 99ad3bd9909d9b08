// emu/test_runtime.cpp -- the emulator's own checks (run by scripts/build-emu.sh): an mma tile
// against a plain matrix product, shuffles against their definitions, and what a broken kernel
// must produce instead of silently passing (errors, or poisoned shared memory).
#include <cstdio>
#include <string>
#include <vector>

#define RESID_EMU_SHARED_SECTION "resid_emu_shared_test"
#include "emu.h"

extern "C" char __start_resid_emu_shared_test[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_resid_emu_shared_test[] __attribute__((weak, visibility("hidden")));

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

// Each thread publishes a value and reads a thread of the other warp's: correct only with the
// barrier. Without it, the emulator must not hand back the value by luck.
// (Not a template: GCC ignores the section attribute of statics in function templates.)
unsigned seen[2][64];
__global__ void exchange_through_shared(bool sync) {
    __shared__ unsigned s[64];
    const unsigned t = threadIdx.x;
    s[t] = 1000 * blockIdx.x + t;
    if (sync) __syncthreads();
    seen[blockIdx.x][t] = s[(t + 32) % 64];
}
bool exchange_correct() {
    for (unsigned b = 0; b < 2; ++b)
        for (unsigned t = 0; t < 64; ++t)
            if (seen[b][t] != 1000 * b + (t + 32) % 64) return false;
    return true;
}

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
    // Under programmatic launch every thread must pass resid_pdl_wait (common.cuh) before exiting.
    resid_emu::programmatic_launch = true;
    const std::string unwaited = resid_emu::run_grid({1, 1, 1}, {64, 1, 1}, [] {
        if (threadIdx.x < 32) resid_emu::pdl_wait();
    });
    const std::string waited = resid_emu::run_grid({1, 1, 1}, {64, 1, 1}, [] { resid_emu::pdl_wait(); });
    resid_emu::programmatic_launch = false;
    expect(unwaited.find("without waiting") != std::string::npos, "a thread that skips the PDL wait is reported: got `" + unwaited + "`");
    expect(waited.empty(), "a kernel whose threads all wait runs: got `" + waited + "`");
    expect(resid_emu::run_grid({1, 1, 1}, {32, 1, 1}, [] {}).empty(), "without programmatic launch nothing need wait");
    // The emulator still works after failed launches.
    expect(resid_emu::run_grid({1, 1, 1}, {32, 1, 1}, [] { mma_tile(); }).empty(), "mma kernel runs after failures");

    const resid_emu::SharedMemory shared{__start_resid_emu_shared_test, __stop_resid_emu_shared_test};
    expect(shared.begin && shared.end > shared.begin, "the shared-memory section exists");
    expect(resid_emu::run_grid({2, 1, 1}, {64, 1, 1}, [] { exchange_through_shared(true); }, shared).empty() && exchange_correct(),
           "shared memory with __syncthreads");
    // Even blocks start with warp 0, odd ones with warp 1: both directions of the missing
    // barrier read a poisoned value.
    expect(resid_emu::run_grid({2, 1, 1}, {64, 1, 1}, [] { exchange_through_shared(false); }, shared).empty(), "the unsynchronised kernel runs");
    unsigned poisoned[2] = {0, 0};
    for (unsigned b = 0; b < 2; ++b)
        for (unsigned t = 0; t < 64; ++t) poisoned[b] += seen[b][t] == 0xffffffffu;
    expect(poisoned[0] == 32 && poisoned[1] == 32,
           "a missing __syncthreads reads poison in both blocks (" + std::to_string(poisoned[0]) + ", " + std::to_string(poisoned[1]) + " of 32)");

    if (failures) return 1;
    std::printf("test_runtime: mma tile (worst %.1e), shuffles, shared-memory poison and thread order, deadlock, exited-lane, trap and PDL-wait reports: ok\n", worst);
    return 0;
}
