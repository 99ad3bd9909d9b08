#!/usr/bin/env python3
"""Generate golden reference fixtures for resid from HF transformers (PyTorch, f32, CPU).

How to run (from anywhere):

    scripts/make-golden.sh                 # creates .venv-golden (torch, transformers 5.x, ...) and runs this
    scripts/make-golden.sh --only tiny-llama-gqa --only smollm2-135m
    .venv-golden/bin/python scripts/make_golden.py --help   # once the venv exists

This is a developer tool, never run by CI.  It needs torch + transformers (5.x) + safetensors + numpy
(+ gguf and accelerate for the smollm2 GGUF cross-check, --no-gguf-check skips it).  Everything is CPU f32 and single-threaded, so
re-running it with the same versions reproduces the committed fixtures bit for bit.

What it writes (paths relative to the repo root):

  tests/fixtures/models/NAME/{config.json,model.safetensors}   random tiny models (only built when
                                                               missing, or with --rebuild-tiny)
  tests/fixtures/golden/NAME.safetensors                       reference tensors (see below)
  tests/fixtures/golden/NAME.json                              metadata: prompts, versions, tokenizer cases
  tests/fixtures/golden/NAME.steer.safetensors                 the steering vector file ("directions" [L+1,H],
                                                               metadata coef / layers)

Models: tiny-llama-gqa (f32, GQA, biases, tied, llama3 rope scaling), tiny-llama-mha-bf16 (bf16 weights),
tiny-llama-f16 (f16 weights, MQA), tiny-qwen2 (Qwen2ForCausalLM: GQA, q/k/v biases, untied),
tiny-qwen3 (Qwen3ForCausalLM: q_norm/k_norm, tied, bf16 weights), tiny-bloom (BloomForCausalLM: 5 heads, i.e. ALiBi
slopes for a head count that is not a power of two), tiny-bloom-postln (6 heads,
apply_residual_connection_post_layernorm), tiny-llama-rope-linear (linear RoPE scaling, factor 4), tiny-mistral
(MistralForCausalLM, head_dim 24 != hidden/heads), tiny-qwen-chat and tiny-qwen-chat-bias (QWenLMHeadModel, whose golden
values come from the float64 numpy re-implementation QwenChatReference below, since transformers has no Qwen-chat
class), smollm2-135m (the real model in models/smollm2-135m, produced by
scripts/fetch-model.sh smollm2-135m; skipped with a warning if it is missing), and recognition-smollm2 (mean-diff
recognition accuracy per layer computed here with numpy from SmolLM2's HF hidden states on data/values, 7 concepts x
en/fr: tests/fixtures/golden/recognition-smollm2.json plus the train/test JSONL split it drew, under
tests/fixtures/golden/recognition-smollm2/), and study-smollm2 (the study's aggregate numbers for 2 concepts x 4
languages, mean-diff and PCA, with the control sweep, computed here from the README's definitions:
tests/fixtures/golden/study-smollm2.json plus the best-layer vector rows in study-smollm2.vectors.safetensors).
The bf16 / f16 models are always *computed* in float32 (f32 compute on rounded weights).  The non-Llama tiny models'
JSON also has "family", "architecture" and "semantics" (notes on the HF behaviour the Rust side must match; for BLOOM
checked against an independent float64 re-implementation at generation time).

Tensors in NAME.safetensors (f32 unless stated; L = num_hidden_layers, H = hidden, V = vocab, i = prompt index):
  p{i}.ids                 i64 [T]      prompt token ids
  p{i}.last                [L+1, H]     hidden_states[l][0, -1] as HF returns them (0 = embeddings,
                                        L = after the final norm)
  p{i}.mean                [L+1, H]     hidden_states[l][0].mean(0) (over all T prompt tokens)
  p{i}.last_raw            [H]          raw output of the last decoder block (pre final norm), last token
  p{i}.logits_last         [V]          logits at the last prompt position
  p{i}.greedy              i64 [16]     16 greedy tokens (argmax loop with KV cache, no EOS stop)
  p{i}.greedy_margin       [16]         top1 - top2 logit gap at each greedy step (near-tie indicator)
  steer.directions         [L+1, H]     seeded gaussian rows, unit norm (row l used when l in steer.layers)
  steer.layers             i64 [k]
  steer.coef               [1]
  p{i}.steer_add.{last,mean}  [L+1, H]  hidden states with block l-1 output += coef*directions[l]
                                        (for every l in steer.layers, at every position incl. generated ones)
  p{i}.steer_add.greedy    i64 [16]     (+ .greedy_margin [16])
  p{i}.steer_pw.last       [L+1, H]     sign-aware add: h + coef*v*sign(<h,v>) per token row (torch.sign)
  p{i}.steer_pw.greedy     i64 [16]     (+ .greedy_margin [16])
  p{i}.steer_norm.last     [L+1, H]     h' = h + coef*v;  h' *= ||h|| / ||h'|| per token row
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import math
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_DIR = os.path.join(REPO, "tests", "fixtures", "golden")
TINY_MODELS_DIR = os.path.join(REPO, "tests", "fixtures", "models")
SMOLLM2_DIR = os.path.join(REPO, "models", "smollm2-135m")

N_GREEDY = 16
TINY_PROMPT_LENGTHS = [1, 2, 7, 33, 130, 310]

# ----------------------------------------------------------------------------------------------
# model specs
# ----------------------------------------------------------------------------------------------

TINY_SPECS = {
    "tiny-llama-gqa": dict(
        config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        dtype=torch.float32,
        seed=0,
        steer_layers=[1, 3],
        steer_coef=2.0,
    ),
    "tiny-llama-mha-bf16": dict(
        config=dict(
            vocab_size=256,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=3,
            num_key_value_heads=3,
            head_dim=16,
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
        rope_theta=500000.0,
        rope_scaling=None,
        dtype=torch.bfloat16,
        seed=1,
        steer_layers=[1, 2],
        steer_coef=2.0,
    ),
    "tiny-llama-f16": dict(
        config=dict(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
        rope_theta=500000.0,
        rope_scaling=None,
        dtype=torch.float16,
        seed=2,
        steer_layers=[1, 2],
        steer_coef=2.0,
    ),
    # Qwen2 / Qwen2.5: the Llama block with biases on q/k/v (not o_proj); GQA; untied; no sliding window.
    # Qwen2Config has no head_dim field: head_dim = hidden_size / num_attention_heads = 16.
    "tiny-qwen2": dict(
        family="qwen2",
        config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            use_sliding_window=False,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
        rope_theta=10000.0,
        rope_scaling=None,
        dtype=torch.float32,
        seed=7,  # seeds of the new families picked so that no greedy step is a near-tie (all margins > 1e-3)
        steer_layers=[1, 3],
        steer_coef=2.0,
    ),
    # Qwen3: per-head RMSNorm on q and k (before RoPE), no attention bias; tied; bf16 weights.
    "tiny-qwen3": dict(
        family="qwen3",
        config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            attention_bias=False,
            tie_word_embeddings=True,
            use_sliding_window=False,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
        rope_theta=10000.0,
        rope_scaling=None,
        dtype=torch.bfloat16,
        seed=4,
        steer_layers=[2, 3],
        steer_coef=2.0,
    ),
    # BLOOM: LayerNorm after the embeddings, ALiBi (5 heads: not a power of two), fused interleaved qkv, tanh-GELU
    # MLP (4*hidden) with biases, tied LM head.  initializer_range 0.2, not 0.1: with N(0, 0.1) the LayerNorm'd
    # embedding (~10x the tied embedding row) dominates the blocks' contributions, so the tied head just copies the
    # last input token (greedy = that token 16 times, for every prompt, steered or not).
    "tiny-bloom": dict(
        family="bloom",
        config=dict(
            vocab_size=256,
            hidden_size=60,
            n_layer=3,
            n_head=5,
            layer_norm_epsilon=1e-5,
            apply_residual_connection_post_layernorm=False,
            tie_word_embeddings=True,
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
        ),
        dtype=torch.float32,
        seed=17,
        steer_layers=[1, 3],
        steer_coef=4.0,
    ),
    # ... with the residual taken after the LayerNorm (apply_residual_connection_post_layernorm), 6 heads (head_dim 10).
    "tiny-bloom-postln": dict(
        family="bloom",
        config=dict(
            vocab_size=256,
            hidden_size=60,
            n_layer=3,
            n_head=6,
            layer_norm_epsilon=1e-5,
            apply_residual_connection_post_layernorm=True,
            tie_word_embeddings=True,
            initializer_range=0.2,
            bos_token_id=1,
            eos_token_id=2,
        ),
        dtype=torch.float32,
        seed=10,
        steer_layers=[2, 3],
        steer_coef=2.0,
    ),
    # Llama with linear RoPE scaling (HF "linear": positions divided by factor); small (2 layers, hidden 32).
    "tiny-llama-rope-linear": dict(
        config=dict(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            max_position_embeddings=1024,
            rms_norm_eps=1e-5,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
        rope_theta=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        dtype=torch.float32,
        seed=31,
        steer_layers=[1, 2],
        steer_coef=2.0,
    ),
    # MistralForCausalLM: the Llama block without biases; GQA; an explicit head_dim (24) that is not
    # hidden_size / num_attention_heads (16), as in Mistral-Nemo; sliding_window null (full attention).
    "tiny-mistral": dict(
        family="mistral",
        config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            sliding_window=None,
            tie_word_embeddings=False,
            max_position_embeddings=1024,
            rms_norm_eps=1e-5,
            initializer_range=0.1,
            bos_token_id=1,
            eos_token_id=2,
        ),
        rope_theta=1000000.0,
        rope_scaling=None,
        dtype=torch.float32,
        seed=32,
        steer_layers=[1, 2],
        steer_coef=2.0,
    ),
}

# model classes per family (transformers names)
FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "bloom": ("BloomConfig", "BloomForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def _alibi_slopes_py(n: int) -> list[float]:
    """ALiBi slopes exactly as transformers' BLOOM computes them (for the JSON notes; checked against HF at run time)."""
    import math

    p = 2 ** math.floor(math.log2(n))
    base = 2.0 ** (-(2.0 ** -(math.log2(p) - 3)))
    s = [base ** k for k in range(1, p + 1)]
    if p != n:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * p) - 3)))
        s += [extra ** k for k in range(1, 1 + 2 * min(p, n - p), 2)]
    return s


# Semantics notes written into NAME.json for the non-Llama families (what the Rust side has to match).
FAMILY_NOTES = {
    "qwen2": {
        "block": "Llama block: x += o_proj(attn(rope(q_proj(rms(x))), rope(k_proj(..)), v_proj(..))); "
                 "x += down(silu(gate(rms(x))) * up(rms(x)))",
        "biases": "q_proj, k_proj, v_proj have biases (added before RoPE); o_proj and the MLP have none",
        "head_dim": "hidden_size / num_attention_heads (Qwen2Config has no head_dim key)",
        "sliding_window": "off (use_sliding_window false; transformers saves sliding_window null)",
        "hidden_states": "0 = embed_tokens output (unscaled); l = output of block l-1; L = norm(last block output)",
    },
    "qwen3": {
        "block": "Llama block with q = rope(q_norm(q_proj(x) per head)), k = rope(k_norm(k_proj(x) per head)); "
                 "q_norm/k_norm are RMSNorm over head_dim (eps rms_norm_eps) with weight [head_dim] shared by "
                 "all heads, applied before RoPE",
        "biases": "none (attention_bias false)",
        "hidden_states": "0 = embed_tokens output (unscaled); l = output of block l-1; L = norm(last block output)",
    },
    "mistral": {
        "block": "Llama block (no biases): x += o_proj(attn(rope(q_proj(rms(x))), rope(k_proj(..)), v_proj(..))); "
                 "x += down(silu(gate(rms(x))) * up(rms(x)))",
        "head_dim": "the config's head_dim (24), not hidden_size / num_attention_heads (16): q_proj is [heads*24, hidden], "
                    "o_proj [hidden, heads*24]",
        "sliding_window": "null (full attention); transformers' Mistral applies a window only when it is set",
        "hidden_states": "0 = embed_tokens output (unscaled); l = output of block l-1; L = norm(last block output)",
    },
    "bloom": {
        "hidden_states": "0 = word_embeddings_layernorm(word_embeddings(ids)) (the LayerNorm'd embeddings, "
                         "not the raw lookup); l = output of block l-1; L = ln_f(output of block L-1)",
        "last_raw": "output of the last block (transformer.h[L-1]) before ln_f",
        "block": "ln1 = input_layernorm(x); r1 = ln1 if apply_residual_connection_post_layernorm else x; "
                 "a = r1 + dense(attn(ln1)); ln2 = post_attention_layernorm(a); "
                 "r2 = ln2 if apply_residual_connection_post_layernorm else a; "
                 "out = r2 + dense_4h_to_h(gelu_tanh(dense_h_to_4h(ln2)))",
        "qkv": "query_key_value.weight [3*H, H] rows interleaved per head: view(n_head, 3, head_dim) -> "
               "row block (h, 0) = q of head h, (h, 1) = k, (h, 2) = v; same for the bias",
        "attention": "scores = slope_h * j + (q . k_j) / sqrt(head_dim) for key position j (absolute, 0-based; "
                     "HF adds slope_h * j, equal under softmax to slope_h * (j - i)), causal mask, softmax in f32",
        "alibi_slopes": "p = 2^floor(log2 n); slopes = [b^1..b^p] with b = 2^(-8/p); if p != n append "
                        "[e^1, e^3, e^5, ...] (min(p, n-p) terms) with e = 2^(-4/p) (= 2^(-8/(2p)))",
        "gelu": "x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))",
        "lm_head": "tied to word_embeddings (no lm_head.weight in the file)",
    },
}

SMOLLM2_STEER_LAYERS = [5, 12, 20]
SMOLLM2_STEER_COEF = 8.0

# Prompts for the real model: several languages / scripts / lengths.  p0 ("Hello") is exactly one token, so it
# doubles as the 1-token prompt (asserted below); the fixture stays under ~6 MB with these 8 prompts.
SMOLLM2_PROMPTS = [
    "Hello",
    "Le petit prince regarda les étoiles et se demanda pourquoi les adultes ne comprenaient jamais rien.",
    "我们今天下午去公园散步，天气非常好，湖边有很多人在钓鱼。",
    "東京は日本の首都で、世界で最も人口の多い都市の一つです。",
    "Habari za asubuhi! Leo tunakwenda sokoni kununua matunda na mboga.",
    "தமிழ் உலகின் மிகப் பழமையான மொழிகளில் ஒன்றாகும்.",
    "Emoji test 😀👍🏽 👨‍👩‍👧‍👦\tcol1\tcol2\nnew line\n\n  indented 🎉 done",
    (
        "The history of the printing press is a story of many small improvements rather than a single "
        "invention. Long before Johannes Gutenberg set up his workshop in Mainz around 1440, craftsmen in "
        "China and Korea had carved wooden blocks and cast individual characters in clay and metal. What "
        "Gutenberg contributed was a practical system: an adjustable hand mould that could cast large numbers "
        "of uniform metal letters, an oil-based ink that stuck to metal type, and a screw press adapted from "
        "the presses used to make wine and olive oil. Together these made it possible to print hundreds of "
        "identical pages quickly and cheaply. Within fifty years, printing shops had spread to more than two "
        "hundred cities across Europe, and millions of books had been produced. Prices fell, literacy rose, "
        "and ideas travelled faster than ever before. Scholars could compare identical copies of a text, "
        "which made it easier to correct errors and to build on the work of others. Religious reformers used "
        "pamphlets to reach ordinary people, governments printed laws and proclamations, and merchants relied "
        "on printed tables of exchange rates and distances. Newspapers appeared in the early seventeenth "
        "century, first as weekly sheets of foreign news and later as daily papers with advertisements, "
        "letters and essays. The technology itself changed surprisingly little for almost three hundred "
        "years. Only in the nineteenth century did steam power, rotary presses and machines for setting type "
        "transform printing into a true industry, making cheap newspapers and novels available to almost "
        "everyone who could read. Today, when most text is displayed on screens, it is easy to forget how "
        "radical that first change was, and how much of modern science, politics and culture depends on it."
    ),
]

# Strings for the tokenizer golden cases (smollm2 only).  The chat-rendered text is appended at run time.
TOKENIZER_CASES = [
    "",
    "Hello",
    "Hello, world! How are you today?",
    "   leading and trailing spaces   ",
    "runs     of      spaces and\ttabs\t\tand\t \tmixed",
    "line one\nline two\r\nline three\n\n\nend\r\n",
    "Digits: 0 7 42 123 4567 12345678 3.14159 1,000,000 2024-06-01 +44 (0)20 7946 0958",
    "def square(x: int) -> int:\n    return x ** 2  # comment\n\nprint([square(i) for i in range(10)])\n",
    "Ça coûte 5 € — « déjà vu » à l'hôtel, n'est-ce pas ?",
    "我们今天去公园散步，天气非常好。",
    "東京は日本の首都です。ひらがなとカタカナも使います。",
    "안녕하세요, 만나서 반갑습니다. 한국어 문장입니다.",
    "தமிழ் ஒரு பழமையான மொழி.",
    "తెలుగు ఒక అందమైన భాష.",
    "Habari za asubuhi? Ninakwenda sokoni kununua matunda.",
    "Moni, muli bwanji? Ndili bwino, zikomo kwambiri.",
    "Tiếng Việt có nhiều dấu thanh: à á ả ã ạ, đường phố Hà Nội.",
    "Hyvää huomenta! Järvessä ui pieniä kaloja.",
    "Árvíztűrő tükörfúrógép és őrült ütközés.",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇫🇷 🧑🏿‍💻",
    "<|im_start|>user\nHi there<|im_end|>\n<|endoftext|>",
]

CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def log(*a):
    print(*a, flush=True)


def rel(p: str) -> str:
    return os.path.relpath(p, REPO)


def setup_determinism():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    np.random.seed(0)
    try:
        torch.use_deterministic_algorithms(True)
    except Exception:  # pragma: no cover
        pass


def model_class(family: str, which: int = 1):
    import transformers

    return getattr(transformers, FAMILY_CLASSES[family][which])


def decoder_blocks(model):
    """The decoder blocks: model.model.layers (Llama, Qwen2, Qwen3) or model.transformer.h (BLOOM)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner.layers
    return model.transformer.h


def final_norm(model):
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "norm"):
        return inner.norm
    return model.transformer.ln_f


def load_model(model_dir: str, family: str = "llama"):
    cls = model_class(family)

    # transformers 5 calls it `dtype` (4.x: `torch_dtype`)
    try:
        model = cls.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    except TypeError:
        model = cls.from_pretrained(model_dir, attn_implementation="eager", torch_dtype=torch.float32)
    model.eval()
    for p in model.parameters():
        assert p.dtype == torch.float32, p.dtype
    return model


def cache_kwarg_name(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def out_cache(out):
    c = getattr(out, "cache", None)
    if c is None:
        c = getattr(out, "past_key_values", None)
    return c


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int):
    """Manual argmax loop with KV cache, never stopping at EOS. Returns (tokens i64 [n], margins f32 [n])."""
    from transformers import DynamicCache

    ck = cache_kwarg_name(model)
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    out = model(input_ids=ids[None], use_cache=True, **{ck: cache})
    toks, margins = [], []
    logits = out.logits[0, -1]
    for step in range(n):
        top2 = torch.topk(logits, 2)
        nxt = int(top2.indices[0])
        toks.append(nxt)
        margins.append(float(top2.values[0] - top2.values[1]))
        if step == n - 1:
            break
        cache = out_cache(out)
        out = model(input_ids=torch.tensor([[nxt]], dtype=torch.long), use_cache=True, **{ck: cache})
        logits = out.logits[0, -1]
    return torch.tensor(toks, dtype=torch.long), torch.tensor(margins, dtype=torch.float32)


@torch.no_grad()
def greedy_nocache(model, ids: torch.Tensor, n: int):
    seq = ids.clone()
    toks = []
    for _ in range(n):
        logits = model(input_ids=seq[None], use_cache=False).logits[0, -1]
        nxt = int(torch.argmax(logits))
        toks.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    return torch.tensor(toks, dtype=torch.long)


def block_output(output):
    """(tensor, rebuild) for a decoder layer's output: a tensor in transformers 5, a tuple in 4.x."""
    if isinstance(output, tuple):
        return output[0], lambda h: (h,) + tuple(output[1:])
    return output, lambda h: h


def make_steer_hook(vec: torch.Tensor, coef: float, mode: str):
    v = vec.to(torch.float32)

    def hook(module, args, output):
        h, rebuild = block_output(output)
        if mode == "add":
            new = h + coef * v
        elif mode == "pw":
            sign = torch.sign((h * (coef * v)).sum(-1, keepdim=True))  # RepE piecewise_linear
            new = h + coef * v * sign
        elif mode == "norm":
            norm_pre = torch.norm(h, dim=-1, keepdim=True)
            new = h + coef * v
            norm_post = torch.norm(new, dim=-1, keepdim=True)
            new = new / norm_post * norm_pre
        else:
            raise ValueError(mode)
        return rebuild(new)

    return hook


class Steering:
    """Context manager: steer the output of decoder block l-1 for every l in layers (RepE WrappedBlock style).

    The hooks are *prepended* so they run before transformers' own output-capturing hooks, i.e. the recorded
    hidden_states are the steered block outputs."""

    def __init__(self, model, directions, layers, coef, mode):
        self.model, self.directions, self.layers, self.coef, self.mode = model, directions, layers, coef, mode
        self.handles = []

    def __enter__(self):
        for l in self.layers:
            block = decoder_blocks(self.model)[l - 1]
            self.handles.append(
                block.register_forward_hook(make_steer_hook(self.directions[l], self.coef, self.mode), prepend=True)
            )
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def forward_states(model, ids: torch.Tensor, check_hooks: bool = False):
    """Returns (last [L+1,H], mean [L+1,H], last_raw [H], logits_last [V])."""
    captured = {}

    def raw_hook(module, args, output):
        captured["raw"] = block_output(output)[0].detach().clone()

    per_layer = {}
    blocks = decoder_blocks(model)
    handles = [blocks[-1].register_forward_hook(raw_hook)]
    if check_hooks:
        # independent record of every block output, registered last (sees the final, possibly steered output)
        for i, layer in enumerate(blocks):
            handles.append(
                layer.register_forward_hook(
                    lambda m, a, o, i=i: per_layer.__setitem__(i, block_output(o)[0].detach().clone())
                )
            )
    try:
        out = model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    L = model.config.num_hidden_layers
    assert len(hs) == L + 1, len(hs)
    if check_hooks:
        for l in range(1, L):
            assert torch.equal(hs[l], per_layer[l - 1]), f"hidden_states[{l}] != output of block {l - 1}"
        assert torch.equal(per_layer[L - 1], captured["raw"])
        normed = final_norm(model)(captured["raw"])
        assert torch.equal(normed, hs[L]), "hidden_states[L] != norm(last block output)"
    last = torch.stack([h[0, -1] for h in hs]).float().contiguous()
    mean = torch.stack([h[0].mean(0) for h in hs]).float().contiguous()
    raw = captured["raw"][0, -1].float().contiguous()
    logits = out.logits[0, -1].float().contiguous()
    return last, mean, raw, logits


_ST_DTYPES = {torch.float32: "F32", torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16"}


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None):
    """Byte-deterministic safetensors writer (safetensors' own serializer orders __metadata__ keys via a Rust
    HashMap, so its output bytes differ from run to run).  Tensors in name order, header keys sorted,
    header padded with spaces to a multiple of 8 (as safetensors does).  Read back and checked."""
    from safetensors import safe_open

    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for b in blobs:
            f.write(b)
    with safe_open(tmp, "pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name in tensors:
            assert torch.equal(f.get_tensor(name), tensors[name].detach().cpu()), name
        assert (f.metadata() or {}) == (header.get("__metadata__") or {})
    os.replace(tmp, path)


def make_directions(L: int, H: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(L + 1, H, generator=g, dtype=torch.float32)
    d = d / d.norm(dim=-1, keepdim=True)
    return d.contiguous()


# ----------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------


def build_tiny_model(name: str, spec: dict, out_dir: str):
    family = spec.get("family", "llama")
    cfg_cls, model_cls = model_class(family, 0), model_class(family, 1)

    cfg_kw = dict(spec["config"])
    if "rope_theta" in spec:
        rope = {"rope_type": "default", "rope_theta": spec["rope_theta"]}
        if spec["rope_scaling"]:
            rope = dict(spec["rope_scaling"])
            rope["rope_theta"] = spec["rope_theta"]
        cfg_kw["rope_parameters"] = rope
    cfg = cfg_cls(**cfg_kw)
    torch.manual_seed(spec["seed"])
    model = model_cls(cfg)
    # Explicit init (independent of transformers' init functions): linear/embedding weights N(0, std),
    # biases N(0, std), norm weights U(0.5, 1.5), LayerNorm biases N(0, std); std = initializer_range (0.1; BLOOM 0.2).  Parameters in name order; the norm
    # parameters are those of the RMSNorm / LayerNorm modules (for Llama exactly the names ending in "norm.weight",
    # so the Llama weights are the same as before the other families were added).
    norm_params = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm"):
            norm_params.add(f"{mname}.weight")
    g = torch.Generator().manual_seed(spec["seed"])
    std = cfg_kw["initializer_range"]
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if pname in norm_params:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    if spec["config"]["tie_word_embeddings"]:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    else:
        assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    model = model.to(spec["dtype"])
    os.makedirs(out_dir, exist_ok=True)
    for f in glob.glob(os.path.join(out_dir, "*")):
        os.remove(f)
    model.save_pretrained(out_dir, safe_serialization=True)
    # Add the legacy (transformers 4.x / hub-style) keys next to transformers 5's `rope_parameters`/`dtype`
    # so that both styles of config reader find them.  transformers 5 reads these consistently.
    cpath = os.path.join(out_dir, "config.json")
    with open(cpath) as f:
        c = json.load(f)
    if "rope_theta" in spec:
        c["rope_theta"] = spec["rope_theta"]
        c["rope_scaling"] = dict(spec["rope_scaling"]) if spec["rope_scaling"] else None
    c["torch_dtype"] = str(spec["dtype"]).replace("torch.", "")
    c["dtype"] = c["torch_dtype"]
    with open(cpath, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
        f.write("\n")
    for f in os.listdir(out_dir):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(out_dir, f))
    log(f"  built {rel(out_dir)}: " + ", ".join(f"{f} {os.path.getsize(os.path.join(out_dir, f))} B" for f in sorted(os.listdir(out_dir))))


def check_tiny_config(model, spec):
    if "rope_theta" in spec:
        rp = model.config.rope_parameters
        assert abs(rp["rope_theta"] - spec["rope_theta"]) < 1e-9, rp
        if spec["rope_scaling"]:
            for k, v in spec["rope_scaling"].items():
                assert rp[k] == v, (k, rp)
        else:
            assert rp.get("rope_type", "default") == "default", rp
    for k, v in spec["config"].items():
        if k in ("initializer_range",):
            continue
        assert getattr(model.config, k) == v, (k, getattr(model.config, k), v)
    family = spec.get("family", "llama")
    if family in ("qwen2", "qwen3"):
        attn = decoder_blocks(model)[0].self_attn
        assert attn.head_dim == 16, attn.head_dim
        assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None \
            if family == "qwen2" else attn.q_proj.bias is None, family
        assert attn.o_proj.bias is None
        assert all(lt == "full_attention" for lt in model.config.layer_types), model.config.layer_types
        assert getattr(attn, "sliding_window", None) is None
        if family == "qwen3":
            assert tuple(attn.q_norm.weight.shape) == (16,) and tuple(attn.k_norm.weight.shape) == (16,)
    if family == "bloom":
        n = model.config.n_head
        from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

        hf = _get_alibi_slopes(n, torch.device("cpu")).tolist()
        assert hf == _alibi_slopes_py(n), (hf, _alibi_slopes_py(n))
        assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()


@torch.no_grad()
def bloom_reference_check(model, ids: torch.Tensor, last: torch.Tensor, logits: torch.Tensor):
    """Independent re-implementation of the BLOOM forward (the notes in FAMILY_NOTES["bloom"]), in float64, compared
    with what HF returned: guards the semantics recorded in the JSON."""
    cfg = model.config
    tr = model.transformer
    H, n = cfg.hidden_size, cfg.n_head
    hd = H // n
    eps = cfg.layer_norm_epsilon
    post = cfg.apply_residual_connection_post_layernorm
    d = lambda t: t.detach().double()

    def ln(x, m):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * d(m.weight) + d(m.bias)

    def gelu(x):
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    T = ids.numel()
    slopes = torch.tensor(_alibi_slopes_py(n), dtype=torch.float64)
    pos = torch.arange(T, dtype=torch.float64)
    bias = slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None])  # slope * (j - i)
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    x = ln(d(tr.word_embeddings.weight)[ids], tr.word_embeddings_layernorm)
    hs = [x]
    for blk in tr.h:
        l1 = ln(x, blk.input_layernorm)
        r1 = l1 if post else x
        qkv = l1 @ d(blk.self_attention.query_key_value.weight).T + d(blk.self_attention.query_key_value.bias)
        qkv = qkv.view(T, n, 3, hd)
        q, k, v = qkv[:, :, 0].transpose(0, 1), qkv[:, :, 1].transpose(0, 1), qkv[:, :, 2].transpose(0, 1)
        sc = q @ k.transpose(-1, -2) / (hd ** 0.5) + bias
        sc = sc.masked_fill(causal, float("-inf"))
        ctx = (torch.softmax(sc, -1) @ v).transpose(0, 1).reshape(T, H)
        a = r1 + ctx @ d(blk.self_attention.dense.weight).T + d(blk.self_attention.dense.bias)
        l2 = ln(a, blk.post_attention_layernorm)
        r2 = l2 if post else a
        m = gelu(l2 @ d(blk.mlp.dense_h_to_4h.weight).T + d(blk.mlp.dense_h_to_4h.bias))
        x = r2 + m @ d(blk.mlp.dense_4h_to_h.weight).T + d(blk.mlp.dense_4h_to_h.bias)
        hs.append(x)
    hs[-1] = ln(x, tr.ln_f)
    ref_last = torch.stack([h[-1] for h in hs]).float()
    ref_logits = (hs[-1][-1] @ d(tr.word_embeddings.weight).T).float()
    err = float(((ref_last - last).norm(dim=-1) / ref_last.norm(dim=-1)).max())
    err_l = float((ref_logits - logits).norm() / ref_logits.norm())
    assert err < 1e-5 and err_l < 1e-5, (err, err_l)
    return max(err, err_l)


# ----------------------------------------------------------------------------------------------
# Qwen-chat (first-generation Qwen, `QWenLMHeadModel`): an independent float64 numpy reference
# ----------------------------------------------------------------------------------------------
#
# transformers has no class for Qwen-chat (its modelling code is remote code shipped with the checkpoints), so the
# golden values for it come from this numpy re-implementation, written from the published modeling_qwen.py (the
# Qwen-7B-Chat / Qwen-72B-Chat repositories: QWenAttention, QWenMLP, QWenBlock, QWenModel, RotaryEmbedding, RMSNorm),
# over random weights stored under Qwen-chat's own tensor names, with Qwen-chat's own config keys.  It shares nothing
# with resid's mapping of Qwen-chat onto its Llama path: the MLP is computed as the remote code writes it,
# `c_proj(w1(x) * silu(w2(x)))` with w1/w2 of width `intermediate_size // 2`, and the attention from `c_attn`'s output
# split at `hidden_size`.

QWEN_CHAT_SPECS = {
    # As the released chat models: no_bias true (only c_attn has a bias), untied head, dynamic NTK and log-n on.
    "tiny-qwen-chat": dict(
        config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=192,  # both halves: w1 and w2 are [96, 64]
            num_hidden_layers=3,
            num_attention_heads=4,
            kv_channels=16,
            layer_norm_epsilon=1e-6,
            rotary_emb_base=10000,
            rotary_pct=1.0,
            seq_length=512,
            max_position_embeddings=512,
            no_bias=True,
            tie_word_embeddings=False,
            use_dynamic_ntk=True,
            use_logn_attn=True,
        ),
        std=0.1,
        seed=21,
        steer_layers=[1, 3],
        steer_coef=2.0,
    ),
    # no_bias false: attn.c_proj, mlp.w1, mlp.w2 and mlp.c_proj have biases too (QWenAttention / QWenMLP build them
    # with bias=not config.no_bias); another rotary base and epsilon; 8 heads of 8.
    "tiny-qwen-chat-bias": dict(
        config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=8,
            kv_channels=8,
            layer_norm_epsilon=1e-5,
            rotary_emb_base=50000,
            rotary_pct=1.0,
            seq_length=400,
            max_position_embeddings=400,
            no_bias=False,
            tie_word_embeddings=False,
            use_dynamic_ntk=True,
            use_logn_attn=True,
        ),
        std=0.1,
        seed=22,
        steer_layers=[1, 2],
        steer_coef=2.0,
    ),
}

QWEN_CHAT_NOTES = {
    "reference": "numpy float64 re-implementation of modeling_qwen.py (QWenLMHeadModel remote code), not HF transformers",
    "names": "transformer.wte, transformer.h.{l}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1, mlp.w2, mlp.c_proj}, "
             "transformer.ln_f, lm_head",
    "block": "a = x + c_proj(attn(ln_1(x))); out = a + mlp.c_proj(w1(ln_2(a)) * silu(w2(ln_2(a)))); ln_* are RMSNorm "
             "x * rsqrt(mean(x^2) + layer_norm_epsilon) * weight",
    "mlp_width": "w1, w2: [intermediate_size // 2, hidden]; mlp.c_proj: [hidden, intermediate_size // 2]",
    "attention": "c_attn(x) = [q | k | v] split at hidden_size; heads of hidden_size // num_attention_heads "
                 "(= kv_channels); scores q.k / sqrt(head_dim), causal, softmax; c_proj",
    "biases": "c_attn always; attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj only when no_bias is false",
    "rotary": "inv_freq = 1 / base^(2i/kv_channels), base = rotary_emb_base * ntk_alpha^(d/(d-2)); rotate_half on "
              "the two halves of each head (x1, x2) -> (-x2, x1); q and k",
    "dynamic_ntk_logn": "ntk_alpha = max(2^ceil(log2(T / seq_length) + 1) - 1, 1) and the log-n query scaling "
                        "(positions > seq_length) are both identity for T <= seq_length, the only case covered here",
    "hidden_states": "0 = wte(ids); l = output of block l-1; L = ln_f(output of block L-1)",
}


def qwen_chat_config_json(cfg: dict) -> dict:
    """config.json as the released Qwen-chat checkpoints write it (later, `hidden_size`-style keys)."""
    out = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": True,
        "initializer_range": 0.02,
        "model_type": "qwen",
        "onnx_safe": None,
        "scale_attn_weights": True,
        "softmax_in_fp32": False,
        "tokenizer_class": "QWenTokenizer",
        "torch_dtype": "float32",
        "use_cache": True,
        "use_cache_kernel": False,
        "use_cache_quantization": False,
        "use_flash_attn": "auto",
    }
    out.update(cfg)
    return out


def qwen_chat_weights(spec: dict) -> dict:
    """Random float32 weights under Qwen-chat's names: norms U(0.5, 1.5), everything else N(0, std), drawn in name
    order from numpy's default_rng(seed)."""
    c = spec["config"]
    H, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    proj = c["kv_channels"] * c["num_attention_heads"]
    ff = c["intermediate_size"] // 2
    bias = not c["no_bias"]
    shapes = {"transformer.wte.weight": (V, H), "transformer.ln_f.weight": (H,), "lm_head.weight": (V, H)}
    for l in range(L):
        p = f"transformer.h.{l}."
        shapes[p + "ln_1.weight"] = (H,)
        shapes[p + "ln_2.weight"] = (H,)
        shapes[p + "attn.c_attn.weight"] = (3 * proj, H)
        shapes[p + "attn.c_attn.bias"] = (3 * proj,)
        shapes[p + "attn.c_proj.weight"] = (H, proj)
        shapes[p + "mlp.w1.weight"] = (ff, H)
        shapes[p + "mlp.w2.weight"] = (ff, H)
        shapes[p + "mlp.c_proj.weight"] = (H, ff)
        if bias:
            shapes[p + "attn.c_proj.bias"] = (H,)
            shapes[p + "mlp.w1.bias"] = (ff,)
            shapes[p + "mlp.w2.bias"] = (ff,)
            shapes[p + "mlp.c_proj.bias"] = (H,)
    rng = np.random.default_rng(spec["seed"])
    out = {}
    for name in sorted(shapes):
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "transformer.ln_f.weight":
            out[name] = (rng.random(shapes[name]) + 0.5).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shapes[name]) * spec["std"]).astype(np.float32)
    return out


class QwenChatReference:
    """Qwen-chat's forward pass in float64 numpy, from the remote modelling code."""

    def __init__(self, weights: dict, cfg: dict):
        self.w = {k: v.astype(np.float64) for k, v in weights.items()}
        self.c = cfg
        self.H = cfg["hidden_size"]
        self.n_head = cfg["num_attention_heads"]
        self.L = cfg["num_hidden_layers"]
        # QWenAttention: c_attn's output is split at split_size = hidden_size and each part viewed as
        # [num_heads, hidden_size // num_heads]; the projection is kv_channels * num_heads wide, so the code only
        # works when the two agree.
        assert cfg["kv_channels"] * self.n_head == self.H, "Qwen-chat needs kv_channels * heads == hidden_size"
        assert cfg["rotary_pct"] == 1.0
        self.head_dim = self.H // self.n_head
        self.eps = cfg["layer_norm_epsilon"]
        self.bias = not cfg["no_bias"]

    def rms(self, x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * weight

    def rotary(self, T):
        dim = self.c["kv_channels"]
        seq_length = self.c["seq_length"]
        # QWenModel.get_ntk_alpha(T) at prefill; the decode steps reuse it.
        ntk_alpha = 1.0
        if self.c["use_dynamic_ntk"]:
            ntk_alpha = max(2 ** math.ceil(math.log(T / seq_length, 2) + 1) - 1, 1)
        assert ntk_alpha == 1, "dynamic NTK scaling only acts beyond seq_length (not covered)"
        base = self.c["rotary_emb_base"] * ntk_alpha ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        freqs = np.outer(np.arange(T, dtype=np.float64), inv_freq)
        emb = np.concatenate([freqs, freqs], axis=-1)  # [T, dim]
        return np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]

    @staticmethod
    def rotate_half(x):
        d = x.shape[-1] // 2
        return np.concatenate([-x[..., d:], x[..., :d]], axis=-1)

    def linear(self, x, name):
        y = x @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y if b is None else y + b

    def attention_ctx(self, x, p):
        """hook_z: every head's output before c_proj, [T, heads * head_dim] head-major."""
        T = x.shape[0]
        qkv = self.linear(x, p + "attn.c_attn")
        q, k, v = (qkv[:, i * self.H:(i + 1) * self.H].reshape(T, self.n_head, self.head_dim) for i in range(3))
        cos, sin = self.rotary(T)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        if self.c["use_logn_attn"]:
            assert T <= self.c["seq_length"], "log-n attention scaling acts beyond seq_length (not covered)"
        scores = np.einsum("ihd,jhd->hij", q, k) / math.sqrt(self.head_dim)
        scores = np.where(np.tril(np.ones((T, T), dtype=bool))[None], scores, -np.inf)
        scores = scores - scores.max(-1, keepdims=True)
        wts = np.exp(scores)
        wts = wts / wts.sum(-1, keepdims=True)
        return np.einsum("hij,jhd->ihd", wts, v).reshape(T, self.H)

    def attention(self, x, p):
        return self.linear(self.attention_ctx(x, p), p + "attn.c_proj")

    def mlp(self, x, p):
        a1 = self.linear(x, p + "mlp.w1")
        a2 = self.linear(x, p + "mlp.w2")
        return self.linear(a1 * (a2 / (1.0 + np.exp(-a2))), p + "mlp.c_proj")

    def forward(self, ids, steer=None):
        """Returns (hidden_states list of L+1 [T, H], raw last-block output [T, H], logits [T, V]).
        steer = (directions [L+1, H] float64, layers, coef, mode): block l-1's output is steered for l in layers."""
        x = self.w["transformer.wte.weight"][np.asarray(ids)]
        hs = [x]
        for i in range(self.L):
            p = f"transformer.h.{i}."
            a = x + self.attention(self.rms(x, self.w[p + "ln_1.weight"]), p)
            x = a + self.mlp(self.rms(a, self.w[p + "ln_2.weight"]), p)
            if steer is not None and (i + 1) in steer[1]:
                x = apply_steer_np(x, steer[0][i + 1], steer[2], steer[3])
            hs.append(x)
        raw = hs[-1]
        hs[-1] = self.rms(raw, self.w["transformer.ln_f.weight"])
        logits = hs[-1] @ self.w["lm_head.weight"].T
        return hs, raw, logits

    def greedy(self, ids, n, steer=None):
        """Argmax loop (full recomputation each step), with the top-1 / top-2 logit margins."""
        seq = list(int(t) for t in ids)
        toks, margins = [], []
        for _ in range(n):
            logits = self.forward(seq, steer)[2][-1]
            order = np.argsort(-logits, kind="stable")
            toks.append(int(order[0]))
            margins.append(float(logits[order[0]] - logits[order[1]]))
            seq.append(int(order[0]))
        return toks, margins


def apply_steer_np(h, v, coef, mode):
    """The three steering rules of make_steer_hook, per token row, in float64."""
    if mode == "add":
        return h + coef * v
    if mode == "pw":
        return h + coef * v * np.sign(h @ (coef * v))[:, None]  # RepE piecewise_linear
    if mode == "norm":
        new = h + coef * v
        return new * (np.linalg.norm(h, axis=-1, keepdims=True) / np.linalg.norm(new, axis=-1, keepdims=True))
    raise ValueError(mode)


def do_qwen_chat(name: str, rebuild: bool):
    spec = QWEN_CHAT_SPECS[name]
    cfg = spec["config"]
    mdir = os.path.join(TINY_MODELS_DIR, name)
    wpath = os.path.join(mdir, "model.safetensors")
    if rebuild or not os.path.exists(wpath):
        os.makedirs(mdir, exist_ok=True)
        for f in glob.glob(os.path.join(mdir, "*")):
            os.remove(f)
        weights = qwen_chat_weights(spec)
        save_safetensors({k: torch.from_numpy(v) for k, v in weights.items()}, wpath, metadata={"format": "pt"})
        with open(os.path.join(mdir, "config.json"), "w") as f:
            json.dump(qwen_chat_config_json(cfg), f, indent=2, sort_keys=True)
            f.write("\n")
        log(f"  built {rel(mdir)}: " + ", ".join(f"{f} {os.path.getsize(os.path.join(mdir, f))} B" for f in sorted(os.listdir(mdir))))
    else:
        log(f"  reusing {rel(mdir)} (pass --rebuild-tiny to regenerate the weights)")
    from safetensors.numpy import load_file

    weights = load_file(wpath)
    with open(os.path.join(mdir, "config.json")) as f:
        assert json.load(f) == qwen_chat_config_json(cfg), "config.json differs from the spec (use --rebuild-tiny)"
    ref = QwenChatReference(weights, cfg)
    L, H, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    rng = np.random.default_rng(1000 + spec["seed"])
    prompts = [rng.integers(0, V, n) for n in TINY_PROMPT_LENGTHS]
    assert max(TINY_PROMPT_LENGTHS) + N_GREEDY <= cfg["seq_length"]
    directions = make_directions(L, H, 2000 + spec["seed"])
    d64 = directions.double().numpy()
    layers, coef = spec["steer_layers"], spec["steer_coef"]
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    tensors = {
        "steer.directions": directions,
        "steer.layers": torch.tensor(layers, dtype=torch.long),
        "steer.coef": torch.tensor([coef], dtype=torch.float32),
    }
    lengths, min_margin = [], float("inf")
    for i, ids in enumerate(prompts):
        p = f"p{i}"
        hs, raw, logits = ref.forward(ids)
        g, gm = ref.greedy(ids, N_GREEDY)
        tensors.update({
            f"{p}.ids": torch.from_numpy(ids.astype(np.int64)),
            f"{p}.last": f32([h[-1] for h in hs]),
            f"{p}.mean": f32([h.mean(0) for h in hs]),
            f"{p}.last_raw": f32(raw[-1]),
            f"{p}.logits_last": f32(logits[-1]),
            f"{p}.greedy": torch.tensor(g, dtype=torch.long),
            f"{p}.greedy_margin": f32(gm),
        })
        min_margin = min(min_margin, min(gm))
        for mode in ("add", "pw", "norm"):
            steer = (d64, layers, coef, mode)
            s_hs, _, _ = ref.forward(ids, steer)
            tensors[f"{p}.steer_{mode}.last"] = f32([h[-1] for h in s_hs])
            if mode == "add":
                tensors[f"{p}.steer_add.mean"] = f32([h.mean(0) for h in s_hs])
            if mode in ("add", "pw"):
                sg, sgm = ref.greedy(ids, N_GREEDY, steer)
                tensors[f"{p}.steer_{mode}.greedy"] = torch.tensor(sg, dtype=torch.long)
                tensors[f"{p}.steer_{mode}.greedy_margin"] = f32(sgm)
                min_margin = min(min_margin, min(sgm))
        lengths.append(len(ids))
        log(f"  {name} p{i}: T={len(ids)} greedy {g}")
    log(f"  {name}: smallest greedy top-2 margin {min_margin:.4f}")
    st_path = os.path.join(GOLDEN_DIR, f"{name}.safetensors")
    save_safetensors(tensors, st_path, metadata={"format": "pt", "model": name})
    steer_path = os.path.join(GOLDEN_DIR, f"{name}.steer.safetensors")
    save_safetensors({"directions": directions}, steer_path,
                     metadata={"coef": repr(float(coef)), "layers": ",".join(str(l) for l in layers)})
    meta = {
        "model": name,
        "model_dir": rel(mdir),
        "reference": "numpy float64 (scripts/make_golden.py QwenChatReference), not HF transformers",
        "numpy_version": np.__version__,
        "num_prompts": len(prompts),
        "prompts": [None] * len(prompts),
        "prompt_lengths": lengths,
        "num_greedy": N_GREEDY,
        "num_hidden_layers": L,
        "hidden_size": H,
        "vocab_size": V,
        "steer": {"coef": float(coef), "layers": list(layers), "seed": 2000 + spec["seed"],
                  "modes": {"add": "h + coef*v", "pw": "h + coef*v*sign(<h,coef*v>)",
                            "norm": "(h + coef*v) * ||h|| / ||h + coef*v||"},
                  "applied_to": "output of decoder block l-1 for each l in layers, every position"},
        "greedy": "argmax loop with full recomputation at every step (no KV cache), no EOS stop",
        "min_greedy_margin": min_margin,
        "tensors": sorted(tensors.keys()),
        "weights_dtype": "float32",
        "compute_dtype": "float64",
        "family": "qwen-chat",
        "architecture": "QWenLMHeadModel",
        "semantics": QWEN_CHAT_NOTES,
    }
    json_path = os.path.join(GOLDEN_DIR, f"{name}.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return {"name": name, "lengths": lengths,
            "files": {rel(pth): os.path.getsize(pth) for pth in (st_path, json_path, steer_path, wpath)}}


# ----------------------------------------------------------------------------------------------
# main per-model work
# ----------------------------------------------------------------------------------------------


def run_model(name, model, prompts_ids, prompt_texts, steer_layers, steer_coef, steer_seed, extra_meta,
              tokenizer=None, check_nocache=False):
    import transformers

    L = model.config.num_hidden_layers
    H = model.config.hidden_size
    V = model.config.vocab_size
    directions = make_directions(L, H, steer_seed)
    tensors = {
        "steer.directions": directions,
        "steer.layers": torch.tensor(steer_layers, dtype=torch.long),
        "steer.coef": torch.tensor([steer_coef], dtype=torch.float32),
    }
    summary = []
    decoded = {}
    for i, ids in enumerate(prompts_ids):
        t0 = time.time()
        ids = ids.to(torch.long).contiguous()
        last, mean, raw, logits = forward_states(model, ids, check_hooks=(i == 0 or i == len(prompts_ids) - 1))
        assert last.shape == (L + 1, H) and mean.shape == (L + 1, H) and raw.shape == (H,) and logits.shape == (V,)
        g, gm = greedy(model, ids, N_GREEDY)
        # the first greedy token is the argmax of logits_last
        assert int(g[0]) == int(torch.argmax(logits)), "greedy[0] != argmax(logits_last)"
        if check_nocache:
            g2 = greedy_nocache(model, ids, N_GREEDY)
            if not torch.equal(g, g2):
                log(f"  WARNING {name} p{i}: greedy with cache {g.tolist()} != without cache {g2.tolist()}")
        p = f"p{i}"
        tensors.update({
            f"{p}.ids": ids,
            f"{p}.last": last,
            f"{p}.mean": mean,
            f"{p}.last_raw": raw,
            f"{p}.logits_last": logits,
            f"{p}.greedy": g,
            f"{p}.greedy_margin": gm,
        })
        row = {"i": i, "T": int(ids.numel()), "greedy": g.tolist(), "min_margin": float(gm.min())}
        # steering
        for mode in ("add", "pw", "norm"):
            with Steering(model, directions, steer_layers, steer_coef, mode):
                s_last, s_mean, _, _ = forward_states(model, ids, check_hooks=(i == 0))
                if mode in ("add", "pw"):
                    sg, sgm = greedy(model, ids, N_GREEDY)
            tensors[f"{p}.steer_{mode}.last"] = s_last
            if mode == "add":
                tensors[f"{p}.steer_add.mean"] = s_mean
            if mode in ("add", "pw"):
                tensors[f"{p}.steer_{mode}.greedy"] = sg
                tensors[f"{p}.steer_{mode}.greedy_margin"] = sgm
                row[f"steer_{mode}_greedy"] = sg.tolist()
                row[f"steer_{mode}_changed"] = int((sg != g).sum())
            # sanity: steering at layer l changes hidden_states[l] by exactly the hook's rule (first steered layer)
            l0 = steer_layers[0]
            if mode == "add" and l0 < L:
                assert torch.allclose(s_last[l0] - last[l0], steer_coef * directions[l0], atol=1e-4), "steer_add mismatch"
        if tokenizer is not None:
            decoded[p] = {
                "greedy": tokenizer.decode(row["greedy"]),
                "steer_add": tokenizer.decode(row["steer_add_greedy"]),
                "steer_pw": tokenizer.decode(row["steer_pw_greedy"]),
            }
        row["secs"] = round(time.time() - t0, 2)
        summary.append(row)
        log(f"  {name} p{i}: T={row['T']} greedy changed by steer_add={row['steer_add_changed']}/16 "
            f"steer_pw={row['steer_pw_changed']}/16 min_margin={row['min_margin']:.4f} ({row['secs']}s)")
        if tokenizer is not None:
            for k, v in decoded[p].items():
                log(f"      {k:9s}: {v!r}")

    os.makedirs(GOLDEN_DIR, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    st_path = os.path.join(GOLDEN_DIR, f"{name}.safetensors")
    save_safetensors(tensors, st_path, metadata={"format": "pt", "model": name})
    steer_path = os.path.join(GOLDEN_DIR, f"{name}.steer.safetensors")
    save_safetensors({"directions": directions}, steer_path,
              metadata={"coef": repr(float(steer_coef)), "layers": ",".join(str(l) for l in steer_layers)})

    meta = {
        "model": name,
        "model_dir": rel(extra_meta.pop("model_dir")),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "num_prompts": len(prompts_ids),
        "prompts": prompt_texts,
        "prompt_lengths": [int(x.numel()) for x in prompts_ids],
        "num_greedy": N_GREEDY,
        "num_hidden_layers": L,
        "hidden_size": H,
        "vocab_size": V,
        "steer": {"coef": float(steer_coef), "layers": list(steer_layers), "seed": steer_seed,
                  "modes": {"add": "h + coef*v", "pw": "h + coef*v*sign(<h,coef*v>)",
                            "norm": "(h + coef*v) * ||h|| / ||h + coef*v||"},
                  "applied_to": "output of decoder block l-1 for each l in layers, every position"},
        "tensors": sorted(tensors.keys()),
    }
    if decoded:
        meta["decoded"] = decoded
    meta.update(extra_meta)
    json_path = os.path.join(GOLDEN_DIR, f"{name}.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return {
        "name": name,
        "lengths": [r["T"] for r in summary],
        "files": {rel(pth): os.path.getsize(pth) for pth in (st_path, json_path, steer_path)},
        "rows": summary,
    }


def do_tiny(name, rebuild: bool):
    spec = TINY_SPECS[name]
    mdir = os.path.join(TINY_MODELS_DIR, name)
    if rebuild or not os.path.exists(os.path.join(mdir, "model.safetensors")):
        build_tiny_model(name, spec, mdir)
    else:
        log(f"  reusing {rel(mdir)} (pass --rebuild-tiny to regenerate the weights)")
    family = spec.get("family", "llama")
    model = load_model(mdir, family)
    check_tiny_config(model, spec)
    # prompts: seeded random ids
    g = torch.Generator().manual_seed(1000 + spec["seed"])
    V = spec["config"]["vocab_size"]
    prompts = [torch.randint(0, V, (n,), generator=g, dtype=torch.long) for n in TINY_PROMPT_LENGTHS]
    extra = {"model_dir": mdir, "weights_dtype": str(spec["dtype"]).replace("torch.", ""), "compute_dtype": "float32"}
    if family != "llama":
        # (the committed tiny-llama-* JSON files predate these keys)
        extra["family"] = family
        extra["architecture"] = FAMILY_CLASSES[family][1]
        notes = dict(FAMILY_NOTES[family])
        if family == "bloom":
            notes["alibi_slopes_values"] = _alibi_slopes_py(model.config.n_head)
            notes["head_dim"] = model.config.hidden_size // model.config.n_head
            notes["apply_residual_connection_post_layernorm"] = model.config.apply_residual_connection_post_layernorm
            errs = []
            for p in prompts:
                last, _, _, logits = forward_states(model, p)
                errs.append(bloom_reference_check(model, p, last, logits))
            notes["reference_check_max_rel_err"] = float(f"{max(errs):.3g}")
        extra["semantics"] = notes
    return run_model(name, model, prompts, [None] * len(prompts), spec["steer_layers"], spec["steer_coef"],
                     steer_seed=2000 + spec["seed"], extra_meta=extra, check_nocache=True)


def find_gguf(explicit: str | None):
    if explicit:
        return explicit
    cands = sorted(glob.glob(os.path.join(REPO, "models", "**", "*.gguf"), recursive=True))
    cands += sorted(glob.glob(os.path.join(REPO, "models", ".cache", "**", "*.gguf"), recursive=True))
    cands = [c for c in cands if "SmolLM2-135M" in os.path.basename(c)]
    return cands[0] if cands else None


def crosscheck_gguf(model_dir: str, gguf_path: str, strings: list[str]) -> dict:
    """(a) HF's own GGUF loader vs our model.safetensors; (b) HF's GGUF tokenizer vs our tokenizer.json."""
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = {"gguf": rel(gguf_path)}
    gdir, gfile = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    log(f"  cross-check: loading {rel(gguf_path)} with transformers' GGUF loader ...")
    try:
        hf = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
    except TypeError:
        hf = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, torch_dtype=torch.float32)
    sd_hf = {k: v.detach().float() for k, v in hf.state_dict().items()}
    ours = {}
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        for k in f.keys():
            ours[k] = f.get_tensor(k)
    only_hf = sorted(set(sd_hf) - set(ours))
    only_ours = sorted(set(ours) - set(sd_hf))
    # a tied lm_head is legitimately absent from a safetensors file
    if only_hf == ["lm_head.weight"] and torch.equal(sd_hf["lm_head.weight"], sd_hf["model.embed_tokens.weight"]):
        res["lm_head"] = "tied (absent from ours; HF's equals embed_tokens)"
        only_hf = []
    res["keys_only_in_hf_gguf"] = only_hf
    res["keys_only_in_ours"] = only_ours
    diffs = {}
    dtypes = set()
    for k in sorted(set(sd_hf) & set(ours)):
        a, b = sd_hf[k], ours[k]
        dtypes.add(str(b.dtype))
        if a.shape != b.shape:
            diffs[k] = f"shape {tuple(a.shape)} vs ours {tuple(b.shape)}"
            continue
        d = float((a - b.float()).abs().max())
        if d != 0.0:
            diffs[k] = d
    res["our_dtypes"] = sorted(dtypes)
    res["tensors_compared"] = len(set(sd_hf) & set(ours))
    res["tensors_differing"] = diffs
    res["max_abs_diff"] = max([v for v in diffs.values() if isinstance(v, float)], default=0.0)
    # config comparison
    with open(os.path.join(model_dir, "config.json")) as f:
        ours_cfg = json.load(f)
    cfg_diff = {}
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings",
              "bos_token_id", "eos_token_id", "head_dim"):
        hv = getattr(hf.config, k, None)
        ov = ours_cfg.get(k)
        if hv != ov:
            cfg_diff[k] = {"hf_gguf": hv, "ours": ov}
    hf_theta = hf.config.rope_parameters.get("rope_theta") if getattr(hf.config, "rope_parameters", None) else None
    our_theta = ours_cfg.get("rope_theta") or (ours_cfg.get("rope_parameters") or {}).get("rope_theta")
    if hf_theta != our_theta:
        cfg_diff["rope_theta"] = {"hf_gguf": hf_theta, "ours": our_theta}
    res["config_differences"] = cfg_diff
    del hf, sd_hf

    # (b) tokenizer
    tk_gguf = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
    tk_json = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tk_auto = AutoTokenizer.from_pretrained(model_dir)
    mism = []
    for s in strings:
        a = tk_gguf(s)["input_ids"]
        b = tk_json.encode(s).ids
        c = tk_auto(s)["input_ids"]
        if not (a == b == c):
            mism.append({"text": s, "hf_gguf": a, "tokenizer_json": b, "auto_from_dir": c})
    res["tokenizer_strings"] = len(strings)
    res["tokenizer_mismatches"] = mism
    res["gguf_tokenizer_has_chat_template"] = bool(getattr(tk_gguf, "chat_template", None))
    try:
        res["gguf_chat_rendered"] = tk_gguf.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # pragma: no cover
        res["gguf_chat_rendered"] = f"ERROR: {e}"
    return res


def smollm2_present() -> bool:
    """Whether models/smollm2-135m is fetched; logs that the fixture is skipped when not."""
    if os.path.exists(os.path.join(SMOLLM2_DIR, "model.safetensors")):
        return True
    log(f"  WARNING: {rel(SMOLLM2_DIR)}/model.safetensors missing (run scripts/fetch-model.sh smollm2-135m); skipping")
    return False


def load_smollm2():
    """(tokenizer, model) of SmolLM2-135M, or None (logged) when it is not fetched."""
    from transformers import AutoTokenizer

    if not smollm2_present():
        return None
    return AutoTokenizer.from_pretrained(SMOLLM2_DIR), load_model(SMOLLM2_DIR)


def do_smollm2(gguf_arg, check_gguf: bool, coef: float):
    from transformers import AutoTokenizer

    if not smollm2_present():
        return None
    tok = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    chat_rendered = None
    chat_source = None
    if getattr(tok, "chat_template", None):
        chat_rendered = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
        chat_source = "model_dir"
    gguf_path = find_gguf(gguf_arg)
    checks = None
    if check_gguf:
        if gguf_path is None:
            log("  WARNING: no SmolLM2 .gguf found under models/; skipping the GGUF cross-check")
        else:
            checks = crosscheck_gguf(SMOLLM2_DIR, gguf_path,
                                     TOKENIZER_CASES + ([chat_rendered] if chat_rendered else []) + SMOLLM2_PROMPTS)
            if chat_rendered is None and isinstance(checks.get("gguf_chat_rendered"), str) \
                    and not checks["gguf_chat_rendered"].startswith("ERROR"):
                chat_rendered = checks["gguf_chat_rendered"]
                chat_source = "gguf (model dir tokenizer has no chat template)"
            elif chat_rendered is not None and checks.get("gguf_chat_rendered") != chat_rendered:
                checks["chat_rendered_mismatch"] = True
            log("  cross-check: " + json.dumps({k: v for k, v in checks.items() if k != "tokenizer_mismatches"},
                                               ensure_ascii=False)[:3000])
            log(f"  cross-check: tokenizer mismatches: {len(checks['tokenizer_mismatches'])}")
            for m in checks["tokenizer_mismatches"]:
                log(f"    {m!r}")
    cases = list(TOKENIZER_CASES)
    if chat_rendered is not None:
        cases.append(chat_rendered)
    tokenizer_cases = [{"text": s, "ids": tok(s)["input_ids"]} for s in cases]

    model = load_model(SMOLLM2_DIR)
    prompts = [torch.tensor(tok(s)["input_ids"], dtype=torch.long) for s in SMOLLM2_PROMPTS]
    assert prompts[0].numel() == 1, f"p0 {SMOLLM2_PROMPTS[0]!r} is not a single token: {prompts[0].tolist()}"
    assert prompts[-1].numel() >= 300, prompts[-1].numel()
    assert all(p.numel() >= 1 for p in prompts)
    extra = {"model_dir": SMOLLM2_DIR, "weights_dtype": "float32", "compute_dtype": "float32",
             "tokenizer_cases": tokenizer_cases, "chat_messages": CHAT_MESSAGES,
             "chat_rendered": chat_rendered, "chat_rendered_source": chat_source}
    if checks is not None:
        extra["gguf_crosscheck"] = checks
    return run_model("smollm2-135m", model, prompts, list(SMOLLM2_PROMPTS), SMOLLM2_STEER_LAYERS, coef,
                     steer_seed=3000, extra_meta=extra, tokenizer=tok)


RECOGNITION_NAME = "recognition-smollm2"
RECOGNITION_CONCEPTS = ["morality", "deontology", "utilitarianism", "fairness", "truthfulness", "toxicity", "harmfulness"]
RECOGNITION_LANGS = ["en", "fr"]
RECOGNITION_SEED = 2024


def recognition_stimulus(concept: str, entry: dict, text: str) -> str:
    """The paper's stimulus construction, written here from its description (not from resid)."""
    if concept == "deontology":
        return entry["scenario"] + " " + text
    if concept == "truthfulness":
        return "Question: " + entry["question"] + " Answer: " + text
    return text


@torch.no_grad()
def do_recognition():
    """Mean-diff recognition accuracies per layer computed from HF hidden states, on a split this
    script draws itself (numpy) and writes as JSONL, so that resid's `recognize --train --test`
    reads exactly the same pairs."""
    loaded = load_smollm2()
    if loaded is None:
        return None
    tok, model = loaded
    out_dir = os.path.join(GOLDEN_DIR, RECOGNITION_NAME)
    os.makedirs(out_dir, exist_ok=True)
    n_layers = model.config.num_hidden_layers

    def last_token_states(text: str) -> np.ndarray:
        ids = torch.tensor([tok(text)["input_ids"]], dtype=torch.long)
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        # HF indexing: hidden_states[l] for l = 1..L (index L is after the final norm).
        return np.stack([hs[l][0, -1].double().numpy() for l in range(1, n_layers + 1)])

    cases = []
    files = {}
    lengths = []
    for concept in RECOGNITION_CONCEPTS:
        for lang in RECOGNITION_LANGS:
            src = os.path.join(REPO, "data", "values", concept, f"{concept}_{lang}.json")
            with open(src, encoding="utf-8") as f:
                groups = json.load(f)
            entries = [(g, i, e) for g, items in groups.items() for i, e in items.items()]
            entries = [x for x in entries if x[2]["pos"] != x[2]["neg"]]
            perm = np.random.default_rng(RECOGNITION_SEED).permutation(len(entries))
            n_train = int(0.8 * len(entries))
            split = {"train": [entries[k] for k in perm[:n_train]], "test": [entries[k] for k in perm[n_train:]]}
            reps = {}
            for part, items in split.items():
                path = os.path.join(out_dir, f"{concept}_{lang}.{part}.jsonl")
                with open(path, "w", encoding="utf-8") as f:
                    for g, i, e in items:
                        f.write(json.dumps({"id": f"{g}/{i}", **e}, ensure_ascii=False) + "\n")
                files[rel(path)] = os.path.getsize(path)
                pos, neg = [], []
                for _, _, e in items:
                    sp = recognition_stimulus(concept, e, e["pos"])
                    sn = recognition_stimulus(concept, e, e["neg"])
                    lengths.append(len(tok(sp)["input_ids"]))
                    pos.append(last_token_states(sp))
                    neg.append(last_token_states(sn))
                reps[part] = (np.stack(pos), np.stack(neg))  # [pairs, L, hidden]
            (tp, tn), (sp_, sn_) = reps["train"], reps["test"]
            acc, margins_min = [], []
            for l in range(n_layers):
                d = (tp[:, l] - tn[:, l]).mean(axis=0)
                d = d / np.linalg.norm(d)
                train_margin = (tp[:, l] - tn[:, l]) @ d
                sign = -1.0 if (train_margin < 0).sum() > (train_margin > 0).sum() else 1.0
                margin = sign * ((sp_[:, l] - sn_[:, l]) @ d)
                acc.append(float((margin >= 0).mean()))
                margins_min.append(float(np.abs(margin).min() / np.abs(sign * train_margin).mean()))
            best = int(np.argmax(acc))
            cases.append({"concept": concept, "lang": lang, "n_train": len(split["train"]), "n_test": len(split["test"]),
                          "accuracy": acc, "best_layer": best + 1, "best_accuracy": acc[best],
                          "closest_test_margin_rel": margins_min})
            log(f"  {concept}_{lang}: train {len(split['train'])}, test {len(split['test'])}, best {acc[best]:.3f} @ {best + 1}, "
                f"mean {np.mean(acc):.3f}, closest relative margin {min(margins_min):.2e}")
    meta = {"name": RECOGNITION_NAME, "model_dir": rel(SMOLLM2_DIR), "method": "mean-diff", "template": "{input}",
            "split": f"numpy default_rng({RECOGNITION_SEED}).permutation over the non-identical pairs; first int(0.8 n) train",
            "direction": "unit(mean over train pairs of pos - neg), float64 from float32 hidden states; sign by train-pair majority (ties +)",
            "accuracy": "fraction of test pairs with <pos - neg, signed direction> >= 0",
            "hidden_states": "HF output_hidden_states[l][0, -1], l = 1..L, one sequence at a time, float32",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "cases": cases}
    path = os.path.join(GOLDEN_DIR, f"{RECOGNITION_NAME}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    files[rel(path)] = os.path.getsize(path)
    return {"name": RECOGNITION_NAME, "lengths": lengths, "files": files}


# ----------------------------------------------------------------------------------------------
# The study's aggregate numbers (cross-lingual matrix, transfer, consistency, PCA, control)
# ----------------------------------------------------------------------------------------------
#
# Written from the study's definitions in README.md ("The multilingual value-concept study"), not from resid's
# Rust code.  What this script must share with resid to compare numbers at all is the *draw*: which pairs
# are train and test, and the random signs PCA gives the pair differences.  Both come from the generator the
# README names (SplitMix64, Steele, Lea & Flood 2014, with its published constants; labels mixed in by
# FNV-1a 64), implemented here from those published definitions.  Everything computed from the draws
# (directions by SVD, signs, accuracies, matrices, best layer, ratios, group means, cosines, steered
# generation through forward hooks, scores, NLLs) is plain numpy/torch over HF's own hidden states.

STUDY_NAME = "study-smollm2"
STUDY_CONCEPTS = ["morality", "utilitarianism"]
STUDY_LANGS = ["en", "es", "id", "sw"]
STUDY_HIGH = ["en", "fr", "zh", "es", "pt", "ja"]  # README: high resource, the rest low
STUDY_METHODS = ["mean-diff", "pca"]
STUDY_SEED = 0
STUDY_CONTROL = {"sources": ["en"], "radius": 2, "prompts": 2, "coefs": [-2.0, 0.0, 2.0], "max_new_tokens": 8}
_M64 = (1 << 64) - 1


class SplitMix64Ref:
    def __init__(self, seed: int):
        self.state = seed & _M64

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)


def fnv1a_seed(seed: int, label: str) -> int:
    h = 0xCBF29CE484222325
    for b in label.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & _M64
    return SplitMix64Ref(seed ^ h).next_u64()


def natural_key(s: str):
    """README: keys sorted naturally (numeric ids numerically, before any other id, which sort by bytes)."""
    if s and len(s) < 20 and s.isascii() and s.isdigit():
        return (0, int(s), s.encode())
    return (1, 0, s.encode())


def study_split(keys: list, seed: int):
    """Sorted keys, Fisher-Yates (from the end, j = next_u64 mod (i+1)), first round(0.8 n) train."""
    keys = sorted(set(keys), key=lambda k: (natural_key(k[0]), natural_key(k[1])))
    rng = SplitMix64Ref(seed)
    for i in range(len(keys) - 1, 0, -1):
        j = rng.next_u64() % (i + 1)
        keys[i], keys[j] = keys[j], keys[i]
    n_train = min(max(int(math.floor(0.8 * len(keys) + 0.5)), 1), len(keys) - 1)
    return set(keys[:n_train])


def study_direction(method: str, dp: np.ndarray, seed: int, layer: int) -> np.ndarray:
    """Unsigned unit direction from the train differences dp = pos - neg [n, H] at one layer."""
    if method == "mean-diff":
        d = dp.mean(axis=0)
    else:
        # RepE-style random order per pair: difference times a random sign (bit 0 of the stream), then the
        # first principal component of the centred differences (SVD, not power iteration).
        rng = SplitMix64Ref(fnv1a_seed(seed, f"pca/{layer}"))
        s = np.array([-1.0 if rng.next_u64() & 1 else 1.0 for _ in range(len(dp))])
        x = dp * s[:, None]
        x = x - x.mean(axis=0)
        _, sv, vt = np.linalg.svd(x, full_matrices=False)
        d = vt[0]
    return d / np.linalg.norm(d)


def fit_concept(method: str, tr_pos, tr_neg, seed: int):
    """Signed unit directions [L, H], train accuracy [L], scale [L], eigengap [L] (pca; NaN otherwise)."""
    L = tr_pos.shape[1]
    dirs, tacc, scale, ties = [], [], [], []
    for l in range(L):
        dp = tr_pos[:, l] - tr_neg[:, l]
        u = study_direction(method, dp, seed, l + 1)
        m = dp @ u
        # README: the sign under which more train pairs project their positive side higher; a tied vote goes by
        # the sign of the summed separation.
        ties.append(int((m < 0).sum() == (m > 0).sum()))
        if (m < 0).sum() > (m > 0).sum() or ((m < 0).sum() == (m > 0).sum() and m.sum() < 0):
            u, m = -u, -m
        dirs.append(u)
        tacc.append(float((m >= 0).mean()))
        scale.append(float(np.abs(m).mean()))
    return np.stack(dirs), tacc, scale, ties


def test_margins(u: np.ndarray, te_pos, te_neg, layer0: int):
    return (te_pos[:, layer0] - te_neg[:, layer0]) @ u


def first_max(xs):
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def transfer_summary(rel, langs):
    high = [l in STUDY_HIGH for l in langs]
    out = {}
    for name, src, dst in [("high_to_low", True, False), ("low_to_high", False, True),
                           ("high_to_high", True, True), ("low_to_low", False, False)]:
        vals = [rel[a][b] for a in range(len(langs)) for b in range(len(langs))
                if a != b and high[a] == src and high[b] == dst and np.isfinite(rel[a][b])]
        out[name] = float(np.mean(vals)) if vals else None
        out[name + "_count"] = len(vals)
    return out


@torch.no_grad()
def study_hf_generate(model, ids: list, steer: dict, coef: float, n: int, stops: set):
    """Greedy continuation with `coef * steer[l]` added to the output of block l-1 at every position
    (prompt and generated), stopping after a stop token. Returns (tokens, top-2 margins)."""
    hooks = []
    if coef != 0.0:
        for l, v in steer.items():
            hooks.append(decoder_blocks(model)[l - 1].register_forward_hook(
                make_steer_hook(torch.tensor(v, dtype=torch.float32), coef, "add"), prepend=True))
    try:
        toks, margins = greedy(model, torch.tensor(ids, dtype=torch.long), n)
    finally:
        for h in hooks:
            h.remove()
    toks, margins = toks.tolist(), margins.tolist()
    for i, t in enumerate(toks):
        if t in stops:
            return toks[: i + 1], margins[: i + 1]
    return toks, margins


@torch.no_grad()
def do_study_reference():
    """The study's aggregate numbers computed from HF hidden states (see the section comment)."""
    loaded = load_smollm2()
    if loaded is None:
        return None
    tok, model = loaded
    L = model.config.num_hidden_layers
    states = {}

    def last_states(text: str) -> np.ndarray:
        if text not in states:
            ids = torch.tensor([tok(text)["input_ids"]], dtype=torch.long)
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            states[text] = np.stack([hs[l][0, -1].double().numpy() for l in range(1, L + 1)])
        return states[text]

    def r(x, digits=9):
        return None if x is None or not np.isfinite(x) else float(f"{x:.{digits}g}")

    concepts_out, vec_tensors, lengths = [], {}, []
    control_tasks = []
    for concept in STUDY_CONCEPTS:
        per_lang = []
        for lang in STUDY_LANGS:
            with open(os.path.join(REPO, "data", "values", concept, f"{concept}_{lang}.json"), encoding="utf-8") as f:
                groups = json.load(f)
            entries = {(g, i): e for g, items in groups.items() for i, e in items.items()}
            train_keys = study_split(list(entries), STUDY_SEED)
            order = sorted(entries, key=lambda k: (natural_key(k[0]), natural_key(k[1])))
            split = {"train": [k for k in order if k in train_keys], "test": [k for k in order if k not in train_keys]}
            split = {p: [k for k in ks if entries[k]["pos"] != entries[k]["neg"]] for p, ks in split.items()}
            reps = {}
            for part, ks in split.items():
                pos = [recognition_stimulus(concept, entries[k], entries[k]["pos"]) for k in ks]
                neg = [recognition_stimulus(concept, entries[k], entries[k]["neg"]) for k in ks]
                lengths.extend(len(tok(t)["input_ids"]) for t in pos + neg)
                reps[part] = (np.stack([last_states(t) for t in pos]), np.stack([last_states(t) for t in neg]))
            per_lang.append({"lang": lang, "split": split, "reps": reps, "entries": entries})
        k = len(STUDY_LANGS)
        methods_out = {}
        for method in STUDY_METHODS:
            fits = []
            for pl in per_lang:
                seed = fnv1a_seed(STUDY_SEED, f"{method}/{concept}/{pl['lang']}")
                dirs, tacc, scale, ties = fit_concept(method, *pl["reps"]["train"], seed)
                fits.append({"dirs": dirs, "train_accuracy": tacc, "scale": scale, "sign_vote_tied": ties})
            cross = np.zeros((L, k, k))
            cross_margin = np.zeros((L, k, k))  # closest test pair to a tie, relative to the source's scale
            for l in range(L):
                for a in range(k):
                    for b in range(k):
                        m = test_margins(fits[a]["dirs"][l], *per_lang[b]["reps"]["test"], l)
                        cross[l, a, b] = (m >= 0).mean()
                        cross_margin[l, a, b] = np.abs(m).min() / fits[a]["scale"][l]
            diag_mean = [float(np.mean([cross[l, a, a] for a in range(k)])) for l in range(L)]
            best = first_max(diag_mean)
            at_best = cross[best]
            relt = [[at_best[a][b] / at_best[b][b] if at_best[b][b] > 0 else float("nan") for b in range(k)] for a in range(k)]
            cos = np.einsum("lah,lbh->lab", np.stack([f["dirs"] for f in fits], axis=1), np.stack([f["dirs"] for f in fits], axis=1))
            cos_mean = cos.mean(axis=0)
            langs_out = []
            for a, (pl, fit) in enumerate(zip(per_lang, fits)):
                own = [float(cross[l, a, a]) for l in range(L)]
                b_own = first_max(own)
                langs_out.append({
                    "lang": pl["lang"], "accuracy": own, "best_layer": b_own + 1, "best_accuracy": own[b_own],
                    "train_accuracy": fit["train_accuracy"], "scale": [r(x) for x in fit["scale"]],
                    "sign_vote_tied_layers": [l + 1 for l, t in enumerate(fit["sign_vote_tied"]) if t],
                })
                vec_tensors[f"{concept}.{method}.{pl['lang']}"] = torch.tensor(fit["dirs"][best] * fit["scale"][best], dtype=torch.float32)
            methods_out[method] = {
                "languages": langs_out,
                "best_layer": best + 1,
                "best_layer_mean_accuracy": diag_mean[best],
                "crosslingual_by_layer": cross.tolist(),
                "crosslingual_closest_margin_rel": [[[r(x, 3) for x in row] for row in m] for m in cross_margin],
                "transfer_relative": [[r(x, 17) for x in row] for row in relt],
                "transfer_summary": transfer_summary(relt, STUDY_LANGS),
                "cosine_by_layer_upper": [[r(cos[l, a, b]) for a in range(k) for b in range(a + 1, k)] for l in range(L)],
                "cosine_mean_over_layers": [[r(x) for x in row] for row in cos_mean],
                "cosine_mean_off_diagonal": r(float(np.mean([cos_mean[a, b] for a in range(k) for b in range(a + 1, k)]))),
            }
            if method == "mean-diff":
                control_tasks.append((concept, per_lang, fits, best + 1))
            log(f"  {concept} {method}: best layer {best + 1} (mean own accuracy {diag_mean[best]:.3f}), "
                f"cosine off-diagonal {methods_out[method]['cosine_mean_off_diagonal']:.3f}, "
                f"closest cross margin {cross_margin.min():.2e}, transfer {methods_out[method]['transfer_summary']}")
        concepts_out.append({
            "concept": concept, "langs": STUDY_LANGS,
            "split": {pl["lang"]: {p: [f"{g}/{i}" for g, i in ks] for p, ks in pl["split"].items()} for pl in per_lang},
            "methods": methods_out,
        })

    # Control (primary method mean-diff): steer with the source's vector (unit direction times its scale, at the
    # concept's best layer +- radius), continue the target's first test pairs' negative stimuli greedily, score
    # the unsteered last-token state of prompt + generation (stop token removed) on the target's direction at the
    # best layer, and the mean NLL of the generated tokens (unsteered).
    stops = {int(model.config.eos_token_id)}
    with open(os.path.join(SMOLLM2_DIR, "generation_config.json"), encoding="utf-8") as f:
        ge = json.load(f).get("eos_token_id")
    stops |= set(ge if isinstance(ge, list) else [ge]) - {None}
    if tok.eos_token_id is not None:
        stops.add(int(tok.eos_token_id))
    c = STUDY_CONTROL
    rows, gens = [], []
    for concept, per_lang, fits, best in control_tasks:
        layers = list(range(max(best - c["radius"], 1), min(best + c["radius"], L) + 1))
        for source in c["sources"]:
            si = STUDY_LANGS.index(source)
            steer = {l: fits[si]["dirs"][l - 1] * fits[si]["scale"][l - 1] for l in layers}
            for ti, target in enumerate(STUDY_LANGS):
                pl = per_lang[ti]
                u = fits[ti]["dirs"][best - 1]
                per_coef = []
                for coef in c["coefs"]:
                    scores, nlls, lens = [], [], []
                    for key in pl["split"]["test"][: c["prompts"]]:
                        e = pl["entries"][key]
                        prompt = recognition_stimulus(concept, e, e["neg"])
                        ids = tok(prompt)["input_ids"]
                        toks, margins = study_hf_generate(model, ids, steer, coef, c["max_new_tokens"], stops)
                        body = toks[:-1] if toks and toks[-1] in stops else toks
                        full = torch.tensor([ids + body], dtype=torch.long)
                        out = model(input_ids=full, output_hidden_states=True)
                        score = float(out.hidden_states[best][0, -1].double().numpy() @ u)
                        lp = torch.log_softmax(out.logits[0].double(), dim=-1)
                        nll = float(-np.mean([lp[len(ids) + j - 1, t].item() for j, t in enumerate(body)])) if body else None
                        scores.append(score)
                        nlls.append(nll)
                        lens.append(len(body))
                        gens.append({"concept": concept, "source": source, "target": target, "coef": coef,
                                     "prompt_id": f"{key[0]}/{key[1]}", "tokens": toks,
                                     "min_margin": r(min(margins), 4), "score": r(score, 12), "nll": r(nll, 12)})
                    per_coef.append((coef, scores, nlls, lens))
                base = next(p for p in per_coef if p[0] == 0.0)
                base_score, base_nll = np.mean(base[1]), np.mean([x for x in base[2] if x is not None])
                for coef, scores, nlls, lens in per_coef:
                    nll_mean = np.mean([x for x in nlls if x is not None])
                    shift = float(np.mean(scores) - base_score)
                    rows.append({"concept": concept, "source": source, "target": target, "coef": coef, "layers": layers,
                                 "score_layer": best, "prompts": len(scores), "score_mean": r(float(np.mean(scores)), 12),
                                 "shift": r(shift, 12), "shift_rel": r(shift / fits[ti]["scale"][best - 1], 12),
                                 "nll_mean": r(float(nll_mean), 12), "nll_delta": r(float(nll_mean - base_nll), 12),
                                 "mean_generated_tokens": float(np.mean(lens))})
                log(f"  control {concept} {source}->{target} layers {layers}: shift_rel "
                    + ", ".join(f"{x['coef']:+g}: {x['shift_rel']:+.3f}" for x in rows[-len(per_coef):]))

    meta = {"name": STUDY_NAME, "model_dir": rel(SMOLLM2_DIR), "data": "data/values", "template": "{input}",
            "seed": STUDY_SEED, "concepts": STUDY_CONCEPTS, "langs": STUDY_LANGS, "high": STUDY_HIGH,
            "methods": STUDY_METHODS, "control": STUDY_CONTROL,
            "definitions": "README.md, 'The multilingual value-concept study'; SplitMix64/FNV-1a draws only shared with resid; "
                           "directions by numpy SVD/mean over HF output_hidden_states[l][0, -1] (float64 from float32)",
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "concepts_out": concepts_out, "control_rows": rows, "control_generations": gens}
    path = os.path.join(GOLDEN_DIR, f"{STUDY_NAME}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, separators=(",", ":"))
        f.write("\n")
    vpath = os.path.join(GOLDEN_DIR, f"{STUDY_NAME}.vectors.safetensors")
    save_safetensors(vec_tensors, vpath, {"layout": "concept.method.lang: the file row (signed unit direction times scale) at the method's best layer"})
    return {"name": STUDY_NAME, "lengths": lengths, "files": {rel(p): os.path.getsize(p) for p in (path, vpath)}}


# ----------------------------------------------------------------------------------------------
# GGUF control vectors written by gguf-py, the way repeng writes them
# ----------------------------------------------------------------------------------------------
#
# repeng's ControlVector.export_gguf (vgel/repeng, repeng/extract.py):
#     writer = gguf.GGUFWriter(path, "controlvector")
#     writer.add_string("controlvector.model_hint", model_type)
#     writer.add_uint32("controlvector.layer_count", len(directions))
#     for layer in directions: writer.add_tensor(f"direction.{layer}", directions[layer])
#     writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
# with `directions` keyed by repeng's layer ids, by default range(-1, -num_hidden_layers, -1) normalised to
# L-1, L-2, ..., 1 (that order), and ControlModel adds coef * directions[k] to the output of decoder block k
# (model.model.layers[k]) at every position.  The hooks below do exactly that, by block index, independently of
# resid's row convention.

GGUF_NAME = "gguf-repeng"
GGUF_MODEL = "tiny-llama-gqa"
GGUF_COEFS = [1.0, -1.5]


def write_repeng_gguf(path: str, directions: dict, model_type: str):
    import gguf

    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_other_gguf(path: str, directions: dict):
    """Also from gguf-py, exercising what repeng's files do not: f16 tensors, a 64-byte general.alignment and
    metadata values of other types (array, float, bool, signed and 64-bit integers) before the tensor infos."""
    import gguf

    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_custom_alignment(64)
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(directions))
    writer.add_array("resid.test.strings", ["a", "bc", ""])
    writer.add_array("resid.test.ints", [1, 2, 3])
    writer.add_float32("resid.test.f32", 0.25)
    writer.add_float64("resid.test.f64", -1.5)
    writer.add_bool("resid.test.bool", True)
    writer.add_int32("resid.test.i32", -7)
    writer.add_uint64("resid.test.u64", 1 << 40)
    for layer in directions.keys():
        writer.add_tensor(f"direction.{layer}", directions[layer].astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@torch.no_grad()
def do_gguf():
    from transformers import DynamicCache  # noqa: F401  (greedy() needs it)

    spec = TINY_SPECS[GGUF_MODEL]
    mdir = os.path.join(TINY_MODELS_DIR, GGUF_MODEL)
    model = load_model(mdir, spec.get("family", "llama"))
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    rng = np.random.default_rng(4242)
    # repeng's default layer ids, in its order; rows of norm 3 (comparable to the other fixtures' steering)
    layer_ids = [i if i >= 0 else L + i for i in range(-1, -L, -1)]
    directions = {}
    for k in layer_ids:
        v = rng.standard_normal(H)
        directions[k] = (3.0 * v / np.linalg.norm(v)).astype(np.float32)
    gpath = os.path.join(GOLDEN_DIR, f"{GGUF_NAME}.gguf")
    write_repeng_gguf(gpath, directions, model.config.model_type)
    other = {1: (rng.standard_normal(H) * 0.5).astype(np.float32)}
    opath = os.path.join(GOLDEN_DIR, f"{GGUF_NAME}-f16-align64.gguf")
    write_other_gguf(opath, other)
    # read both back with gguf-py's own reader
    import gguf

    for path, dirs, dt in ((gpath, directions, np.float32), (opath, other, np.float16)):
        r = gguf.GGUFReader(path)
        got = {t.name: np.array(t.data) for t in r.tensors}
        assert sorted(got) == sorted(f"direction.{k}" for k in dirs), got.keys()
        for k, v in dirs.items():
            assert got[f"direction.{k}"].dtype == dt and np.array_equal(got[f"direction.{k}"], v.astype(dt)), k
    # The same vector in resid's safetensors layout: [L+1, H], row k+1 = direction.k (block k's output is
    # hidden-state index k+1), other rows zero.
    rows = torch.zeros(L + 1, H, dtype=torch.float32)
    for k, v in directions.items():
        rows[k + 1] = torch.from_numpy(v)
    spath = os.path.join(GOLDEN_DIR, f"{GGUF_NAME}.steer.safetensors")
    save_safetensors({"directions": rows}, spath, metadata={"source": f"{GGUF_NAME}.gguf, row k+1 = direction.k"})

    # HF hidden states with repeng's steering: coef * directions[k] added to the output of block k.
    g = torch.Generator().manual_seed(1000 + spec["seed"])
    prompts = [torch.randint(0, spec["config"]["vocab_size"], (n,), generator=g, dtype=torch.long) for n in TINY_PROMPT_LENGTHS]
    tensors = {}
    blocks = decoder_blocks(model)
    for ci, coef in enumerate(GGUF_COEFS):
        def hook_for(v):
            vt = torch.from_numpy(v)

            def hook(module, args, output):
                h, rebuild = block_output(output)
                return rebuild(h + coef * vt)

            return hook

        handles = [blocks[k].register_forward_hook(hook_for(v), prepend=True) for k, v in directions.items()]
        try:
            for i, ids in enumerate(prompts):
                last, _, _, _ = forward_states(model, ids)
                tensors[f"c{ci}.p{i}.last"] = last
                if ci == 0:
                    gt, gm = greedy(model, ids, N_GREEDY)
                    tensors[f"c{ci}.p{i}.greedy"] = gt
                    tensors[f"c{ci}.p{i}.greedy_margin"] = gm
        finally:
            for h in handles:
                h.remove()
    for i, ids in enumerate(prompts):
        tensors[f"p{i}.ids"] = ids
    tpath = os.path.join(GOLDEN_DIR, f"{GGUF_NAME}.safetensors")
    save_safetensors(tensors, tpath, metadata={"format": "pt", "model": GGUF_MODEL})
    meta = {
        "name": GGUF_NAME,
        "model_dir": rel(mdir),
        "writer": f"gguf-py {getattr(gguf, '__version__', '')}".strip() + " GGUFWriter, as repeng's ControlVector.export_gguf",
        "files": {
            f"{GGUF_NAME}.gguf": {
                "model_hint": model.config.model_type,
                "layer_count": len(directions),
                "tensor_order": [f"direction.{k}" for k in directions],
                "dtype": "f32",
                "alignment": 32,
                "directions": {str(k): [float(x) for x in v] for k, v in directions.items()},
            },
            f"{GGUF_NAME}-f16-align64.gguf": {
                "model_hint": "llama",
                "layer_count": len(other),
                "dtype": "f16",
                "alignment": 64,
                "directions": {str(k): [float(x) for x in v.astype(np.float16)] for k, v in other.items()},
            },
        },
        "mapping": "direction.k is added to the output of decoder block k (0-based) = hidden-state index k+1",
        "coefs": GGUF_COEFS,
        "tensors": {"c{j}.p{i}.last": "[L+1, H] HF hidden_states[l][0, -1] with coefs[j] * direction.k added to block k's output",
                    "c0.p{i}.greedy": "16 greedy tokens under coefs[0] (+ greedy_margin)"},
        "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
    }
    jpath = os.path.join(GOLDEN_DIR, f"{GGUF_NAME}.json")
    with open(jpath, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    files = {rel(p): os.path.getsize(p) for p in (gpath, opath, spath, tpath, jpath)}
    return {"name": GGUF_NAME, "lengths": [int(p.numel()) for p in prompts], "files": files}


PAPER_NAME = "paper-smollm2"
PAPER_CONCEPTS = ["morality", "utilitarianism"]
PAPER_LANGS = ["en", "es", "id", "sw"]
PAPER_TEMPLATE = "[INST] {input} [/INST] "  # the LLaMA family's (SmolLM2's config says model_type llama)


@torch.no_grad()
def do_paper_reference():
    """Per-layer recognition on the paper's split (`--protocol paper`), from HF hidden states.  The split is
    scripts/paper_split.py (the paper's utils.read_data on CPython's own `random`); the vectors are RepE's
    cluster means with RepE's get_signs, written here from the paper's code, not from resid's."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import paper_split

    loaded = load_smollm2()
    if loaded is None:
        return None
    tok, model = loaded
    L = model.config.num_hidden_layers
    states = {}

    def last_states(text):
        if text not in states:
            ids = torch.tensor([tok(text)["input_ids"]], dtype=torch.long)
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            states[text] = np.stack([hs[l][0, -1].double().numpy() for l in range(1, L + 1)])
        return states[text]

    def fit(tp, tn):
        """RepE cluster_mean per layer, sign by get_signs: -1 when more pairs have pos at the min than at the max."""
        dirs = []
        for l in range(L):
            d = tp[:, l].mean(axis=0) - tn[:, l].mean(axis=0)
            m = (tp[:, l] - tn[:, l]) @ d
            sign = -1.0 if (m <= 0).sum() > (m >= 0).sum() else 1.0
            dirs.append(sign * d / np.linalg.norm(d))
        return np.stack(dirs)

    out_concepts, lengths = [], []
    for concept in PAPER_CONCEPTS:
        per = []
        for lang in PAPER_LANGS:
            path = os.path.join(REPO, "data", "values", concept, f"{concept}_{lang}.json")
            sp = paper_split.read_data(path, 0.8, 1)
            with open(path, encoding="utf-8") as f:
                groups = json.load(f)
            entry = lambda k: groups[k.split("|", 1)[0]][k.split("|", 1)[1]]  # noqa: E731

            def reps(keys):
                pos = [PAPER_TEMPLATE.replace("{input}", recognition_stimulus(concept, entry(k), entry(k)["pos"])) for k in keys]
                neg = [PAPER_TEMPLATE.replace("{input}", recognition_stimulus(concept, entry(k), entry(k)["neg"])) for k in keys]
                lengths.extend(len(tok(t)["input_ids"]) for t in pos + neg)
                return np.stack([last_states(t) for t in pos]), np.stack([last_states(t) for t in neg])

            tp, tn = reps(sp["train"])
            xp, xn = reps(sp["test"])
            flips = np.array(sp["flips"])
            rp = np.where(flips[:, None, None], tn, tp)
            rn = np.where(flips[:, None, None], tp, tn)
            per.append({"lang": lang, "split": sp, "dirs": fit(tp, tn), "rand": fit(rp, rn), "test": (xp, xn),
                        "train": (tp, tn)})
        k = len(per)
        cross = [[[0.0] * k for _ in range(k)] for _ in range(L)]
        margin = [[[0.0] * k for _ in range(k)] for _ in range(L)]
        cos = [[[0.0] * k for _ in range(k)] for _ in range(L)]
        for l in range(L):
            for a in range(k):
                u = per[a]["dirs"][l]
                tp, tn = per[a]["train"]
                scale = np.abs((tp[:, l] - tn[:, l]) @ u).mean()
                for b in range(k):
                    xp, xn = per[b]["test"]
                    m = (xp[:, l] - xn[:, l]) @ u
                    cross[l][a][b] = float((m >= 0).mean())
                    margin[l][a][b] = float(np.abs(m).min() / scale)
                    v = per[b]["dirs"][l]
                    cos[l][a][b] = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
        random_labels = []
        for p in per:
            xp, xn = p["test"]
            random_labels.append([float((((xp[:, l] - xn[:, l]) @ p["rand"][l]) >= 0).mean()) for l in range(L)])
        out_concepts.append({"concept": concept, "langs": PAPER_LANGS,
                             "splits": {p["lang"]: {"train": p["split"]["train"], "test": p["split"]["test"]} for p in per},
                             "crosslingual": cross, "closest_margin_rel": margin, "cosine": cos,
                             "random_labels": random_labels})
    meta = {"name": PAPER_NAME, "model_dir": rel(SMOLLM2_DIR), "data": "data/values", "template": PAPER_TEMPLATE,
            "seed": 1, "split": 0.8, "layers": L, "concepts": out_concepts,
            "definitions": "scripts/paper_split.py (utils.read_data on CPython random) and RepE cluster_mean/get_signs"}
    path = os.path.join(GOLDEN_DIR, PAPER_NAME + ".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f)
    return {"name": PAPER_NAME, "lengths": lengths, "files": {rel(path): os.path.getsize(path)}}
# ----------------------------------------------------------------------------------------------
# points inside blocks (TransformerLens names): tests/fixtures/golden/points/NAME.safetensors
# ----------------------------------------------------------------------------------------------

POINTS_NAME = "points"
POINTS_DIR = os.path.join(GOLDEN_DIR, "points")
POINT_SITES = ("resid_mid", "attn_out", "mlp_out", "z")
POINTS_PROMPT_LENGTHS = [7, 33]
POINTS_STEER_LAYER = 1
# (site, mode, coef): every site with `add`; piecewise (with c < 0: RepE's sign rule) and
# norm-preserving adds where they are allowed; hook_z takes additions on chosen heads only.
POINTS_STEER_CASES = [
    ("resid_mid", "add", 2.0), ("resid_mid", "pw", -2.0), ("resid_mid", "norm", 2.0),
    ("attn_out", "add", 2.0), ("attn_out", "pw", -2.0),
    ("mlp_out", "add", 2.0), ("mlp_out", "norm", 2.0),
    ("z", "add", 2.0),
]


def steer_rows(h: torch.Tensor, v: torch.Tensor, coef: float, mode: str) -> torch.Tensor:
    """The steering operators on the last axis, as make_steer_hook applies them."""
    if mode == "add":
        return h + coef * v
    if mode == "pw":
        return h + coef * v * torch.sign((h * (coef * v)).sum(-1, keepdim=True))  # RepE piecewise_linear
    if mode == "norm":
        new = h + coef * v
        return new / torch.norm(new, dim=-1, keepdim=True) * torch.norm(h, dim=-1, keepdim=True)
    raise ValueError(mode)


def point_modules(block, family: str):
    """(attention output module, o projection, post-attention norm, MLP output module) and whether the
    attention module's output already includes the residual (BLOOM's self_attention adds it)."""
    if family == "bloom":
        a = block.self_attention
        return a.dense, a.dense, block.post_attention_layernorm, block.mlp.dense_4h_to_h, a
    return block.self_attn, block.self_attn.o_proj, block.post_attention_layernorm, block.mlp, None


@torch.no_grad()
def hf_points(model, family: str, ids: torch.Tensor, steer=None):
    """Every point of every block by HF forward hooks: attn_out = the attention module's output (BLOOM:
    self_attention.dense's, before dropout_add), z = the o projection's input, resid_mid = the input of
    post_attention_layernorm, mlp_out = the MLP's output (BLOOM: dense_4h_to_h's).  Returns
    ({site: [L, T, W]}, hidden_states last [L+1, H]).  steer = (layer, site, vector, coef, mode) steers that
    point: attn_out / mlp_out / z at their modules; resid_mid through the attention output, as
    steer(x + a) - x with x the block's input (BLOOM: steer(self_attention output), which holds x + a)."""
    rec = {s: {} for s in POINT_SITES}
    handles = []
    block_in = {}

    def out_of(o):
        return block_output(o)[0]

    for l, block in enumerate(decoder_blocks(model)):
        attn_mod, o_proj, post_norm, mlp_mod, bloom_attn = point_modules(block, family)
        st = steer if steer is not None and steer[0] == l else None

        def steer_out(site, st=st):
            def hook(m, a, o):
                h, rebuild = block_output(o)
                return rebuild(steer_rows(h, st[2], st[3], st[4]))
            return hook

        if st is not None and st[1] == "attn_out":
            handles.append(attn_mod.register_forward_hook(steer_out("attn_out")))
        if st is not None and st[1] == "mlp_out":
            handles.append(mlp_mod.register_forward_hook(steer_out("mlp_out")))
        if st is not None and st[1] == "z":
            handles.append(o_proj.register_forward_pre_hook(
                lambda m, a, st=st: (steer_rows(a[0], st[2], st[3], st[4]),) + tuple(a[1:])))
        if st is not None and st[1] == "resid_mid":
            if bloom_attn is not None:
                handles.append(bloom_attn.register_forward_hook(steer_out("resid_mid")))
            else:
                handles.append(block.input_layernorm.register_forward_pre_hook(
                    lambda m, a, l=l: block_in.__setitem__(l, a[0])))

                def mid_hook(m, a, o, l=l, st=st):
                    h, rebuild = block_output(o)
                    x = block_in[l]
                    return rebuild(steer_rows(x + h, st[2], st[3], st[4]) - x)
                handles.append(attn_mod.register_forward_hook(mid_hook))
        # records (registered after the steering hooks: they see steered values)
        handles.append(attn_mod.register_forward_hook(lambda m, a, o, l=l: rec["attn_out"].__setitem__(l, out_of(o)[0].clone())))
        handles.append(o_proj.register_forward_pre_hook(lambda m, a, l=l: rec["z"].__setitem__(l, a[0][0].clone())))
        handles.append(post_norm.register_forward_pre_hook(lambda m, a, l=l: rec["resid_mid"].__setitem__(l, a[0][0].clone())))
        handles.append(mlp_mod.register_forward_hook(lambda m, a, o, l=l: rec["mlp_out"].__setitem__(l, out_of(o)[0].clone())))
    try:
        out = model(input_ids=ids[None], output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    L = model.config.num_hidden_layers
    sites = {s: torch.stack([rec[s][l] for l in range(L)]).float() for s in POINT_SITES}
    last = torch.stack([h[0, -1] for h in out.hidden_states]).float()
    return sites, last


def qwen_points(ref, ids, steer=None):
    """hf_points for Qwen-chat, on the float64 numpy reference (no transformers class exists)."""
    x = ref.w["transformer.wte.weight"][np.asarray(ids)]
    rec = {s: [] for s in POINT_SITES}
    hs = [x]

    def st_np(h, site, l):
        if steer is None or steer[0] != l or steer[1] != site:
            return h
        return steer_rows(torch.from_numpy(h), torch.from_numpy(steer[2].double().numpy()), steer[3], steer[4]).numpy()

    for l in range(ref.L):
        p = f"transformer.h.{l}."
        z = st_np(ref.attention_ctx(ref.rms(x, ref.w[p + "ln_1.weight"]), p), "z", l)
        a = st_np(ref.linear(z, p + "attn.c_proj"), "attn_out", l)
        mid = st_np(x + a, "resid_mid", l)
        m = st_np(ref.mlp(ref.rms(mid, ref.w[p + "ln_2.weight"]), p), "mlp_out", l)
        x = mid + m
        for s, v in (("z", z), ("attn_out", a), ("resid_mid", mid), ("mlp_out", m)):
            rec[s].append(v)
        hs.append(x)
    hs[-1] = ref.rms(x, ref.w["transformer.ln_f.weight"])
    sites = {s: torch.from_numpy(np.stack(rec[s]).astype(np.float32)) for s in POINT_SITES}
    last = torch.from_numpy(np.stack([h[-1] for h in hs]).astype(np.float32))
    return sites, last


def do_points():
    """Fixtures for the points inside blocks, for every tiny family: per prompt, each point's last-token row
    and mean over tokens ([L, W]), and, for each steering case, the hidden states (last token, [L+1, H]) with
    that point of block POINTS_STEER_LAYER steered."""
    from safetensors.numpy import load_file

    os.makedirs(POINTS_DIR, exist_ok=True)
    files, lengths = {}, []
    for name in list(TINY_SPECS) + list(QWEN_CHAT_SPECS):
        log(f"  points: {name}")
        mdir = os.path.join(TINY_MODELS_DIR, name)
        if name in QWEN_CHAT_SPECS:
            cfg = QWEN_CHAT_SPECS[name]["config"]
            ref = QwenChatReference(load_file(os.path.join(mdir, "model.safetensors")), cfg)
            family, L, H, V = "qwen", cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
            heads, head_dim = ref.n_head, ref.head_dim
            run = lambda ids, steer=None: qwen_points(ref, ids.numpy(), steer)
        else:
            family = TINY_SPECS[name].get("family", "llama")
            model = load_model(mdir, family)
            c = model.config
            L, H, V = c.num_hidden_layers, c.hidden_size, c.vocab_size
            heads = c.num_attention_heads
            head_dim = getattr(c, "head_dim", None) or H // heads
            run = lambda ids, steer=None, model=model, family=family: hf_points(model, family, ids, steer)
        g = torch.Generator().manual_seed(3000)
        prompts = [torch.randint(0, V, (n,), generator=g, dtype=torch.long) for n in POINTS_PROMPT_LENGTHS]
        vg = torch.Generator().manual_seed(4000)
        vectors = {}
        for site in POINT_SITES:
            w = heads * head_dim if site == "z" else H
            v = torch.randn(w, generator=vg, dtype=torch.float64)
            if site == "z":  # ITI: chosen heads only (the first and the last)
                mask = torch.zeros(heads, head_dim, dtype=torch.float64)
                mask[0] = 1
                mask[heads - 1] = 1
                v = v * mask.reshape(-1)
            vectors[site] = (v / v.norm()).float()
        tensors = {f"steer.{s}": v for s, v in vectors.items()}
        for i, ids in enumerate(prompts):
            sites, last = run(ids)
            tensors[f"p{i}.ids"] = ids
            tensors[f"p{i}.hidden.last"] = last
            for s in POINT_SITES:
                tensors[f"p{i}.{s}.last"] = sites[s][:, -1].contiguous()
                tensors[f"p{i}.{s}.mean"] = sites[s].double().mean(1).float().contiguous()
            for site, mode, coef in POINTS_STEER_CASES:
                steer = (POINTS_STEER_LAYER, site, vectors[site], coef, mode)
                s_sites, s_last = run(ids, steer)
                # the steered point itself holds the steered value
                tensors[f"p{i}.steer.{site}.{mode}.last"] = s_last.contiguous()
                tensors[f"p{i}.steer.{site}.{mode}.point"] = s_sites[site][POINTS_STEER_LAYER, -1].contiguous()
        path = os.path.join(POINTS_DIR, f"{name}.safetensors")
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, path,
                         metadata={"model": name, "family": family, "layers": str(L), "heads": str(heads),
                                   "head_dim": str(head_dim)})
        files[rel(path)] = os.path.getsize(path)
    meta = {
        "models": list(TINY_SPECS) + list(QWEN_CHAT_SPECS),
        "prompt_lengths": POINTS_PROMPT_LENGTHS,
        "prompt_seed": 3000,
        "sites": list(POINT_SITES),
        "steer_layer": POINTS_STEER_LAYER,
        "steer_cases": [{"site": s, "mode": m, "coef": c} for s, m, c in POINTS_STEER_CASES],
        "hooks": {
            "attn_out": "self_attn output[0] (BLOOM: self_attention.dense output, before dropout_add)",
            "z": "input of o_proj (BLOOM: of self_attention.dense)",
            "resid_mid": "input of post_attention_layernorm",
            "mlp_out": "mlp output (BLOOM: mlp.dense_4h_to_h output)",
            "qwen-chat": "the float64 numpy reference QwenChatReference, split at the same points",
        },
        "steering": "resid_mid: steer(x + a) - x added through the attention output (BLOOM: steer(self_attention "
                    "output)); attn_out, mlp_out: the module output; z: the o projection's input.  Vectors unit norm; "
                    "z's is zero outside heads 0 and heads-1",
        "tensors": "p{i}.ids, p{i}.hidden.last [L+1,H], p{i}.{site}.{last,mean} [L,W], steer.{site} [W], "
                   "p{i}.steer.{site}.{mode}.last [L+1,H], p{i}.steer.{site}.{mode}.point [W] (the steered point)",
        "transformers_version": __import__("transformers").__version__,
        "torch_version": torch.__version__,
    }
    with open(os.path.join(POINTS_DIR, "points.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    return {"name": POINTS_NAME, "lengths": POINTS_PROMPT_LENGTHS, "files": files}



def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[],
                    help="model NAME to (re)generate; repeatable (default: all)")
    ap.add_argument("--rebuild-tiny", action="store_true",
                    help="regenerate the tiny random model weights in tests/fixtures/models (default: reuse)")
    ap.add_argument("--no-gguf-check", action="store_true", help="skip the smollm2 GGUF cross-check")
    ap.add_argument("--gguf", default=None, help="path of SmolLM2-135M-Instruct*.gguf (default: search models/)")
    ap.add_argument("--smollm2-coef", type=float, default=SMOLLM2_STEER_COEF)
    args = ap.parse_args()

    setup_determinism()
    import transformers

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    known = list(TINY_SPECS) + list(QWEN_CHAT_SPECS) + [GGUF_NAME, "smollm2-135m", RECOGNITION_NAME, STUDY_NAME, PAPER_NAME, POINTS_NAME]
    names = args.only or known
    results = []
    for name in names:
        log(f"== {name}")
        if name in TINY_SPECS:
            results.append(do_tiny(name, args.rebuild_tiny))
        elif name in QWEN_CHAT_SPECS:
            results.append(do_qwen_chat(name, args.rebuild_tiny))
        elif name == GGUF_NAME:
            results.append(do_gguf())
        elif name == "smollm2-135m":
            r = do_smollm2(args.gguf, not args.no_gguf_check, args.smollm2_coef)
            if r:
                results.append(r)
        elif name == RECOGNITION_NAME:
            r = do_recognition()
            if r:
                results.append(r)
        elif name == POINTS_NAME:
            results.append(do_points())
        elif name == STUDY_NAME:
            r = do_study_reference()
            if r:
                results.append(r)
        elif name == PAPER_NAME:
            r = do_paper_reference()
            if r:
                results.append(r)
        else:
            sys.exit(f"unknown model {name!r}; known: {known}")

    log("\n== summary")
    total = 0
    for r in results:
        log(f"{r['name']}: {len(r['lengths'])} prompts, token lengths {r['lengths']}")
        for f, sz in r["files"].items():
            log(f"    {f}: {sz / 1024:.1f} KiB")
    for root in (GOLDEN_DIR, TINY_MODELS_DIR):
        for dp, _, fs in os.walk(root):
            for f in fs:
                total += os.path.getsize(os.path.join(dp, f))
    log(f"total size of tests/fixtures/golden + tests/fixtures/models: {total / 1024 / 1024:.2f} MiB")


if __name__ == "__main__":
    main()
