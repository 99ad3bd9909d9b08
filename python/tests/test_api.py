"""The API surface: shapes, dtypes, layers, positions, iteration, files, steering, generation,
the study's building blocks."""
import json
import os

import numpy as np
import pytest

import resid
from conftest import read_safetensors

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "One two three four five six seven."]


def test_info_and_sizes(model):
    info = model.info
    assert info["layers"] == model.num_layers == 30
    assert info["hidden_size"] == model.hidden_size == 576
    assert info["architecture"] == "LlamaForCausalLM" and info["tensor_check"].startswith("ok")


def test_tokenize_and_chat_template(model):
    ids = model.tokenize(["Hello world", "Bonjour"])
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids[0])
    assert model.tokenize("Hello world") == ids[:1]
    assert model.decode(ids[0]) == "Hello world"
    text = model.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert "Hi there" in text and text.rstrip().endswith("assistant")


def test_extract_layers_order_and_raw(model):
    full = model.extract(TEXTS)
    assert full.shape == (3, 31, 576) and full.dtype == np.float32 and full.flags["C_CONTIGUOUS"]
    sub = model.extract(TEXTS, layers=[20, 3, "raw", 30])
    np.testing.assert_array_equal(sub[:, 0], full[:, 20])
    np.testing.assert_array_equal(sub[:, 1], full[:, 3])
    np.testing.assert_array_equal(sub[:, 3], full[:, 30])
    assert not np.array_equal(sub[:, 2], full[:, 30])  # before the final norm


def test_ids_and_text_inputs_agree_and_batching_does_not_matter(model):
    ids = model.tokenize(TEXTS)
    a = model.extract(TEXTS, layers=[5, 25])
    b = model.extract(ids, layers=[5, 25], batch_tokens=1)
    c = model.extract([np.array(i, dtype=np.int64) for i in ids], layers=[5, 25])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_mean_and_all(model):
    arr, offsets = model.extract(TEXTS, layers=[10], position="all")
    assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == arr.shape[0]
    mean = model.extract(TEXTS, layers=[10], position="mean")
    last = model.extract(TEXTS, layers=[10], position="last")
    for i in range(3):
        rows = arr[offsets[i] : offsets[i + 1]]
        np.testing.assert_array_equal(rows[-1], last[i])
        np.testing.assert_allclose(rows.mean(axis=0), mean[i], rtol=1e-5, atol=1e-5)


def test_extract_iter_equals_extract(model):
    want = model.extract(TEXTS * 3, layers=[1, 15])
    got = list(model.extract_iter(TEXTS * 3, layers=[1, 15], batch_tokens=16))
    assert len(got) > 1 and got[0][0].start == 0 and got[-1][0].stop == 9
    np.testing.assert_array_equal(np.concatenate([a for _, a in got]), want)
    arr, offsets = model.extract(TEXTS, layers=[2], position="all")
    parts = list(model.extract_iter(TEXTS, layers=[2], position="all", batch_tokens=1))
    np.testing.assert_array_equal(np.concatenate([a for _, (a, _) in parts]), arr)
    assert all(o[0] == 0 for _, (_, o) in parts)


def test_extract_to_file_and_resumable_directory(model, tmp_path):
    want = model.extract(TEXTS, layers=[4, "raw"])
    s = model.extract_to(tmp_path / "h.safetensors", TEXTS, layers=[4, "raw"])
    t, meta = read_safetensors(tmp_path / "h.safetensors")
    np.testing.assert_array_equal(t["hidden_states"], want)
    assert t["layers"].tolist() == [4, -1] and meta["position"] == "last" and s["sequences"] == 3
    d = tmp_path / "shards"
    s1 = model.extract_to(d, TEXTS, layers=[4], shard_sequences=2)
    assert s1["shards"] == 2 and sorted(os.listdir(d)) == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    s2 = model.extract_to(d, TEXTS, layers=[4], shard_sequences=2)
    assert s2["already_complete"]
    with pytest.raises(resid.InputError):
        model.extract_to(d, TEXTS[:2], layers=[4], shard_sequences=2)  # another input: refuses to mix
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"text": x}) + "\n" for x in TEXTS))
    model.extract_to(tmp_path / "j.safetensors", jsonl, layers=[4, "raw"])
    t2, meta2 = read_safetensors(tmp_path / "j.safetensors")
    np.testing.assert_array_equal(t2["hidden_states"], want)
    assert meta2["steering"] == "none"


def test_steering_construction_and_files(model, tmp_path):
    rng = np.random.default_rng(0)
    v = rng.standard_normal(576)
    dense = np.zeros((31, 576), dtype=np.float64)
    dense[10] = v
    a = resid.Steering(dense, coef=2.0)
    b = resid.Steering({10: v}, coef=2.0)
    assert a.layers == b.layers == [10]
    ha = model.extract(TEXTS, layers=[12], steer=a)
    hb = model.extract(TEXTS, layers=[12], steer=b)
    np.testing.assert_array_equal(ha, hb)
    assert not np.array_equal(ha, model.extract(TEXTS, layers=[12]))
    # Non-contiguous float16 input converts.
    c = resid.Steering(np.asfortranarray(dense.astype(np.float16)), coef=2.0)
    assert c.directions.dtype == np.float32
    a.save(tmp_path / "v.safetensors")
    a.save(tmp_path / "v.gguf", gguf=True)
    for p in ("v.safetensors", "v.gguf"):
        back = resid.Steering.load(tmp_path / p, coef=2.0)
        assert back.layers == [10], p
        np.testing.assert_array_equal(model.extract(TEXTS, layers=[12], steer=back), ha)
    t, _ = read_safetensors(tmp_path / "v.safetensors")
    assert t["directions"].shape == (31, 576)


def test_points_inside_blocks_capture_and_steer(model):
    # Capture: point names mix with indices, in the order given.
    h = model.extract(TEXTS, layers=[7, "blocks.5.hook_mlp_out", "blocks.4.hook_z", "raw"])
    assert h.shape == (len(TEXTS), 4, 576)
    with pytest.raises(resid.InputError, match="beyond the model"):
        model.extract(TEXTS, layers=["blocks.30.hook_z"])
    rng = np.random.default_rng(3)
    v = rng.standard_normal(576)
    # add at hook_mlp_out: the point and index 6 (block 5's output) move by exactly c·v.
    s = resid.Steering(None, coef=3.0, points={"blocks.5.hook_mlp_out": v})
    assert s.points == ["blocks.5.hook_mlp_out"]
    plain = model.extract(TEXTS, layers=["blocks.5.hook_mlp_out", 6])
    steered = model.extract(TEXTS, layers=["blocks.5.hook_mlp_out", 6], steer=s)
    np.testing.assert_allclose(steered - plain, np.broadcast_to(3.0 * v.astype(np.float32), plain.shape), rtol=0, atol=2e-4)
    # ITI: heads 2 and 3 of hook_z (9 heads of 64): the other heads do not move.
    z = rng.standard_normal(576)
    s = resid.Steering(None, coef=2.0, points={"blocks.4.hook_z.2-3": z})
    dz = model.extract(TEXTS, layers=["blocks.4.hook_z"], steer=s) - model.extract(TEXTS, layers=["blocks.4.hook_z"])
    want = np.zeros(576, dtype=np.float32)
    want[128:256] = 2.0 * z[128:256]
    np.testing.assert_allclose(dz[:, 0], np.broadcast_to(want, dz[:, 0].shape), rtol=0, atol=2e-4)
    for bad, msg in [({"blocks.4.hook_z.9": z}, "head 9 is out of range"), ({"blocks.5.hook_mlp_out": v[:100]}, "the point is 576 wide")]:
        with pytest.raises(resid.InputError, match=msg):
            model.extract(TEXTS, layers=[3], steer=resid.Steering(None, points=bad))


def test_mixed_steering_in_one_batch_equals_separate_calls(model):
    rng = np.random.default_rng(1)
    s1 = resid.Steering({8: rng.standard_normal(576)}, coef=6.0)
    s2 = resid.Steering({5: rng.standard_normal(576), 6: rng.standard_normal(576)}, coef=-4.0, op="piecewise")
    prompts = ["The weather today is", "My favourite food is", "In the beginning"]
    mixed = model.generate(prompts, max_new_tokens=8, steer=[s1, None, s2])
    alone = [model.generate([p], max_new_tokens=8, steer=s)[0] for p, s in zip(prompts, [s1, None, s2])]
    assert mixed == alone
    plain = model.generate(prompts[:1], max_new_tokens=8)[0]
    assert plain["tokens"] != mixed[0]["tokens"]


def test_generate_fields_stop_chat_and_sampling(model):
    out = model.generate(["The capital of France is"], max_new_tokens=8)
    assert set(out[0]) == {"text", "tokens", "prompt_tokens", "finish_reason"}
    assert out[0]["finish_reason"] == "length" and len(out[0]["tokens"]) == 8
    cut = model.generate(["The capital of France is"], max_new_tokens=8, stop=["."])[0]
    assert cut["finish_reason"] == "stop" and "." not in cut["text"] and out[0]["text"].startswith(cut["text"])
    chat = model.generate(["Say hello"], max_new_tokens=4, chat=True)[0]
    assert chat["prompt_tokens"] > 5
    s1 = model.generate(["Once upon a time"], max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    s2 = model.generate(["Once upon a time"], max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    assert s1 == s2


def test_repe_concept_vectors_and_recognize(model):
    pos = model.extract(["I love this, it is wonderful.", "What a great and happy day.", "This is excellent work.", "She was kind and generous."])
    neg = model.extract(["I hate this, it is awful.", "What a terrible and sad day.", "This is dreadful work.", "She was cruel and selfish."])
    for method in ("mean-diff", "pca"):
        v = resid.repe.concept_vectors(pos, neg, method=method)
        assert v["directions"].shape == (31, 576) and not v["directions"][0].any()
        norms = np.linalg.norm(v["unit"][1:], axis=1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-4)
        assert v["train_accuracy"].shape == (30,)
    r = resid.repe.recognize(pos[:3], neg[:3], pos[3:], neg[3:])
    assert r["layers"] == list(range(1, 31)) and 1 <= r["best_layer"] <= 30 and len(r["accuracy"]) == 30
    p = resid.repe.recognize(pos[:3], neg[:3], pos[3:], neg[3:], method="random-labels", protocol="paper")
    assert p["method"] == "random-labels" and len(p["accuracy"]) == 30
    with pytest.raises(resid.InputError):
        resid.repe.recognize(pos[:3], neg[:3], pos[3:], neg[3:], protocol="papers")
    # The vectors steer directly.
    s = resid.Steering(resid.repe.concept_vectors(pos, neg)["directions"], coef=1.0, layers=[10])
    model.extract(["x"], steer=s)


def test_study_runs_the_cli_code(model, tmp_path):
    src = resid_root() / "data" / "values"
    concept = sorted(p.name for p in src.iterdir() if p.is_dir())[0]
    report = resid.study(model, src, tmp_path / "study", concepts=[concept], langs=["en", "fr"], control=False, figures=False)
    assert len(report["concepts"]) == 1
    assert (tmp_path / "study" / "report.md").exists() and (tmp_path / "study" / "report.json").exists()
    # The paper's protocol by default, as `resid study`; resid's own on request.
    assert report["protocol"] == "paper" and report["paper"]["langs"] == ["en", "fr"]
    assert (tmp_path / "study" / "splits.json").exists()
    own = resid.study(model, src, tmp_path / "study-resid", concepts=[concept], langs=["en", "fr"], control=False,
                      figures=False, protocol="resid", cache=tmp_path / "study" / "cache")
    assert own["protocol"] == "resid" and own["paper"] is None
    with pytest.raises(resid.InputError):
        resid.study(model, src, tmp_path / "s2", bogus=1)


def resid_root():
    from conftest import ROOT

    return ROOT


def test_a_model_without_tokenizer_takes_token_ids(tiny_dir):
    m = resid.Model(tiny_dir)
    assert m.info["tokenizer"] is False
    assert m.extract([[1, 2, 3]]).shape == (1, 3, 64)
    g = m.generate([[1, 2, 3]], max_new_tokens=3)[0]
    assert g["text"] is None and len(g["tokens"]) <= 3
    with pytest.raises(resid.InputError):
        m.extract(["text needs a tokenizer"])
    with pytest.raises(resid.ModelError):
        m.tokenize(["x"])
    with pytest.raises(resid.InputError):
        m.generate([[1, 2]], stop=["x"])
