#!/usr/bin/env bash
# The main job on the default model: fetch SmolLM2-135M, run the multilingual value-concept
# study on the demo data (data/values: 7 concepts, 8 languages; about 6 minutes on 2 cores),
# extract hidden states for a few sentences, and generate with and without steering.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/fetch-model.sh smollm2-135m
cargo build --release --quiet
RESID=target/release/resid
MODEL=models/smollm2-135m
mkdir -p out
$RESID info --model $MODEL
# The paper's protocol (the default): its split, RepE vectors, max over layers; tables in CSV and LaTeX.
$RESID study --model $MODEL --data data/values --out out/study
echo "study report (paper protocol): out/study/report.md (tables/paper_*.csv|.tex, figures/paper_*.png, splits.json)"
# resid's own protocol on the same cached hidden states, beside it.
$RESID study --protocol resid --model $MODEL --data data/values --out out/study-resid --cache out/study/cache --no-control
echo "study report (resid protocol): out/study-resid/report.md"
# Several models side by side (here one, twice): the paper's Fig. 2 and Table 6.
$RESID compare out/study out/study --out out/compare
$RESID extract --model $MODEL --input data/demo/sentences.jsonl --out out/demo-hidden.safetensors
# A steering vector from the extraction itself: mean(kind) − mean(cruel) sentences, per layer.
python3 scripts/mean_diff_vector.py out/demo-hidden.safetensors data/demo/sentences.jsonl out/kindness.safetensors
echo "--- unsteered"
$RESID generate --model $MODEL --chat --prompt "Describe my new neighbour in one sentence." --max-new-tokens 40
echo "--- steered toward kindness (layers 8-20, coef 6)"
$RESID generate --model $MODEL --chat --prompt "Describe my new neighbour in one sentence." --max-new-tokens 40 \
    --steer out/kindness.safetensors --coef 6 --steer-layers 8-20
echo "--- steered away from kindness (coef -2.5)"
$RESID generate --model $MODEL --chat --prompt "Describe my new neighbour in one sentence." --max-new-tokens 40 \
    --steer out/kindness.safetensors --coef -2.5 --steer-layers 8-20
# The same from Python (`import resid`, built from python/ into scripts/.venv-py): extract to
# numpy, a concept vector, and three differently steered generations in one batch.
PYVENV="$ROOT/scripts/.venv-py"
if [ ! -x "$PYVENV/bin/python" ]; then
    python3 -m venv "$PYVENV"
fi
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}" "$PYVENV/bin/pip" install -q "$ROOT/python"
echo "--- Python: examples/python_demo.py"
"$PYVENV/bin/python" examples/python_demo.py $MODEL
