#!/usr/bin/env bash
# Peak memory of a long extraction: N sentences (default 10,000) of 10-60 words, last-token hidden
# states at every index, written to a sharded output directory, under GNU time. Prints the peak
# RSS against the size of the model's weight files (the CPU-backend issue's limit: weights + 15%).
#
#   scripts/stream-rss.sh [MODEL_DIR] [N] [OUT_DIR]
#
# Defaults: models/smollm2-135m, 10000, a temporary directory (removed afterwards).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${1:-$ROOT/models/smollm2-135m}"
N="${2:-10000}"
WORK="$(mktemp -d)"
OUT="${3:-$WORK/out}"
trap 'rm -rf "$WORK"' EXIT
RESID="${RESID:-$ROOT/target/release/resid}"

[ -x "$RESID" ] || { echo "stream-rss: $RESID not built (cargo build --release)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "stream-rss: GNU time (/usr/bin/time) is needed" >&2; exit 1; }
[ -d "$MODEL" ] || { echo "stream-rss: no model directory $MODEL (scripts/fetch-model.sh smollm2-135m)" >&2; exit 1; }

python3 "$ROOT/scripts/compare_hf.py" make-input "$WORK/input.jsonl" "$N" 10 60 1
/usr/bin/time -v -o "$WORK/time.txt" "$RESID" extract --model "$MODEL" --input "$WORK/input.jsonl" --out "$OUT" --quiet
"$RESID" verify "$OUT" >/dev/null

weights=$(find -L "$MODEL" -maxdepth 1 -name '*.safetensors' -printf '%s\n' | awk '{s += $1} END {print s}')
peak_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time.txt")
wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$WORK/time.txt")
out_bytes=$(du -sb "$OUT" | cut -f1)
python3 - "$N" "$weights" "$peak_kb" "$wall" "$out_bytes" "$OUT" <<'EOF'
import glob, json, struct, sys
n, weights, peak_kb, wall, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
tokens = 0
for shard in glob.glob(sys.argv[6] + "/shard-*.safetensors"):
    with open(shard, "rb") as f:
        tokens += int(json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))["__metadata__"]["tokens"])
peak = peak_kb * 1024
print(f"sentences {n} ({tokens} tokens): wall {wall}, output {out / 2**20:.0f} MiB")
print(f"peak RSS {peak / 2**20:.0f} MiB; weight files {weights / 2**20:.0f} MiB; ratio {peak / weights:.3f} (limit 1.15)")
sys.exit(0 if peak <= 1.15 * weights else 2)
EOF
