"""Helpers for scripts/compare-hf.sh: the CPU side-by-side comparison of resid against Hugging Face
transformers on the CPU-backend issue's workload (last-token hidden states at every layer of
256 sentences of 10-60 words).

  compare_hf.py make-input OUT N MIN_WORDS MAX_WORDS SEED
  compare_hf.py hf OUT MODEL_DIR INPUT THREADS [lm-head|no-lm-head] [BATCH]
  compare_hf.py torch-rates OUT THREADS HIDDEN INTER
  compare_hf.py resid-log OUT LOG LABEL
  compare_hf.py summary DIR
"""
import json
import os
import random
import re
import sys
import time

WORDS = """the of and to in is was he for it with as his on be at by had are but from or have an
they which one you were all her she there would their we him been has when who will no more if
out so up said what its about than into them can only other time new some could these two may
first then do any like my now over such our man me even most made after also did many before
must through back years where much your way well down should because each just those people how
too little state good very make world still own see men work long get here between both life
being under never day same another know while last might us great old year off come since
against go came right used take three small large part house water light city story river night
word room found place home point number always music garden letter morning window mountain
children teacher question answer market village winter summer evening kitchen doctor country
friend family school paper money table forest ocean bridge island animal flower weather""".split()


def make_input(out, n, lo, hi, seed):
    rng = random.Random(int(seed))
    with open(out, "w") as f:
        for _ in range(int(n)):
            k = rng.randint(int(lo), int(hi))
            words = [rng.choice(WORDS) for _ in range(k)]
            text = " ".join(words).capitalize() + "."
            f.write(json.dumps({"text": text}) + "\n")


def hf(out, model_dir, inp, threads, mode="lm-head", batch=8):
    """As the paper's code uses transformers: fp32, padded batches of 8 (left padding),
    output_hidden_states=True, the LM head computed (or not, with the bare model), last-token
    states of every layer stacked per batch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(int(threads))
    batch = int(batch)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_s = time.time() - t0
    texts = [json.loads(l)["text"] for l in open(inp)]
    tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    body = model.model if mode == "no-lm-head" else model
    # One small warm-up batch (not timed).
    with torch.inference_mode():
        enc = tok(texts[:2], return_tensors="pt", padding=True)
        body(**enc, output_hidden_states=True)
    t0 = time.time()
    with torch.inference_mode():
        for b in range(0, len(texts), batch):
            enc = tok(texts[b:b + batch], return_tensors="pt", padding=True)
            o = body(**enc, output_hidden_states=True)
            torch.stack([h[:, -1, :] for h in o.hidden_states], 1).float().numpy()
    secs = time.time() - t0
    res = {"engine": f"hf-transformers ({'LM head' if mode != 'no-lm-head' else 'no LM head'})", "sequences": len(texts),
           "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs, "load_seconds": load_s, "batch": batch,
           "threads": int(threads), "torch": torch.__version__, "loadavg_end": os.getloadavg()}
    json.dump(res, open(out, "w"))
    print(json.dumps(res))


def torch_rates(out, threads, hidden, inter):
    """PyTorch's own GEMM rate on this CPU, f32 and bf16, at the model's MLP shape and square."""
    import torch
    torch.set_num_threads(int(threads))
    h, i = int(hidden), int(inter)
    res = {"threads": int(threads), "torch": torch.__version__}
    for dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        for shape, (m, n, k) in {"gate_up_2048": (2048, 2 * i, h), "square_2048": (2048, 2048, 2048)}.items():
            a = torch.randn(m, k, dtype=dtype)
            b = torch.randn(k, n, dtype=dtype)
            for _ in range(2):
                a @ b
            best = float("inf")
            for _ in range(5):
                t0 = time.time()
                a @ b
                best = min(best, time.time() - t0)
            res[f"{name}_gemm_gflops_{shape}"] = 2 * m * n * k / best / 1e9
    json.dump(res, open(out, "w"))
    print(json.dumps(res))


def resid_log(out, log, label):
    text = open(log).read()
    m = re.search(r"\((\d+) sequences, (\d+) tokens; extraction ([\d.]+) s, (\d+) tokens/s", text)
    if not m:
        sys.exit(f"no extraction line in {log}")
    res = {"engine": label, "sequences": int(m[1]), "tokens": int(m[2]), "seconds": float(m[3]),
           "tokens_per_s": int(m[2]) / float(m[3]), "loadavg_end": os.getloadavg()}
    json.dump(res, open(out, "w"))
    print(json.dumps(res))


def summary(d):
    def load(n):
        """The best of the repeats `n` (NAME.json or NAME.<i>.json), with their count."""
        stem = n[:-len(".json")]
        runs = [json.load(open(os.path.join(d, f))) for f in sorted(os.listdir(d))
                if f == n or re.fullmatch(re.escape(stem) + r"\.\d+\.json", f)]
        if not runs:
            return None
        best = max(runs, key=lambda r: r.get("tokens_per_s", 0))
        best["repeats"] = len(runs)
        best["all_tokens_per_s"] = [round(r.get("tokens_per_s", 0), 1) for r in runs]
        return best
    hf_lm, hf_bare = load("hf-lm-head.json"), load("hf-no-lm-head.json")
    rows = [load(n) for n in ("hf-lm-head.json", "hf-no-lm-head.json", "candle.json", "resid-f32.json", "resid-bf16.json", "resid-bf16-f32-down.json")]
    print(f"{'engine':<44} {'tokens':>7} {'s':>7} {'tok/s':>8} {'vs HF':>7} {'vs HF no head':>13}")
    for r in rows:
        if not r:
            continue
        a = r["tokens_per_s"] / hf_lm["tokens_per_s"] if hf_lm else float("nan")
        b = r["tokens_per_s"] / hf_bare["tokens_per_s"] if hf_bare else float("nan")
        print(f"{r['engine']:<44} {r['tokens']:>7} {r['seconds']:>7.2f} {r['tokens_per_s']:>8.0f} {a:>6.2f}x {b:>12.2f}x"
              f"   (best of {r['repeats']}: {r['all_tokens_per_s']})")
    for name in ("bench-f32.json", "bench-bf16.json"):
        b = load(name)
        if b:
            print(f"resid bench ({b['compute']}): {b['tokens_per_s']:.0f} tok/s on random ids, {b['gflop_per_s']:.1f} GFLOP/s = "
                  f"{b['fraction_of_gemm_peak']:.1%} of its GEMM peak {b['gemm_peak_gflop_per_s']:.1f} GFLOP/s "
                  f"({b.get('fraction_of_one_matrix_gemm_peak', float('nan')):.1%} of the one-matrix peak; "
                  f"FMA peak {b.get('fma_peak_gflop_per_s', float('nan')):.1f})")
    r = load("torch-rates.json")
    if r:
        print("torch GEMM GFLOP/s: " + ", ".join(f"{k.replace('_gemm_gflops', '')} {v:.0f}" for k, v in r.items() if "gflops" in k))
    names = {re.sub(r"\.\d+\.json$", ".json", n) for n in os.listdir(d) if n.endswith(".json") and n != "summary.json"}
    doc = {n: load(n) for n in sorted(names)}
    json.dump(doc, open(os.path.join(d, "summary.json"), "w"), indent=1)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"make-input": make_input, "hf": hf, "torch-rates": torch_rates, "resid-log": resid_log, "summary": summary}[cmd](*args)
