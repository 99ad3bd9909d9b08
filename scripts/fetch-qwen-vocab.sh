#!/usr/bin/env bash
# Fetch the real first-generation Qwen vocabulary (qwen.tiktoken, 2.5 MB) and Qwen's own
# tokenization_qwen.py for the tokenizer tests, from the pinned PyPI wheel of qwen-agent, into
# models/qwen-vocab/ (git-ignored). Idempotent: a run with the files in place checks them and exits.
#
#   bash scripts/fetch-qwen-vocab.sh            # the vocabulary only (what the tests need)
#   bash scripts/fetch-qwen-vocab.sh --reference
#       also installs the pinned tiktoken into scripts/.venv-qwen and regenerates
#       tests/fixtures/qwen-tokenizer/reference.json with scripts/qwen_tokenizer_reference.py
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$REPO_ROOT/models/qwen-vocab"
CACHE_DIR="$REPO_ROOT/models/.cache"
VENV="$REPO_ROOT/scripts/.venv-qwen"
PYTHON="${PYTHON:-python3}"

PYPI_PACKAGE="qwen-agent"
PYPI_VERSION="0.0.34"
WHEEL_NAME="qwen_agent-0.0.34-py3-none-any.whl"
# member path in the wheel, sha256
FILES=(
    "qwen_agent/utils/qwen.tiktoken b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
    "qwen_agent/utils/tokenization_qwen.py f6fdddd23643224ddb6e97b57605c205dd85d6135523fc5dc9ab18b0bde94d7e"
)
# The independent reference for the fixture (Qwen's tokenizer is tiktoken with Qwen's ranks).
TIKTOKEN="tiktoken==0.12.0"

say() { printf '[fetch-qwen-vocab] %s\n' "$*"; }
die() { printf '[fetch-qwen-vocab] error: %s\n' "$*" >&2; exit 1; }

REFERENCE=0
case "${1:-}" in
    "") ;;
    --reference) REFERENCE=1 ;;
    *) die "usage: bash scripts/fetch-qwen-vocab.sh [--reference]" ;;
esac

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
all_present() {
    local entry member sum
    for entry in "${FILES[@]}"; do
        read -r member sum <<<"$entry"
        [[ -f "$OUT_DIR/$(basename "$member")" && "$(sha256_of "$OUT_DIR/$(basename "$member")")" == "$sum" ]] || return 1
    done
}

venv() {
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating venv ${VENV#"$REPO_ROOT"/}"
        "$PYTHON" -m venv "$VENV" || { rm -rf "$VENV"; die "could not create a venv with $PYTHON -m venv (on Debian/Ubuntu: apt-get install python3-venv)"; }
    fi
}

if all_present; then
    say "models/qwen-vocab/ is up to date"
else
    mkdir -p "$CACHE_DIR" "$OUT_DIR"
    if [[ ! -f "$CACHE_DIR/$WHEEL_NAME" ]]; then
        venv
        say "downloading $PYPI_PACKAGE==$PYPI_VERSION from PyPI (~7 MB wheel, no dependencies)"
        tmp="$(mktemp -d "$CACHE_DIR/.download.XXXXXX")"
        "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            -d "$tmp" "$PYPI_PACKAGE==$PYPI_VERSION" || { rm -rf "$tmp"; die "pip download of $PYPI_PACKAGE==$PYPI_VERSION failed (is PyPI reachable?)"; }
        [[ -f "$tmp/$WHEEL_NAME" ]] || { rm -rf "$tmp"; die "pip did not produce $WHEEL_NAME"; }
        mv -f "$tmp/$WHEEL_NAME" "$CACHE_DIR/$WHEEL_NAME"
        rm -rf "$tmp"
    fi
    for entry in "${FILES[@]}"; do
        read -r member sum <<<"$entry"
        dest="$OUT_DIR/$(basename "$member")"
        "$PYTHON" - "$CACHE_DIR/$WHEEL_NAME" "$member" "$dest.tmp" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
        got="$(sha256_of "$dest.tmp")"
        if [[ "$got" != "$sum" ]]; then
            rm -f "$dest.tmp" "$CACHE_DIR/$WHEEL_NAME"
            die "sha256 of $member is $got, expected $sum (removed the cached wheel; rerun to download again)"
        fi
        mv -f "$dest.tmp" "$dest"
    done
    say "wrote models/qwen-vocab/: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
fi

if [[ $REFERENCE == 1 ]]; then
    venv
    "$VENV/bin/python" -c "import tiktoken, sys; sys.exit(0 if tiktoken.__version__ == '${TIKTOKEN#tiktoken==}' else 1)" 2>/dev/null \
        || "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$TIKTOKEN" || die "pip install $TIKTOKEN failed"
    "$VENV/bin/python" "$REPO_ROOT/scripts/qwen_tokenizer_reference.py" "$OUT_DIR" "$REPO_ROOT/tests/fixtures/qwen-tokenizer/reference.json"
fi
