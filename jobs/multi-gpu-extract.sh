#!/usr/bin/env bash
# One process per GPU on a multi-GPU node: part i/N runs on cuda:i, then the parts are merged.
#   bash jobs/multi-gpu-extract.sh MODEL_DIR INPUT.jsonl OUT_DIR [extra resid flags]
set -euo pipefail
MODEL="$1"; INPUT="$2"; OUT="$3"; shift 3
N="${GPUS:-$(nvidia-smi -L | wc -l)}"
pids=()
for ((i = 0; i < N; i++)); do
    resid extract --model "$MODEL" --input "$INPUT" --out "$OUT/part-$i" --shard "$i/$N" --device "cuda:$i" --quiet "$@" &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ "$status" -eq 0 ] || { echo "a part failed; rerun this script to resume it" >&2; exit 1; }
resid merge --out "$OUT/merged" "$OUT"/part-*
