"""The Python API's overhead against the CLI on the extraction workload.

usage: scripts/.venv-py/bin/python scripts/bench-python.py [MODEL_DIR] [ROUNDS]

The workload: every stimulus of data/values (pos and neg of each pair, 7 concepts × 8
languages; the study's extraction) truncated to the first N texts, all layers, last position,
written to one safetensors file. Each round runs `resid extract --quiet` (a process: its wall
time includes loading the model) and, in this process, `resid.Model(...)` + `extract_to(...)`
(the same load and the same writer), alternating, and keeps each side's fastest round.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import resid

ROOT = Path(__file__).resolve().parents[1]
model_dir = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "models" / "smollm2-135m")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
texts = []
for f in sorted((ROOT / "data" / "values").glob("*/*.json")):
    for group in json.loads(f.read_text(encoding="utf-8")).values():
        for pair in group.values():
            texts += [pair["pos"], pair["neg"]]
texts = texts[:400]
cli = ROOT / "target" / "release" / "resid"
with tempfile.TemporaryDirectory() as d:
    inp = Path(d) / "in.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    best = {"cli": float("inf"), "python": float("inf")}
    for r in range(rounds):
        for side in ("cli", "python"):
            out = Path(d) / f"{side}-{r}.safetensors"
            start = time.perf_counter()
            if side == "cli":
                subprocess.run([str(cli), "extract", "--model", model_dir, "--input", str(inp), "--out", str(out), "--quiet"], check=True)
            else:
                resid.Model(model_dir).extract_to(out, inp)
            best[side] = min(best[side], time.perf_counter() - start)
            os.remove(out)
    tokens = sum(len(x) for x in resid.Model(model_dir).tokenize(texts))
overhead = (best["python"] - best["cli"]) / best["cli"] * 100
print(json.dumps({"texts": len(texts), "tokens": tokens, "cli_s": round(best["cli"], 3), "python_s": round(best["python"], 3), "overhead_percent": round(overhead, 2)}))
