"""GPU-machine half of scripts/gpu-check.sh (needs torch, transformers, safetensors; no network).

  python3 scripts/gpu_bench.py make-model NAME DIR          random-weight bf16 Llama model
  python3 scripts/gpu_bench.py make-input OUT.jsonl N MIN MAX SEED   token-id workload
  python3 scripts/gpu_bench.py hf-extract DIR IN.jsonl BATCH OUT.json
  python3 scripts/gpu_bench.py rates OUT.json               bf16 GEMM rate and copy bandwidth
  python3 scripts/gpu_bench.py summary OUTDIR               gpu-check.json + table
"""
import json, os, random, sys, time

SHAPES = {
    # Llama-2-7B: 32 layers, hidden 4096, 32 heads (MHA), intermediate 11008, vocab 32000.
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    # Llama-3.2-1B-like: 16 layers, hidden 2048, 32 q / 8 kv heads (GQA), intermediate 8192.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
}


def make_model(name, out):
    import torch
    from safetensors.torch import save_file
    s = SHAPES[name]
    os.makedirs(out, exist_ok=True)
    h, i, L = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    nq, nkv = s["num_attention_heads"], s["num_key_value_heads"]
    hd = h // nq
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", head_dim=hd, rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
               attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
               torch_dtype="bfloat16", hidden_act="silu", **s)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
    g = torch.Generator(device="cuda").manual_seed(0)
    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * std).to(torch.bfloat16).cpu()
    t = {"model.embed_tokens.weight": rnd(s["vocab_size"], h, std=1.0),
         "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
         "lm_head.weight": rnd(s["vocab_size"], h, std=h ** -0.5)}
    for l in range(L):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        t[p + "self_attn.q_proj.weight"] = rnd(nq * hd, h, std=h ** -0.5)
        t[p + "self_attn.k_proj.weight"] = rnd(nkv * hd, h, std=h ** -0.5)
        t[p + "self_attn.v_proj.weight"] = rnd(nkv * hd, h, std=h ** -0.5)
        t[p + "self_attn.o_proj.weight"] = rnd(h, nq * hd, std=h ** -0.5)
        t[p + "mlp.gate_proj.weight"] = rnd(i, h, std=h ** -0.5)
        t[p + "mlp.up_proj.weight"] = rnd(i, h, std=h ** -0.5)
        t[p + "mlp.down_proj.weight"] = rnd(h, i, std=i ** -0.5)
    save_file(t, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    params = sum(v.numel() for v in t.values())
    print(json.dumps({"model": name, "parameters": params}))


def make_input(out, n, lo, hi, seed):
    rng = random.Random(int(seed))
    with open(out, "w") as f:
        for _ in range(int(n)):
            length = rng.randint(int(lo), int(hi))
            f.write(json.dumps({"ids": [rng.randrange(3, 32000) for _ in range(length)]}) + "\n")


def hf_extract(model_dir, inp, batch, out):
    """The paper's pipeline: padded batches (left padding), output_hidden_states=True, LM head
    computed, last-token states of every layer moved to the host per batch."""
    import torch
    from transformers import AutoModelForCausalLM
    t0 = time.time()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    model = model.cuda().eval()
    load_s = time.time() - t0
    seqs = [json.loads(l)["ids"] for l in open(inp)]
    batch = int(batch)
    tokens = sum(len(s) for s in seqs)
    torch.cuda.synchronize()
    t0 = time.time()
    with torch.inference_mode():
        for b in range(0, len(seqs), batch):
            chunk = seqs[b:b + batch]
            width = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, width - len(s):] = torch.tensor(s)
                mask[j, width - len(s):] = 1
            o = model(input_ids=ids.cuda(), attention_mask=mask.cuda(), output_hidden_states=True)
            torch.stack([h[:, -1, :] for h in o.hidden_states], 1).float().cpu()
    torch.cuda.synchronize()
    secs = time.time() - t0
    res = {"engine": "hf-transformers", "sequences": len(seqs), "tokens": tokens, "seconds": secs,
           "tokens_per_s": tokens / secs, "load_seconds": load_s, "batch": batch,
           "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    json.dump(res, open(out, "w"))
    print(json.dumps(res))


def rates(out):
    import torch
    res = {"device": torch.cuda.get_device_name(0)}
    for name, (m, n, k) in {"square_8192": (8192, 8192, 8192), "llama7b_mlp": (8192, 11008, 4096),
                            "llama7b_qkv": (8192, 12288, 4096)}.items():
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t0 = time.time(); reps = 20
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        res[f"bf16_gemm_tflops_{name}"] = 2 * m * n * k * reps / (time.time() - t0) / 1e12
    x = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x); torch.cuda.synchronize()
    t0 = time.time(); reps = 20
    for _ in range(reps):
        y.copy_(x)
    torch.cuda.synchronize()
    # A copy reads and writes every byte.
    res["copy_bandwidth_gbs"] = 2 * x.numel() * reps / (time.time() - t0) / 1e9
    json.dump(res, open(out, "w"))
    print(json.dumps(res))


def top_ops(report, n=6):
    """The largest shares of a `resid bench --profile` breakdown, as one line."""
    p = report.get("profile") or {}
    ops = p.get("ops") or []
    total = p.get("marked_seconds") or 1e-12

    def one(o):
        host = f" (host {100 * o['host_seconds'] / total:.0f}%)" if "host_seconds" in o else ""
        return f"{o['op']} {100 * o['share']:.0f}%{host}"
    return "profile: " + ", ".join(one(o) for o in ops[:n]) + \
        f" (marked {p.get('marked_seconds')} s of {p.get('wall_seconds')} s wall)"


def summary(outdir):
    def load(name):
        p = os.path.join(outdir, name)
        return json.load(open(p)) if os.path.exists(p) else None
    # gpu-check.sh's fallback selftests (selftest-no-pdl.log, ...), in the order it ran them.
    fallbacks = sorted((f[len("selftest-"):-len(".log")] for f in os.listdir(outdir) if f.startswith("selftest-") and f.endswith(".log")),
                       key=lambda name: os.path.getmtime(os.path.join(outdir, f"selftest-{name}.log")))
    doc = {"selftest": load("selftest.json"), "rates": load("rates.json"), "runs": {}}
    doc.update({f"selftest_{name.replace('-', '_')}": load(f"selftest-{name}.json") for name in fallbacks})
    rows = []
    for model in SHAPES:
        hf, rs = load(f"hf-{model}.json"), load(f"resid-{model}.json")
        dec = {b: load(f"decode-{model}-b{b}.json") for b in (1, 32, "1-cublaslt", "1-no-pdl")}
        steer = load(f"steer-{model}.json")
        bench = load(f"bench-extract-{model}.json")
        doc["runs"][model] = {"hf": hf, "resid": rs, "decode": dec, "steer": steer, "bench_extract": bench}
        if hf and rs:
            rows.append(f"{model:<10} extract  resid {rs['tokens_per_s']:>9.0f} tok/s  HF {hf['tokens_per_s']:>9.0f} tok/s  ratio {rs['tokens_per_s'] / hf['tokens_per_s']:.2f}x"
                        f"  (upload {rs.get('upload_seconds')} s, {rs.get('memory_gib_after_load')} GiB)")
        if bench:
            rows.append(f"{model:<10} prefill  {bench['tokens_per_s']:.0f} tok/s, {bench['fraction_of_gemm_peak']:.3f} of the GEMM peak "
                        f"({bench['gemm_peak_gflop_per_s'] / 1e3:.0f} TFLOP/s); " + top_ops(bench))
        for b, d in dec.items():
            if d:
                rows.append(f"{model:<10} decode b{b!s:<2} " + ", ".join(f"{k} {v:.4g}" for k, v in d.items() if isinstance(v, (int, float))))
                if d.get("profile"):
                    rows.append(f"{model:<10} decode b{b!s:<2} " + top_ops(d))
        for phase in ("prefill", "decode"):
            p = (steer or {}).get(phase)
            if p:
                rows.append(f"{model:<10} {phase:<7} plain {p['plain_ms_median']:.3f} ms, steering {100 * p['steering_overhead']:+.1f}% "
                            f"(paired {100 * p['steering_overhead_paired_median']:+.1f}%), capture {100 * p['capture_overhead']:+.1f}% "
                            f"(paired {100 * p['capture_overhead_paired_median']:+.1f}%)")
    json.dump(doc, open(os.path.join(outdir, "gpu-check.json"), "w"), indent=1)
    st = doc["selftest"]
    print("\n== gpu-check summary ==")
    print("selftest:", "passed" if st and not st.get("failures") else f"FAILED or missing ({outdir}/selftest.log)")
    for name in fallbacks:
        st2 = load(f"selftest-{name}.json")
        print(f"selftest {name}:", "passed: the benchmarks ran in this configuration (switches in gpu-check.log)" if st2 and not st2.get("failures")
              else f"FAILED or missing ({outdir}/selftest-{name}.log)")
    if doc["rates"]:
        r = doc["rates"]
        print(f"bf16 GEMM {r['bf16_gemm_tflops_square_8192']:.0f} TFLOP/s (8192^3), copy {r['copy_bandwidth_gbs']:.0f} GB/s")
    for r in rows:
        print(r)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"make-model": make_model, "make-input": make_input, "hf-extract": hf_extract,
     "rates": rates, "summary": summary}[cmd](*args)
