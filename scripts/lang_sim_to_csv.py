#!/usr/bin/env python3
"""Converts the paper's `lang_sim.pt` (GitHub shaoyangxu/Multilingual-Human-Value-Concepts, computed there
with lang2vec by `lang2vec_try.ipynb`) to the CSV that `resid study --lang2vec FILE.csv` reads.

    pip install torch      # only to unpickle lang_sim.pt
    python3 scripts/lang_sim_to_csv.py lang_sim.pt > lang2vec.csv

`lang_sim.pt` holds {lang_a: {lang_b: {"genetic": d, "geographic": d, "syntactic": d, "phonological": d}}} with
lang2vec *distances*.  The CSV has the header `lang_a,lang_b,genetic,syntactic,geographic,phonological` and
one row per ordered pair of distinct languages, the distances unchanged (resid correlates with 1 - distance,
as the paper's consistency_analysis.py does).
"""
import sys

KINDS = ["genetic", "syntactic", "geographic", "phonological"]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    import torch

    sim = torch.load(sys.argv[1], weights_only=False)
    print("lang_a,lang_b," + ",".join(KINDS))
    for a, row in sim.items():
        for b, d in row.items():
            if a != b:
                print(f"{a},{b}," + ",".join(repr(float(d[k])) for k in KINDS))


if __name__ == "__main__":
    main()
