"""`dtype` outputs against numpy's rounding of the f32 output, and `Model.stats` against numpy
over an all-token extraction."""
import json

import numpy as np
import pytest

import resid
from conftest import read_safetensors

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "One two three four five six seven.", "Hello"]


def test_f16_is_numpys_rounding_of_f32(model, tmp_path):
    f32, offsets = model.extract(TEXTS, layers=[0, 12, "raw"], position="all")
    f16, offsets16 = model.extract(TEXTS, layers=[0, 12, "raw"], position="all", dtype="f16")
    assert f16.dtype == np.float16 and f16.shape == f32.shape
    np.testing.assert_array_equal(offsets, offsets16)
    # numpy's float32 -> float16 cast rounds to nearest even: the reference.
    np.testing.assert_array_equal(f16.view(np.uint16), f32.astype(np.float16).view(np.uint16))
    for start, arr in model.extract_iter(TEXTS, layers=[12], position="last", dtype="f16", batch_tokens=8):
        np.testing.assert_array_equal(arr, model.extract([TEXTS[i] for i in start], layers=[12])[:, :, :].astype(np.float16))
    out = tmp_path / "h.safetensors"
    model.extract_to(out, TEXTS, layers=[0, 12, "raw"], position="all", dtype="f16")
    tensors, meta = read_safetensors(out)
    assert meta["dtype"] == "float16"
    np.testing.assert_array_equal(tensors["hidden_states"], f16)
    # bf16 files: the upper half of the f32 bits, rounded to nearest even.
    out = tmp_path / "b.safetensors"
    model.extract_to(out, TEXTS, layers=[0, 12, "raw"], position="all", dtype="bf16")
    bits = np.frombuffer(out.read_bytes()[-f32.size * 2 :], dtype=np.uint16).reshape(f32.shape)
    u = f32.view(np.uint32).astype(np.uint64)
    want = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(bits, want)


def test_bad_dtypes(model):
    with pytest.raises(resid.InputError, match="unknown dtype `f8`"):
        model.extract(TEXTS, dtype="f8")
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        with pytest.raises(resid.InputError, match="needs the ml_dtypes package"):
            model.extract(TEXTS, dtype="bf16")


def test_stats_match_numpy_over_an_all_token_extraction(model, tmp_path):
    layers = [3, 30, "raw"]
    rows, _ = model.extract(TEXTS, layers=layers, position="all")
    out = tmp_path / "s.safetensors"
    summary = model.stats(out, TEXTS, layers=layers, stats="mean,cov,gram", batch_tokens=7)
    assert summary["complete"] and summary["rows"] == rows.shape[0]
    t, meta = read_safetensors(out)
    assert json.loads(meta["points"]) == ["blocks.3.hook_resid_pre", "30", "blocks.29.hook_resid_post"]
    for p in range(len(layers)):
        x = rows[:, p].astype(np.float64)
        assert t["count"][p] == x.shape[0]
        # Thresholds: both sides sum the same f32 rows in float64.
        np.testing.assert_allclose(t["mean"][p], x.mean(axis=0), rtol=0, atol=1e-9 * np.abs(x).max())
        c = np.cov(x, rowvar=False)
        np.testing.assert_allclose(t["cov"][p], c, rtol=0, atol=1e-9 * np.abs(c).max())
        g = x.T @ x
        np.testing.assert_allclose(t["gram"][p], g, rtol=0, atol=1e-9 * np.abs(g).max())
        np.testing.assert_array_equal(t["min"][p], x.min(axis=0))
        np.testing.assert_array_equal(t["max"][p], x.max(axis=0))


def test_stats_of_pairs_and_resumption(model, tmp_path):
    pairs = [("I helped my friend.", "I hurt my friend."), ("She told the truth.", "She told a lie."), ("We shared food.", "We stole food.")]
    out = tmp_path / "p.safetensors"
    first = model.stats(out, pairs, layers=[10], position="last", pairs=True, stop_after=3)
    assert not first["complete"] and (tmp_path / "p.safetensors.state").exists()
    done = model.stats(out, pairs, layers=[10], position="last", pairs=True)
    assert done["complete"] and done["resumed_from"] == 2
    t, _ = read_safetensors(out)
    flat = [s for p in pairs for s in p]
    h = model.extract(flat, layers=[10]).astype(np.float64)[:, 0]
    d = h[0::2] - h[1::2]
    assert t["count"][0] == 3
    np.testing.assert_allclose(t["mean"][0], d.mean(axis=0), rtol=0, atol=1e-5 * np.abs(d).max())
    with pytest.raises(resid.InputError, match=r"expected a \(pos, neg\) pair"):
        model.stats(out, ["just one"], pairs=True)
