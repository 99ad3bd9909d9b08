// CPU emulation of the NVRTC calls cudarc's `nvrtc::result` makes (cudarc 0.19.10). Nothing is
// compiled: the "PTX" is the CUDA source itself. The fake driver never reads it: it resolves
// kernels by name from its own registry of the C++ builds.
//
// Build: g++ -std=c++17 -O2 -fPIC -shared fake_nvrtc.cpp -o libnvrtc.so
#include <cstdint>
#include <cstring>
#include <string>

namespace {

// nvrtcResult values from cudarc's nvrtc sys bindings.
enum : int32_t {
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_OUT_OF_MEMORY = 1,
    NVRTC_ERROR_PROGRAM_CREATION_FAILURE = 2,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_INVALID_OPTION = 5,
    NVRTC_ERROR_COMPILATION = 6,
    NVRTC_ERROR_INTERNAL_ERROR = 11,
};

struct Program {
    uint32_t magic;
    std::string src, name;
    bool compiled = false;
};
const uint32_t MAGIC = 0x4e565254;  // catches use after nvrtcDestroyProgram

bool valid(const Program* p) { return p && p->magic == MAGIC; }

}  // namespace

#define EXPORT __attribute__((visibility("default")))

extern "C" {

typedef struct _nvrtcProgram* nvrtcProgram;

EXPORT const char* nvrtcGetErrorString(int32_t r) {
    switch (r) {
        case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
        case NVRTC_ERROR_OUT_OF_MEMORY: return "NVRTC_ERROR_OUT_OF_MEMORY";
        case NVRTC_ERROR_PROGRAM_CREATION_FAILURE: return "NVRTC_ERROR_PROGRAM_CREATION_FAILURE";
        case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
        case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
        case NVRTC_ERROR_INVALID_OPTION: return "NVRTC_ERROR_INVALID_OPTION";
        case NVRTC_ERROR_COMPILATION: return "NVRTC_ERROR_COMPILATION";
        case NVRTC_ERROR_INTERNAL_ERROR: return "NVRTC_ERROR_INTERNAL_ERROR";
        default: return "NVRTC_ERROR unknown";
    }
}

EXPORT int32_t nvrtcVersion(int* major, int* minor) {
    if (!major || !minor) return NVRTC_ERROR_INVALID_INPUT;
    *major = 12;  // matches the cuda-12080 bindings resid builds cudarc with
    *minor = 8;
    return NVRTC_SUCCESS;
}

EXPORT int32_t nvrtcCreateProgram(nvrtcProgram* prog, const char* src, const char* name, int num_headers,
                                  const char* const* /*headers*/, const char* const* /*include_names*/) {
    if (!prog || !src || num_headers < 0) return NVRTC_ERROR_INVALID_INPUT;
    try {
        // Copied: cudarc keeps its strings alive, but NVRTC itself does not require callers to.
        Program* p = new Program{MAGIC, src, name ? name : "default_program"};
        *prog = reinterpret_cast<nvrtcProgram>(p);
    } catch (...) {
        return NVRTC_ERROR_OUT_OF_MEMORY;
    }
    return NVRTC_SUCCESS;
}

EXPORT int32_t nvrtcCompileProgram(nvrtcProgram prog, int num_options, const char* const* options) {
    Program* p = reinterpret_cast<Program*>(prog);
    if (!valid(p)) return NVRTC_ERROR_INVALID_PROGRAM;
    if (num_options < 0 || (num_options > 0 && !options)) return NVRTC_ERROR_INVALID_INPUT;
    // Options (arch, -std, ...) have no meaning without a real compiler.
    p->compiled = true;
    return NVRTC_SUCCESS;
}

// Sizes count the terminating NUL, as NVRTC's do: cudarc reads the buffers with CStr::from_ptr.
EXPORT int32_t nvrtcGetPTXSize(nvrtcProgram prog, size_t* size) {
    Program* p = reinterpret_cast<Program*>(prog);
    if (!valid(p)) return NVRTC_ERROR_INVALID_PROGRAM;
    if (!size) return NVRTC_ERROR_INVALID_INPUT;
    if (!p->compiled) return NVRTC_ERROR_INVALID_PROGRAM;
    *size = p->src.size() + 1;
    return NVRTC_SUCCESS;
}

EXPORT int32_t nvrtcGetPTX(nvrtcProgram prog, char* ptx) {
    Program* p = reinterpret_cast<Program*>(prog);
    if (!valid(p)) return NVRTC_ERROR_INVALID_PROGRAM;
    if (!ptx) return NVRTC_ERROR_INVALID_INPUT;
    if (!p->compiled) return NVRTC_ERROR_INVALID_PROGRAM;
    memcpy(ptx, p->src.c_str(), p->src.size() + 1);
    return NVRTC_SUCCESS;
}

// The log is always empty: compilation cannot fail here.
EXPORT int32_t nvrtcGetProgramLogSize(nvrtcProgram prog, size_t* size) {
    if (!valid(reinterpret_cast<Program*>(prog))) return NVRTC_ERROR_INVALID_PROGRAM;
    if (!size) return NVRTC_ERROR_INVALID_INPUT;
    *size = 1;
    return NVRTC_SUCCESS;
}

EXPORT int32_t nvrtcGetProgramLog(nvrtcProgram prog, char* log) {
    if (!valid(reinterpret_cast<Program*>(prog))) return NVRTC_ERROR_INVALID_PROGRAM;
    if (!log) return NVRTC_ERROR_INVALID_INPUT;
    log[0] = '\0';
    return NVRTC_SUCCESS;
}

EXPORT int32_t nvrtcDestroyProgram(nvrtcProgram* prog) {
    if (!prog) return NVRTC_ERROR_INVALID_INPUT;
    Program* p = reinterpret_cast<Program*>(*prog);
    if (!valid(p)) return NVRTC_ERROR_INVALID_PROGRAM;
    p->magic = 0;
    delete p;
    *prog = nullptr;
    return NVRTC_SUCCESS;
}

}  // extern "C"
