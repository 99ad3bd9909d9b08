// emu/env.h -- the emulator's switches are environment variables: set, non-empty and not "0".
#pragma once
#include <cstdlib>
#include <cstring>

namespace resid_emu {

inline bool env_flag(const char* name) {
    const char* v = std::getenv(name);
    return v && *v && std::strcmp(v, "0") != 0;
}

// RESID_EMU_PLANT plants a wrong device result, so that the tests can show the selftest catches
// one: `cublaslt` scales every cuBLASLt matmul result by 1.03 (fake_cublaslt.cpp);
// `KERNEL:ARG` overwrites, after every launch of KERNEL, the first 4 bytes of the device buffer
// its pointer argument ARG (0-based) points to with 0x447a447a: 1000 as two bf16 values, about
// 1001 as one f32, so finite and far off (driver.cpp). Unset or empty: no plant.
inline const char* plant() {
    static const char* v = [] {
        const char* s = std::getenv("RESID_EMU_PLANT");
        return s && *s ? s : nullptr;
    }();
    return v;
}

}  // namespace resid_emu
