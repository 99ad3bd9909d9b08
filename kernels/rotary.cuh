// kernels/rotary.cuh -- the rotary angle's cosine and sine, shared by rope.cu and gemv_rope.cu
// so that both rotate by exactly the same values.
#pragma once
#include "common.cuh"

__device__ __forceinline__ void rope_cos_sin(float theta, float mscale, float* c, float* s) {
    // theta can be ~1e5 rad: reduce to [-pi, pi] in f64 (exact enough for
    // |theta| < 2^40), then use the hardware approximations, which are
    // accurate on that range. (sinf/cosf would pull in the Payne-Hanek slow
    // path, which uses local memory.)
    const double two_pi = 6.283185307179586476925286766559;
    const double inv_two_pi = 0.15915494309189533576888376337251;
    const double td = (double)theta;
    const double r = td - rint(td * inv_two_pi) * two_pi;
    float sf, cf;
    __sincosf((float)r, &sf, &cf);
    *c = cf * mscale;
    *s = sf * mscale;
}
