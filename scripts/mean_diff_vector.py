"""Mean-difference steering vector from an `resid extract` output (numpy + stdlib only).

usage: python3 scripts/mean_diff_vector.py HIDDEN.safetensors INPUT.jsonl OUT.safetensors
INPUT.jsonl lines carry `label` 1 (positive) or 0 (negative). Writes `directions` [L+1, hidden],
each row unit-norm, in the format `resid generate --steer` reads.
"""
import json, struct, sys

def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        fmt = {"F32": "f", "I64": "q"}[info["dtype"]]
        count = (b - a) // struct.calcsize(fmt)
        out[name] = (info["shape"], struct.unpack(f"<{count}{fmt}", raw[8 + n + a: 8 + n + b]))
    return out

def main():
    hidden_path, input_path, out_path = sys.argv[1:4]
    t = read_safetensors(hidden_path)
    (n, layers, h), values = t["hidden_states"]
    labels = [json.loads(line)["label"] for line in open(input_path, encoding="utf-8")]
    rows = []
    for l in range(layers):
        pos = [0.0] * h; neg = [0.0] * h
        npos = sum(labels); nneg = len(labels) - npos
        for i, lab in enumerate(labels):
            base = (i * layers + l) * h
            acc = pos if lab else neg
            for d in range(h):
                acc[d] += values[base + d]
        diff = [p / npos - q / nneg for p, q in zip(pos, neg)]
        norm = sum(x * x for x in diff) ** 0.5 or 1.0
        rows.extend(x / norm for x in diff)
    data = struct.pack(f"<{len(rows)}f", *rows)
    header = json.dumps({"directions": {"dtype": "F32", "shape": [layers, h], "data_offsets": [0, len(data)]},
                         "__metadata__": {"method": "mean-diff", "source": hidden_path}}).encode()
    header += b" " * (-len(header) % 8)
    with open(out_path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    print(f"wrote {out_path}: directions [{layers}, {h}]")

main()
