#!/usr/bin/env bash
# The one command to run on a machine with an NVIDIA GPU, nvcc, PyTorch and transformers, but no
# Rust toolchain and no network:
#
#   bash scripts/gpu-check.sh OUTDIR
#
# It needs a resid binary built beforehand on a development machine:
#   bash scripts/build-gpu-binary.sh          # writes target/gpu/resid (~11 MB, kernels embedded)
# and carried along with the working tree (the device tool: carry ["target/gpu"]).
#
# Steps: locate the CUDA libraries; `resid selftest --device cuda` (every kernel path against the
# CPU backend, device sampling included; if it fails, again without programmatic dependent
# launch and/or the decode GEMV kernels, and the rest runs in the first configuration that
# passes); bf16 GEMM rate and
# copy bandwidth (torch); random-weight Llama-2-7B and 1B models (bf16 safetensors written here
# with torch); the same token workload through Hugging Face transformers as the paper's code
# uses it and through `resid extract --device cuda` (weight upload time and memory from its
# log); prefill
# throughput against the GEMM peak and decode tokens/s (batch 1 and 32, unsteered and steered),
# each with a per-operation time profile (`resid bench --profile`), and batch 1 again without
# the GEMV kernel and without programmatic dependent launch (A/B); and the cost of steering
# and of capture (`resid bench --workload steer`: batch 16, every index, prefill and decode);
# then `resid serve --device cuda` under scripts/bench-serve.py (concurrency 1, 16, 64; sampled
# with top-p and with top-k at 16; a shared 256-id preamble at 16, through the prefix cache); then
# points inside blocks (capture cost A/B, CUDA against CPU) and `resid stats` against extraction;
# then `resid stats` accumulating on the device: time at 3 and at every point, and its numbers
# against numpy over the device's rows and against the CPU backend.
# Everything lands in OUTDIR as JSON (gpu-check.json collects it), with a short table last.
# Sizes: GPU_CHECK_SEQS_1B (default 2048) and GPU_CHECK_SEQS_7B (default 512) sequences of
# 16..512 tokens. Budget: under 8 minutes on one H100.
set -uo pipefail
OUT="${1:?usage: scripts/gpu-check.sh OUTDIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESID="${RESID_BIN:-$ROOT/target/gpu/resid}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="${GPU_CHECK_WORK:-/tmp/resid-gpu-check}"
mkdir -p "$WORK"
log() { printf '[gpu-check %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/gpu-check.log" >&2; }
[ -x "$RESID" ] || { log "no resid binary at $RESID: run scripts/build-gpu-binary.sh on a dev machine and carry target/gpu"; exit 2; }

# --- CUDA libraries: the toolkit's, or the nvidia-* wheels PyTorch brings; unversioned links.
LIBS="$WORK/libs"; mkdir -p "$LIBS"
SITE="$("$PY" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)"
for lib in libnvrtc libcublasLt libcublas; do
    found=""
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu $(for s in $SITE; do ls -d "$s"/nvidia/*/lib 2>/dev/null; done); do
        f="$(ls "$d/$lib.so"* 2>/dev/null | grep -v alt | head -1)"
        if [ -n "$f" ]; then found="$f"; break; fi
    done
    if [ -n "$found" ]; then ln -sf "$found" "$LIBS/$lib.so"; log "$lib: $found"; else log "$lib: not found"; fi
done
export LD_LIBRARY_PATH="$LIBS:${LD_LIBRARY_PATH:-}"
export RESID_KERNEL_CACHE="$WORK/kernel-cache"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$RESID" --version > "$OUT/resid-version.txt" 2>&1 || true

# --- 1. selftest
log "selftest"
timeout 300 "$RESID" selftest --device cuda --json "$OUT/selftest.json" > "$OUT/selftest.log" 2>&1
rc=$?
log "selftest exit $rc ($(tail -1 "$OUT/selftest.log"))"
# The parts never run on a GPU before can each be switched off: programmatic dependent launch
# (sm_90+) and the decode GEMV kernels (gemv, gemv_swiglu, gemv_rope). If the selftest fails,
# it runs again without them, in this order; the first configuration that passes is exported,
# so that every benchmark below measures a correct engine (and the logs say which part broke).
if [[ $rc != 0 ]]; then
    sm90=0; grep -q 'sm_9\|sm_1[0-9]' "$OUT/selftest.log" && sm90=1
    for fallback in no-pdl no-gemv no-gemv-no-pdl; do
        case $fallback in
            no-pdl) [[ $sm90 == 1 && ${RESID_CUDA_PDL:-1} != 0 ]] || continue; vars=(RESID_CUDA_PDL=0) ;;
            no-gemv) vars=(RESID_CUDA_GEMV=0) ;;
            no-gemv-no-pdl) [[ $sm90 == 1 && ${RESID_CUDA_PDL:-1} != 0 ]] || continue; vars=(RESID_CUDA_GEMV=0 RESID_CUDA_PDL=0) ;;
        esac
        log "selftest again with ${vars[*]}"
        env "${vars[@]}" timeout 120 "$RESID" selftest --device cuda --json "$OUT/selftest-$fallback.json" > "$OUT/selftest-$fallback.log" 2>&1
        rc_fallback=$?
        log "selftest with ${vars[*]} exit $rc_fallback ($(tail -1 "$OUT/selftest-$fallback.log"))"
        if [[ $rc_fallback == 0 ]]; then
            log "every benchmark below runs with ${vars[*]}"
            export "${vars[@]}"
            break
        fi
    done
fi

# --- 2. machine rates
log "bf16 GEMM rate and copy bandwidth"
timeout 120 "$PY" "$ROOT/scripts/gpu_bench.py" rates "$OUT/rates.json" >> "$OUT/gpu-check.log" 2>&1 || log "rates failed"

# --- 3. extraction: HF vs resid on the same ids, then decode
for model in llama-1b llama2-7b; do
    dir="$WORK/$model"
    if [ ! -f "$dir/model.safetensors" ]; then
        log "writing random-weight $model"
        timeout 300 "$PY" "$ROOT/scripts/gpu_bench.py" make-model "$model" "$dir" >> "$OUT/gpu-check.log" 2>&1 || { log "make-model $model failed"; continue; }
    fi
    if [ "$model" = llama2-7b ]; then n="${GPU_CHECK_SEQS_7B:-512}"; else n="${GPU_CHECK_SEQS_1B:-2048}"; fi
    "$PY" "$ROOT/scripts/gpu_bench.py" make-input "$WORK/$model.jsonl" "$n" 16 512 0
    log "$model: HF transformers extraction ($n sequences)"
    timeout 400 "$PY" "$ROOT/scripts/gpu_bench.py" hf-extract "$dir" "$WORK/$model.jsonl" 16 "$OUT/hf-$model.json" >> "$OUT/gpu-check.log" 2>&1 || log "HF extract $model failed"
    log "$model: resid extraction"
    timeout 400 "$RESID" extract --model "$dir" --device cuda --input "$WORK/$model.jsonl" --out "$WORK/$model-hidden.safetensors" --batch-tokens 16384 > "$OUT/resid-$model.log" 2>&1
    log "resid extract exit $?: $(tail -1 "$OUT/resid-$model.log")"
    "$PY" - "$OUT/resid-$model.log" "$OUT/resid-$model.json" <<'PYEOF'
import json, re, sys
text = open(sys.argv[1]).read()
m = re.search(r"\((\d+) sequences, (\d+) tokens; extraction ([\d.]+) s, (\d+) tokens/s", text)
mem = re.search(r"device memory in use ([\d.]+) GiB", text)
up = re.search(r"weights uploaded in ([\d.]+) s", text)
if m:
    json.dump({"engine": "resid", "sequences": int(m[1]), "tokens": int(m[2]), "seconds": float(m[3]),
               "tokens_per_s": float(m[4]), "memory_gib_after_load": float(mem[1]) if mem else None,
               "upload_seconds": float(up[1]) if up else None}, open(sys.argv[2], "w"))
PYEOF
    rm -f "$WORK/$model-hidden.safetensors"
    if "$RESID" bench --help >/dev/null 2>&1; then
        log "$model: prefill throughput against the GEMM peak, with the per-operation profile"
        timeout 180 "$RESID" bench --model "$dir" --device cuda --workload extract --sequences 256 --min-len 16 --max-len 512 --batch 8192 --profile --json > "$OUT/bench-extract-$model.json" 2>> "$OUT/gpu-check.log" || log "bench extract failed"
        for b in 1 32; do
            log "$model: decode batch $b"
            timeout 120 "$RESID" bench --model "$dir" --device cuda --workload decode --batch "$b" --steps 64 --profile --json > "$OUT/decode-$model-b$b.json" 2>> "$OUT/gpu-check.log" || log "decode b$b failed"
        done
        # The A/B runs load the model twice more: skipped when uploads are slow (session 1 took
        # 46 s per 7B load), so that the whole check stays within its time budget.
        slow=$("$PY" -c 'import json, sys; print(int((json.load(open(sys.argv[1])).get("upload_seconds") or 0) > 20))' "$OUT/resid-$model.json" 2>/dev/null || echo 0)
        if [[ $slow == 1 ]]; then
            log "$model: weight upload over 20 s: decode A/B runs skipped"
        else
            log "$model: decode batch 1 with cuBLASLt instead of the GEMV kernel (A/B)"
            RESID_CUDA_GEMV=0 timeout 120 "$RESID" bench --model "$dir" --device cuda --workload decode --batch 1 --steps 64 --json > "$OUT/decode-$model-b1-cublaslt.json" 2>> "$OUT/gpu-check.log" || log "decode b1 cublaslt failed"
            log "$model: decode batch 1 without programmatic dependent launch of the GEMVs (A/B)"
            RESID_CUDA_PDL=0 timeout 120 "$RESID" bench --model "$dir" --device cuda --workload decode --batch 1 --steps 64 --json > "$OUT/decode-$model-b1-no-pdl.json" 2>> "$OUT/gpu-check.log" || log "decode b1 without PDL failed"
        fi
        log "$model: steering and capture overheads (batch 16)"
        timeout 120 "$RESID" bench --model "$dir" --device cuda --workload steer --batch 16 --steps 20 --json > "$OUT/steer-$model.json" 2>> "$OUT/gpu-check.log" || log "steer overheads failed"
    else
        log "this resid binary has no bench command: decode benchmarks skipped"
    fi
done

# --- 4. the server on the GPU: aggregate tokens/s, TTFT and ITL at concurrency 1, 16 and 64,
# unsteered and steered (one inline direction at 8 layers), on the 1B model (token-id prompts:
# the random models have no tokenizer).
if "$RESID" serve --help > /dev/null 2>&1 && [ -f "$WORK/llama-1b/model.safetensors" ]; then
    log "llama-1b: resid serve --device cuda"
    "$RESID" serve --model "$WORK/llama-1b" --device cuda --port 0 --kv-budget-mib 8192 > /dev/null 2> "$OUT/serve.log" &
    serve_pid=$!
    url=""
    for _ in $(seq 1 120); do
        url="$(grep -o 'http://[0-9.:]*' "$OUT/serve.log" | head -1)"
        [ -n "$url" ] && break
        sleep 1
    done
    if [ -n "$url" ]; then
        # Greedy unsteered and steered at 1, 16 and 64 clients; sampled (top-p on the device,
        # top-k on the host) at 16; prompts behind a shared 256-id preamble at 16 (the prefix
        # cache copies its keys and values on the device: resid_prompt_tokens_cached_total).
        for variant in none inline top_p top_k shared_prefix; do
            extra=(--concurrency 1,16,64)
            case "$variant" in
                inline) extra+=(--steering-direction 8-15) ;;
                top_p) extra=(--concurrency 16 --temperature 0.8 --top-p 0.9) ;;
                top_k) extra=(--concurrency 16 --temperature 0.8 --top-k 50) ;;
                shared_prefix) extra=(--concurrency 16 --shared-prefix 256) ;;
            esac
            timeout 240 "$PY" "$ROOT/scripts/bench-serve.py" --url "$url" --ids 64 --requests-per-client 1 \
                --max-tokens 32 --label "resid cuda $variant" --json "$OUT/serve-bench.jsonl" "${extra[@]}" >> "$OUT/gpu-check.log" 2>&1 \
                || log "serve bench ($variant) failed"
        done
        curl -s "$url/metrics" > "$OUT/serve-metrics.txt" 2>/dev/null || true
    else
        log "resid serve did not start: $(tail -2 "$OUT/serve.log")"
    fi
    kill -TERM "$serve_pid" 2>/dev/null; wait "$serve_pid"; log "resid serve exit $? after SIGTERM"
fi

# --- 5. points inside blocks and statistics on the GPU (1B model): the capture cost of every
# point of 4 blocks (A/B against the block boundaries alone), the CUDA points against the CPU's on
# 4 sequences, and `resid stats` throughput against plain extraction.
dir="$WORK/llama-1b"
if "$RESID" stats --help > /dev/null 2>&1 && [ -f "$dir/model.safetensors" ]; then
    pts="0,4,8,12,blocks.3.hook_resid_mid,blocks.3.hook_attn_out,blocks.3.hook_mlp_out,blocks.3.hook_z,blocks.7.hook_attn_out,blocks.7.hook_mlp_out,blocks.7.hook_z,blocks.11.hook_z"
    for layers in 0,4,8,12 "$pts"; do
        tag=$([ "$layers" = 0,4,8,12 ] && echo plain || echo points)
        timeout 120 "$RESID" bench --model "$dir" --device cuda --workload extract --sequences 512 --layers "$layers" --json > "$OUT/points-$tag.json" 2>> "$OUT/gpu-check.log" || log "points bench ($tag) failed"
    done
    head -4 "$WORK/llama-1b.jsonl" > "$WORK/points.jsonl"
    for dev in cuda cpu; do
        timeout 240 "$RESID" extract --model "$dir" --device $dev --input "$WORK/points.jsonl" --layers "$pts" --position mean --out "$WORK/points-$dev.safetensors" --quiet 2>> "$OUT/gpu-check.log" || log "points extract on $dev failed"
    done
    "$PY" - "$WORK/points-cuda.safetensors" "$WORK/points-cpu.safetensors" > "$OUT/points-cuda-vs-cpu.json" 2>> "$OUT/gpu-check.log" <<'PYEOF'
import json, sys
from safetensors.numpy import load_file
a, b = (load_file(p)["hidden_states"].astype("float64") for p in sys.argv[1:3])
rel = [float(abs(a[:, i] - b[:, i]).max() / max(abs(b[:, i]).max(), 1e-30)) for i in range(a.shape[1])]
print(json.dumps({"max_relative_difference_per_point": rel}))
PYEOF
    for cmd in extract stats; do
        start=$(date +%s%N)
        timeout 240 "$RESID" $cmd --model "$dir" --device cuda --input "$WORK/llama-1b.jsonl" --layers 4,8,12 --out "$WORK/$cmd-run.safetensors" --quiet 2>> "$OUT/gpu-check.log" || log "$cmd run failed"
        echo "{\"command\": \"$cmd\", \"milliseconds\": $(( ($(date +%s%N) - start) / 1000000 ))}" >> "$OUT/stats-vs-extract.jsonl"
    done
fi

# --- 6. `resid stats` accumulating on the device (kernels/stats_accumulate.cu; 1B model): time
# against extracting the same rows (all tokens of 128 sequences) at 3 points and at every point,
# into stats-device.jsonl; then on 8 sequences (3 points, mean, cov, gram) the CUDA statistics
# against a numpy f64 two-pass fold of the rows `resid extract --device cuda` gives (the same
# rows: expected within 1e-9 of each point's largest value), and against the CPU backend's
# statistics (its f32 forward against CUDA's bf16: expected within 5e-2), into
# stats-device-check.json.
if "$RESID" stats --help > /dev/null 2>&1 && [ -f "$dir/model.safetensors" ]; then
    head -128 "$WORK/llama-1b.jsonl" > "$WORK/stats.jsonl"
    tokens=$("$PY" -c 'import json, sys; print(sum(len(json.loads(l)["ids"]) for l in open(sys.argv[1])))' "$WORK/stats.jsonl" 2>/dev/null || echo 0)
    for layers in 4,8,12 all; do
        pick=(); [ "$layers" != all ] && pick=(--layers "$layers")
        for cmd in extract stats; do
            start=$(date +%s%N)
            timeout 240 "$RESID" $cmd --model "$dir" --device cuda --input "$WORK/stats.jsonl" ${pick[@]+"${pick[@]}"} --position all --out "$WORK/timed-$cmd.safetensors" --quiet 2>> "$OUT/gpu-check.log" || log "$cmd at points $layers failed"
            echo "{\"command\": \"$cmd\", \"points\": \"$layers\", \"tokens\": $tokens, \"milliseconds\": $(( ($(date +%s%N) - start) / 1000000 ))}" >> "$OUT/stats-device.jsonl"
            rm -f "$WORK/timed-$cmd.safetensors"
        done
    done
    head -8 "$WORK/llama-1b.jsonl" > "$WORK/stats8.jsonl"
    few=(--model "$dir" --input "$WORK/stats8.jsonl" --layers 4,8,12 --position all --quiet)
    timeout 120 "$RESID" extract "${few[@]}" --device cuda --out "$WORK/rows-cuda.safetensors" 2>> "$OUT/gpu-check.log" || log "rows extract failed"
    for dev in cuda cpu; do
        timeout 240 "$RESID" stats "${few[@]}" --device $dev --stats mean,cov,gram --out "$WORK/stats-$dev.safetensors" 2>> "$OUT/gpu-check.log" || log "stats on $dev failed"
    done
    "$PY" - "$WORK/rows-cuda.safetensors" "$WORK/stats-cuda.safetensors" "$WORK/stats-cpu.safetensors" > "$OUT/stats-device-check.json" 2>> "$OUT/gpu-check.log" <<'PYEOF'
import json, sys
import numpy as np
from safetensors.numpy import load_file
rows = load_file(sys.argv[1])["hidden_states"].astype(np.float64)
cuda, cpu = load_file(sys.argv[2]), load_file(sys.argv[3])
def rel(a, b):  # per point, the largest difference over the point's largest value
    return [float(abs(a[i] - b[i]).max() / max(abs(b[i]).max(), 1e-30)) for i in range(b.shape[0])]
mean = rows.mean(axis=0)
cov = np.stack([np.cov(rows[:, p].T) for p in range(rows.shape[1])])
gram = np.einsum("rpi,rpj->pij", rows, rows)
vs_rows = {"mean": rel(cuda["mean"], mean), "cov": rel(cuda["cov"], cov), "gram": rel(cuda["gram"], gram),
           "min": rel(cuda["min"], rows.min(axis=0)), "max": rel(cuda["max"], rows.max(axis=0))}
vs_cpu = {k: rel(cuda[k], cpu[k]) for k in ("mean", "cov", "gram", "min", "max")}
worst = lambda d: max(max(v) for v in d.values())
print(json.dumps({"count_equal": bool((cuda["count"] == rows.shape[0]).all() and (cuda["count"] == cpu["count"]).all()),
                  "vs_numpy_of_cuda_rows": vs_rows, "vs_numpy_ok_1e-9": worst(vs_rows) <= 1e-9,
                  "vs_cpu_backend": vs_cpu, "vs_cpu_ok_5e-2": worst(vs_cpu) <= 5e-2}))
PYEOF
    log "stats on the device: $(cat "$OUT/stats-device-check.json" 2>/dev/null | "$PY" -c 'import json, sys; d = json.load(sys.stdin); print("count", d["count_equal"], "vs numpy", d["vs_numpy_ok_1e-9"], "vs cpu", d["vs_cpu_ok_5e-2"])' 2>/dev/null)"
    rm -f "$WORK/rows-cuda.safetensors"
fi

"$PY" "$ROOT/scripts/gpu_bench.py" summary "$OUT"
