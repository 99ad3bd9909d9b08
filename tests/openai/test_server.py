"""The official `openai` client (PyPI), unchanged, against `resid serve`.

scripts/test.sh runs this after `cargo test` (which builds target/release/resid). The server is
started here on a free loopback port with the test model and two steering vectors written by
this file; resid's extensions (steering, probes) travel in the client's `extra_body`.
"""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time

import openai
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESID = os.environ.get("RESID_BIN", os.path.join(ROOT, "target", "release", "resid"))
MODEL = os.path.join(ROOT, "models", "smollm2-135m")
LAYERS, HIDDEN = 30, 576


def write_vector(path, seed, layers, scale):
    """A safetensors `directions` file [L+1, hidden] with unit random rows (times scale) at layers."""
    import random

    rng = random.Random(seed)
    data = []
    for layer in range(LAYERS + 1):
        if layer in layers:
            row = [rng.uniform(-1, 1) for _ in range(HIDDEN)]
            norm = sum(x * x for x in row) ** 0.5
            data += [x / norm * scale for x in row]
        else:
            data += [0.0] * HIDDEN
    raw = struct.pack(f"<{len(data)}f", *data)
    header = json.dumps({"directions": {"dtype": "F32", "shape": [LAYERS + 1, HIDDEN], "data_offsets": [0, len(raw)]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + raw)


class Server:
    def __init__(self, *args):
        self.proc = subprocess.Popen([RESID, "serve", "--model", MODEL, "--port", "0", *args], stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        self.log = []
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                return
        self.proc.kill()
        raise RuntimeError("resid serve did not start:\n" + "".join(self.log))

    def client(self, key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=300)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def vectors():
    with tempfile.TemporaryDirectory() as d:
        write_vector(os.path.join(d, "honesty.safetensors"), 7, range(8, 13), 8.0)
        write_vector(os.path.join(d, "power.safetensors"), 11, range(14, 17), 8.0)
        yield d


@pytest.fixture(scope="module")
def server(vectors):
    if not os.path.isdir(MODEL):
        pytest.fail(f"{MODEL} is missing: run scripts/fetch-model.sh smollm2-135m")
    s = Server("--vectors", vectors)
    yield s
    s.stop()


def resid_generate(prompt, n, *extra):
    out = subprocess.run([RESID, "generate", "--model", MODEL, "--prompt", prompt, "--max-new-tokens", str(n), "--json", *extra],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[0])


def test_models(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]


def test_completion_equals_resid_generate_with_and_without_steering(server, vectors):
    c = server.client()
    prompt = "The most important value in life is"
    plain = c.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=12, temperature=0)
    want = resid_generate(prompt, 12)
    assert plain.choices[0].text == want["text"]
    assert plain.usage.completion_tokens == len(want["tokens"])
    steer = {"vector": "honesty", "coef": 4.0, "layers": "8-12"}
    steered = c.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=12, temperature=0, extra_body={"steering": steer})
    want = resid_generate(prompt, 12, "--steer", os.path.join(vectors, "honesty.safetensors"), "--coef", "4", "--steer-layers", "8-12")
    assert steered.choices[0].text == want["text"]
    assert steered.choices[0].text != plain.choices[0].text


def test_chat_stream_equals_whole_answer(server):
    c = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is honesty?"}]
    whole = c.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_next_turn_reports_cached_prompt_tokens(server):
    """A conversation's next turn starts from the first turn's cached keys and values; the client
    reads how many prompt tokens that covered from OpenAI's usage.prompt_tokens_details."""
    c = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is kindness?"}]
    first = c.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=12, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "And fairness?"}]
    second = c.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=12, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens


def test_steering_and_probes_in_extra_body(server):
    c = server.client()
    messages = [{"role": "user", "content": "Tell me about power."}]
    extra = {"steering": [{"vector": "power", "coef": -6.0, "layers": [14, 15, 16], "op": "piecewise"}],
             "probes": [{"vector": "honesty", "layer": 10}, {"vector": "power", "layer": 15}]}
    r = c.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, temperature=0, extra_body=extra)
    probes = r.choices[0].model_extra["probes"]
    assert [p["layer"] for p in probes] == [10, 15]
    assert all(len(p["values"]) == r.usage.completion_tokens for p in probes)
    stream = c.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, temperature=0, extra_body=extra, stream=True)
    streamed = [ch.choices[0].model_extra["probes"][1]["values"][0] for ch in stream if ch.choices and ch.choices[0].model_extra.get("probes")]
    assert streamed == probes[1]["values"]


def test_logprobs_n_seed_and_stop(server):
    c = server.client()
    r = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
                                  logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content)
    # Greedy: the chosen token is the most likely one.
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6 for t in content)
    a = c.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=10, temperature=0.9, seed=42, n=2)
    b = c.completions.create(model="smollm2-135m", prompt="Once upon a time", max_tokens=10, temperature=0.9, seed=42, n=2)
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert a.choices[0].text != a.choices[1].text
    s = c.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 6"])
    assert s.choices[0].finish_reason == "stop" and " 6" not in s.choices[0].text


def test_errors_are_openai_exceptions(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="smollm2-135m", prompt="x", temperature=5)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="smollm2-135m", prompt="x", extra_body={"steering": {"vector": "nope"}})
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "x"}],
                                  extra_body={"steering": {"directions": [[1.0, 2.0]], "layers": [3]}})


def test_api_key():
    s = Server("--api-key", "sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("sekret").models.list().data[0].id == "smollm2-135m"
    finally:
        s.stop()
