#!/usr/bin/env python3
"""The paper's split, with CPython's own `random`: the reference for resid's `--protocol paper`.

`read_data` below is `utils.read_data` of the paper's code (GitHub
shaoyangxu/Multilingual-Human-Value-Concepts), reduced to what decides the split: the same
filter, key order, `random.seed`, `random.shuffle` calls and counts.  No third-party package.

    python3 scripts/paper_split.py FILE.json [--split F] [--seed S]    # one file's split as JSON
    python3 scripts/paper_split.py --random-cases                        # MT19937 outputs (tests)
    python3 scripts/paper_split.py --fixture OUT.json FILE...            # tests/fixtures/paper_split.json

A file's split is {"train": [keys], "test": [keys], "flips": [bool]}: keys `group|id` in the
paper's order; flips[i] is true when the random baseline's re-shuffled labels of training pair i
name its negative side.
"""
import json
import math
import random
import sys


def read_data(path, split=0.8, seed=1):
    random.seed(seed)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    # utils.filter: drop pos == neg (groups stay, possibly empty)
    data = {k1: {k2: v2 for k2, v2 in v1.items() if v2["pos"] != v2["neg"]} for k1, v1 in data.items()}
    cot = sum(len(v) for v in data.values())
    train_num = math.floor(cot * 0.8)
    test_num = cot - train_num
    if split <= 0.8:
        train_num = math.floor(cot * split)
    elif split >= 1:
        train_num = min(int(split), train_num)
    samples = []
    for k1, v1 in data.items():
        for k2, v2 in v1.items():
            samples.append({"key": k1 + "|" + k2, "pos": v2["pos"], "neg": v2["neg"]})
    random.shuffle(samples)
    paired = [[s["key"] + "\x00pos", s["key"] + "\x00neg"] for s in samples]
    train, test = paired[:train_num], paired[-test_num:]
    labels = []
    for d in train:
        pos = d[0]
        random.shuffle(d)
        labels.append([s == pos for s in d])
    flips = []
    for label in labels:
        before = list(label)
        random.shuffle(label)
        # The label-positive side after the shuffle is the negative one when the labels moved.
        flips.append(label != before)
    key = lambda d: min(d).split("\x00")[0]  # noqa: E731
    return {"train": [key(d) for d in train], "test": [key(d) for d in test], "flips": flips}


def random_cases():
    out = []
    for seed in [0, 1, 2, 42, 12345, 2**32 - 1, 2**32, 2**40 + 5, 2**63 + 11]:
        r = random.Random(seed)
        case = {"seed": seed, "u32": [r.getrandbits(32) for _ in range(700)]}
        case["bits"] = [[k, r.getrandbits(k)] for k in [1, 2, 7, 31, 32, 33, 53, 64]]
        case["below"] = [[n, r.randrange(n)] for n in [1, 2, 3, 5, 10, 1000, 2**31 + 1, 2**32 - 1, 2**32 + 7, 2**53 + 3]]
        case["shuffles"] = []
        for n in [0, 1, 2, 3, 10, 100, 1000]:
            x = list(range(n))
            r.shuffle(x)
            case["shuffles"].append(x)
        case["random"] = [int(r.random() * 2**53) for _ in range(5)]  # exact: JSON floats may not round-trip
        out.append(case)
    return out


def main(argv):
    if argv[:1] == ["--random-cases"]:
        print(json.dumps(random_cases()))
        return
    if argv[:1] == ["--fixture"]:
        out, files = argv[1], argv[2:]
        fixture = {"python": sys.version.split()[0], "random": random_cases(),
                   "splits": [{"file": f, "split": s, "seed": 1, **read_data(f, s, 1)} for f in files for s in [0.8, 0.5, 10]]}
        with open(out, "w", encoding="utf-8") as f:
            json.dump(fixture, f)
        return
    path, split, seed = argv[0], 0.8, 1
    rest = argv[1:]
    while rest:
        if rest[0] == "--split":
            split = float(rest[1])
        elif rest[0] == "--seed":
            seed = int(rest[1])
        else:
            sys.exit(f"unknown argument {rest[0]!r}")
        rest = rest[2:]
    print(json.dumps(read_data(path, split, seed)))


if __name__ == "__main__":
    main(sys.argv[1:])
