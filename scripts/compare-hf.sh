#!/usr/bin/env bash
# Side-by-side CPU comparison of resid against Hugging Face transformers on the CPU-backend issue's
# workload: last-token hidden states at every layer of SmolLM2-135M for 256 sentences of 10-60
# words. Developer tool, not part of CI (it needs torch and transformers).
#
#   bash scripts/compare-hf.sh [MODEL_DIR] [OUT_DIR]        (defaults: models/smollm2-135m, out/compare-hf)
#
# Environment:
#   COMPARE_HF_VENV   a Python venv with torch + transformers to use (e.g. .venv-golden); default: a
#                     private .venv-compare created on first use from PyPI (torch's ordinary wheel).
#   THREADS           threads for both sides (default: all cores).
#   REPEATS           runs of each engine, alternating (default 1); the best run of each is reported.
#   RESID_BIN         a resid binary (default: cargo build --release, target/release/resid).
#   COMPARE_CANDLE=1  also build scripts/candle-extract (candle-transformers 0.9's Llama, from
#                     crates.io) and time it on the same sentences, one at a time.
#
# Engines: HF as the paper's code uses it (fp32, padded batches of 8, output_hidden_states=True,
# LM head computed), HF without the LM head, resid f32, resid bf16 (AMX or AVX512-BF16 CPUs; default
# policy, and RESID_CPU_BF16=f32-down, the earlier policy with f32 down projections), plus
# `resid bench` (GEMM-peak fractions) and PyTorch's own f32/bf16 GEMM rates. Other processes
# distort every number: the load average is recorded next to each result; rerun when quiet.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${1:-$ROOT/models/smollm2-135m}"
OUT="${2:-$ROOT/out/compare-hf}"
THREADS="${THREADS:-$(nproc)}"
REPEATS="${REPEATS:-1}"
mkdir -p "$OUT"
log() { printf '[compare-hf %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

VENV="${COMPARE_HF_VENV:-$ROOT/.venv-compare}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    # The ordinary PyPI wheels (the only index reachable here), pinned as scripts/make-golden.sh
    # pins them. PyPI's Linux torch is the CUDA build: it brings ~3 GB of nvidia-* wheels, and
    # only its CPU side runs here.
    log "creating $VENV (torch + transformers from PyPI)"
    python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    "$PY" -m pip install --quiet torch==2.15.0 transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)" >&2

if [ -z "${RESID_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release --quiet)
    RESID_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/resid"
fi
HELP="$ROOT/scripts/compare_hf.py"
INPUT="$OUT/sentences.jsonl"
"$PY" "$HELP" make-input "$INPUT" 256 10 60 0
CFG="$MODEL/config.json"
HIDDEN="$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['hidden_size'])" "$CFG")"
INTER="$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['intermediate_size'])" "$CFG")"
BF16=0; grep -q avx512_bf16 /proc/cpuinfo && BF16=1
# bf16 runs only where it is faster than f32 (`resid info`); force it here to compare anyway.
export RESID_CPU_BF16_FORCE=1

{ echo "date: $(date -Is)"; grep -m1 "model name" /proc/cpuinfo; echo "cores: $(nproc), threads used: $THREADS";
  grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512_bf16|avx512_vnni)$' | tr '\n' ' '; echo;
  echo "load at start: $(cat /proc/loadavg)"; } > "$OUT/machine.txt"
cat "$OUT/machine.txt" >&2

log "PyTorch GEMM rates"
"$PY" "$HELP" torch-rates "$OUT/torch-rates.json" "$THREADS" "$HIDDEN" "$INTER" > /dev/null
for i in $(seq 1 "$REPEATS"); do
    log "round $i/$REPEATS: HF with LM head"
    "$PY" "$HELP" hf "$OUT/hf-lm-head.$i.json" "$MODEL" "$INPUT" "$THREADS" lm-head 8 > /dev/null
    log "round $i/$REPEATS: resid f32"
    "$RESID_BIN" extract --threads "$THREADS" --model "$MODEL" --input "$INPUT" --out "$OUT/resid-f32.safetensors" --compute f32 2> "$OUT/resid-f32.log"
    "$PY" "$HELP" resid-log "$OUT/resid-f32.$i.json" "$OUT/resid-f32.log" "resid f32" > /dev/null
    log "round $i/$REPEATS: HF without LM head"
    "$PY" "$HELP" hf "$OUT/hf-no-lm-head.$i.json" "$MODEL" "$INPUT" "$THREADS" no-lm-head 8 > /dev/null
    if [ "$BF16" = 1 ]; then
        log "round $i/$REPEATS: resid bf16"
        "$RESID_BIN" extract --compute bf16 --threads "$THREADS" --model "$MODEL" --input "$INPUT" --out "$OUT/resid-bf16.safetensors" 2> "$OUT/resid-bf16.log"
        "$PY" "$HELP" resid-log "$OUT/resid-bf16.$i.json" "$OUT/resid-bf16.log" "resid bf16 ($("$RESID_BIN" info --model "$MODEL" --compute bf16 --json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["backend"])'))" > /dev/null
        log "round $i/$REPEATS: resid bf16, down projections f32"
        RESID_CPU_BF16=f32-down "$RESID_BIN" extract --compute bf16 --threads "$THREADS" --model "$MODEL" --input "$INPUT" --out "$OUT/resid-bf16-f32-down.safetensors" 2> "$OUT/resid-bf16-f32-down.log"
        "$PY" "$HELP" resid-log "$OUT/resid-bf16-f32-down.$i.json" "$OUT/resid-bf16-f32-down.log" "resid bf16 f32-down (down proj f32)" > /dev/null
    fi
done
rm -f "$OUT"/resid-*.safetensors
if [ "${COMPARE_CANDLE:-0}" = 1 ]; then
    log "building the candle runner (scripts/candle-extract)"
    cargo build --release --quiet --manifest-path "$ROOT/scripts/candle-extract/Cargo.toml" --target-dir "$ROOT/target/candle"
    for i in $(seq 1 "$REPEATS"); do
        log "round $i/$REPEATS: candle"
        RAYON_NUM_THREADS="$THREADS" "$ROOT/target/candle/release/candle-extract" "$MODEL" "$INPUT" "$OUT/candle.$i.json" > /dev/null
    done
fi
log "resid bench (GEMM peak fractions, random ids)"
"$RESID_BIN" bench --threads "$THREADS" --model "$MODEL" --workload extract --json --quiet > "$OUT/bench-f32.json"
[ "$BF16" = 1 ] && "$RESID_BIN" bench --threads "$THREADS" --model "$MODEL" --workload extract --compute bf16 --json --quiet > "$OUT/bench-bf16.json"
echo "load at end: $(cat /proc/loadavg)" >> "$OUT/machine.txt"
"$PY" "$HELP" summary "$OUT" | tee "$OUT/summary.txt"
