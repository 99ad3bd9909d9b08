"""Scale-out on an existing engine with Ray Data: every actor holds one `resid.Model`, and Ray
streams a JSONL file through them in batches, writing parquet.

    python examples/ray_extract.py models/smollm2-135m in.jsonl out/ray-hidden \
        --layers 10,20 --concurrency 2

Input lines are objects with `id` and `text`; each output row has the `id`, `text` and
`hidden` (float32 [n_layers, hidden], last position). Rows come out in Ray's order: the ids say
which is which. On a cluster, `ray.init(address="auto")` joins it and
`concurrency` is the number of model replicas (one per GPU with `device="cuda"` and
`num_gpus=1`). Ray starts a local cluster on loopback when none is running.
"""
import argparse
from typing import Any, Dict, List, Optional, Union

import numpy as np

import resid


class Extractor:
    """A Ray Data actor: loads the model once, then extracts each batch of rows."""

    def __init__(self, model_dir: str, layers: Optional[List[Union[int, str]]] = None, device: str = "cpu", threads: Optional[int] = None):
        self.model = resid.Model(model_dir, device=device, threads=threads)
        self.layers = layers

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        h = self.model.extract([str(t) for t in batch["text"]], layers=self.layers)
        return {"id": batch["id"], "text": batch["text"], "hidden": h}


def run(model_dir: str, input_jsonl: str, out_dir: str, layers=None, concurrency: int = 2, batch_size: int = 16, threads: Optional[int] = None) -> None:
    """Extracts every line of `input_jsonl` (objects with `id` and `text`) into parquet files in `out_dir`."""
    import ray

    ds = ray.data.read_json(input_jsonl, lines=True) if _new_read_json() else ray.data.read_json(input_jsonl)
    ds.map_batches(
        Extractor,
        fn_constructor_args=(model_dir, layers, "cpu", threads),
        concurrency=concurrency,
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
    ).write_parquet(out_dir)


def _new_read_json() -> bool:
    import inspect

    import ray

    return "lines" in inspect.signature(ray.data.read_json).parameters


def read(out_dir: str):
    """(ids, hidden [N, n_layers, hidden]) of a run's parquet output, sorted by id."""
    import ray

    rows = sorted(ray.data.read_parquet(out_dir).take_all(), key=lambda r: r["id"])
    return np.array([r["id"] for r in rows]), np.stack([np.asarray(r["hidden"], dtype=np.float32) for r in rows])


if __name__ == "__main__":
    import ray

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--layers", help="e.g. 10,20,raw (default: all)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args()
    layers = [x if x == "raw" else int(x) for x in a.layers.split(",")] if a.layers else None
    ray.init()
    run(a.model, a.input, a.out, layers, a.concurrency, a.batch_size)
    ids, h = read(a.out)
    print(f"wrote {a.out}: {len(ids)} rows, hidden {h.shape[1:]}")
