#!/usr/bin/env bash
# Regenerate the golden reference fixtures (tests/fixtures/golden/, tests/fixtures/models/tiny-*) with
# HF transformers.  Developer tool only: CI never runs it (it needs ~6 GB of Python packages).
#
#   scripts/make-golden.sh [make_golden.py args...]
#   scripts/make-golden.sh --only smollm2-135m          # one model
#   scripts/make-golden.sh --rebuild-tiny               # also regenerate the tiny random weights
#
# Creates a private, git-ignored venv at <repo>/.venv-golden on first use (PyPI only).  Versions are pinned so
# that a re-run reproduces the committed fixtures; override with GOLDEN_PIP_SPECS="torch transformers ...".
# PyPI's Linux torch wheel is the CUDA build: it pulls the nvidia-*/cuda-* wheels (~3 GB) and cannot be
# imported without them (it preloads libcudart even on CPU), so --no-deps is not an option; the CPU is all
# that is used.  The smollm2-135m fixtures need models/smollm2-135m (scripts/fetch-model.sh smollm2-135m).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-golden"
PY="${PYTHON:-python3}"
SPECS="${GOLDEN_PIP_SPECS:-torch==2.15.0 transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6 gguf==0.19.0 accelerate==1.15.0}"
STAMP="$VENV/.golden-installed"

if [ ! -x "$VENV/bin/python" ]; then
    echo "make-golden: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$SPECS" ]; then
    echo "make-golden: installing $SPECS" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet $SPECS
    "$VENV/bin/python" -c "import torch, transformers, safetensors, gguf, accelerate; print('torch', torch.__version__, '| transformers', transformers.__version__)"
    printf '%s' "$SPECS" > "$STAMP"
fi

cd "$ROOT"
exec "$VENV/bin/python" "$ROOT/scripts/make_golden.py" "$@"
