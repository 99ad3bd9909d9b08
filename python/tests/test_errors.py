"""Every bad argument raises a Python exception with the command line's one-line message;
nothing crashes the interpreter."""
import numpy as np
import pytest

import resid

GOOD = ["Hello world"]


def one_line(e):
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_exception_classes():
    assert issubclass(resid.InputError, ValueError)
    assert issubclass(resid.ModelError, Exception) and issubclass(resid.DeviceError, Exception)


def test_model_paths(tmp_path):
    with pytest.raises(resid.ModelError) as e:
        resid.Model(tmp_path / "nope")
    assert "no such model directory" in one_line(e)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(resid.ModelError) as e:
        resid.Model(tmp_path / "bad")
    assert "config.json" in one_line(e)


def test_device_errors(model_dir):
    with pytest.raises(resid.InputError) as e:
        resid.Model(model_dir, device="tpu")
    assert "expected cpu, cuda or cuda:N" in one_line(e)
    with pytest.raises(resid.DeviceError) as e:
        resid.Model(model_dir, device="cuda")
    one_line(e)



def test_compute_choice(model_dir):
    # The other tests load f32 models in this process; the compute type is per process.
    m = resid.Model(model_dir, compute="f32")
    assert m.info["compute"] == "f32" and "--compute bf16" in m.info["compute_note"]
    with pytest.raises(resid.InputError) as e:
        resid.Model(model_dir, compute="f64")
    assert "unknown compute type `f64`" in one_line(e)
    with pytest.raises(resid.InputError) as e:
        resid.Model(model_dir, compute="bf16")
    assert "chosen once per process" in one_line(e)
    with pytest.raises(resid.InputError) as e:
        resid.Model(model_dir, device="cuda", compute="f32")
    assert "CUDA backend computes in bf16" in one_line(e)


@pytest.mark.parametrize(
    "inputs,needle",
    [
        ([], "empty"),
        ("a single string", "single str"),
        ([[]], "no tokens"),
        ([[1, 2, 10**12]], "outside the vocabulary"),
        ([[1, 2, 2**200]], "outside the vocabulary"),
        ([[1, -5]], "outside the vocabulary"),
        ([[49152]], "outside the vocabulary"),
        ([[1.5, 2]], "not an integer"),
        ([[True]], "not an integer"),
        ([None], "expected a str or a list"),
        ([["a", "b"]], "not an integer"),
        (42, "expected a list"),
        ([[1] * 9000], "context"),
    ],
)
def test_bad_inputs(model, inputs, needle):
    with pytest.raises(resid.InputError) as e:
        model.extract(inputs)
    assert needle in one_line(e)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(layers=[31]), "out of range"),
        (dict(layers=[-1]), "out of range"),
        (dict(layers=[10**30]), "out of range"),
        (dict(layers=["rawr"]), "`rawr` is not a layer"),
        (dict(layers=[]), "no capture layers"),
        (dict(layers="10"), "not a string"),
        (dict(layers=[1.5]), "not a layer index"),
        (dict(layers=5), "expected a list"),
        (dict(position="first"), "unknown position"),
        (dict(batch_tokens=0), "batch_tokens"),
        (dict(batch_tokens=-3), "batch_tokens"),
        (dict(steer="vec.safetensors"), "resid.Steering"),
    ],
)
def test_bad_extract_options(model, kwargs, needle):
    with pytest.raises(resid.InputError) as e:
        model.extract(GOOD, **kwargs)
    assert needle in one_line(e)


@pytest.mark.parametrize(
    "directions,kwargs,needle",
    [
        (np.full((31, 576), np.nan), {}, "NaN"),
        ({3: np.array([1.0, np.inf] + [0.0] * 574)}, {}, "NaN"),
        (np.zeros((31, 576), dtype=np.int32), {}, "not a float dtype"),
        (np.zeros((31, 576), dtype=complex), {}, "not a float dtype"),
        (np.zeros(576), {}, "dimensions"),
        (np.zeros((31, 576, 1)), {}, "dimensions"),
        (np.zeros((0, 576)), {}, "empty"),
        (np.zeros((31, 576)), {}, "no layers"),
        (np.ones((31, 576)), dict(layers=[40]), "no direction"),
        (np.ones((31, 576)), dict(layers=[]), "empty"),
        (np.ones((31, 576)), dict(layers=[-2]), "not a hidden-state index"),
        (np.ones((31, 576)), dict(op="mul"), "unknown steering operator"),
        (np.ones((31, 576)), dict(positions="some"), "unknown steering positions"),
        (np.ones((31, 576)), dict(coef=float("nan")), "not finite"),
        (np.ones((31, 576)), dict(coef="big"), "not a number"),
        ({}, {}, "empty dict"),
        ({-1: np.ones(576)}, {}, "not a hidden-state index"),
        ({"a": np.ones(576)}, {}, "not a hidden-state index"),
        ({1: np.ones(576), 2: np.ones(10)}, {}, "different lengths"),
        ([["x"]], {}, "not a float dtype"),
    ],
)
def test_bad_steering(directions, kwargs, needle):
    with pytest.raises(resid.InputError) as e:
        resid.Steering(directions, **kwargs)
    assert needle in one_line(e)


def test_steering_that_does_not_fit_the_model(model):
    for s, needle in [
        (resid.Steering(np.ones((31, 100))), "hidden size"),
        (resid.Steering(np.ones((20, 576))), "rows"),
        (resid.Steering({40: np.ones(576)}), "out of range"),
    ]:
        with pytest.raises(resid.InputError) as e:
            model.extract(GOOD, steer=s)
        assert needle in one_line(e)


def test_bad_vector_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        resid.Steering.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(resid.InputError) as e:
        resid.Steering.load(tmp_path / "junk.safetensors")
    assert "junk.safetensors" in one_line(e)
    (tmp_path / "junk.gguf").write_bytes(b"GGUX" + b"\x00" * 40)
    with pytest.raises(resid.InputError) as e:
        resid.Steering.load(tmp_path / "junk.gguf")
    assert "not a GGUF file" in one_line(e)
    s = resid.Steering({1: np.ones(8)})
    with pytest.raises(OSError):
        s.save(tmp_path / "no" / "such" / "dir" / "v.safetensors")


def test_bad_generate_options(model):
    for kwargs, needle in [
        (dict(temperature=-1.0), "non-negative"),
        (dict(temperature=float("nan")), "non-negative"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(top_k=5), "need temperature"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(seed=-1), "seed"),
        (dict(steer=[None, None]), "2 entries for 1 prompts"),
        (dict(steer=["x"]), "resid.Steering"),
    ]:
        with pytest.raises(resid.InputError) as e:
            model.generate(["Hi"], **kwargs)
        assert needle in one_line(e), kwargs
    for prompts in ([], "Hi", [[]], [[10**10]]):
        with pytest.raises(resid.InputError):
            model.generate(prompts)
    with pytest.raises(resid.InputError):
        model.generate([[1, 2]], chat=True)


def test_bad_chat_messages(model):
    with pytest.raises(resid.InputError):
        model.apply_chat_template([])
    with pytest.raises(resid.InputError):
        model.apply_chat_template([{"role": "user"}])


def test_extract_to_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError):
        model.extract_to(tmp_path / "o.safetensors", tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n')
    with pytest.raises(resid.InputError) as e:
        model.extract_to(tmp_path / "o.safetensors", bad)
    assert "line 2" in one_line(e)
    with pytest.raises(OSError):
        model.extract_to(tmp_path / "missing-dir" / "o.safetensors", GOOD)
    with pytest.raises(resid.InputError):
        model.extract_to(tmp_path / "o.safetensors", GOOD, shard=(0, 2))
    with pytest.raises(resid.InputError):
        model.extract_to(tmp_path / "d", GOOD, shard=(3, 2))
    with pytest.raises(resid.InputError):
        model.extract_to(tmp_path / "d", GOOD, shard_sequences=0)
    assert not (tmp_path / "o.safetensors").exists()


def test_repe_errors():
    a = np.zeros((2, 31, 8), dtype=np.float32)
    for args, needle in [
        ((a, a[:1]), "differ in shape"),
        ((a[:0], a[:0]), "no pairs"),
        ((a[:, :1], a[:, :1]), "expected [pairs, L+1, hidden]"),
        ((a.astype(np.int64), a), "not a float dtype"),
        ((a[0], a[0]), "dimensions"),
        ((np.full_like(a, np.nan), a), "NaN"),
    ]:
        with pytest.raises(resid.InputError) as e:
            resid.repe.concept_vectors(*args)
        assert needle in one_line(e), args
    with pytest.raises(resid.InputError):
        resid.repe.concept_vectors(a, a, method="lda")
    with pytest.raises(resid.InputError):
        resid.repe.recognize(a, a, a[:, :5], a[:, :5])


def test_study_errors(model, tmp_path):
    with pytest.raises(resid.InputError):
        resid.study(model, tmp_path / "nodata", tmp_path / "out", control=False)
    with pytest.raises(resid.InputError):
        resid.study(model, tmp_path, tmp_path / "out", batch_tokens=0)
    with pytest.raises(resid.InputError):
        resid.study("not a model", tmp_path, tmp_path / "out")


def test_threads_argument(model_dir):
    import os

    with pytest.raises(resid.InputError):
        resid.Model(model_dir, threads=0)
    with pytest.raises(resid.InputError):
        resid.Model(model_dir, threads=(os.cpu_count() or 1) + 7)
