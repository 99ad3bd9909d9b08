"""Type stubs for resid.repe."""
from typing import Any, Dict

import numpy.typing as npt

def concept_vectors(pos: npt.ArrayLike, neg: npt.ArrayLike, method: str = "mean-diff", seed: int = 0, protocol: str = "resid") -> Dict[str, Any]:
    """Concept directions per layer from [pairs, L+1, hidden] representations."""

def recognize(
    train_pos: npt.ArrayLike, train_neg: npt.ArrayLike, test_pos: npt.ArrayLike, test_neg: npt.ArrayLike,
    method: str = "mean-diff", seed: int = 0, protocol: str = "resid",
) -> Dict[str, Any]:
    """Per-layer recognition accuracy, as `resid recognize --json`."""
