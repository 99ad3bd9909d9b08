// emu/runtime.h -- the CPU emulator's runtime, shared by the kernel shim (emu.h), the fiber
// scheduler (runtime.cpp) and the fake driver (driver.cpp).
//
// Each CUDA thread of a block runs as a fiber on one OS thread; blocks run one after another.
// __syncthreads and the warp collectives (shuffles, mma) are barriers between fibers, so a
// missing barrier, a barrier in divergent code, or a shuffle from an exited lane shows up as an
// error (deadlock or inactive-lane read) instead of silently working as on a CPU loop.
#pragma once
#include <cstddef>
#include <functional>
#include <string>

namespace resid_emu {

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// The coordinates of the fiber running now (valid only inside a kernel).
struct ThreadCoords {
    Dim3 thread_idx, block_idx, block_dim, grid_dim;
};
extern ThreadCoords* current_coords;

void sync_threads();
// griddepcontrol.wait (kernels/common.cuh resid_pdl_wait): a no-op here, since kernels run one
// after another, but recorded. While `programmatic_launch` is set (cuLaunchKernelEx with
// programmatic stream serialization), a thread that exits without having waited is an error:
// on a GPU such a kernel could run ahead of the one it depends on.
void pdl_wait();
extern bool programmatic_launch;
// All live lanes of the caller's warp deposit `bytes` (<= 64) and wait for each other; returns
// the base of the 32 deposited slots (64 bytes apart) for this exchange. `valid` receives a
// bitmask of the lanes that took part.
const unsigned char* warp_exchange(const void* mine, size_t bytes, unsigned* valid);
[[noreturn]] void trap(const char* why);

// The kernel file's static "__shared__" variables: [begin, end) of its own linker section.
struct SharedMemory {
    char* begin = nullptr;
    char* end = nullptr;
};

// Runs `body` as every thread of every block of the grid. Returns an empty string on success,
// otherwise what went wrong (trap, deadlock, inactive-lane shuffle; a fiber stack overflow hits
// a guard page and kills the process). Before each block the kernel's shared memory is filled
// with 0xff (NaN), so a read of shared data no thread of this block wrote shows up instead of
// reusing the previous block's values. Threads start in index order in even blocks and in
// reverse order in odd ones, so a missing __syncthreads between warps shows up whichever warp
// writes first.
std::string run_grid(Dim3 grid, Dim3 block, const std::function<void()>& body, SharedMemory shared = {});

using Launcher = std::function<std::string(Dim3 grid, Dim3 block, void** params)>;
struct Kernel {
    std::string name;
    Launcher launch;
    unsigned max_threads;  // from __launch_bounds__: a GPU refuses larger blocks
};
void register_kernel(const char* name, Launcher launcher, unsigned max_threads);
const Kernel* find_kernel(const std::string& name);

// Deduces the kernel's parameter types to copy the launch's `void** params` into real arguments.
template <typename... A, size_t... I>
Launcher make_launcher_impl(void (*f)(A...), SharedMemory shared, std::index_sequence<I...>) {
    return [f, shared](Dim3 grid, Dim3 block, void** params) {
        std::tuple<std::decay_t<A>...> args{*static_cast<std::decay_t<A>*>(params[I])...};
        return run_grid(grid, block, [&] { f(std::get<I>(args)...); }, shared);
    };
}
template <typename... A>
Launcher make_launcher(void (*f)(A...), SharedMemory shared) {
    return make_launcher_impl(f, shared, std::index_sequence_for<A...>{});
}

struct Registrar {
    Registrar(const char* name, Launcher l, unsigned max_threads) { register_kernel(name, std::move(l), max_threads); }
};

}  // namespace resid_emu
