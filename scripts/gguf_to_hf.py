#!/usr/bin/env python3
"""Convert a llama-architecture GGUF file into a Hugging Face style model directory.

    python3 scripts/gguf_to_hf.py MODEL.gguf OUT_DIR

Writes into OUT_DIR (which must not exist yet; the caller renames it into place):

  config.json             LlamaForCausalLM config, from the GGUF metadata
  model.safetensors       f32 weights under Hugging Face tensor names
  tokenizer.json          `tokenizers` byte-level BPE tokenizer
  tokenizer_config.json   bos/eos/unk/pad tokens, add_bos_token, chat_template
  generation_config.json  bos/eos/pad token ids

Everything here mirrors what Hugging Face transformers does when it loads the same
file with `from_pretrained(..., gguf_file=...)` (transformers 5.x,
`modeling_gguf_pytorch_utils.load_gguf_checkpoint`, `integrations/ggml.py`
GGUF_CONFIG_MAPPING["llama"], and `integrations/gguf/gguf_tokenizer_mapping.py`):

* weights are dequantized with gguf-py's `gguf.quants.dequantize`, the very
  function transformers calls, and cast to f32;
* attn_q / attn_k rows are un-permuted exactly like transformers'
  `LlamaTensorProcessor._reverse_permute_weights` (llama.cpp's converter
  interleaved each head's two rotary halves; HF's rotate_half wants them split);
* the tokenizer is transformers' `byte_level_tokenizer` + `add_gguf_special_tokens`
  (+ `set_split_regex`, which leaves the GPT-2 ByteLevel regex in place for the
  pre-tokenizer types handled here), and the post-processor that
  `TokenizersBackend.update_post_processor` installs.

Needs only numpy, gguf, safetensors and tokenizers (no torch, no transformers).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

try:
    import gguf
    from gguf import GGUFReader, GGUFValueType
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
except ImportError as exc:  # pragma: no cover - the shell wrapper installs these
    sys.exit(f"gguf_to_hf.py: missing Python package ({exc}); run scripts/fetch-model.sh, which installs them")


def log(msg: str) -> None:
    print(f"  [gguf_to_hf] {msg}", flush=True)


# --------------------------------------------------------------------------- metadata


def field_value(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def require(reader: GGUFReader, key: str):
    value = field_value(reader, key)
    if value is None:
        sys.exit(f"gguf_to_hf.py: GGUF metadata lacks required key {key!r}")
    return value


def f32_as_python_float(reader: GGUFReader, key: str) -> float:
    """A FLOAT32 field as transformers reads it: the f32 widened to a Python float
    (so rms_norm_eps 1e-5 becomes 9.999999747378752e-06, as in HF's config)."""
    field = reader.fields[key]
    return float(field.parts[field.data[0]][0])


# transformers integrations/ggml.py GGUF_CONFIG_MAPPING["llama"]: gguf key -> config key
LLAMA_CONFIG_MAPPING = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
# ... and GGUF_CONFIG_MAPPING["tokenizer"]
TOKENIZER_CONFIG_MAPPING = {
    "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id",
}


def build_config(reader: GGUFReader, tensor_names: set[str]) -> dict:
    arch = require(reader, "general.architecture")
    if arch != "llama":
        sys.exit(f"gguf_to_hf.py: only llama-architecture GGUF files are supported, this one is {arch!r}")
    name = field_value(reader, "general.name") or ""
    if "mistral" in name:  # transformers would build a MistralConfig instead
        sys.exit("gguf_to_hf.py: mistral-flavoured llama GGUF files are not supported")

    parsed: dict = {}
    for gguf_key, hf_key in LLAMA_CONFIG_MAPPING.items():
        full = f"llama.{gguf_key}"
        if full not in reader.fields:
            continue
        if reader.fields[full].types[0] == GGUFValueType.FLOAT32:
            parsed[hf_key] = f32_as_python_float(reader, full)
        else:
            parsed[hf_key] = field_value(reader, full)
    for gguf_key, hf_key in TOKENIZER_CONFIG_MAPPING.items():
        value = field_value(reader, f"tokenizer.{gguf_key}")
        if value is not None:
            parsed[hf_key] = int(value)
    if "vocab_size" not in parsed:  # as load_gguf_checkpoint: fall back to the token list
        parsed["vocab_size"] = len(require(reader, "tokenizer.ggml.tokens"))

    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in parsed:
            sys.exit(f"gguf_to_hf.py: GGUF metadata lacks the value for {key}")
    parsed.setdefault("num_key_value_heads", parsed["num_attention_heads"])
    parsed.setdefault("head_dim", parsed["hidden_size"] // parsed["num_attention_heads"])
    # LlamaConfig defaults for keys the file may omit
    parsed.setdefault("rope_theta", 10000.0)
    parsed.setdefault("rms_norm_eps", 1e-6)
    parsed.setdefault("max_position_embeddings", 2048)

    # transformers: tie_word_embeddings is true iff the file has no separate output tensor
    tie = "output.weight" not in tensor_names

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": parsed["hidden_size"],
        "intermediate_size": parsed["intermediate_size"],
        "num_hidden_layers": parsed["num_hidden_layers"],
        "num_attention_heads": parsed["num_attention_heads"],
        "num_key_value_heads": parsed["num_key_value_heads"],
        "head_dim": parsed["head_dim"],
        "hidden_act": "silu",
        "rms_norm_eps": parsed["rms_norm_eps"],
        "rope_theta": parsed["rope_theta"],
        # transformers >= 5 keeps rope settings here; older versions read rope_theta above
        "rope_parameters": {"rope_theta": parsed["rope_theta"], "rope_type": "default"},
        "rope_scaling": None,
        "max_position_embeddings": parsed["max_position_embeddings"],
        "vocab_size": parsed["vocab_size"],
        "tie_word_embeddings": tie,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if key in parsed:
            config[key] = parsed[key]
    return config


# --------------------------------------------------------------------------- weights

# gguf-py's TensorNameMap for MODEL_ARCH.LLAMA, restricted to what a llama GGUF holds
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{BLOCK_NAMES[parts[2]]}"
    return None


def reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """transformers LlamaTensorProcessor._reverse_permute_weights (n_head is num_kv_heads for k)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (nh * hd, h),
                p + "self_attn.k_proj.weight": (nkv * hd, h),
                p + "self_attn.v_proj.weight": (nkv * hd, h),
                p + "self_attn.o_proj.weight": (h, nh * hd),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    return shapes


def convert_weights(reader: GGUFReader, config: dict) -> dict[str, np.ndarray]:
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    kinds: dict[str, int] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            if tensor.name == "rope_freqs.weight":
                sys.exit("gguf_to_hf.py: this GGUF has rope_freqs (llama3-style rope scaling), which is not supported")
            sys.exit(f"gguf_to_hf.py: unexpected tensor {tensor.name!r} in the GGUF file")
        # gguf-py gives numpy arrays in row-major order with the GGUF dims reversed, i.e. the
        # [out_features, in_features] layout transformers expects; dequantize keeps that.
        weights = dequantize(tensor.data, tensor.tensor_type)
        if ".attn_q." in tensor.name:
            weights = reverse_permute(weights, nh)
        elif ".attn_k." in tensor.name:
            weights = reverse_permute(weights, nkv)
        out[name] = np.ascontiguousarray(weights, dtype=np.float32)
        kinds[tensor.tensor_type.name] = kinds.get(tensor.tensor_type.name, 0) + 1
    log("tensor types in the file: " + ", ".join(f"{n} x{k}" for k, n in sorted(kinds.items())))

    want = expected_shapes(config)
    missing = sorted(set(want) - set(out))
    extra = sorted(set(out) - set(want))
    if missing or extra:
        sys.exit(f"gguf_to_hf.py: tensor set mismatch; missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in want.items():
        if out[name].shape != shape:
            sys.exit(f"gguf_to_hf.py: {name} has shape {out[name].shape}, expected {shape}")
        if not np.isfinite(out[name]).all():
            sys.exit(f"gguf_to_hf.py: {name} contains non-finite values")
    return out


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (transformers.convert_slow_tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# pre-tokenizer types for which transformers replaces the GPT-2 regex by a model-specific
# split (gguf_tokenizer_mapping.GGUF_PRE_TOKENIZER_SPLITS); not implemented here
PRE_TYPES_WITH_OWN_SPLIT = {
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
    "jina-v5-nano", "dbrx", "smaug-bpe", "tekken", "qwen2", "deepseek-r1-qwen", "kormo",
    "f2llmv2", "megrez", "qwen35", "gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2",
}

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def build_tokenizer(reader: GGUFReader, config_max_len: int) -> tuple[Tokenizer, dict]:
    model = require(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        sys.exit(f"gguf_to_hf.py: only byte-level BPE ('gpt2') GGUF tokenizers are supported, not {model!r}")
    pre = field_value(reader, "tokenizer.ggml.pre")
    if pre in PRE_TYPES_WITH_OWN_SPLIT:
        sys.exit(f"gguf_to_hf.py: pre-tokenizer type {pre!r} needs a custom split regex, not implemented")

    tokens = list(require(reader, "tokenizer.ggml.tokens"))
    token_types = list(field_value(reader, "tokenizer.ggml.token_type") or [])
    merges = field_value(reader, "tokenizer.ggml.merges")
    if merges is None:
        sys.exit("gguf_to_hf.py: GGUF tokenizer has no merges")

    # transformers byte_level_tokenizer: tokens outside the byte alphabet get re-spelled
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    merge_pairs = [tuple(m.split(" ")) for m in merges]

    # transformers GPT2Tokenizer.__init__
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merge_pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()

    # transformers add_gguf_special_tokens: CONTROL tokens spelled in the byte alphabet become
    # special added tokens, USER_DEFINED tokens present in the vocab become plain added tokens
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, tt in zip(tokens, token_types)
        if tt == TOKEN_TYPE_CONTROL and set(t) <= alphabet
    ]
    if control:
        tok.add_special_tokens(control)
    vocab_now = tok.get_vocab(with_added_tokens=True)
    user_defined = [
        AddedToken(t, normalized=False, special=False)
        for t, tt in zip(tokens, token_types)
        if tt == TOKEN_TYPE_USER_DEFINED and t in vocab_now
    ]
    if user_defined:
        tok.add_tokens(user_defined)

    def special(key: str) -> str | None:
        token_id = field_value(reader, f"tokenizer.ggml.{key}")
        return tokens[int(token_id)] if token_id is not None else None

    bos, eos, unk, pad = special("bos_token_id"), special("eos_token_id"), special("unknown_token_id"), special("padding_token_id")
    # TokenizersBackend also registers bos/eos/unk/pad as special tokens (a no-op when they are
    # already control tokens, as they are in every file this script has been used on)
    extra_specials = [t for t in (bos, eos, unk, pad) if t is not None and t not in {a.content for a in control}]
    if extra_specials:
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in extra_specials])

    add_bos = bool(field_value(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(field_value(reader, "tokenizer.ggml.add_eos_token", False))
    if add_bos and bos is None:
        add_bos = False
    if add_eos and eos is None:
        add_eos = False

    # TokenizersBackend.update_post_processor
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special_tokens = []
    if add_bos:
        special_tokens.append((bos, vocab[bos]))
    if add_eos:
        special_tokens.append((eos, vocab[eos]))
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)

    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        log(f"note: tokenizer vocabulary has {tok.get_vocab_size(with_added_tokens=True)} entries, file lists {len(tokens)}")

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config_max_len,
    }
    chat_template = field_value(reader, "tokenizer.chat_template")
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    return tok, tokenizer_config


def self_check_tokenizer(tok: Tokenizer) -> None:
    samples = ["Hello, world!", "  two  spaces\tand\ttabs\n\nnewlines", "日本語とEnglish 🤗 ünïcödé", "x = 12345"]
    for s in samples:
        ids = tok.encode(s).ids
        back = tok.decode(ids, skip_special_tokens=False)
        if back != s:
            sys.exit(f"gguf_to_hf.py: tokenizer round trip failed for {s!r}: got {back!r}")


# --------------------------------------------------------------------------- main


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    gguf_path, out_dir = argv[1], argv[2]
    if os.path.exists(out_dir):
        sys.exit(f"gguf_to_hf.py: output directory {out_dir} already exists")
    t0 = time.time()
    try:
        from importlib.metadata import version

        gguf_version = version("gguf")
    except Exception:  # pragma: no cover
        gguf_version = "?"
    log(f"reading {gguf_path} (gguf-py {gguf_version})")
    reader = GGUFReader(gguf_path)
    tensor_names = {t.name for t in reader.tensors}

    config = build_config(reader, tensor_names)
    log(
        "config: hidden {hidden_size}, ffn {intermediate_size}, layers {num_hidden_layers}, heads {num_attention_heads}/"
        "{num_key_value_heads} x {head_dim}, vocab {vocab_size}, rope_theta {rope_theta}, eps {rms_norm_eps}, "
        "tied {tie_word_embeddings}".format(**config)
    )

    tok, tokenizer_config = build_tokenizer(reader, config["max_position_embeddings"])
    self_check_tokenizer(tok)
    log(f"tokenizer: byte-level BPE, {tok.get_vocab_size()} tokens, add_bos_token={tokenizer_config['add_bos_token']}")

    log(f"dequantizing {len(reader.tensors)} tensors to f32")
    weights = convert_weights(reader, config)
    n_params = sum(w.size for w in weights.values())

    os.makedirs(out_dir)
    write_json(os.path.join(out_dir, "config.json"), config)
    generation_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    write_json(os.path.join(out_dir, "generation_config.json"), generation_config)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    log(f"writing model.safetensors ({n_params / 1e6:.1f}M parameters, f32)")
    st_path = os.path.join(out_dir, "model.safetensors")
    save_file(weights, st_path, metadata={"format": "pt"})
    os.chmod(st_path, 0o644)  # safetensors writes through a private temp file (mode 0600)
    log(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
