// emu/env.h -- the emulator's switches are environment variables: set, non-empty and not "0".
#pragma once
#include <cstdlib>
#include <cstring>

namespace resid_emu {

inline bool env_flag(const char* name) {
    const char* v = std::getenv(name);
    return v && *v && std::strcmp(v, "0") != 0;
}

}  // namespace resid_emu
