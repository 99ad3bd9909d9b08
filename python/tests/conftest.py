"""Shared fixtures: the real test model (models/smollm2-135m, fetched by scripts/fetch-model.sh)
and a safetensors reader that needs nothing beyond numpy."""
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "smollm2-135m"
GOLDEN = ROOT / "tests" / "fixtures" / "golden"

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64, "I32": np.int32}


def read_safetensors(path):
    """(tensors as numpy arrays, metadata) of a safetensors file."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        raw = data[8 + n + a : 8 + n + b]
        if t["dtype"] == "BF16":
            arr = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=_DTYPES[t["dtype"]])
        out[name] = arr.reshape(t["shape"])
    return out, meta


@pytest.fixture(scope="session")
def model_dir():
    if not (MODEL / "config.json").exists():
        pytest.skip("models/smollm2-135m missing: run scripts/fetch-model.sh smollm2-135m")
    return MODEL


@pytest.fixture(scope="session")
def model(model_dir):
    import resid

    return resid.Model(model_dir)


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
