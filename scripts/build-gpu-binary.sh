#!/usr/bin/env bash
# Builds the resid binary that travels to a GPU machine (which has no Rust toolchain):
# a stripped release build at target/gpu/resid (about 11 MB). Kernels are embedded and compiled
# there by NVRTC on first use. Then, on the GPU machine: bash scripts/gpu-check.sh OUTDIR
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
cargo build --release --quiet
mkdir -p target/gpu
strip -o target/gpu/resid target/release/resid
ls -la target/gpu/resid
