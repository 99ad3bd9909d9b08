// emu/trace.cpp -- the state behind emu/trace.h: the trace file and the clock of the last return.
#include "trace.h"

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <mutex>
#include <unistd.h>

namespace {

std::mutex g_mutex;
std::chrono::steady_clock::time_point g_last_return;
bool g_started = false;

int trace_fd() {
    static const int fd = [] {
        const char* path = std::getenv("RESID_EMU_TRACE");
        return path && *path ? ::open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644) : -1;
    }();
    return fd;
}

}  // namespace

extern "C" void resid_emu_trace_begin(const char* fmt, ...) {
    if (trace_fd() < 0) return;
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> l(g_mutex);
    const double gap_us = g_started ? std::chrono::duration<double, std::micro>(now - g_last_return).count() : 0.0;
    char line[512];
    int n = std::snprintf(line, sizeof line, "+%.1f ", gap_us);
    va_list ap;
    va_start(ap, fmt);
    const int m = std::vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
    va_end(ap);
    if (m < 0) return;
    n = n + m < (int)sizeof line - 1 ? n + m : (int)sizeof line - 2;
    line[n] = '\n';
    const ssize_t ignored = ::write(trace_fd(), line, n + 1);
    (void)ignored;
}

extern "C" void resid_emu_trace_end() {
    if (trace_fd() < 0) return;
    std::lock_guard<std::mutex> l(g_mutex);
    g_last_return = std::chrono::steady_clock::now();
    g_started = true;
}
