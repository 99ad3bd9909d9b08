"""Parity with Hugging Face transformers through the Python API: the golden fixtures of
tests/golden.rs (scripts/make_golden.py), within 1e-4 relative error per hidden-state index."""
import json

import numpy as np
import pytest

import resid
from conftest import GOLDEN, read_safetensors, rel_err

TOL = 1e-4


@pytest.fixture(scope="module")
def golden(model_dir):
    meta = json.loads((GOLDEN / "smollm2-135m.json").read_text())
    tensors, _ = read_safetensors(GOLDEN / "smollm2-135m.safetensors")
    ids = [tensors[f"p{i}.ids"].astype(int).tolist() for i in range(meta["num_prompts"])]
    return meta, tensors, ids


def check_layers(what, ours, hf):
    assert ours.shape == hf.shape, (what, ours.shape, hf.shape)
    for l in range(hf.shape[0]):
        e = rel_err(ours[l], hf[l])
        assert e <= TOL, f"{what}: hidden-state index {l}: relative error {e:.3e}"


def test_tokenization_matches_hf(model, golden):
    meta, _, ids = golden
    texts = [(i, p) for i, p in enumerate(meta["prompts"]) if isinstance(p, str)]
    got = model.tokenize([p for _, p in texts])
    for (i, _), g in zip(texts, got):
        assert g == ids[i], f"prompt {i} tokenizes differently from HF"


@pytest.mark.parametrize("position", ["last", "mean"])
def test_hidden_states_match_hf(model, golden, position):
    meta, t, ids = golden
    L = model.num_layers
    h = model.extract(ids, layers=list(range(L + 1)) + ["raw"], position=position, batch_tokens=1 << 20)
    assert h.shape == (len(ids), L + 2, model.hidden_size) and h.dtype == np.float32
    for i in range(len(ids)):
        check_layers(f"p{i} {position}", h[i, : L + 1], t[f"p{i}.{position}"].reshape(L + 1, -1))
        if position == "last":
            assert rel_err(h[i, L + 1], t[f"p{i}.last_raw"]) <= TOL


def test_all_positions_agree_with_last_and_mean(model, golden):
    _, t, ids = golden
    arr, offsets = model.extract(ids, position="all")
    assert offsets.tolist() == np.cumsum([0] + [len(x) for x in ids]).tolist()
    for i in range(len(ids)):
        rows = arr[offsets[i] : offsets[i + 1]]
        check_layers(f"p{i} all→last", rows[-1], t[f"p{i}.last"].reshape(rows.shape[1], -1))
        check_layers(f"p{i} all→mean", rows.mean(axis=0), t[f"p{i}.mean"].reshape(rows.shape[1], -1))


@pytest.mark.parametrize("tag,op,keep", [("steer_add", "add", False), ("steer_pw", "piecewise", False), ("steer_norm", "add", True)])
def test_steered_hidden_states_match_hf(model, golden, tag, op, keep):
    _, t, ids = golden
    layers = t["steer.layers"].astype(int).tolist()
    coef = float(t["steer.coef"][0])
    s = resid.Steering.load(GOLDEN / "smollm2-135m.steer.safetensors", coef=coef, layers=layers, op=op, preserve_norm=keep)
    h = model.extract(ids, position="last", steer=s)
    for i in range(len(ids)):
        check_layers(f"p{i} {tag}", h[i], t[f"p{i}.{tag}.last"].reshape(h.shape[1], -1))
