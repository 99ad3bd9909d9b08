"""The demo's extraction and steering from Python (`import resid`): hidden states of the demo
sentences as a numpy array, a mean-difference vector from them, and steered generation with
different steering per prompt in one batch.

usage: python examples/python_demo.py [MODEL_DIR]
"""
import json
import sys

import numpy as np

import resid

model = resid.Model(sys.argv[1] if len(sys.argv) > 1 else "models/smollm2-135m")
rows = [json.loads(line) for line in open("data/demo/sentences.jsonl", encoding="utf-8")]
h = model.extract([r["text"] for r in rows])  # float32 [N, L+1, hidden], no copy out of the engine
labels = np.array([r["label"] for r in rows])
print(f"hidden states {h.shape} {h.dtype}")
v = resid.repe.concept_vectors(h[labels == 1][: (labels == 0).sum()], h[labels == 0][: (labels == 1).sum()])
best = int(np.argmax(v["train_accuracy"])) + 1
print(f"kindness direction: train accuracy {v['train_accuracy'].max():.2f} at layer {best}")
kind = resid.Steering(v["unit"], coef=6.0, layers=list(range(8, 21)))
cruel = resid.Steering(v["unit"], coef=-2.5, layers=list(range(8, 21)))
prompt = "Describe my new neighbour in one sentence."
for label, out in zip(["unsteered", "kind (+6)", "unkind (-2.5)"],
                      model.generate([prompt] * 3, max_new_tokens=40, chat=True, steer=[None, kind, cruel])):
    print(f"--- {label}: {out['text']!r}")
