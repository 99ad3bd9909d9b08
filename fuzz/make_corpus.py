#!/usr/bin/env python3
"""Writes the committed seed corpus of every fuzz target into fuzz/corpus/<target>/.

Seeds are valid and near-valid inputs, small enough for libFuzzer (a few KB). Standard library
only. Rerun after changing it: `python3 fuzz/make_corpus.py` (files are rewritten in place;
regression inputs named `regress-*` are kept).
"""
import base64
import hashlib
import json
import math
import os
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "corpus"


def rand(n, seed, scale=0.5):
    s = (seed * 0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D) & (2**64 - 1) | 1
    out = []
    for _ in range(n):
        s ^= (s << 13) & (2**64 - 1)
        s ^= s >> 7
        s ^= (s << 17) & (2**64 - 1)
        out.append(((s >> 40) / (1 << 24) - 0.5) * 2 * scale)
    return out


def bf16(x):
    return struct.pack("<I", struct.unpack("<I", struct.pack("<f", x))[0])[2:]


def encode(values, dtype):
    if dtype == "F32":
        return struct.pack(f"<{len(values)}f", *values)
    if dtype == "F16":
        return struct.pack(f"<{len(values)}e", *values)
    if dtype == "BF16":
        return b"".join(bf16(v) for v in values)
    if dtype == "I64":
        return struct.pack(f"<{len(values)}q", *[int(v * 100) for v in values])
    if dtype == "U8":
        return bytes(int(abs(v) * 200) % 256 for v in values)
    raise ValueError(dtype)


def safetensors(tensors, metadata=None, dtype="F32"):
    """tensors: list of (name, shape, values or None for random); returns the file's bytes."""
    header, body = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for i, t in enumerate(tensors):
        name, shape = t[0], t[1]
        dt = t[3] if len(t) > 3 else dtype
        n = math.prod(shape)
        values = t[2] if len(t) > 2 and t[2] is not None else rand(n, i)
        data = encode(values, dt)
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + body


def raw(header_obj, body, pad=True):
    head = json.dumps(header_obj, separators=(",", ":")).encode()
    if pad:
        head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + body


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(tensors, dtype=0, alignment=None, extra_kv=()):
    """A control-vector GGUF v3: tensors is a list of (k, values) for `direction.k`."""
    kv = [("general.architecture", 8, gstr("controlvector")), ("controlvector.model_hint", 8, gstr("llama")),
          ("controlvector.layer_count", 4, struct.pack("<I", len(tensors)))]
    align = alignment or 32
    if alignment:
        kv.append(("general.alignment", 4, struct.pack("<I", alignment)))
    kv += list(extra_kv)
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, t, value in kv:
        out += gstr(key) + struct.pack("<I", t) + value
    datas, offset = [], 0
    for k, values in tensors:
        data = struct.pack(f"<{len(values)}" + ("f" if dtype == 0 else "e"), *values)
        out += gstr(f"direction.{k}") + struct.pack("<IQIQ", 1, len(values), dtype, offset)
        datas.append(data + bytes(-len(data) % align))
        offset += len(datas[-1])
    out += bytes(-len(out) % align)
    return out + b"".join(datas)


# ---- tiny models of every family: (config dict, list of (name, shape)) ----

def llama_like(arch="LlamaForCausalLM", V=7, H=4, I=6, L=1, nh=2, nkv=1, hd=None, bias=False, tie=False, **extra):
    hd = hd or H // nh
    q, kv = nh * hd, nkv * hd
    cfg = {"architectures": [arch], "vocab_size": V, "hidden_size": H, "intermediate_size": I,
           "num_hidden_layers": L, "num_attention_heads": nh, "num_key_value_heads": nkv,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 16,
           "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2}
    if hd != H // nh:
        cfg["head_dim"] = hd
    if arch == "LlamaForCausalLM":
        cfg["attention_bias"] = bias
        cfg["mlp_bias"] = bias
    cfg.update(extra)
    qkv_bias = arch == "Qwen2ForCausalLM" or (arch != "Qwen2ForCausalLM" and bias)
    o_bias = arch != "Qwen2ForCausalLM" and bias
    t = [("model.embed_tokens.weight", [V, H])]
    for l in range(L):
        p = f"model.layers.{l}."
        t += [(p + "input_layernorm.weight", [H]), (p + "self_attn.q_proj.weight", [q, H]),
              (p + "self_attn.k_proj.weight", [kv, H]), (p + "self_attn.v_proj.weight", [kv, H]),
              (p + "self_attn.o_proj.weight", [H, q])]
        if qkv_bias:
            t += [(p + "self_attn.q_proj.bias", [q]), (p + "self_attn.k_proj.bias", [kv]), (p + "self_attn.v_proj.bias", [kv])]
        if o_bias:
            t += [(p + "self_attn.o_proj.bias", [H])]
        t += [(p + "post_attention_layernorm.weight", [H]), (p + "mlp.gate_proj.weight", [I, H]),
              (p + "mlp.up_proj.weight", [I, H]), (p + "mlp.down_proj.weight", [H, I])]
        if arch == "LlamaForCausalLM" and bias:
            t += [(p + "mlp.gate_proj.bias", [I]), (p + "mlp.up_proj.bias", [I]), (p + "mlp.down_proj.bias", [H])]
        if arch == "Qwen3ForCausalLM":
            t += [(p + "self_attn.q_norm.weight", [hd]), (p + "self_attn.k_norm.weight", [hd])]
    t += [("model.norm.weight", [H])]
    if not tie:
        t += [("lm_head.weight", [V, H])]
    return cfg, t


def qwen_chat(V=7, H=4, I2=12, L=1, nh=2):
    hd = H // nh
    cfg = {"architectures": ["QWenLMHeadModel"], "vocab_size": V, "hidden_size": H, "intermediate_size": I2,
           "num_hidden_layers": L, "num_attention_heads": nh, "kv_channels": hd, "layer_norm_epsilon": 1e-6,
           "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 16, "no_bias": True}
    I = I2 // 2
    t = [("transformer.wte.weight", [V, H])]
    for l in range(L):
        p = f"transformer.h.{l}."
        t += [(p + "ln_1.weight", [H]), (p + "attn.c_attn.weight", [3 * H, H]), (p + "attn.c_attn.bias", [3 * H]),
              (p + "attn.c_proj.weight", [H, H]), (p + "ln_2.weight", [H]), (p + "mlp.w2.weight", [I, H]),
              (p + "mlp.w1.weight", [I, H]), (p + "mlp.c_proj.weight", [H, I])]
    t += [("transformer.ln_f.weight", [H]), ("lm_head.weight", [V, H])]
    return cfg, t


def bloom(V=7, H=4, L=1, nh=2, post_ln=False):
    cfg = {"architectures": ["BloomForCausalLM"], "vocab_size": V, "hidden_size": H, "n_layer": L, "n_head": nh,
           "layer_norm_epsilon": 1e-5, "apply_residual_connection_post_layernorm": post_ln, "seq_length": 16}
    t = [("transformer.word_embeddings.weight", [V, H]),
         ("transformer.word_embeddings_layernorm.weight", [H]), ("transformer.word_embeddings_layernorm.bias", [H])]
    for l in range(L):
        p = f"transformer.h.{l}."
        t += [(p + "input_layernorm.weight", [H]), (p + "input_layernorm.bias", [H]),
              (p + "self_attention.query_key_value.weight", [3 * H, H]), (p + "self_attention.query_key_value.bias", [3 * H]),
              (p + "self_attention.dense.weight", [H, H]), (p + "self_attention.dense.bias", [H]),
              (p + "post_attention_layernorm.weight", [H]), (p + "post_attention_layernorm.bias", [H]),
              (p + "mlp.dense_h_to_4h.weight", [4 * H, H]), (p + "mlp.dense_h_to_4h.bias", [4 * H]),
              (p + "mlp.dense_4h_to_h.weight", [H, 4 * H]), (p + "mlp.dense_4h_to_h.bias", [H])]
    t += [("transformer.ln_f.weight", [H]), ("transformer.ln_f.bias", [H])]
    return cfg, t


MODELS = {
    "llama": llama_like(),
    "llama-bias-2layers": llama_like(L=2, bias=True),
    "llama-tied-mha": llama_like(nh=2, nkv=2, tie=True),
    "llama-head-dim": llama_like(hd=4),
    "llama3-scaling": llama_like(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "llama-linear-scaling": llama_like(rope_scaling={"type": "linear", "factor": 2.0}),
    "mistral": llama_like(arch="MistralForCausalLM", sliding_window=None),
    "qwen2": llama_like(arch="Qwen2ForCausalLM"),
    "qwen3": llama_like(arch="Qwen3ForCausalLM", hd=2),
    "qwen-chat": qwen_chat(),
    "bloom": bloom(),
    "bloom-postln-3heads": bloom(H=6, nh=3, post_ln=True),
}


def write(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def main():
    for d in ROOT.glob("*"):
        for f in d.glob("*"):
            if not f.name.startswith("regress-"):
                f.unlink()

    # config
    for name, (cfg, _) in MODELS.items():
        write("config", name + ".json", json.dumps(cfg, indent=1))
    base = MODELS["llama"][0]
    near = {
        "missing-hidden": {k: v for k, v in base.items() if k != "hidden_size"},
        "negative-heads": dict(base, num_attention_heads=-2),
        "float-layers": dict(base, num_hidden_layers=1.5),
        "huge-layers": dict(base, num_hidden_layers=2**39),
        "huge-dims": dict(base, hidden_size=2**39, vocab_size=2**39, num_attention_heads=1, num_key_value_heads=1),
        "kv-not-divisor": dict(base, num_key_value_heads=3),
        "odd-head-dim": dict(base, head_dim=3),
        "heads-over-hidden": dict(base, num_attention_heads=8, num_key_value_heads=8),
        "unknown-arch": dict(base, architectures=["GPT2LMHeadModel"]),
        "model-type-only": dict({k: v for k, v in base.items() if k != "architectures"}, model_type="qwen2"),
        "sliding-window": dict(base, architectures=["MistralForCausalLM"], sliding_window=4096),
        "rope-yarn": dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        "rope-params": dict(base, rope_parameters={"rope_type": "linear", "factor": 0.0, "rope_theta": 1e6}),
        "eos-list": dict(base, eos_token_id=[2, 5, 4294967296]),
        "nan-eps": dict(base, rms_norm_eps="NaN"),
    }
    for name, cfg in near.items():
        write("config", name + ".json", json.dumps(cfg))
    # Regressions: configs that crashed resid before it bounded and checked sizes (an
    # expected-tensor list of 2^39 layers exhausted memory; products of sizes overflowed).
    write("config", "regress-layers-2e39.json", json.dumps(dict(base, num_hidden_layers=2**39)))
    write("config", "regress-params-overflow.json",
          json.dumps(dict(base, hidden_size=2**39, vocab_size=2**39, num_attention_heads=2, num_key_value_heads=2)))
    write("config", "regress-qkv-overflow.json",
          json.dumps(dict(base, hidden_size=2**38, num_attention_heads=2**38, num_key_value_heads=2**38, head_dim=2**38)))
    write("config", "regress-head-dim-zero.json", json.dumps(dict(base, num_attention_heads=8, num_key_value_heads=8)))
    write("config", "not-object.json", "[1, 2, 3]")
    write("config", "truncated.json", json.dumps(base)[:60])

    # safetensors
    st = lambda tensors, **kw: safetensors(tensors, **kw)
    write("safetensors", "f32", st([("a", [2, 3]), ("b", [3])]))
    write("safetensors", "bf16", st([("a", [2, 2]), ("b", [5])], dtype="BF16"))
    write("safetensors", "f16-metadata", st([("x", [4])], metadata={"format": "pt", "k": "v"}, dtype="F16"))
    write("safetensors", "mixed-dtypes", st([("i", [2], [1.0, 2.0], "I64"), ("u", [3], None, "U8"), ("f", [1, 2])]))
    write("safetensors", "scalar-and-empty", st([("s", []), ("e", [0, 3]), ("v", [2])]))
    write("safetensors", "unaligned-f32", st([("u8", [3], None, "U8"), ("f", [2])]))
    write("safetensors", "empty-header", raw({}, b""))
    good = st([("a", [2, 2]), ("b", [2])])
    write("safetensors", "truncated", good[:-5])
    write("safetensors", "trailing-bytes", good + b"\0\0\0\0")
    write("safetensors", "header-len-huge", struct.pack("<Q", 2**62) + good[8:])
    write("safetensors", "header-len-past-end", struct.pack("<Q", len(good)) + good[8:])
    write("safetensors", "overlapping", raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)))
    write("safetensors", "offset-out-of-range", raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4096]}}, bytes(8)))
    write("safetensors", "shape-size-mismatch", raw({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)))
    write("safetensors", "shape-overflow", raw({"a": {"dtype": "F32", "shape": [2**62, 8], "data_offsets": [0, 0]}}, b""))
    write("safetensors", "unknown-dtype", raw({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)))
    write("safetensors", "not-json", struct.pack("<Q", 8) + b"{\"a\":[1" + bytes(4))
    write("safetensors", "invalid-utf8-header", struct.pack("<Q", 8) + b"{\"\xff\":1}  ")
    write("safetensors", "short", b"\x08\x00\x00")

    # tensor_check: config, NUL, weights
    for name, (cfg, tensors) in MODELS.items():
        write("tensor_check", name, json.dumps(cfg).encode() + b"\0" + st(tensors))
    cfg, tensors = MODELS["llama"]
    write("tensor_check", "llama-bf16", json.dumps(cfg).encode() + b"\0" + st(tensors, dtype="BF16"))
    write("tensor_check", "llama-f16", json.dumps(cfg).encode() + b"\0" + st(tensors, dtype="F16"))
    write("tensor_check", "missing-tensor", json.dumps(cfg).encode() + b"\0" + st(tensors[:-1]))
    swapped = [(n, s[::-1]) for n, s in tensors]
    write("tensor_check", "transposed", json.dumps(cfg).encode() + b"\0" + st(swapped))
    ints = [(n, s, None, "I64") if "embed" in n else (n, s) for n, s in tensors]
    write("tensor_check", "int-embeddings", json.dumps(cfg).encode() + b"\0" + st(ints))
    nan = [(n, s, [float("nan")] * math.prod(s)) if "norm" in n else (n, s) for n, s in tensors]
    write("tensor_check", "nan-weights", json.dumps(cfg).encode() + b"\0" + st(nan))
    cfg2 = dict(cfg, num_hidden_layers=2)
    write("tensor_check", "config-more-layers", json.dumps(cfg2).encode() + b"\0" + st(tensors))
    cfg3 = dict(cfg, vocab_size=1, max_position_embeddings=1)
    write("tensor_check", "tiny-context", json.dumps(cfg3).encode() + b"\0" + st(
        [(n, [1, s[1]]) if n in ("model.embed_tokens.weight", "lm_head.weight") else (n, s) for n, s in tensors]))

    # Regression: a config whose head dimension works out to 0, with weights to match it.
    cfg0, t0 = llama_like(H=4, nh=8, nkv=8)
    write("tensor_check", "regress-head-dim-zero", json.dumps(cfg0).encode() + b"\0" + st(t0))

    # jsonl
    write("jsonl", "text", '{"text": "Hello world"}\n{"text": "Bonjour \\u00e0 tous 🌍"}\n')
    write("jsonl", "ids", '{"ids": [1, 2, 3]}\n{"ids": [4294967295]}\n')
    write("jsonl", "crlf-no-final-newline", '{"text": "a"}\r\n{"text": "b", "label": 1}')
    write("jsonl", "text-and-ids", '{"text": "x", "ids": [1]}\n{"ids": []}\n')
    write("jsonl", "blank-line", '{"text": "a"}\n\n{"text": "b"}\n')
    write("jsonl", "bad-json", '{"text": "a"}\n{"text": oops}\n')
    write("jsonl", "not-object", '["text"]\n')
    write("jsonl", "text-not-string", '{"text": 5}\n')
    write("jsonl", "ids-negative", '{"ids": [1, -2]}\n{"ids": [4294967296]}\n{"ids": [1.5]}\n')
    write("jsonl", "no-text", '{"words": "hi"}\n')
    write("jsonl", "invalid-utf8", b'{"text": "a"}\n{"text": "\xff\xfe"}\n')
    write("jsonl", "empty", b"")
    write("jsonl", "whitespace-only", b"  \n")
    write("jsonl", "deep-nesting", '{"text": "a", "x": ' + "[" * 200 + "]" * 200 + "}\n")
    write("jsonl", "bom", b'\xef\xbb\xbf{"text": "a"}\n')
    # the concept study's pairs: JSONL and MVALUE files go through the same target
    write("jsonl", "pairs", '{"pos": "I help.", "neg": "I harm.", "id": 1}\n{"pos": "Yes", "neg": "No", "question": "Q?"}\n'
          '{"pos": "a", "neg": "a", "scenario": "S", "id": "x"}\n')
    write("jsonl", "pairs-duplicate-id", '{"pos": "a", "neg": "b", "id": 1}\n{"pos": "c", "neg": "d", "id": "1"}\n')
    write("jsonl", "pairs-both-contexts", '{"pos": "a", "neg": "b", "scenario": "s", "question": "q"}\n')
    write("jsonl", "mvalue", json.dumps({"g1": {"1": {"pos": "p", "neg": "n", "scenario": "s", "question": "q"},
                                                "10": {"pos": "p2", "neg": "n2", "scenario": "s", "question": "q"}},
                                         "2": {"a": {"pos": "x", "neg": "y", "scenario": "s", "question": "q"}}}))
    write("jsonl", "mvalue-missing-neg", json.dumps({"g": {"1": {"pos": "p"}}}))
    write("jsonl", "mvalue-not-object", json.dumps({"g": [1, 2]}))

    # vectors: layer-count byte, hidden-size byte, then the file (layers = b0 % 8, hidden = 1 + b1 % 64)
    def vec(layers, hidden, body):
        return bytes([layers, hidden - 1]) + body
    write("vectors", "f32", vec(2, 4, st([("directions", [3, 4])], metadata={"concept": "honesty"})))
    write("vectors", "bf16", vec(1, 8, st([("directions", [2, 8])], dtype="BF16")))
    write("vectors", "f16", vec(0, 2, st([("directions", [1, 2])], dtype="F16")))
    write("vectors", "extra-tensors", vec(1, 2, st([("signs", [2], None, "I64"), ("directions", [2, 2])])))
    write("vectors", "nan", vec(1, 2, st([("directions", [2, 2], [0.0, float("nan"), 1.0, 2.0])])))
    write("vectors", "inf", vec(1, 2, st([("directions", [2, 2], [0.0, 1.0, float("inf"), 2.0])], dtype="F16")))
    write("vectors", "wrong-rows", vec(3, 4, st([("directions", [3, 4])])))
    write("vectors", "wrong-hidden", vec(2, 4, st([("directions", [3, 5])])))
    write("vectors", "one-dim", vec(2, 4, st([("directions", [12])])))
    write("vectors", "int-dtype", vec(1, 2, st([("directions", [2, 2], None, "I64")])))
    write("vectors", "no-directions", vec(1, 2, st([("vectors", [2, 2])])))
    write("vectors", "truncated", vec(2, 4, st([("directions", [3, 4])])[:-7]))
    # llama.cpp control vectors (GGUF v3), as resid and repeng write them
    write("vectors", "gguf", vec(3, 4, gguf([(1, rand(4, 1)), (2, rand(4, 2))])))
    write("vectors", "gguf-f16-alignment", vec(2, 2, gguf([(1, [0.5, -0.5])], dtype=1, alignment=64)))
    write("vectors", "gguf-nan", vec(2, 2, gguf([(1, [float("nan"), 1.0])])))
    write("vectors", "gguf-layer0", vec(2, 2, gguf([(0, [1.0, 1.0])])))
    write("vectors", "gguf-layer-out-of-range", vec(2, 2, gguf([(2, [1.0, 1.0])])))
    write("vectors", "gguf-wrong-hidden", vec(2, 3, gguf([(1, [1.0, 1.0])])))
    write("vectors", "gguf-truncated", vec(3, 4, gguf([(1, rand(4, 1)), (2, rand(4, 2))])[:-40]))
    write("vectors", "gguf-array-metadata", vec(1, 2, gguf([], extra_kv=[("tokens", 9, struct.pack("<IQ", 8, 2) + gstr("a") + gstr("bc"))])))

    # manifest: an extraction directory's manifest.json beside one file, shard-00000.safetensors
    # holding SHARD_FILE (fuzz/harness.rs), which the seeds list with its sha256
    shard_sum = hashlib.sha256(b"not really a shard").hexdigest()
    manifest = {"format": "resid-extract-v1", "input": "in.jsonl", "input_sha256": hashlib.sha256(b"in").hexdigest(),
                "input_sequences": 8, "range_start": 0, "range_end": 4, "part": "0/2",
                "options": {"model": "m", "position": "last", "layers": [0, 1, 2]}, "shard_sequences": 4,
                "shards": [{"file": "shard-00000.safetensors", "start": 0, "end": 4, "sha256": shard_sum}], "complete": True}
    man = lambda **kw: json.dumps(dict(manifest, **kw), indent=1)
    write("manifest", "complete", man())
    write("manifest", "resumable", man(complete=False, part=None, range_end=8))
    write("manifest", "empty", man(shards=[], range_end=0, complete=False))
    write("manifest", "checksum-mismatch", man(shards=[dict(manifest["shards"][0], sha256="0" * 64)]))
    write("manifest", "missing-shard", man(shards=[dict(manifest["shards"][0], file="shard-00001.safetensors")]))
    write("manifest", "not-plain-name", man(shards=[dict(manifest["shards"][0], file="../manifest.json")]))
    write("manifest", "gap", man(shards=[dict(manifest["shards"][0], start=1)]))
    write("manifest", "reversed-range", man(shards=[dict(manifest["shards"][0], start=4, end=0)], range_start=4))
    write("manifest", "short-of-range", man(range_end=6))
    write("manifest", "huge-numbers", man(range_end=2**64 - 1, input_sequences=2**64 - 1))
    write("manifest", "negative", man(range_start=-1))
    write("manifest", "missing-field", json.dumps({k: v for k, v in manifest.items() if k != "shards"}))
    write("manifest", "not-object", "[1, 2]")
    write("manifest", "truncated", man()[:100])
    write("manifest", "invalid-utf8", man().encode().replace(b"in.jsonl", b"in\xff.jsonl"))

    # lang_similarity: the --lang-similarity CSV
    write("lang_similarity", "matrix", ",en,fr,zh\nen,1,0.8,0.2\nfr,0.8,1,0.25\nzh,0.2,0.25,1\n")
    write("lang_similarity", "quoted-crlf", '"",\"en\",\"fr\"\r\n\"en\",1.0,-0.5e-1\r\n\r\n\"fr\",-0.05,1\r\n')
    write("lang_similarity", "two-of-three-rows", ",en,fr,sw\nen,1,0.5,0.1\nfr,0,1,0.3\n")
    write("lang_similarity", "header-only", ",en,fr\n")
    write("lang_similarity", "empty", "")
    write("lang_similarity", "no-languages", "lang\nen\n")
    write("lang_similarity", "empty-language", ",en,,fr\nen,1,2,3\n")
    write("lang_similarity", "not-a-number", ",en,fr\nen,1,0.5\nfr,0.5,x\n")
    write("lang_similarity", "infinite", ",en\nen,inf\n")
    write("lang_similarity", "nan", ",en\nen,NaN\n")
    write("lang_similarity", "ragged", ",en,fr\nen,1\n")
    write("lang_similarity", "unicode", ",中文,ελ\n中文,1,0.1\nελ,0.1,1\n")
    write("lang_similarity", "invalid-utf8", b",en\n\xff,1\n")

    # weight_index: model.safetensors.index.json beside one shard, model-00001-of-00001.safetensors,
    # holding the f32 tensor `w` [2, 3]
    shard = "model-00001-of-00001.safetensors"
    write("weight_index", "one-shard", json.dumps({"metadata": {"total_size": 24}, "weight_map": {"w": shard}}))
    write("weight_index", "two-names-one-file", json.dumps({"weight_map": {"w": shard, "v": shard}}))
    write("weight_index", "missing-file", json.dumps({"weight_map": {"w": shard, "x": "model-00002-of-00002.safetensors"}}))
    write("weight_index", "empty-map", json.dumps({"weight_map": {}}))
    write("weight_index", "no-map", json.dumps({"metadata": {}}))
    write("weight_index", "map-not-object", json.dumps({"weight_map": [shard]}))
    write("weight_index", "file-not-string", json.dumps({"weight_map": {"w": 1}}))
    write("weight_index", "traversal", json.dumps({"weight_map": {"w": "../" + shard}}))
    write("weight_index", "names-itself", json.dumps({"weight_map": {"w": "model.safetensors.index.json"}}))
    write("weight_index", "names-the-directory", json.dumps({"weight_map": {"w": "", "v": "."}}))
    write("weight_index", "not-json", '{"weight_map": {"w": ')
    write("weight_index", "invalid-utf8", b'{"weight_map": {"w": "\xff"}}')

    # tokenizer_config: tokenizer_config.json beside a word-level tokenizer.json
    chatml = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    write("tokenizer_config", "chatml", json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": chatml}))
    write("tokenizer_config", "token-objects", json.dumps({"bos_token": {"content": "<s>", "lstrip": False},
                                                           "eos_token": {"content": "</s>"}, "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}))
    write("tokenizer_config", "named-templates", json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                                              {"name": "default", "template": "{{ messages | length }}"}]}))
    write("tokenizer_config", "raise-exception", json.dumps({"chat_template": "{% if messages[0]['role'] == 'user' %}{{ raise_exception('no users') }}{% endif %}"}))
    write("tokenizer_config", "syntax-error", json.dumps({"chat_template": "{% for m in messages %}{{ m.content }"}))
    write("tokenizer_config", "undefined-filter", json.dumps({"chat_template": "{{ messages | nosuchfilter }}"}))
    write("tokenizer_config", "loops-and-json", json.dumps({"chat_template": "{% for i in range(3) %}{% for m in messages %}{{ m | tojson }}{{ loop.index }}{% endfor %}{% endfor %}"}))
    write("tokenizer_config", "no-template", json.dumps({"model_max_length": 2048, "eos_token": 5}))
    write("tokenizer_config", "not-object", "[]")
    write("tokenizer_config", "not-json", '{"chat_template": ')
    write("tokenizer_config", "invalid-utf8", b'{"chat_template": "\xff"}')

    # cache_shard: two bytes (layers = 1 + b0 % 4, hidden = 1 + b1 % 16), then a cache shard for
    # the model id `fuzz-model` (fuzz/harness.rs CACHE_MODEL_ID)
    def cache(layers, hidden, n, dtype="F32", values=None, **meta):
        keys = ",".join(hashlib.sha256(b"stimulus %d" % i).hexdigest() for i in range(n))
        m = dict({"format": "resid-hidden-cache-v1", "model_id": "fuzz-model", "keys": keys, "layers": f"1..={layers}",
                  "texts": json.dumps([f"stimulus {i}" for i in range(n)])}, **meta)
        return bytes([layers - 1, hidden - 1]) + st([("hidden_states", [n, layers, hidden], values, dtype)], metadata=m)
    write("cache_shard", "f32", cache(2, 4, 3))
    write("cache_shard", "bf16-one-row", cache(1, 8, 1, dtype="BF16"))
    write("cache_shard", "no-rows", cache(3, 2, 0))
    write("cache_shard", "other-model", cache(2, 4, 1, model_id="0" * 64))
    write("cache_shard", "other-format", cache(2, 4, 1, format="resid-hidden-cache-v0"))
    write("cache_shard", "bad-key", cache(1, 2, 1, keys="zz" * 32))
    write("cache_shard", "short-key", cache(1, 2, 1, keys="abc"))
    write("cache_shard", "fewer-keys", cache(2, 4, 3, keys=hashlib.sha256(b"x").hexdigest()))
    write("cache_shard", "nan", cache(1, 2, 1, values=[0.5, float("nan")]))
    write("cache_shard", "inf-f16", cache(1, 2, 1, dtype="F16", values=[float("inf"), 1.0]))
    write("cache_shard", "wrong-tensor", bytes([0, 1]) + st([("states", [1, 1, 2])], metadata={"format": "resid-hidden-cache-v1"}))
    write("cache_shard", "truncated", cache(2, 4, 3)[:-9])

    # qwen_tiktoken: a qwen.tiktoken file (`BASE64_TOKEN RANK` lines)
    def tiktoken(extra=(), skip=()):
        lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256) if b not in skip]
        lines += [f"{base64.b64encode(t.encode()).decode()} {256 + i}" for i, t in enumerate(extra)]
        return "\n".join(lines) + "\n"
    merges = ["he", "ll", "hell", "hello", " w", "or", " wor", " world", "\r\n", "  ", "\u00e9", "\u8bda"]
    write("qwen_tiktoken", "bytes-only", tiktoken())
    write("qwen_tiktoken", "merges", tiktoken(merges))
    write("qwen_tiktoken", "crlf-lines", tiktoken(merges).replace("\n", "\r\n"))
    write("qwen_tiktoken", "missing-byte", tiktoken(skip=(65,)))
    write("qwen_tiktoken", "bad-base64", tiktoken() + "QQ=* 300\n")
    write("qwen_tiktoken", "duplicate-rank", tiktoken() + "YWI= 7\n")
    write("qwen_tiktoken", "duplicate-token", tiktoken() + "QQ== 300\n")
    write("qwen_tiktoken", "truncated", tiktoken(merges)[:-5])
    write("qwen_tiktoken", "rank-too-large", tiktoken() + "YWI= 151643\n")
    write("qwen_tiktoken", "empty", "")


if __name__ == "__main__":
    main()
