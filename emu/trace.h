// emu/trace.h -- RESID_EMU_TRACE=FILE appends one line per driver and cuBLASLt call to FILE, in
// call order, so that the host side of a pass can be read and checked: what blocks the host
// (which on a GPU leaves the device idle until the next launch), what allocates, what launches,
// and how long resid's own host code ran between calls.
//
// Line: "+GAP_US CALL FIELDS...". GAP_US is the host time from the return of the previous traced
// call to the start of this one, so it excludes the emulator's own work (kernels run on the CPU
// here) and counts only the caller's. CALL starts with "block " when the call blocks a real
// host until the device has finished the work queued before it (CUDA's "API synchronization
// behavior").
//
// The state lives in libresid_emu_trace.so, which libcuda.so and libcublasLt.so both link, so the
// gaps are measured across the two libraries' calls.
#pragma once

extern "C" {
void resid_emu_trace_begin(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void resid_emu_trace_end();
}

namespace resid_emu {

// One traced call: the line is written when the call starts, the clock stops when it returns.
struct TracedCall {
    template <typename... A>
    explicit TracedCall(const char* fmt, A... args) {
        resid_emu_trace_begin(fmt, args...);
    }
    ~TracedCall() { resid_emu_trace_end(); }
    TracedCall(const TracedCall&) = delete;
    TracedCall& operator=(const TracedCall&) = delete;
};

}  // namespace resid_emu

#define RESID_EMU_TRACE_CALL(...) const resid_emu::TracedCall resid_emu_traced_call_(__VA_ARGS__)
