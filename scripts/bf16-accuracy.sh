#!/usr/bin/env bash
# How far the CPU bf16 policies move hidden states from resid f32 (itself within 1e-4 of Hugging
# Face f32) on the CPU-backend issue's workload: 256 sentences of 10-60 words, every
# hidden-state index, last-token and mean-pooled. Prints max / p99.9 / p99 / median relative
# error per row (‖bf16 − f32‖ / ‖f32‖) and how many (sentence, index) rows exceed 1e-2.
# Developer tool (needs numpy and safetensors in PY, e.g. .venv-golden/bin/python).
#
#   bash scripts/bf16-accuracy.sh [MODEL_DIR] [OUT_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${1:-$ROOT/models/smollm2-135m}"
OUT="${2:-$ROOT/out/bf16-accuracy}"
PY="${PY:-$ROOT/.venv-golden/bin/python}"
RESID_BIN="${RESID_BIN:-$ROOT/target/release/resid}"
mkdir -p "$OUT"
"$PY" "$ROOT/scripts/compare_hf.py" make-input "$OUT/sentences.jsonl" 256 10 60 0
for pos in last mean; do
    "$RESID_BIN" extract --quiet --model "$MODEL" --input "$OUT/sentences.jsonl" --position "$pos" --out "$OUT/f32-$pos.safetensors"
    for policy in split-down f32-down; do
        RESID_CPU_COMPUTE=bf16 RESID_CPU_BF16=$policy "$RESID_BIN" extract --quiet --model "$MODEL" --input "$OUT/sentences.jsonl" \
            --position "$pos" --out "$OUT/bf16-$policy-$pos.safetensors"
    done
done
"$PY" - "$OUT" <<'PYEOF'
import sys
import numpy as np
from safetensors.numpy import load_file
d = sys.argv[1]
for pos in ("last", "mean"):
    ref = load_file(f"{d}/f32-{pos}.safetensors")["hidden_states"].astype(np.float64)
    for policy in ("split-down", "f32-down"):
        x = load_file(f"{d}/bf16-{policy}-{pos}.safetensors")["hidden_states"].astype(np.float64)
        e = np.linalg.norm(x - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
        s, l = np.unravel_index(e.argmax(), e.shape)
        print(f"{pos:4} bf16 {policy:10}: max {e.max():.2e} (sentence {s}, index {l}), p99.9 {np.quantile(e, 0.999):.2e}, "
              f"p99 {np.quantile(e, 0.99):.2e}, median {np.median(e):.2e}; rows > 1e-2: {(e > 1e-2).sum()} of {e.size}")
PYEOF
