#!/usr/bin/env python3
"""Summarises a CUDA-emulator call trace (RESID_EMU_TRACE=FILE, see emu/trace.h).

    python3 scripts/emu-trace.py TRACE [--json]

The trace is cut at every call that blocks a real host (a synchronisation, a copy into pageable
memory, a synchronous allocation): on a GPU the device idles from such a call until the host
queues work again, so a forward pass should be one segment that ends with its one copy back.
Consecutive segments that made the same calls are grouped; each group shows its count, the
median host time of resid's own code per segment (the emulator's work excluded; run with
RESID_EMU_NO_KERNELS=1 for warm caches), the calls, and the kernels launched.
--json prints {"segments": [...], "heuristic_shapes": {...}} for tests to check.
"""
import collections
import json
import statistics
import sys


def parse(path):
    segments, calls, kernels, host_us = [], collections.Counter(), [], 0.0
    heuristics = collections.Counter()
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if len(fields) < 2 or not fields[0].startswith("+"):
                sys.exit(f"{path}:{n}: not a trace line: {line.strip()!r}")
            host_us += float(fields[0][1:])
            call = fields[1]
            if call == "block":
                segments.append({"calls": dict(calls), "kernels": kernels, "host_us": host_us,
                                 "blocked_by": " ".join(fields[2:])})
                calls, kernels, host_us = collections.Counter(), [], 0.0
                continue
            calls[call] += 1
            if call == "launch":
                kernels.append(fields[2])
            elif call == "lt_matmul":
                kernels.append("gemm")
            elif call == "lt_heuristic":
                heuristics[" ".join(fields[2:5])] += 1
    if calls:
        segments.append({"calls": dict(calls), "kernels": kernels, "host_us": host_us, "blocked_by": None})
    return segments, heuristics


def grouped(segments):
    groups = []
    for s in segments:
        blocked = (s["blocked_by"] or "end of trace").split()[0]
        key = (tuple(sorted(s["calls"].items())), blocked, tuple(s["kernels"]))
        if groups and groups[-1]["key"] == key:
            groups[-1]["host_us"].append(s["host_us"])
        else:
            groups.append({"key": key, "calls": s["calls"], "blocked_by": blocked, "kernels": s["kernels"],
                           "host_us": [s["host_us"]]})
    return groups


def main():
    args = [a for a in sys.argv[1:] if a != "--json"]
    if len(args) != 1:
        sys.exit(__doc__)
    segments, heuristics = parse(args[0])
    if "--json" in sys.argv:
        print(json.dumps({"segments": segments, "heuristic_shapes": heuristics}))
        return
    for g in grouped(segments):
        calls = " ".join(f"{k}={v}" for k, v in sorted(g["calls"].items()))
        print(f"{len(g['host_us']):5d} x  host {statistics.median(g['host_us']):9.1f} us  {calls}  -> {g['blocked_by']}")
        if g["kernels"]:
            kernels = " ".join(g["kernels"])
            print("           " + (kernels if len(kernels) < 400 else kernels[:400] + " ..."))
    repeated = {k: v for k, v in heuristics.items() if v > 1}
    print(f"cuBLASLt heuristics: {sum(heuristics.values())} for {len(heuristics)} shapes"
          + (f"; planned more than once: {repeated}" if repeated else ""))


if __name__ == "__main__":
    main()
