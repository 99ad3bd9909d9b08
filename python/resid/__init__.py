"""resid from Python: read and steer the residual stream of language models at the engine's speed.

    import resid
    m = resid.Model("models/smollm2-135m")
    h = m.extract(["Hello world"], layers=[10, 20, "raw"])      # float32 [1, 3, 576]
    v = resid.Steering({10: direction}, coef=4.0)
    m.generate(["Tell me a story"], steer=v)

The work happens in the Rust library (`resid`), with the GIL released; this package only
parses arguments and renders results. Errors carry the command line's one-line messages:
`InputError` (a `ValueError`), `ModelError`, `DeviceError`, `FileNotFoundError`/`OSError`,
and `KeyboardInterrupt` when Ctrl-C stops a call between batches.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _resid
from ._resid import DeviceError, InputError, ModelError

__version__ = _resid.__version__
__all__ = ["Model", "Steering", "InputError", "ModelError", "DeviceError", "study", "repe"]

_POSITIONS = ("last", "mean", "all")


def _float32(a: Any, what: str, ndim: int) -> np.ndarray:
    """`a` as a C-contiguous float32 array of `ndim` dimensions (any float dtype converts)."""
    if isinstance(a, np.ndarray):
        arr = a
    else:
        try:
            arr = np.asarray(a)
        except Exception as e:  # ragged lists and the like
            raise InputError(f"{what}: not an array ({e})") from None
    if arr.dtype.kind != "f":
        raise InputError(f"{what}: dtype {arr.dtype} is not a float dtype (expected float16/32/64)")
    if arr.ndim != ndim:
        raise InputError(f"{what}: shape {arr.shape} has {arr.ndim} dimensions, expected {ndim}")
    return np.ascontiguousarray(arr, dtype=np.float32)


class _Progress:
    """A tqdm bar fed by `(done, total)` calls; nothing when tqdm is missing or not wanted."""

    def __init__(self, enabled: bool, unit: str):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=0, unit=unit, desc="resid")

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def callback(self):
        return self if self.bar is not None else None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _delegate(name: str, doc: str) -> property:
    return property(lambda self: getattr(self._inner, name), doc=doc)


class Steering:
    """A steering intervention: per-layer directions, the layers they act on, and how.

    `directions` is an array `[L+1, hidden]` (row l acts at hidden-state index l, i.e. on the
    output of decoder block l-1; row 0 is the embeddings) of any float dtype, or a dict
    `{layer: vector}` (rows the model has beyond those given are zero). `layers` defaults to
    every row that is not all zero. `op` is "add" (h + c·v) or "piecewise" (RepE: h + c·v·sign(⟨h, c·v⟩));
    `positions` is "all", "prompt" or "generated"; `preserve_norm` rescales each steered row
    back to its norm. NaN or Inf anywhere in the directions raises `InputError`.

    `points` steers points inside blocks (README, "Points inside blocks"): `{name: vector}` with
    names as `resid extract --steer-layers` takes them, e.g. `"blocks.3.hook_mlp_out"` (a
    `[hidden]` vector) or `"blocks.3.hook_z.0-1"` (ITI: heads 0 and 1, from a
    `[heads * head_dim]` vector). `directions` may then be None.
    """

    def __init__(
        self,
        directions: Union[np.ndarray, Mapping[int, Any], None],
        coef: float = 1.0,
        layers: Optional[Sequence[int]] = None,
        op: str = "add",
        positions: str = "all",
        preserve_norm: bool = False,
        *,
        points: Optional[Mapping[str, Any]] = None,
        _inner: Any = None,
    ):
        if _inner is not None:
            self._inner = _inner
            return
        point_list = []
        for k, v in (points or {}).items():
            if not isinstance(k, str):
                raise InputError(f"points: key {k!r} is not a point name such as 'blocks.3.hook_mlp_out'")
            point_list.append((k, [float(x) for x in _float32(v, f"points[{k!r}]", 1)]))
        if directions is None:
            if not point_list:
                raise InputError("steering: give directions or points")
            self._inner = _resid.Steering(
                np.zeros((0, 0), dtype=np.float32), False, None, _coef(coef), str(op), str(positions), bool(preserve_norm), point_list
            )
            return
        sparse = isinstance(directions, Mapping)
        if sparse:
            if not directions:
                raise InputError("directions: empty dict")
            rows = {}
            for k, v in directions.items():
                if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
                    raise InputError(f"directions: key {k!r} is not a hidden-state index (an int >= 0)")
                rows[int(k)] = _float32(v, f"directions[{k}]", 1)
            hidden = {r.shape[0] for r in rows.values()}
            if len(hidden) != 1:
                raise InputError(f"directions: vectors of different lengths {sorted(hidden)}")
            n = max(rows) + 1
            if n > 1 << 16:
                raise InputError(f"directions: layer {n - 1} is out of range")
            table = np.zeros((n, hidden.pop()), dtype=np.float32)
            for k, r in rows.items():
                table[k] = r
            if layers is None:
                layers = sorted(rows)
        else:
            table = _float32(directions, "directions", 2)
        self._inner = _resid.Steering(
            table, sparse, _layer_list(layers), _coef(coef), str(op), str(positions), bool(preserve_norm), point_list
        )

    @classmethod
    def load(
        cls,
        path: Union[str, os.PathLike],
        coef: float = 1.0,
        layers: Optional[Sequence[int]] = None,
        op: str = "add",
        positions: str = "all",
        preserve_norm: bool = False,
    ) -> "Steering":
        """Reads a vector file: safetensors with f32/bf16/f16 `directions` [L+1, hidden] (as
        `resid vectors` writes), or a llama.cpp control-vector GGUF (`.gguf`; direction.k acts at
        index k+1). The other arguments are as for `Steering(...)`."""
        inner = _resid.Steering.load(os.fspath(path), _layer_list(layers), _coef(coef), str(op), str(positions), bool(preserve_norm))
        return cls(None, _inner=inner)

    def save(self, path: Union[str, os.PathLike], gguf: bool = False) -> None:
        """Writes the directions: safetensors `directions` [L+1, hidden] with the settings as
        metadata, or with `gguf=True` a llama.cpp control vector (row 0 is not written)."""
        self._inner.save(os.fspath(path), bool(gguf))

    # Read-only views of the settings (types in __init__.pyi).
    directions = _delegate("directions", "A copy of the directions, float32 [rows, hidden].")
    layers = _delegate("layers", "The hidden-state indices steered.")
    points = _delegate("points", "The points inside blocks steered (names).")
    coef = _delegate("coef", "The coefficient c.")
    op = _delegate("op", '"add" or "piecewise".')
    positions = _delegate("positions", '"all", "prompt" or "generated".')
    preserve_norm = _delegate("preserve_norm", "Whether steered rows keep their norm.")

    def __repr__(self) -> str:
        return (f"Steering(layers={self.layers}, coef={self.coef}, op={self.op!r}, "
                f"positions={self.positions!r}, preserve_norm={self.preserve_norm})")


def _coef(c: Any) -> float:
    try:
        return float(c)
    except (TypeError, ValueError):
        raise InputError(f"coef {c!r} is not a number") from None


def _layer_list(layers: Any) -> Optional[List[int]]:
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise InputError(f"layers: expected a list of hidden-state indices, got {type(layers).__name__}")
    out = []
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, (int, np.integer)) or l < 0 or l > 1 << 16:
            raise InputError(f"layers: {l!r} is not a hidden-state index")
        out.append(int(l))
    if not out:
        raise InputError("layers: empty list")
    return out


def _steer_inner(s: Any, what: str = "steer") -> Any:
    if s is None:
        return None
    if not isinstance(s, Steering):
        raise InputError(f"{what}: expected a resid.Steering or None, got {type(s).__name__}")
    return s._inner


def _position(p: Any) -> str:
    if p not in _POSITIONS:
        raise InputError(f"unknown position `{p}` (expected last, mean or all)")
    return p


def _batch_tokens(b: Any) -> int:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise InputError(f"batch_tokens {b!r}: must be an integer >= 1")
    return int(b)


_DTYPES = ("f32", "f16", "bf16")


def _dtype(d: Any, in_memory: bool) -> str:
    """Checks `dtype`; in-memory bf16 needs ml_dtypes (numpy has no bfloat16)."""
    if d not in _DTYPES:
        raise InputError(f"unknown dtype `{d}` (expected f32, f16 or bf16)")
    if d == "bf16" and in_memory and _bfloat16() is None:
        raise InputError(
            "dtype='bf16' in memory needs the ml_dtypes package (numpy has no bfloat16): "
            "pip install ml_dtypes, or use dtype='f16', or extract_to(..., dtype='bf16') for files"
        )
    return d


def _bfloat16() -> Any:
    try:
        import ml_dtypes  # type: ignore[import-not-found]
    except ImportError:
        return None
    return ml_dtypes.bfloat16


def _as_dtype(arr: np.ndarray, d: str) -> np.ndarray:
    """The engine returns f16/bf16 as their bits (uint16): view them as the real type (no copy)."""
    if d == "f16":
        return arr.view(np.float16)
    if d == "bf16":
        return arr.view(_bfloat16())
    return arr


class Model:
    """A model directory (Hugging Face layout: config.json, tokenizer.json, *.safetensors) loaded
    on `device` ("cpu", "cuda" or "cuda:N"). `threads` sets the CPU backend's worker threads for
    the whole process (once, before the first compute; default: all cores). `compute` is the CPU
    arithmetic, as `--compute`: "f32" (the default; HF parity within 1e-4) or "bf16" (bf16 GEMM
    inputs with f32 accumulation, used only where it is faster than f32 on this CPU: a
    `UserWarning` says when it falls back). It is chosen once per process.

    A Model is immutable and may be used from several Python threads at once: each call gives
    the result it would give alone. Without a usable GPU stack, `device="cuda"` raises
    `DeviceError` naming what is missing.
    """

    def __init__(self, path: Union[str, os.PathLike], device: str = "cpu", threads: Optional[int] = None, compute: Optional[str] = None):
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int):
                raise InputError(f"threads {threads!r}: must be an integer >= 1")
            _resid.set_threads(threads)
        if compute is not None and not isinstance(compute, str):
            raise InputError(f"compute {compute!r}: must be 'f32' or 'bf16'")
        self._m = _resid.Model(os.fspath(path), str(device), compute)
        self.path = os.fspath(path)
        self.device = device

    def __repr__(self) -> str:
        return f"resid.Model({self.path!r}, device={self.device!r})"

    @property
    def info(self) -> Dict[str, Any]:
        """The model's description, as `resid info --json` prints it."""
        return json.loads(self._m.info_json())

    @property
    def num_layers(self) -> int:
        """Decoder blocks L (hidden-state indices are 0..=L)."""
        return self._m.num_layers

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream."""
        return self._m.hidden_size

    def tokenize(self, texts: Union[str, Sequence[str]]) -> List[List[int]]:
        """Token ids of each text, with the tokenizer's own special-token rules (as
        `AutoTokenizer(...)(text)["input_ids"]`). A single str gives a list with one entry."""
        if isinstance(texts, str):
            texts = [texts]
        return self._m.tokenize(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids."""
        return self._m.decode([int(i) for i in ids])

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        """Renders `[{"role": ..., "content": ...}, ...]` with the model's chat template, ending
        with the prompt for the assistant's turn."""
        turns = []
        for i, m in enumerate(messages):
            try:
                turns.append((str(m["role"]), str(m["content"])))
            except (KeyError, TypeError):
                raise InputError(f"messages[{i}]: expected a dict with `role` and `content`") from None
        if not turns:
            raise InputError("messages: empty list")
        return self._m.apply_chat_template(turns)

    def _prepare(self, inputs: Any) -> Any:
        return self._m.prepare(inputs)

    def extract(
        self,
        inputs: Sequence[Union[str, Sequence[int]]],
        layers: Optional[Sequence[Union[int, str]]] = None,
        position: str = "last",
        steer: Optional[Steering] = None,
        batch_tokens: int = 2048,
        progress: bool = False,
        dtype: str = "f32",
    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Hidden states of every input (a list of str, or of token-id lists), in one forward pass.

        Returns float32 `[N, n_layers, hidden]` for `position="last"` or `"mean"`, and for
        `position="all"` a tuple `(array [T, n_layers, hidden], offsets)` where input i owns
        rows `offsets[i]:offsets[i+1]` (int64, N+1 entries). `layers` holds Hugging Face
        `output_hidden_states` indices (0 = embeddings, L = after the final norm) and "raw"
        (the last block's output before the final norm), in the order given; default 0..=L.
        `steer` applies one `Steering` to every input. The array is the engine's own buffer
        (no copy). `dtype` "f16" gives numpy float16 (rounded to nearest even; a value beyond
        float16's range raises InputError naming the input and layer); "bf16" gives
        `ml_dtypes.bfloat16` and needs the ml_dtypes package. Ctrl-C stops between batches with
        `KeyboardInterrupt`.
        """
        d = _dtype(dtype, in_memory=True)
        prepared = self._prepare(inputs)
        bar = _Progress(progress, "seq")
        try:
            arr, offsets = self._m.extract(
                prepared, 0, len(prepared), layers, _position(position), _steer_inner(steer), _batch_tokens(batch_tokens), bar.callback(), d
            )
        finally:
            bar.close()
        arr = _as_dtype(arr, d)
        return (arr, offsets) if position == "all" else arr

    def extract_iter(
        self,
        inputs: Sequence[Union[str, Sequence[int]]],
        layers: Optional[Sequence[Union[int, str]]] = None,
        position: str = "last",
        steer: Optional[Steering] = None,
        batch_tokens: int = 2048,
        progress: bool = False,
        dtype: str = "f32",
    ) -> Iterator[Tuple[range, Any]]:
        """As `extract`, one batch at a time: yields `(range, array)` per batch of about
        `batch_tokens` tokens (for "all", `(range, (array, offsets))` with offsets from 0), so
        memory holds one batch however long the input. Inputs are tokenized and checked first.
        `dtype` as for `extract`."""
        d = _dtype(dtype, in_memory=True)
        prepared = self._prepare(inputs)
        bt = _batch_tokens(batch_tokens)
        pos = _position(position)
        s = _steer_inner(steer)
        bar = _Progress(progress, "seq")
        try:
            for start, end in prepared.batch_ranges(bt):
                arr, offsets = self._m.extract(prepared, start, end, layers, pos, s, bt, None, d)
                arr = _as_dtype(arr, d)
                bar(end, len(prepared))
                yield range(start, end), ((arr, offsets) if pos == "all" else arr)
        finally:
            bar.close()

    def extract_to(
        self,
        out: Union[str, os.PathLike],
        inputs: Union[Sequence[Union[str, Sequence[int]]], str, os.PathLike],
        layers: Optional[Sequence[Union[int, str]]] = None,
        position: str = "last",
        steer: Optional[Steering] = None,
        batch_tokens: int = 2048,
        shard_sequences: int = 1024,
        shard: Optional[Tuple[int, int]] = None,
        wait_lock: bool = False,
        progress: bool = False,
        dtype: str = "f32",
    ) -> Dict[str, Any]:
        """The writer of `resid extract --out`: a `.safetensors` file, or any other path a
        directory of numbered shards with a manifest. A directory resumes after its last complete
        shard when called again with the same inputs and options, and refuses to mix results
        otherwise. `inputs` is a list (as for `extract`) or the path (`pathlib.Path`) of a JSONL
        file. `shard=(i, n)` writes part i of n. `dtype` ("f32", "f16" or "bf16") is the
        element type of `hidden_states` in the files (bf16 needs no extra package here).
        Returns the run's summary. Ctrl-C: nothing half-written (a file output leaves nothing,
        a directory keeps its complete shards)."""
        d = _dtype(dtype, in_memory=False)
        if isinstance(inputs, (str, os.PathLike)):
            prepared = self._m.prepare_jsonl(os.fspath(inputs))
        else:
            prepared = self._prepare(inputs)
        if shard is not None:
            try:
                i, n = shard
                shard = (int(i), int(n))
            except (TypeError, ValueError):
                raise InputError(f"shard {shard!r}: expected (i, n)") from None
            if shard[1] < 1 or not 0 <= shard[0] < shard[1]:
                raise InputError(f"shard {shard[0]}/{shard[1]}: expected i/N with 0 <= i < N")
        if isinstance(shard_sequences, bool) or not isinstance(shard_sequences, int) or shard_sequences < 1:
            raise InputError(f"shard_sequences {shard_sequences!r}: must be an integer >= 1")
        bar = _Progress(progress, "seq")
        try:
            summary = self._m.extract_to(
                os.fspath(out), prepared, layers, _position(position), _steer_inner(steer),
                _batch_tokens(batch_tokens), shard_sequences, shard, bool(wait_lock), bar.callback(), d,
            )
        finally:
            bar.close()
        return json.loads(summary)

    def stats(
        self,
        out: Union[str, os.PathLike],
        inputs: Union[Sequence[Any], str, os.PathLike],
        layers: Optional[Sequence[Union[int, str]]] = None,
        position: str = "all",
        stats: Union[str, Sequence[str]] = "mean,cov",
        pairs: bool = False,
        batch_tokens: int = 2048,
        checkpoint_seconds: float = 60.0,
        stop_after: Optional[int] = None,
        wait_lock: bool = False,
        progress: bool = False,
    ) -> Dict[str, Any]:
        """`resid stats`: per-point `count`, `mean`, `cov` (n - 1, as numpy.cov) or `gram`
        (sum of x x^T), `min` and `max` over every row of `inputs`, accumulated in float64
        without storing rows, written to the safetensors file `out` (each tensor with a leading
        points axis). Rows are tokens (`position="all"`) or one per input ("last", "mean").
        With `pairs=True`, `inputs` is a list of `(pos, neg)` tuples or the path of a JSONL
        file with `pos` and `neg` per line, and the rows are the differences pos - neg (for
        `resid vectors --from-stats`). The result does not depend on `batch_tokens` or the
        threads. The state is checkpointed beside `out` (`out + ".state"`) every
        `checkpoint_seconds`, on Ctrl-C and after `stop_after` sequences; calling again with the
        same arguments resumes. Returns the run's summary."""
        if isinstance(stats, (list, tuple)):
            stats = ",".join(str(x) for x in stats)
        if isinstance(inputs, (str, os.PathLike)):
            path = os.fspath(inputs)
            prepared = self._m.prepare_pairs_jsonl(path) if pairs else self._m.prepare_jsonl(path)
        elif pairs:
            flat: List[Any] = []
            for i, pair in enumerate(inputs):
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise InputError(f"inputs[{i}]: expected a (pos, neg) pair")
                flat.extend(pair)
            prepared = self._prepare(flat)
        else:
            prepared = self._prepare(inputs)
        if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0):
            raise InputError(f"stop_after {stop_after!r}: must be a non-negative integer or None")
        bar = _Progress(progress, "seq")
        try:
            summary = self._m.stats(
                os.fspath(out), prepared, layers, _position(position), str(stats), bool(pairs),
                _batch_tokens(batch_tokens), float(checkpoint_seconds), stop_after, bool(wait_lock), bar.callback(),
            )
        finally:
            bar.close()
        return json.loads(summary)

    def generate(
        self,
        prompts: Sequence[Union[str, Sequence[int]]],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: Optional[int] = None,
        seed: int = 0,
        chat: bool = False,
        stop: Optional[Union[str, Sequence[str]]] = None,
        steer: Optional[Union[Steering, Sequence[Optional[Steering]]]] = None,
    ) -> List[Dict[str, Any]]:
        """Generates for every prompt as one batch (the continuous-batching scheduler).

        `temperature=0` is greedy; otherwise seeded sampling with `top_p` and `top_k`. `chat`
        renders each prompt as a user turn with the model's chat template. `stop` strings end a
        generation (as the server's `stop`; the text ends before them). `steer` is one `Steering`
        for every prompt, or a list with one entry (or None) per prompt: different steering in
        the same batch. Returns one dict per prompt: `text`, `tokens` (generated ids),
        `prompt_tokens` and `finish_reason` ("stop" or "length").
        """
        if isinstance(prompts, str):
            raise InputError("prompts: expected a list of str, not a single str")
        prompts = list(prompts)
        if isinstance(steer, (list, tuple)):
            per = [_steer_inner(s, f"steer[{i}]") for i, s in enumerate(steer)]
            if len(per) != len(prompts):
                raise InputError(f"steer: {len(per)} entries for {len(prompts)} prompts")
        else:
            per = [_steer_inner(steer)] * len(prompts)
        if stop is None:
            stops = []
        elif isinstance(stop, str):
            stops = [stop]
        else:
            stops = [str(s) for s in stop]
        for name, v in (("max_new_tokens", max_new_tokens), ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"{name} {v!r}: must be an integer >= 0")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise InputError(f"top_k {top_k!r}: must be an integer >= 1 or None")
        return self._m.generate(
            prompts, max_new_tokens, float(temperature), float(top_p), top_k, seed, bool(chat), stops, per
        )


def study(model: Model, data: Union[str, os.PathLike], out: Union[str, os.PathLike], **options: Any) -> Dict[str, Any]:
    """The multilingual value-concept study, exactly as `resid study` runs it (same library code):
    hidden states (cached), vectors by every method, recognition, cross-lingual analyses,
    control, and report.md / report.json / tables / figures / vectors under `out`.

    Options (the command's flags, with underscores): protocol ("paper", as `resid study`; or
    "resid"), split (0.8, the paper's --split), family (from config.json), lang2vec (CSV for
    Table 1), concepts, langs (lists), method ("mean-diff"), cache, template (the family's with
    the paper's protocol, "{input}" with resid's), seed (1 paper, 0 resid), batch_tokens (2048), high, low,
    lang_similarity, control (True), figures (True), quiet (True), wait_lock (False),
    control_concepts, control_sources (["en"]), control_targets, control_layers, control_radius
    (2), control_prompts (2), coefs ([-2, 0, 2]), steer_op ("add"), steer_positions ("all"),
    steer_preserve_norm (False), max_new_tokens (16). Returns report.json as a dict.
    """
    if not isinstance(model, Model):
        raise InputError(f"study: model must be a resid.Model, got {type(model).__name__}")
    defaults: Dict[str, Any] = dict(
        protocol="paper", split=0.8, family=None, lang2vec=None,
        concepts=None, langs=None, method="mean-diff", cache=None, template=None, seed=None, batch_tokens=2048,
        high=None, low=None, lang_similarity=None, control=True, figures=True, quiet=True, wait_lock=False,
        control_concepts=None, control_sources=["en"], control_targets=None, control_layers=None, control_radius=2,
        control_prompts=2, coefs=[-2.0, 0.0, 2.0], steer_op="add", steer_positions="all", steer_preserve_norm=False,
        max_new_tokens=16,
    )
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise InputError(f"study: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(defaults))})")
    o = {**defaults, **options}
    for k in ("concepts", "langs", "high", "low", "control_concepts", "control_sources", "control_targets"):
        if isinstance(o[k], str):
            o[k] = [s.strip() for s in o[k].split(",") if s.strip()]
    for k in ("cache", "lang_similarity", "lang2vec"):
        if o[k] is not None:
            o[k] = os.fspath(o[k])
    try:
        report = _resid.study(
            model._m, os.fspath(data), os.fspath(out), o["concepts"], o["langs"], o["method"], o["cache"], o["template"],
            o["seed"], _batch_tokens(o["batch_tokens"]), o["high"], o["low"], o["lang_similarity"], bool(o["control"]),
            bool(o["figures"]), bool(o["quiet"]), bool(o["wait_lock"]), o["control_concepts"], o["control_sources"],
            o["control_targets"], o["control_layers"], o["control_radius"], o["control_prompts"],
            [float(c) for c in o["coefs"]], o["steer_op"], o["steer_positions"], bool(o["steer_preserve_norm"]),
            o["max_new_tokens"], str(o["protocol"]), float(o["split"]), o["family"], o["lang2vec"],
        )
    except (TypeError, OverflowError) as e:
        raise InputError(f"study: {e}") from None
    return json.loads(report)


from . import repe  # noqa: E402  (needs the names above)
