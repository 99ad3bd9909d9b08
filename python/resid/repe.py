"""The study's building blocks on arrays: concept vectors and recognition (`resid vectors`,
`resid recognize`), the same library code as the command line.

Representations are what `Model.extract(texts)` returns with the default layers: float32
`[pairs, L+1, hidden]`, hidden-state indices 0..=L (index 0, the embeddings, is not used).
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

from . import _float32, _resid

__all__ = ["concept_vectors", "recognize"]


def concept_vectors(pos: Any, neg: Any, method: str = "mean-diff", seed: int = 0, protocol: str = "resid") -> Dict[str, Any]:
    """Concept directions per layer from paired representations (`pos[i]` and `neg[i]` are the
    two sides of pair i), by "mean-diff" (mean(pos) − mean(neg)), "pca" (first principal
    component of the pair differences, RepE's reader), "random" (Gaussian directions) or
    "random-labels" (the paper's baseline: cluster means on labels shuffled within each pair,
    CPython's `random.seed(seed)`). `protocol="paper"` signs the directions as RepE's
    `get_signs` does; "resid" (default) as resid's own protocol.

    Returns a dict: `directions` float32 [L+1, hidden] in the vector-file layout (row 0 zero,
    row l the signed unit direction times its scale; `resid.Steering(d["directions"], ...)`
    steers with it), `unit` (the signed unit directions, same layout), and per layer 1..=L
    `signs`, `scale` (mean pair separation) and `train_accuracy`.
    """
    p, n = _float32(pos, "pos", 3), _float32(neg, "neg", 3)
    return _resid.concept_vectors(p, n, str(method), int(seed), str(protocol))


def recognize(train_pos: Any, train_neg: Any, test_pos: Any, test_neg: Any, method: str = "mean-diff", seed: int = 0, protocol: str = "resid") -> Dict[str, Any]:
    """Fits concept vectors on the training pairs and scores the test pairs at every layer,
    as `resid recognize --json`: `layers` (1..=L), `accuracy` (test), `train_accuracy`,
    `best_layer` and `best_accuracy`. A pair counts as recognized when its positive side
    projects at least as high as its negative side on the signed direction. `protocol` as in
    `concept_vectors` (with "paper", `best_layer` is the max over layers on the test set, as the
    paper reports it)."""
    arrays = [_float32(a, name, 3) for a, name in ((train_pos, "train_pos"), (train_neg, "train_neg"), (test_pos, "test_pos"), (test_neg, "test_neg"))]
    return _resid.recognize(*arrays, str(method), int(seed), str(protocol))
