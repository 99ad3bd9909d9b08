"""Type stubs for resid (the Python face of the resid library)."""
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union, overload, Literal

import numpy as np
import numpy.typing as npt

from . import repe as repe

__version__: str

class InputError(ValueError):
    """Bad input: arguments, token ids, vector files, layer lists (the CLI's exit code 3)."""

class ModelError(Exception):
    """An unusable model directory (exit code 4)."""

class DeviceError(Exception):
    """A compute device that cannot be used (exit code 5)."""

Input = Union[str, Sequence[int], npt.NDArray[np.integer]]
Layer = Union[int, Literal["raw"]]
PathLike = Union[str, os.PathLike]

class Steering:
    """A steering intervention: directions [L+1, hidden] or {layer: vector}, layers, coef, op, positions."""
    def __init__(
        self,
        directions: Union[npt.ArrayLike, Mapping[int, npt.ArrayLike], None],
        coef: float = 1.0,
        layers: Optional[Sequence[int]] = None,
        op: Literal["add", "piecewise"] = "add",
        positions: Literal["all", "prompt", "generated"] = "all",
        preserve_norm: bool = False,
        *,
        points: Optional[Mapping[str, npt.ArrayLike]] = None,
    ) -> None: ...
    @classmethod
    def load(
        cls,
        path: PathLike,
        coef: float = 1.0,
        layers: Optional[Sequence[int]] = None,
        op: Literal["add", "piecewise"] = "add",
        positions: Literal["all", "prompt", "generated"] = "all",
        preserve_norm: bool = False,
    ) -> "Steering":
        """Reads a safetensors vector file or a llama.cpp control-vector GGUF."""
    def save(self, path: PathLike, gguf: bool = False) -> None:
        """Writes safetensors `directions`, or a llama.cpp control vector with gguf=True."""
    @property
    def directions(self) -> npt.NDArray[np.float32]: ...
    @property
    def layers(self) -> List[int]: ...
    @property
    def points(self) -> List[str]: ...
    @property
    def coef(self) -> float: ...
    @property
    def op(self) -> str: ...
    @property
    def positions(self) -> str: ...
    @property
    def preserve_norm(self) -> bool: ...

class Model:
    """A model directory loaded on a device ("cpu", "cuda", "cuda:N")."""
    path: str
    device: str
    def __init__(self, path: PathLike, device: str = "cpu", threads: Optional[int] = None, compute: Optional[Literal["f32", "bf16"]] = None) -> None: ...
    @property
    def info(self) -> Dict[str, Any]:
        """As `resid info --json`."""
    @property
    def num_layers(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    def tokenize(self, texts: Union[str, Sequence[str]]) -> List[List[int]]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str: ...
    @overload
    def extract(
        self,
        inputs: Sequence[Input],
        layers: Optional[Sequence[Layer]] = None,
        position: Literal["last", "mean"] = "last",
        steer: Optional[Steering] = None,
        batch_tokens: int = 2048,
        progress: bool = False,
        dtype: Literal["f32", "f16", "bf16"] = "f32",
    ) -> npt.NDArray[Any]:
        """[N, n_layers, hidden] of float32, float16 or ml_dtypes.bfloat16."""
    @overload
    def extract(
        self,
        inputs: Sequence[Input],
        layers: Optional[Sequence[Layer]] = None,
        position: Literal["all"] = ...,
        steer: Optional[Steering] = None,
        batch_tokens: int = 2048,
        progress: bool = False,
        dtype: Literal["f32", "f16", "bf16"] = "f32",
    ) -> Tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
        """(float32 [T, n_layers, hidden], int64 offsets [N+1])."""
    def extract_iter(
        self,
        inputs: Sequence[Input],
        layers: Optional[Sequence[Layer]] = None,
        position: Literal["last", "mean", "all"] = "last",
        steer: Optional[Steering] = None,
        batch_tokens: int = 2048,
        progress: bool = False,
        dtype: Literal["f32", "f16", "bf16"] = "f32",
    ) -> Iterator[Tuple[range, Any]]:
        """(range, array) per batch; for "all", (range, (array, offsets))."""
    def extract_to(
        self,
        out: PathLike,
        inputs: Union[Sequence[Input], PathLike],
        layers: Optional[Sequence[Layer]] = None,
        position: Literal["last", "mean", "all"] = "last",
        steer: Optional[Steering] = None,
        batch_tokens: int = 2048,
        shard_sequences: int = 1024,
        shard: Optional[Tuple[int, int]] = None,
        wait_lock: bool = False,
        progress: bool = False,
        dtype: Literal["f32", "f16", "bf16"] = "f32",
    ) -> Dict[str, Any]:
        """The resumable, sharded writer of `resid extract --out`."""
    def stats(
        self,
        out: PathLike,
        inputs: Union[Sequence[Any], PathLike],
        layers: Optional[Sequence[Layer]] = None,
        position: Literal["last", "mean", "all"] = "all",
        stats: Union[str, Sequence[str]] = "mean,cov",
        pairs: bool = False,
        batch_tokens: int = 2048,
        checkpoint_seconds: float = 60.0,
        stop_after: Optional[int] = None,
        wait_lock: bool = False,
        progress: bool = False,
    ) -> Dict[str, Any]:
        """`resid stats`: f64 count, mean, cov/gram, min, max per point, written to `out`."""
    def generate(
        self,
        prompts: Sequence[Input],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: Optional[int] = None,
        seed: int = 0,
        chat: bool = False,
        stop: Optional[Union[str, Sequence[str]]] = None,
        steer: Optional[Union[Steering, Sequence[Optional[Steering]]]] = None,
    ) -> List[Dict[str, Any]]:
        """One dict per prompt: text, tokens, prompt_tokens, finish_reason."""

def study(model: Model, data: PathLike, out: PathLike, **options: Any) -> Dict[str, Any]:
    """The value-concept study, as `resid study`; returns report.json."""
