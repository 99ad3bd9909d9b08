// emu/bf16.h -- bf16 <-> f32 as the GPU does them (cvt.rn.bf16.f32: round to nearest even, NaN
// stays a quiet NaN), for the kernel shim (emu.h) and the fake cuBLASLt.
#pragma once
#include <cstdint>
#include <cstring>

inline float resid_emu_bf16_to_f32(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t resid_emu_f32_to_bf16(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
}
