"""examples/ray_extract.py: Ray Data with resid.Model actors on a local Ray cluster (loopback)
gives exactly the single-process extraction."""
import json
import sys

import numpy as np
import pytest

from conftest import ROOT


def test_ray_data_extraction_equals_a_single_process_run(model, model_dir, tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("pyarrow")
    sys.path.insert(0, str(ROOT / "examples"))
    import ray_extract

    texts = [json.loads(l)["text"] for l in (ROOT / "data/demo/sentences.jsonl").read_text(encoding="utf-8").splitlines()]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts * 2)), encoding="utf-8")
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT / "examples")}})
    try:
        ray_extract.run(str(model_dir), str(inp), str(tmp_path / "out"), layers=[5, 20, "raw"], concurrency=2, batch_size=8, threads=1)
        ids, h = ray_extract.read(str(tmp_path / "out"))
    finally:
        ray.shutdown()
    want = model.extract(texts * 2, layers=[5, 20, "raw"])
    assert ids.tolist() == list(range(len(texts) * 2))
    # Bit-identical: a sequence's vectors do not depend on its batch or the thread count.
    np.testing.assert_array_equal(h, want)
