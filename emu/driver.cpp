// emu/driver.cpp -- a CPU stand-in for libcuda.so: exactly the driver calls cudarc makes for
// resid's CUDA backend. "Device" memory is host memory, every call completes before it returns
// (streams and events only keep cudarc's bookkeeping happy), and cuLaunchKernel runs the kernel's
// C++ build from kernels/ on fibers (runtime.cpp).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "env.h"
#include "runtime.h"
#include "trace.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUmodule;
typedef void* CUmemoryPool;
typedef const resid_emu::Kernel* CUfunction;

enum : CUresult {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
};

namespace {

constexpr size_t kTotalMemory = size_t(16) << 30;

struct Event {
    std::chrono::steady_clock::time_point at;
    bool recorded = false;
};

std::mutex g_mutex;
std::map<uintptr_t, size_t> g_allocations;  // base -> bytes, to reject copies outside them
size_t g_in_use = 0;
std::map<uintptr_t, size_t> g_pinned;  // cuMemHostAlloc'd ranges: copies to them need not block
int g_context_tag = 1;     // the primary context's handle points here
int g_pool_tag = 1;

bool verbose() {
    static const bool v = std::getenv("RESID_EMU_VERBOSE") != nullptr;
    return v;
}

// RESID_EMU_NO_KERNELS=1: launches are checked but not run (but for the samplers) and memory
// starts zeroed, so that a trace (emu/trace.h) times resid's host code on warm caches, as a
// measure of how fast the host can feed a GPU. Every result is then meaningless.
bool no_kernels() {
    static const bool v = resid_emu::env_flag("RESID_EMU_NO_KERNELS");
    return v;
}

CUresult alloc(CUdeviceptr* out, size_t bytes) {
    if (!out) return INVALID_VALUE;
    // Exactly `bytes` (cudaMalloc would round up): under --asan, a kernel reading past the end
    // of its buffer is reported even where the GPU would quietly read padding.
    void* p = nullptr;
    if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) return OUT_OF_MEMORY;
    // All ones is NaN in f32 and bf16: a kernel that reads memory nobody wrote shows up.
    std::memset(p, no_kernels() ? 0 : 0xff, bytes);
    std::lock_guard<std::mutex> l(g_mutex);
    g_allocations[(uintptr_t)p] = bytes;
    g_in_use += (bytes + 255) / 256 * 256;
    *out = (CUdeviceptr)(uintptr_t)p;
    return OK;
}

CUresult release(CUdeviceptr ptr) {
    std::lock_guard<std::mutex> l(g_mutex);
    auto it = g_allocations.find((uintptr_t)ptr);
    if (it == g_allocations.end()) {
        std::fprintf(stderr, "resid CUDA emulator: free of %#llx, which is not an allocation\n", ptr);
        return INVALID_VALUE;
    }
    g_in_use -= (it->second + 255) / 256 * 256;
    g_allocations.erase(it);
    std::free((void*)(uintptr_t)ptr);
    return OK;
}

// A copy touching device memory must stay inside one live allocation.
bool inside_allocation(CUdeviceptr ptr, size_t bytes, const char* what) {
    std::lock_guard<std::mutex> l(g_mutex);
    auto it = g_allocations.upper_bound((uintptr_t)ptr);
    if (it != g_allocations.begin()) {
        --it;
        if ((uintptr_t)ptr >= it->first && (uintptr_t)ptr + bytes <= it->first + it->second) return true;
    }
    std::fprintf(stderr, "resid CUDA emulator: %s of %zu bytes at %#llx is outside every live allocation\n", what, bytes, ptr);
    return false;
}

bool pinned(const void* host, size_t bytes) {
    std::lock_guard<std::mutex> l(g_mutex);
    auto it = g_pinned.upper_bound((uintptr_t)host);
    if (it == g_pinned.begin()) return false;
    --it;
    return (uintptr_t)host >= it->first && (uintptr_t)host + bytes <= it->first + it->second;
}

// RESID_EMU_PLANT=KERNEL:ARG (emu/env.h): after a launch of `f`, a wrong value in the buffer
// its pointer argument ARG points to. False when the argument is not a pointer into device
// memory (the plant itself is wrong: the launch fails).
bool apply_plant(const resid_emu::Kernel* f, void** params) {
    static const std::string spec = resid_emu::plant() ? resid_emu::plant() : "";
    const size_t colon = spec.rfind(':');
    if (colon == std::string::npos || spec.substr(0, colon) != f->name) return true;
    // The argument count is not known here: ARG must be one of the kernel's (a test's setting).
    const int arg = std::atoi(spec.c_str() + colon + 1);
    if (arg < 0 || arg > 31) return false;
    CUdeviceptr ptr = 0;
    std::memcpy(&ptr, params[arg], sizeof ptr);
    if (!inside_allocation(ptr, 4, "RESID_EMU_PLANT's write")) return false;
    static bool told = false;
    if (!told) std::fprintf(stderr, "resid CUDA emulator: RESID_EMU_PLANT: %s's argument %d gets a wrong value\n", f->name.c_str(), arg);
    told = true;
    const uint32_t wrong = 0x447a447au;
    std::memcpy((void*)(uintptr_t)ptr, &wrong, sizeof wrong);
    return true;
}

CUresult copy(void* dst, const void* src, size_t bytes) {
    if (bytes) std::memmove(dst, src, bytes);
    return OK;
}

}  // namespace

extern "C" {

CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int* v) { *v = 12080; return OK; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return OK;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::snprintf(name, (size_t)len, "resid CPU emulator (sm_90)");
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) { *bytes = kTotalMemory; return OK; }
CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice) {
    switch (attribute) {
        case 1: *value = 1024; break;        // max threads per block
        case 13: *value = 1980000; break;    // clock rate, kHz
        case 16: *value = 132; break;        // multiprocessors
        case 36: *value = 2619000; break;    // memory clock, kHz
        case 37: *value = 5120; break;       // bus width, bits
        case 38: *value = 50 << 20; break;   // L2 bytes
        case 41: *value = 1; break;          // unified addressing
        case 75: *value = 9; break;          // compute capability 9.0
        case 76: *value = 0; break;
        case 97: *value = 227 << 10; break;  // opt-in shared memory per block
        case 115: *value = 1; break;         // memory pools
        default: *value = 0; break;
    }
    return OK;
}
CUresult cuDeviceGetUuid(void* uuid, CUdevice) { std::memset(uuid, 0, 16); return OK; }
CUresult cuDeviceGetUuid_v2(void* uuid, CUdevice) { std::memset(uuid, 0, 16); return OK; }
CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice) { *ctx = &g_context_tag; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return OK; }
CUresult cuCtxSetCurrent(CUcontext) { return OK; }
CUresult cuCtxGetCurrent(CUcontext* ctx) { *ctx = &g_context_tag; return OK; }
CUresult cuCtxGetDevice(CUdevice* d) { *d = 0; return OK; }
CUresult cuCtxSynchronize() { RESID_EMU_TRACE_CALL("block ctx_synchronize"); return OK; }
CUresult cuCtxSetFlags(unsigned) { return OK; }
CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice) { *pool = &g_pool_tag; return OK; }
CUresult cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice) { *pool = &g_pool_tag; return OK; }
CUresult cuMemPoolSetAttribute(CUmemoryPool, int, void*) { return OK; }
CUresult cuMemPoolGetAttribute(CUmemoryPool, int, void* value) { std::memset(value, 0, 8); return OK; }
CUresult cuMemPoolTrimTo(CUmemoryPool, size_t) { return OK; }

CUresult cuStreamCreate(CUstream* s, unsigned) { *s = new int(0); return OK; }
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned, int) { *s = new int(0); return OK; }
CUresult cuStreamDestroy_v2(CUstream s) { delete static_cast<int*>(s); return OK; }
CUresult cuStreamSynchronize(CUstream) { RESID_EMU_TRACE_CALL("block stream_synchronize"); return OK; }
CUresult cuStreamWaitEvent(CUstream, void*, unsigned) { RESID_EMU_TRACE_CALL("stream_wait_event"); return OK; }
CUresult cuStreamIsCapturing(CUstream, int* status) { *status = 0; return OK; }

CUresult cuEventCreate(void** e, unsigned) { *e = new Event(); return OK; }
CUresult cuEventDestroy_v2(void* e) { delete static_cast<Event*>(e); return OK; }
CUresult cuEventRecord(void* e, CUstream) {
    RESID_EMU_TRACE_CALL("event_record");
    auto* ev = static_cast<Event*>(e);
    ev->at = std::chrono::steady_clock::now();
    ev->recorded = true;
    return OK;
}
CUresult cuEventSynchronize(void*) { RESID_EMU_TRACE_CALL("block event_synchronize"); return OK; }
CUresult cuEventQuery(void*) { return OK; }
CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    auto *a = static_cast<Event*>(start), *b = static_cast<Event*>(end);
    if (!a->recorded || !b->recorded) return INVALID_HANDLE;
    *ms = std::chrono::duration<float, std::milli>(b->at - a->at).count();
    return OK;
}
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { RESID_EMU_TRACE_CALL("block mem_alloc %zu", bytes); return alloc(p, bytes); }
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { RESID_EMU_TRACE_CALL("mem_alloc_async %zu", bytes); return alloc(p, bytes); }
CUresult cuMemAllocFromPoolAsync(CUdeviceptr* p, size_t bytes, CUmemoryPool, CUstream) { RESID_EMU_TRACE_CALL("mem_alloc_async %zu", bytes); return alloc(p, bytes); }
CUresult cuMemFree_v2(CUdeviceptr p) { RESID_EMU_TRACE_CALL("block mem_free"); return release(p); }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { RESID_EMU_TRACE_CALL("mem_free_async"); return release(p); }
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    RESID_EMU_TRACE_CALL("block host_alloc %zu", bytes);
    *p = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
    if (!*p) return OUT_OF_MEMORY;
    std::lock_guard<std::mutex> l(g_mutex);
    g_pinned[(uintptr_t)*p] = bytes;
    return OK;
}
CUresult cuMemFreeHost(void* p) {
    RESID_EMU_TRACE_CALL("block host_free");
    {
        std::lock_guard<std::mutex> l(g_mutex);
        g_pinned.erase((uintptr_t)p);
    }
    std::free(p);
    return OK;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> l(g_mutex);
    *total = kTotalMemory;
    *free_bytes = kTotalMemory - g_in_use;
    return OK;
}

CUresult htod(CUdeviceptr dst, const void* src, size_t n) {
    if (!inside_allocation(dst, n, "host-to-device copy")) return INVALID_VALUE;
    return copy((void*)(uintptr_t)dst, src, n);
}
CUresult dtoh(void* dst, CUdeviceptr src, size_t n) {
    if (!inside_allocation(src, n, "device-to-host copy")) return INVALID_VALUE;
    return copy(dst, (const void*)(uintptr_t)src, n);
}
// Blocking as CUDA documents it ("API synchronization behavior"): the synchronous copies block;
// an asynchronous copy to pageable host memory returns only when it is done; one from pageable
// memory is staged and returns.
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    RESID_EMU_TRACE_CALL("block htod %zu", n);
    return htod(dst, src, n);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream) {
    RESID_EMU_TRACE_CALL("htod_async %zu %s", n, pinned(src, n) ? "pinned" : "pageable");
    return htod(dst, src, n);
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    RESID_EMU_TRACE_CALL("block dtoh %zu", n);
    return dtoh(dst, src, n);
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream) {
    RESID_EMU_TRACE_CALL(pinned(dst, n) ? "dtoh_async %zu pinned" : "block dtoh_async %zu pageable", n);
    return dtoh(dst, src, n);
}
// cuMemcpy2D's descriptor (CUDA_MEMCPY2D). Only host and device memory, no arrays.
struct Memcpy2D {
    size_t srcXInBytes, srcY;
    int srcMemoryType;
    const void* srcHost;
    CUdeviceptr srcDevice;
    void* srcArray;
    size_t srcPitch;
    size_t dstXInBytes, dstY;
    int dstMemoryType;
    void* dstHost;
    CUdeviceptr dstDevice;
    void* dstArray;
    size_t dstPitch;
    size_t WidthInBytes, Height;
};
enum : int { MEMORYTYPE_HOST = 1, MEMORYTYPE_DEVICE = 2 };

static CUresult memcpy_2d(const Memcpy2D* c) {
    if (!c || c->srcArray || c->dstArray) return NOT_SUPPORTED;
    const bool src_host = c->srcMemoryType == MEMORYTYPE_HOST, dst_host = c->dstMemoryType == MEMORYTYPE_HOST;
    if ((!src_host && c->srcMemoryType != MEMORYTYPE_DEVICE) || (!dst_host && c->dstMemoryType != MEMORYTYPE_DEVICE))
        return NOT_SUPPORTED;
    if (c->Height == 0 || c->WidthInBytes == 0) return OK;
    // The driver's rules: a row may not be wider than either pitch.
    if (c->WidthInBytes + c->srcXInBytes > c->srcPitch || c->WidthInBytes + c->dstXInBytes > c->dstPitch) {
        std::fprintf(stderr, "resid CUDA emulator: 2D copy of %zu-byte rows with pitches %zu and %zu\n", c->WidthInBytes,
                     c->srcPitch, c->dstPitch);
        return INVALID_VALUE;
    }
    const size_t src_first = c->srcY * c->srcPitch + c->srcXInBytes, dst_first = c->dstY * c->dstPitch + c->dstXInBytes;
    const size_t src_span = (c->Height - 1) * c->srcPitch + c->WidthInBytes;
    const size_t dst_span = (c->Height - 1) * c->dstPitch + c->WidthInBytes;
    if (!src_host && !inside_allocation(c->srcDevice + src_first, src_span, "2D copy (source)")) return INVALID_VALUE;
    if (!dst_host && !inside_allocation(c->dstDevice + dst_first, dst_span, "2D copy (destination)")) return INVALID_VALUE;
    const char* src = src_host ? static_cast<const char*>(c->srcHost) : reinterpret_cast<const char*>((uintptr_t)c->srcDevice);
    char* dst = dst_host ? static_cast<char*>(c->dstHost) : reinterpret_cast<char*>((uintptr_t)c->dstDevice);
    for (size_t r = 0; r < c->Height; ++r)
        std::memmove(dst + dst_first + r * c->dstPitch, src + src_first + r * c->srcPitch, c->WidthInBytes);
    return OK;
}
CUresult cuMemcpy2D_v2(const Memcpy2D* c) {
    RESID_EMU_TRACE_CALL("block memcpy_2d %zu", c ? c->WidthInBytes * c->Height : 0);
    return memcpy_2d(c);
}
CUresult cuMemcpy2DAsync_v2(const Memcpy2D* c, CUstream) {
    const bool to_pageable = c && c->dstMemoryType == MEMORYTYPE_HOST &&
                             !pinned(static_cast<char*>(c->dstHost) + c->dstY * c->dstPitch + c->dstXInBytes,
                                     c->Height ? (c->Height - 1) * c->dstPitch + c->WidthInBytes : 0);
    const size_t bytes = c ? c->WidthInBytes * c->Height : 0;
    RESID_EMU_TRACE_CALL(to_pageable ? "block dtoh_2d_async %zu pageable" : "memcpy_2d_async %zu", bytes);
    return memcpy_2d(c);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    RESID_EMU_TRACE_CALL("dtod %zu", n);
    if (!inside_allocation(dst, n, "device-to-device copy (destination)") || !inside_allocation(src, n, "device-to-device copy (source)"))
        return INVALID_VALUE;
    return copy((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) { return cuMemcpyDtoD_v2(dst, src, n); }
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    RESID_EMU_TRACE_CALL("memset %zu", n);
    if (!inside_allocation(dst, n, "memset")) return INVALID_VALUE;
    std::memset((void*)(uintptr_t)dst, v, n);
    return OK;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) { return cuMemsetD8_v2(dst, v, n); }

CUresult cuModuleLoadData(CUmodule* m, const void*) { *m = new int(0); return OK; }
CUresult cuModuleUnload(CUmodule m) { delete static_cast<int*>(m); return OK; }
CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    *f = resid_emu::find_kernel(name);
    if (!*f) {
        std::fprintf(stderr, "resid CUDA emulator: kernel `%s` is not in the emulator build (rebuild it: scripts/build-emu.sh)\n", name);
        return NOT_FOUND;
    }
    return OK;
}
CUresult cuFuncGetAttribute(int* v, int, CUfunction) { *v = 0; return OK; }
CUresult cuFuncSetAttribute(CUfunction, int, int) { return OK; }
CUresult cuFuncSetCacheConfig(CUfunction, int) { return OK; }

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared_bytes, CUstream, void** params, void** extra) {
    if (!f) return INVALID_HANDLE;
    if (extra) return NOT_SUPPORTED;
    if (shared_bytes) {
        std::fprintf(stderr, "resid CUDA emulator: dynamic shared memory is not emulated\n");
        return NOT_SUPPORTED;
    }
    // The GPU's limits, which a real launch would fail on.
    if (gx == 0 || gy == 0 || gz == 0 || gx > 0x7fffffffu || gy > 65535 || gz > 65535) {
        std::fprintf(stderr, "resid CUDA emulator: grid (%u,%u,%u) is outside the GPU's limits\n", gx, gy, gz);
        return INVALID_VALUE;
    }
    if (bx * by * bz > f->max_threads) {
        std::fprintf(stderr, "resid CUDA emulator: block of %u threads for a kernel with __launch_bounds__(%u)\n", bx * by * bz,
                     f->max_threads);
        return INVALID_VALUE;
    }
    RESID_EMU_TRACE_CALL("launch %s grid %u,%u,%u block %u,%u,%u", f->name.c_str(), gx, gy, gz, bx, by, bz);
    const auto t0 = verbose() ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    // The samplers still run (on zeroed logits they are cheap and pick token 0): resid checks
    // the ids they return.
    if (no_kernels() && f->name != "argmax_rows" && f->name != "sample_rows") return OK;
    std::string err = f->launch({gx, gy, gz}, {bx, by, bz}, params);
    if (verbose()) {
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        std::fprintf(stderr, "resid CUDA emulator: launch grid (%u,%u,%u) block (%u,%u,%u): %.2f ms\n", gx, gy, gz, bx, by, bz, ms);
    }
    if (!err.empty()) {
        std::fprintf(stderr, "resid CUDA emulator: kernel failed: %s\n", err.c_str());
        return LAUNCH_FAILED;
    }
    if (resid_emu::plant() && !apply_plant(f, params)) return LAUNCH_FAILED;
    return OK;
}

// cuLaunchKernelEx's configuration (CUlaunchConfig, CUlaunchAttribute). Of the attributes only
// programmatic stream serialization is accepted: launches run one after another here anyway, so
// the dependent kernel's resid_pdl_wait() has nothing to wait for; but every thread of such a
// launch must execute it (runtime.h), as on a GPU it guards the kernel's first dependent access.
struct LaunchAttribute {
    int id;
    char pad[4];
    union {
        char bytes[64];
        int programmatic_stream_serialization_allowed;
    } value;
};
struct LaunchConfig {
    unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
    CUstream hStream;
    LaunchAttribute* attrs;
    unsigned numAttrs;
};
enum : int { LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6 };

CUresult cuLaunchKernelEx(const LaunchConfig* c, CUfunction f, void** params, void** extra) {
    if (!c || (c->numAttrs && !c->attrs)) return INVALID_VALUE;
    bool programmatic = false;
    for (unsigned i = 0; i < c->numAttrs; ++i) {
        if (c->attrs[i].id != LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION) {
            std::fprintf(stderr, "resid CUDA emulator: launch attribute %d is not emulated\n", c->attrs[i].id);
            return NOT_SUPPORTED;
        }
        programmatic = c->attrs[i].value.programmatic_stream_serialization_allowed != 0;
    }
    // RESID_EMU_REFUSE_PDL=1 plays a driver that refuses programmatic launches (the backend's
    // fallback is tested with it).
    static const bool refuse = resid_emu::env_flag("RESID_EMU_REFUSE_PDL");
    if (f) {
        // A marker line before cuLaunchKernel's own: which launches asked for PDL.
        RESID_EMU_TRACE_CALL("launch_ex %s%s", f->name.c_str(), programmatic ? " programmatic" : "");
    }
    if (programmatic && refuse) return NOT_SUPPORTED;
    resid_emu::programmatic_launch = programmatic;
    const CUresult r = cuLaunchKernel(f, c->gridDimX, c->gridDimY, c->gridDimZ, c->blockDimX, c->blockDimY, c->blockDimZ,
                                      c->sharedMemBytes, c->hStream, params, extra);
    resid_emu::programmatic_launch = false;
    return r;
}

CUresult cuLaunchHostFunc(CUstream, void (*fn)(void*), void* data) {
    RESID_EMU_TRACE_CALL("host_func");
    fn(data);
    return OK;
}

CUresult cuGetErrorName(CUresult e, const char** s) {
    switch (e) {
        case OK: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *s = "CUDA_ERROR_UNKNOWN"; break;
    }
    return OK;
}
CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

}  // extern "C"
