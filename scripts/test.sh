#!/usr/bin/env bash
# The test command: fetches the real test model (cached) and runs every test.
#   bash scripts/test.sh [extra cargo test args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/fetch-model.sh smollm2-135m
cargo test --release --all-targets "$@"
