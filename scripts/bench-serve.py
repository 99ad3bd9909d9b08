#!/usr/bin/env python3
"""Serving benchmark: aggregate generated tokens/s, time to first token and inter-token latency
at several concurrencies, steered and unsteered, against any OpenAI-compatible server
(`resid serve`, llama.cpp's `llama-server`). Standard library only.

    python3 scripts/bench-serve.py --url http://127.0.0.1:8000 [--concurrency 1,4,16,64]
        [--max-tokens 64] [--requests-per-client 2] [--steering JSON] [--label NAME] [--json OUT]
        [--temperature T [--top-p P] [--top-k K]] [--logprobs N] [--shared-prefix N]

Each client sends its requests one after another, streaming (`stream: true`, greedy unless
`--temperature` is given, `ignore_eos`), and times every chunk: TTFT is from sending a request to its first token, ITL
the gaps between tokens of one request. Aggregate tokens/s = all generated tokens / wall time
of the whole level. `--steering` is sent as the request's `steering` field (resid); a server
steered globally (llama.cpp's --control-vector) is run without it and labelled by --label.
`--shared-prefix N` starts every prompt with the same N words (or ids): a system prompt or
few-shot examples, which a server's prefix cache need not prefill again. The 8 prompts repeat
across requests and levels, so a prefix cache also serves whole prompts after their first use.
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

PROMPTS = [
    "Write a short story about a lighthouse keeper who",
    "Explain why honesty matters in friendship:",
    "The history of the printing press began when",
    "List the steps to bake bread at home:",
    "A letter to a friend about moving to a new city:",
    "The most surprising fact about octopuses is",
    "In a small village by the sea, there lived",
    "Describe the water cycle to a ten-year-old:",
]


def one_request(url, body):
    """Streams one completion; returns (ttft, [gaps], tokens)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    times = []
    buf = b""
    while True:
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                d = json.loads(data)
                ch = (d.get("choices") or [{}])[0]
                # resid names each chunk's tokens (token_ids); llama.cpp's server sends one chunk
                # per token, then a last one with the finish reason.
                if "token_ids" in ch:
                    n = len(ch["token_ids"])
                else:
                    n = 1 if "text" in ch and ch.get("finish_reason") is None else 0
                now = time.perf_counter()
                times.extend([now] * n)
    conn.close()
    if not times:
        return None, [], 0
    gaps = [b - a for a, b in zip(times, times[1:])]
    return times[0] - sent, gaps, len(times)


def level(url, concurrency, per_client, max_tokens, steering, model, sampling):
    ttfts, gaps, tokens, errors = [], [], [0], []
    lock = threading.Lock()

    def client(k):
        for j in range(per_client):
            body = {"prompt": PROMPTS[(k + j) % len(PROMPTS)], "max_tokens": max_tokens, "stream": True, "ignore_eos": True, **sampling}
            if model:
                body["model"] = model
            if steering is not None:
                body["steering"] = steering
            try:
                t, g, n = one_request(url, body)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                if t is not None:
                    ttfts.append(t)
                gaps.extend(g)
                tokens[0] += n

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = lambda xs, p: statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) >= 2 else (xs[0] if xs else float("nan"))
    return {
        "concurrency": concurrency, "requests": concurrency * per_client, "errors": len(errors), "tokens": tokens[0],
        "seconds": wall, "tokens_per_s": tokens[0] / wall,
        "ttft_p50_ms": 1e3 * q(ttfts, 50), "ttft_p99_ms": 1e3 * q(ttfts, 99),
        "itl_p50_ms": 1e3 * q(gaps, 50), "itl_p99_ms": 1e3 * q(gaps, 99),
        "first_error": errors[0] if errors else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default="")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steering", help="JSON for the request's steering field")
    ap.add_argument("--steering-direction", metavar="LAYERS", help="steer with one random inline direction (norm 4) at LAYERS, e.g. 8-15 (needs the model's hidden size from /v1/models)")
    ap.add_argument("--ids", type=int, metavar="N", help="prompts of N random token ids instead of text (models without a tokenizer)")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", help="append the results as JSON lines here")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    ap.add_argument("--top-p", type=float, help="nucleus mass sent as top_p (with --temperature)")
    ap.add_argument("--top-k", type=int, help="top_k (an extension of resid's and llama.cpp's servers)")
    ap.add_argument("--logprobs", type=int, metavar="N", help="ask for each token's log-probability and the top N (the completions API's logprobs)")
    ap.add_argument("--shared-prefix", type=int, metavar="N", default=0, help="start every prompt with the same N words (token ids with --ids)")
    a = ap.parse_args()
    sampling = {"temperature": a.temperature}
    if a.top_p is not None:
        sampling["top_p"] = a.top_p
    if a.top_k is not None:
        sampling["top_k"] = a.top_k
    if a.logprobs is not None:
        sampling["logprobs"] = a.logprobs
    steering = json.loads(a.steering) if a.steering else None
    if a.ids or a.steering_direction:
        u = urllib.parse.urlparse(a.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("GET", "/v1/models")
        info = json.loads(conn.getresponse().read())["data"][0]
        import random
        rng = random.Random(0)
        if a.ids:
            vocab = 1000  # low ids exist in every vocabulary
            PROMPTS[:] = [[rng.randrange(vocab) for _ in range(a.ids)] for _ in range(8)]
        if a.steering_direction:
            row = [rng.uniform(-1, 1) for _ in range(info["hidden_size"])]
            norm = sum(x * x for x in row) ** 0.5
            steering = {"directions": [[4 * x / norm for x in row]], "layers": a.steering_direction}
    if a.shared_prefix:
        import random
        rng = random.Random(1)
        if a.ids:
            preamble = [rng.randrange(1000) for _ in range(a.shared_prefix)]
            PROMPTS[:] = [preamble + p for p in PROMPTS]
        else:
            words = "the value of honesty fairness kindness people law power care trust a community and each".split()
            preamble = " ".join(rng.choice(words) for _ in range(a.shared_prefix)) + ".\n\n"
            PROMPTS[:] = [preamble + p for p in PROMPTS]
    # Warm-up: one request, not counted.
    level(a.url, 1, 1, 8, steering, a.model, sampling)
    print(f"| server | concurrency | requests | tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|---|")
    for c in [int(x) for x in a.concurrency.split(",")]:
        r = level(a.url, c, a.requests_per_client, a.max_tokens, steering, a.model, sampling)
        r["label"] = a.label
        r["sampling"] = sampling
        print(f"| {a.label} | {c} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |" + (f" {r['errors']} errors: {r['first_error']}" if r["errors"] else ""),
              flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
        if r["errors"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
