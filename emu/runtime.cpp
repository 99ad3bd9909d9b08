// emu/runtime.cpp -- fibers for the threads of a block, barriers, warp exchanges, the kernel
// registry. One block at a time: static "__shared__" variables are then exactly shared memory.
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

// Saves the callee-saved registers and the FP control words on the current stack, stores the
// stack pointer in *save, and resumes the context whose stack pointer is `next`. glibc's
// swapcontext makes a system call per switch (signal mask), which made the emulator ~5x slower.
extern "C" void resid_emu_switch(void** save, void* next);
asm(R"(
    .text
    .globl resid_emu_switch
    .type resid_emu_switch, @function
resid_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size resid_emu_switch, .-resid_emu_switch
)");

namespace resid_emu {

ThreadCoords* current_coords = nullptr;

namespace {

constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kSlotBytes = 64;

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct Trap : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// AddressSanitizer builds (scripts/build-emu.sh --asan) must be told about every stack switch.
#if defined(__SANITIZE_ADDRESS__)
const void* g_scheduler_stack = nullptr;
size_t g_scheduler_stack_size = 0;
void asan_enter_fiber(void** fake, const void* bottom, size_t size) { __sanitizer_start_switch_fiber(fake, bottom, size); }
void asan_entered(void* fake) { __sanitizer_finish_switch_fiber(fake, &g_scheduler_stack, &g_scheduler_stack_size); }
void asan_leave_fiber(void** fake) { __sanitizer_start_switch_fiber(fake, g_scheduler_stack, g_scheduler_stack_size); }
void asan_left(void* fake) { __sanitizer_finish_switch_fiber(fake, nullptr, nullptr); }
void asan_fresh_stack(void* p, size_t n) { __asan_unpoison_memory_region(p, n); }
// The shared-memory section holds ASan's redzones between the variables: fill around them.
void fill_shared(char* b, char* e) {
    while (b < e) {
        char* bad = static_cast<char*>(__asan_region_is_poisoned(b, (size_t)(e - b)));
        std::memset(b, 0xff, (size_t)((bad ? bad : e) - b));
        if (!bad) return;
        for (b = bad; b < e && __asan_address_is_poisoned(b);) ++b;
    }
}
#else
void fill_shared(char* b, char* e) { std::memset(b, 0xff, (size_t)(e - b)); }
void asan_enter_fiber(void**, const void*, size_t) {}
void asan_entered(void*) {}
void asan_leave_fiber(void**) {}
void asan_left(void*) {}
void asan_fresh_stack(void*, size_t) {}
#endif

struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
    void* stack_bottom = nullptr;
    void* asan_fake_stack = nullptr;
    ThreadCoords coords;
    State state = State::Done;
    unsigned exchange_parity = 0;
    bool pdl_waited = false;
};

struct Warp {
    unsigned live = 0, arrived = 0;
    unsigned valid[2] = {0, 0};    // lanes that deposited in each parity's slots
    unsigned deposited[2] = {0, 0};
    alignas(16) unsigned char slots[2][32 * kSlotBytes];
};

struct Block {
    const std::function<void()>* body = nullptr;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::deque<unsigned> ready;
    std::vector<unsigned> block_waiters;
    std::vector<std::vector<unsigned>> warp_waiters;
    unsigned live = 0, arrived = 0;
    void* scheduler_sp = nullptr;
    std::string error;
    Fiber* running = nullptr;
};

// Launches are serialised (g_launch_mutex), so the running block is a plain global: a
// thread_local here costs a __tls_get_addr call per access from a shared library.
Block* g_block = nullptr;

void* map_stack() {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    return p;
}

// Parks the running fiber until a barrier releases it.
void block_running(State why) {
    Block* b = g_block;
    Fiber* f = b->running;
    f->state = why;
    const unsigned index = f->coords.thread_idx.x;
    if (why == State::AtBlockBarrier)
        b->block_waiters.push_back(index);
    else
        b->warp_waiters[index >> 5].push_back(index);
    asan_leave_fiber(&f->asan_fake_stack);
    resid_emu_switch(&f->sp, b->scheduler_sp);
    asan_entered(f->asan_fake_stack);
}

void release(State which, int warp) {
    Block* b = g_block;
    std::vector<unsigned>& waiters = which == State::AtBlockBarrier ? b->block_waiters : b->warp_waiters[warp];
    for (unsigned i : waiters) {
        b->fibers[i].state = State::Ready;
        b->ready.push_back(i);
    }
    waiters.clear();
}

// Opens the block barrier once every live thread has arrived (also when the last missing one
// exits instead); returns whether it opened.
bool maybe_release_block() {
    Block* b = g_block;
    if (b->arrived == 0 || b->arrived != b->live) return false;
    b->arrived = 0;
    release(State::AtBlockBarrier, -1);
    return true;
}

bool maybe_release_warp(unsigned w) {
    Block* b = g_block;
    Warp& wp = b->warps[w];
    if (wp.arrived == 0 || wp.arrived != wp.live) return false;
    wp.arrived = 0;
    release(State::AtWarpBarrier, (int)w);
    return true;
}

[[noreturn]] void fiber_main() {
    asan_entered(nullptr);
    Block* b = g_block;
    Fiber& f = *b->running;
    try {
        (*b->body)();
    } catch (const Trap& t) {
        if (b->error.empty()) b->error = t.what();
    } catch (const std::exception& e) {
        if (b->error.empty()) b->error = std::string("exception in a kernel: ") + e.what();
    }
    if (programmatic_launch && !f.pdl_waited && b->error.empty())
        b->error = "thread " + std::to_string(f.coords.thread_idx.x) +
                   " exited without waiting for the kernel ahead (resid_pdl_wait, kernels/common.cuh), but the "
                   "kernel was launched with programmatic dependent launch";
    f.state = State::Done;
    b->live -= 1;
    b->warps[f.coords.thread_idx.x >> 5].live -= 1;
    if (b->error.empty()) {
        maybe_release_block();
        maybe_release_warp(f.coords.thread_idx.x >> 5);
    }
    void* dead;
    asan_leave_fiber(nullptr);  // null: this fiber's fake stack can go
    resid_emu_switch(&dead, b->scheduler_sp);
    __builtin_unreachable();
}

// A fresh stack whose first switch "returns" into fiber_main with the ABI's alignment.
void* initial_sp(void* stack_top) {
    auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack_top) & ~uintptr_t(15)));
    uint64_t* sp = top - 2;  // [sp] = fiber_main, [sp + 8] = a null return address
    sp[0] = reinterpret_cast<uint64_t>(&fiber_main);
    sp[1] = 0;
    sp -= 6;  // rbp rbx r12 r13 r14 r15, zeroed
    for (int i = 0; i < 6; ++i) sp[i] = 0;
    sp -= 1;  // mxcsr and x87 control word: the defaults
    uint32_t mxcsr = 0x1f80;
    uint16_t fpcw = 0x037f;
    std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
    std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, 2);
    return sp;
}

std::string describe_deadlock(const Block& b) {
    unsigned at_block = 0, at_warp = 0;
    for (const Fiber& f : b.fibers) {
        at_block += f.state == State::AtBlockBarrier;
        at_warp += f.state == State::AtWarpBarrier;
    }
    return "deadlock: " + std::to_string(at_block) + " thread(s) wait in __syncthreads and " + std::to_string(at_warp) +
           " in a warp collective while " + std::to_string(b.fibers.size() - b.live) +
           " have exited (a barrier in divergent code, or a warp collective missing lanes)";
}

std::mutex g_launch_mutex;

}  // namespace

void sync_threads() {
    Block* b = g_block;
    b->arrived += 1;
    // The last to arrive is not parked: it carries on, the others are now ready.
    if (!maybe_release_block()) block_running(State::AtBlockBarrier);
}

const unsigned char* warp_exchange(const void* mine, size_t bytes, unsigned* valid) {
    Block* b = g_block;
    Fiber* f = b->running;
    const unsigned lane = f->coords.thread_idx.x & 31, w = f->coords.thread_idx.x >> 5;
    Warp& wp = b->warps[w];
    const unsigned p = f->exchange_parity;
    f->exchange_parity ^= 1;
    // The first lane into this parity's exchange starts a fresh deposit set.
    if (wp.deposited[p] == 0) wp.valid[p] = 0;
    std::memcpy(wp.slots[p] + kSlotBytes * lane, mine, bytes);
    wp.valid[p] |= 1u << lane;
    wp.deposited[p] += 1;
    wp.arrived += 1;
    if (!maybe_release_warp(w)) block_running(State::AtWarpBarrier);
    *valid = wp.valid[p];
    // Every lane has read this parity's slots before any lane can deposit into them again (that
    // needs the exchange in between, which needs every lane); count reads to reset the set.
    wp.deposited[p] -= 1;
    return wp.slots[p];
}

void trap(const char* why) { throw Trap(why); }

bool programmatic_launch = false;

void pdl_wait() {
    if (g_block && g_block->running) g_block->running->pdl_waited = true;
}

std::string run_grid(Dim3 grid, Dim3 block, const std::function<void()>& body, SharedMemory shared) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    const unsigned nthreads = block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024) return "block of " + std::to_string(nthreads) + " threads (1 to 1024 allowed)";
    if (block.y != 1 || block.z != 1) return "the emulator supports one-dimensional blocks only";
    static std::vector<void*> stacks;  // guard page + stack each, mapped once, reused (under the mutex)
    while (stacks.size() < nthreads) {
        void* s = map_stack();
        if (!s) return "could not map a fiber stack";
        stacks.push_back(s);
    }
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    Block b;
    b.body = &body;
    g_block = &b;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                b.fibers.assign(nthreads, Fiber{});
                b.warps.assign((nthreads + 31) / 32, Warp{});
                b.ready.clear();
                b.block_waiters.clear();
                b.warp_waiters.assign(b.warps.size(), {});
                b.live = nthreads;
                b.arrived = 0;
                if (shared.begin && shared.end > shared.begin) fill_shared(shared.begin, shared.end);
                const bool reversed = (bx + grid.x * (by + grid.y * bz)) & 1;
                for (unsigned t = 0; t < nthreads; ++t) {
                    Fiber& f = b.fibers[t];
                    f.coords.thread_idx = {t, 0, 0};
                    f.coords.block_idx = {bx, by, bz};
                    f.coords.block_dim = block;
                    f.coords.grid_dim = grid;
                    f.state = State::Ready;
                    b.warps[t >> 5].live += 1;
                    f.stack_bottom = static_cast<char*>(stacks[t]) + page;
                    asan_fresh_stack(f.stack_bottom, kStackBytes);
                    f.sp = initial_sp(static_cast<char*>(f.stack_bottom) + kStackBytes);
                    b.ready.push_back(reversed ? nthreads - 1 - t : t);
                }
                while (b.live > 0 && b.error.empty()) {
                    if (b.ready.empty()) {
                        b.error = describe_deadlock(b);
                        break;
                    }
                    const unsigned i = b.ready.front();
                    b.ready.pop_front();
                    b.running = &b.fibers[i];
                    current_coords = &b.fibers[i].coords;
                    void* scheduler_fake = nullptr;
                    asan_enter_fiber(&scheduler_fake, b.fibers[i].stack_bottom, kStackBytes);
                    resid_emu_switch(&b.scheduler_sp, b.fibers[i].sp);
                    asan_left(scheduler_fake);
                }
                if (!b.error.empty()) {
                    // Parked fibers are abandoned; their stacks are reused by the next launch.
                    std::string e = b.error + " (block " + std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) + ")";
                    g_block = nullptr;
                    current_coords = nullptr;
                    return e;
                }
            }
    g_block = nullptr;
    current_coords = nullptr;
    return {};
}

namespace {
std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> r;
    return r;
}
}  // namespace

void register_kernel(const char* name, Launcher launcher, unsigned max_threads) {
    registry()[name] = Kernel{name, std::move(launcher), max_threads};
}

const Kernel* find_kernel(const std::string& name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

}  // namespace resid_emu
