#!/usr/bin/env python3
"""Compile every kernels/*.cu with NVRTC (through ctypes) and report ptxas stats.

Used by scripts/check-kernels.sh; can be run on its own:

    nvrtc_compile.py --nvrtc LIB --ptxas BIN [--arch 80 --arch 90] [--out DIR]
                     [--allowlist FILE] [--define NAME=VAL ...] [KERNEL.cu ...]

Each .cu file is compiled the way the Rust host does it at run time: the
source is handed to nvrtcCreateProgram together with every kernels/*.cuh as
an in-memory header (no -I paths, no system headers), with the options in
NVRTC_OPTS plus --gpu-architecture=compute_XX. The PTX is assembled with
`ptxas -v -arch=sm_XX`, whose resource report is parsed into one table row
per (entry point, arch).

Exit status: 0 when everything compiles without warnings, no entry point
spills or uses local memory (stack frame) unless it is listed in the
allowlist, and every sm_90+ entry point executes griddepcontrol.wait (the
host launches all kernels with programmatic dependent launch there); 1
otherwise; 2 on usage / environment errors.
"""
import argparse
import concurrent.futures as cf
import ctypes
import os
import re
import subprocess
import sys
import tempfile
import time

# Options shared with the Rust host (keep in sync with kernels/README.md).
NVRTC_OPTS = ["-std=c++17"]


class Nvrtc:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        maj, mi = ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(maj), ctypes.byref(mi))
        self.version = f"{maj.value}.{mi.value}"

    def compile(self, name, src, headers, opts):
        """Returns (ok, log, ptx_bytes)."""
        L = self.lib
        prog = ctypes.c_void_p()
        hnames = [h.encode() for h in headers]
        hsrcs = [headers[h].encode() for h in headers]
        n = len(headers)
        r = L.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), n,
                                 (ctypes.c_char_p * n)(*hsrcs) if n else None,
                                 (ctypes.c_char_p * n)(*hnames) if n else None)
        if r != 0:
            return False, "nvrtcCreateProgram: " + L.nvrtcGetErrorString(r).decode(), b""
        try:
            bopts = [o.encode() for o in opts]
            rc = L.nvrtcCompileProgram(prog, len(bopts), (ctypes.c_char_p * len(bopts))(*bopts))
            sz = ctypes.c_size_t()
            L.nvrtcGetProgramLogSize(prog, ctypes.byref(sz))
            buf = ctypes.create_string_buffer(sz.value + 1)
            L.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace").strip()
            if rc != 0:
                return False, log or L.nvrtcGetErrorString(rc).decode(), b""
            L.nvrtcGetPTXSize(prog, ctypes.byref(sz))
            buf = ctypes.create_string_buffer(sz.value + 1)
            L.nvrtcGetPTX(prog, buf)
            return True, log, buf.value
        finally:
            L.nvrtcDestroyProgram(ctypes.byref(prog))


FUNC_RE = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
PROPS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED_RE = re.compile(r"Used (\d+) registers")
SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text):
    """-> list of dicts (entry, arch, regs, smem, stack, spill_st, spill_ld)."""
    rows, cur = [], None
    for line in text.splitlines():
        m = FUNC_RE.search(line)
        if m:
            cur = dict(entry=m.group(1), arch=m.group(2), regs=0, smem=0, stack=0,
                       spill_st=0, spill_ld=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = PROPS_RE.search(line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
            continue
        m = USED_RE.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            m = SMEM_RE.search(line)
            cur["smem"] = int(m.group(1)) if m else 0
    return rows


def entries_without_pdl_wait(ptx):
    """Entry points of an sm_90+ PTX module that never execute griddepcontrol.wait. The host
    launches every kernel with programmatic dependent launch there, so each must wait for the
    kernel ahead (kernels/common.cuh, resid_pdl_prologue)."""
    missing = []
    for m in re.finditer(r"\.entry\s+([A-Za-z_][A-Za-z_0-9]*)", ptx):
        end = ptx.find(".entry", m.end())
        if "griddepcontrol.wait" not in ptx[m.end():end if end >= 0 else len(ptx)]:
            missing.append(m.group(1))
    return missing


def load_allowlist(path):
    allow = {}
    if path and os.path.exists(path):
        for ln in open(path):
            ln = ln.split("#", 1)[0].strip()
            if not ln:
                continue
            parts = ln.split(None, 1)
            if len(parts) < 2:
                print(f"allowlist: entry '{parts[0]}' has no reason; ignored", file=sys.stderr)
                continue
            allow[parts[0]] = parts[1]
    return allow


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvrtc", required=True, help="path to libnvrtc.so.12")
    ap.add_argument("--ptxas", required=True, help="path to ptxas")
    ap.add_argument("--arch", action="append", type=int, help="SM version (default: 80 and 90)")
    ap.add_argument("--kernels", default=os.path.join(os.path.dirname(__file__), "..", "kernels"))
    ap.add_argument("--out", help="keep PTX/cubin here (default: temp dir)")
    ap.add_argument("--allowlist", help="spill/local-memory allowlist file")
    ap.add_argument("--readme", help="index file that must name every entry point "
                    "(brace lists like attn_hd{64,128} are expanded)")
    ap.add_argument("--define", action="append", default=[], help="extra -D for NVRTC")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("files", nargs="*", help="subset of .cu files (default: all)")
    a = ap.parse_args()
    archs = a.arch or [80, 90]
    kdir = os.path.abspath(a.kernels)

    try:
        nv = Nvrtc(a.nvrtc)
    except OSError as e:
        print(f"cannot load NVRTC: {e}", file=sys.stderr)
        return 2
    if not os.access(a.ptxas, os.X_OK):
        print(f"ptxas not executable: {a.ptxas}", file=sys.stderr)
        return 2

    headers = {f: open(os.path.join(kdir, f)).read()
               for f in sorted(os.listdir(kdir)) if f.endswith(".cuh")}
    files = a.files or sorted(f for f in os.listdir(kdir) if f.endswith(".cu"))
    files = [os.path.basename(f) for f in files]
    tmp = None
    if a.out:
        outdir = a.out
        os.makedirs(outdir, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="resid-kernels-")
        outdir = tmp.name
    allow = load_allowlist(a.allowlist)

    def job(fname, arch):
        t0 = time.time()
        src = open(os.path.join(kdir, fname)).read()
        opts = NVRTC_OPTS + [f"--gpu-architecture=compute_{arch}"] + [f"-D{d}" for d in a.define]
        ok, log, ptx = nv.compile(fname, src, headers, opts)
        res = dict(file=fname, arch=arch, ok=ok, log=log, rows=[], ptxas_log="")
        if not ok:
            res["secs"] = time.time() - t0
            return res
        base = os.path.join(outdir, f"{fname[:-3]}.sm_{arch}")
        with open(base + ".ptx", "wb") as f:
            f.write(ptx)
        p = subprocess.run([a.ptxas, "-v", f"-arch=sm_{arch}", base + ".ptx", "-o", base + ".cubin"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        res["ptxas_log"] = p.stdout
        if p.returncode != 0:
            res["ok"] = False
        res["rows"] = parse_ptxas(p.stdout)
        res["no_wait"] = entries_without_pdl_wait(ptx.decode(errors="replace")) if int(arch) >= 90 else []
        for r in res["rows"]:
            r["file"] = fname
        res["secs"] = time.time() - t0
        return res

    t0 = time.time()
    with cf.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        results = list(ex.map(lambda fa: job(*fa), [(f, ar) for f in files for ar in archs]))

    failed = False
    for r in results:
        if not r["ok"]:
            failed = True
            print(f"\n=== COMPILE FAILED: {r['file']} sm_{r['arch']} ===\n{r['log']}\n{r['ptxas_log']}")
        elif r["log"]:
            failed = True
            print(f"\n=== WARNINGS (treated as errors): {r['file']} sm_{r['arch']} ===\n{r['log']}")
        elif "warning" in r["ptxas_log"].lower():
            failed = True
            print(f"\n=== PTXAS WARNINGS: {r['file']} sm_{r['arch']} ===\n{r['ptxas_log']}")
        for ent in r.get("no_wait", []):
            failed = True
            print(f"\n=== {r['file']} sm_{r['arch']}: entry {ent} never waits for the kernel ahead "
                  "(begin it with resid_pdl_prologue(), kernels/common.cuh) ===")

    rows = [row for r in results for row in r["rows"]]
    rows.sort(key=lambda x: (x["file"], x["entry"], x["arch"]))
    hdr = ("file", "entry point", "arch", "regs", "smem B", "spill st", "spill ld", "stack B", "status")
    table = []
    for x in rows:
        bad = x["spill_st"] or x["spill_ld"] or x["stack"]
        status = "ok"
        if bad:
            if x["entry"] in allow:
                status = "allowed: " + allow[x["entry"]]
            else:
                status = "FAIL (spill/local memory)"
                failed = True
        table.append((x["file"], x["entry"], x["arch"], str(x["regs"]), str(x["smem"]),
                      str(x["spill_st"]), str(x["spill_ld"]), str(x["stack"]), status))
    w = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(hdr)]
    fmt = "  ".join("{:<%d}" % n for n in w)
    print(fmt.format(*hdr))
    print(fmt.format(*["-" * n for n in w]))
    for t in table:
        print(fmt.format(*t))
    nfiles = len(files)
    print(f"\nNVRTC {nv.version}, options {' '.join(NVRTC_OPTS)} --gpu-architecture=compute_XX; "
          f"{nfiles} files x {len(archs)} archs, {len(rows)} entry/arch rows, "
          f"{time.time() - t0:.1f}s on {a.jobs} jobs"
          + (f"; PTX/cubin in {outdir}" if a.out else ""))
    for ent in allow:
        if not any(x["entry"] == ent for x in rows):
            print(f"note: allowlisted entry '{ent}' not found (stale allowlist line?)")
    if a.readme and rows:
        text = open(a.readme).read()
        names = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", text))
        for stem, alts in re.findall(r"([A-Za-z_][A-Za-z_0-9]*)\{([A-Za-z_0-9,]+)\}", text):
            names.update(stem + alt for alt in alts.split(","))
        missing = sorted({x["entry"] for x in rows} - names)
        if missing:
            failed = True
            print(f"FAIL: entry points not named in {a.readme}: {', '.join(missing)}")
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
