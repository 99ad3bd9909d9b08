#!/usr/bin/env bash
# Compile every kernels/*.cu with NVRTC for sm_80 and sm_90, assemble the PTX
# with `ptxas -v`, print registers / shared memory / spills / stack per entry
# point, and fail on compile errors or warnings, and on spills or local memory
# (stack frame) unless the entry point is listed in kernels/spill-allowlist.txt,
# and when an entry point is not named in kernels/README.md.
#
# Needs no GPU and no CUDA toolkit: NVRTC and ptxas come from PyPI wheels,
# installed once into a private venv (scripts/.venv-cuda, git-ignored) and
# reused afterwards. Non-interactive (fine with CI=true and no stdin).
#
# Usage: scripts/check-kernels.sh [--arch 80 --arch 90 ...] [--out DIR] [FILE.cu ...]
#   Extra arguments are passed to scripts/nvrtc_compile.py.
# Environment:
#   RESID_CUDA_VENV   venv location (default scripts/.venv-cuda)
#   PYTHON            interpreter used to create the venv (default python3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${RESID_CUDA_VENV:-$here/.venv-cuda}"
python="${PYTHON:-python3}"

# Pinned wheel versions (CUDA 12.9 toolchain; both exist on PyPI).
NVRTC_PKG="nvidia-cuda-nvrtc-cu12==12.9.86"
NVCC_PKG="nvidia-cuda-nvcc-cu12==12.9.86"
stamp="$venv/.resid-kernels-$(echo "$NVRTC_PKG $NVCC_PKG" | tr -c 'A-Za-z0-9.\n' '_')"

if [[ ! -f "$stamp" ]]; then
    echo "check-kernels: installing $NVRTC_PKG $NVCC_PKG into $venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
        "$NVRTC_PKG" "$NVCC_PKG" </dev/null
    touch "$stamp"
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
nvrtc="$site/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
ptxas="$site/nvidia/cuda_nvcc/bin/ptxas"
for f in "$nvrtc" "$ptxas"; do
    if [[ ! -e "$f" ]]; then
        echo "check-kernels: missing $f (delete $venv and rerun)" >&2
        exit 2
    fi
done
chmod +x "$ptxas" 2>/dev/null || true

exec "$venv/bin/python" "$here/nvrtc_compile.py" \
    --nvrtc "$nvrtc" --ptxas "$ptxas" \
    --kernels "$root/kernels" \
    --allowlist "$root/kernels/spill-allowlist.txt" \
    --readme "$root/kernels/README.md" \
    "$@"
