#!/usr/bin/env bash
# Fuzzes every target in fuzz/ for a bounded time from the committed seed corpus; fails on a
# crash (panic, overflow, abort, timeout or out-of-memory) and names the input that caused it.
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET (default 60)] [TARGET ...]
# Works on the stable toolchain: cargo-fuzz's nightly-only flags are let through with
# RUSTC_BOOTSTRAP=1, without a sanitizer (safe Rust; debug assertions and overflow checks on).
# New inputs libFuzzer finds go to fuzz/target/corpus-work/ (git-ignored); crashes to
# fuzz/artifacts/TARGET/. Reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a --sanitizer none TARGET fuzz/artifacts/TARGET/crash-...
# then fix it and add the input as fuzz/corpus/TARGET/regress-NAME: tests/fuzz_corpus.rs replays
# the whole corpus through the same checks (fuzz/harness.rs) under a normal `cargo test`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"
SECS="${1:-60}"
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(config safetensors tensor_check jsonl vectors manifest lang_similarity weight_index tokenizer_config cache_shard serve_request qwen_tiktoken)

# libFuzzer itself is C++ (built by the libfuzzer-sys crate).
command -v c++ >/dev/null || command -v g++ >/dev/null || { apt-get update -qq && apt-get install -y -qq g++; }
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
# Scratch files of the targets that read from disk (in memory where /dev/shm exists).
RESID_FUZZ_SCRATCH="$(mktemp -d "$( [ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")/resid-fuzz.XXXXXX")"
export RESID_FUZZ_SCRATCH
trap 'rm -rf "$RESID_FUZZ_SCRATCH"' EXIT
FLAGS=(-O -a --sanitizer none)
started=$(date +%s)
cargo fuzz build "${FLAGS[@]}"
echo "fuzz: targets built in $(( $(date +%s) - started )) s" >&2

failed=()
for t in "${TARGETS[@]}"; do
    work="target/corpus-work/$t"
    mkdir -p "$work" "artifacts/$t"
    echo "fuzz: $t for ${SECS} s from $(ls "corpus/$t" | wc -l) seeds" >&2
    # The first corpus directory receives new inputs; the committed seeds are only read.
    if ! cargo fuzz run "${FLAGS[@]}" "$t" "$work" "corpus/$t" -- \
        -max_total_time="$SECS" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
        >"target/fuzz-$t.log" 2>&1; then
        failed+=("$t")
        tail -n 40 "target/fuzz-$t.log" >&2
        echo "fuzz: $t FAILED; inputs in fuzz/artifacts/$t/: $(ls "artifacts/$t" | tr '\n' ' ')" >&2
    else
        grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "target/fuzz-$t.log" | tr '\n' ' ' >&2 || true
        echo >&2
    fi
done
echo "fuzz: done in $(( $(date +%s) - started )) s" >&2
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]}" >&2
    exit 1
fi
