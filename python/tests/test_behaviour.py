"""Behaviour under load: threads, the GIL, Ctrl-C, memory (no leak, no extra copy), progress,
and arrays that torch takes without a copy."""
import _thread
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import resid

TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "One two three four five six seven.", "Zebras"]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_one_model_from_many_threads_gives_the_sequential_results(model):
    rng = np.random.default_rng(2)
    steer = resid.Steering({7: rng.standard_normal(576)}, coef=5.0)
    jobs = [
        lambda: model.extract(TEXTS, layers=[3, 17, "raw"]),
        lambda: model.extract(TEXTS[::-1], position="mean", steer=steer),
        lambda: model.extract(TEXTS[:2], position="all", layers=[9])[0],
        lambda: model.generate(["Once upon a time"], max_new_tokens=6, steer=steer)[0]["tokens"],
        lambda: model.generate(["The weather is"], max_new_tokens=6)[0]["tokens"],
    ]
    want = [job() for job in jobs]
    got = [None] * (len(jobs) * 3)
    errors = []

    def work(i):
        try:
            got[i] = jobs[i % len(jobs)]()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(got))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, g in enumerate(got):
        w = want[i % len(jobs)]
        if isinstance(w, np.ndarray):
            np.testing.assert_array_equal(g, w)
        else:
            assert g == w


def test_the_gil_is_released_during_compute(model):
    ids = [[1 + (i * 37 + j) % 4000 for j in range(64)] for i in range(24)]
    done = threading.Event()
    ticks = 0

    def extract():
        model.extract(ids, batch_tokens=64)
        done.set()

    t = threading.Thread(target=extract)
    start = time.perf_counter()
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    elapsed = time.perf_counter() - start
    # With the GIL held through the call, this loop could not run at all meanwhile.
    assert elapsed > 0.05 and ticks > elapsed * 100, (ticks, elapsed)


def _interrupt_after(seconds):
    # interrupt_main() does nothing while SIGINT is ignored, as it is in a shell's background
    # jobs (`cmd &` without job control, e.g. a CI runner's): restore Python's Ctrl-C handler.
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(seconds, _thread.interrupt_main)
    timer.start()
    return timer


LONG = [[1 + (i * 31 + j) % 4000 for j in range(12)] for i in range(300)]


def test_ctrl_c_stops_between_batches_and_leaves_nothing(model, tmp_path):
    out = tmp_path / "h.safetensors"
    _interrupt_after(0.3)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt) as e:
        model.extract_to(out, LONG, layers=[5], batch_tokens=12)
    assert time.perf_counter() - start < 5
    assert "nothing written" in str(e.value)
    assert os.listdir(tmp_path) == []
    # The next call runs normally (the stop request is cleared).
    assert model.extract(["ok"], layers=[1]).shape == (1, 1, 576)
    _interrupt_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        model.extract(LONG, layers=[5], batch_tokens=12)


def test_ctrl_c_stops_generation_between_decode_steps(model):
    _interrupt_after(0.3)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        model.generate(["Write a very long story about a dragon."], max_new_tokens=2000, temperature=0.7)
    assert time.perf_counter() - start < 5
    assert len(model.generate(["Hi"], max_new_tokens=2)[0]["tokens"]) <= 2


def test_ctrl_c_keeps_complete_shards_and_a_rerun_resumes(model, tmp_path):
    d = tmp_path / "shards"
    _interrupt_after(0.5)
    with pytest.raises(KeyboardInterrupt):
        model.extract_to(d, LONG, layers=[5], batch_tokens=12, shard_sequences=20)
    left = sorted(os.listdir(d))
    assert all(n == "manifest.json" or (n.startswith("shard-") and n.endswith(".safetensors")) for n in left), left
    s = model.extract_to(d, LONG, layers=[5], batch_tokens=12, shard_sequences=20)
    assert s["shards"] == 15 and s["range_end"] == 300
    want = tmp_path / "want"
    model.extract_to(want, LONG, layers=[5], batch_tokens=12, shard_sequences=20)
    for n in sorted(os.listdir(want)):
        if n.startswith("shard-"):
            assert (d / n).read_bytes() == (want / n).read_bytes(), n


def test_no_leak_across_1000_calls(tiny_dir):
    model = resid.Model(tiny_dir)
    rng = np.random.default_rng(3)
    v = rng.standard_normal(64)

    def calls(n):
        for i in range(n):
            s = resid.Steering({1: v}, coef=0.5) if i % 2 else None
            model.extract([[1, 2 + i % 100], [5, 6, 7]], layers=[1, "raw"], steer=s)
            model.extract([[3, 4]], position="all")
            if i % 10 == 0:
                model.generate([[1, 2, 3]], max_new_tokens=4, steer=[s])
                try:
                    model.extract([[10**9]])
                except resid.InputError:
                    pass

    calls(100)
    before = rss_bytes()
    calls(1000)
    grown = rss_bytes() - before
    print(f"RSS growth over 1000 calls: {grown / 2**20:.2f} MiB")
    assert grown < 8 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 1000 calls"


PEAK_SCRIPT = r"""
import json, sys, numpy as np, resid
m = resid.Model(sys.argv[1])
ids = [[1 + (i * 53 + j) % 40000 for j in range(250)] for i in range(8)]
m.extract(ids[:1], position="all", batch_tokens=256)  # warm: weights paged in, pools built
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current RSS
base = status("VmRSS:")
arr, off = m.extract(ids, position="all", batch_tokens=256)
peak = status("VmHWM:")
print(json.dumps({"base": base, "peak": peak, "nbytes": arr.nbytes, "hwm_reset": status("VmHWM:") >= base}))
"""


def test_a_large_all_positions_extraction_does_not_double_peak_memory(model_dir):
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(model_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    ratio = (m["peak"] - m["base"]) / m["nbytes"]
    print(f"position=all: result {m['nbytes'] / 2**20:.0f} MiB, peak above baseline {(m['peak'] - m['base']) / 2**20:.0f} MiB, ratio {ratio:.2f}")
    assert m["nbytes"] == 2000 * 31 * 576 * 4
    # One copy more (the result copied on its way to numpy) would make this at least 2.
    assert ratio < 1.5, m


def test_results_are_arrays_torch_takes_without_a_copy(model):
    arr = model.extract(TEXTS)
    allarr, offsets = model.extract(TEXTS, position="all")
    s = resid.Steering({3: np.ones(576)})
    cv = resid.repe.concept_vectors(arr[:2], arr[2:])
    results = [arr, allarr, offsets, s.directions, cv["directions"], cv["unit"], cv["signs"], cv["scale"]]
    for a in results:
        assert a.flags["C_CONTIGUOUS"] and a.flags["WRITEABLE"] and a.flags["ALIGNED"], a.flags
        assert a.dtype.isnative and a.dtype in (np.float32, np.int64, np.float64)
    try:
        import torch
    except ImportError:
        return
    for a in results:
        t = torch.from_numpy(a)
        assert t.data_ptr() == a.ctypes.data


def test_progress_bar_with_tqdm(model, capsys):
    pytest.importorskip("tqdm")
    model.extract(LONG[:60], layers=[1], batch_tokens=12, progress=True)
    err = capsys.readouterr().err
    assert "resid" in err and "60/60" in err
