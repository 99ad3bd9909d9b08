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

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None, "I64": np.int64, "I32": np.int32}


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


def write_safetensors(path, tensors):
    """A float32 safetensors file of `{name: array}`."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def make_tiny_llama(d, hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, vocab=128, inter=128, seed=0):
    """A random LLaMA (no tokenizer: token ids only), for tests where the real model's weights
    would only make a call slower."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }))
    rng = np.random.default_rng(seed)
    q, kv = heads * head_dim, kv_heads * head_dim
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)), "model.norm.weight": 1 + 0.1 * rng.standard_normal(hidden)}
    for l in range(layers):
        p = f"model.layers.{l}."
        for n, shape in [("self_attn.q_proj", (q, hidden)), ("self_attn.k_proj", (kv, hidden)), ("self_attn.v_proj", (kv, hidden)),
                         ("self_attn.o_proj", (hidden, q)), ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                         ("mlp.down_proj", (hidden, inter))]:
            t[p + n + ".weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(hidden)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(hidden)
    write_safetensors(d / "model.safetensors", t)
    return d


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny")
