"""ONNX plain export parity over the conformance architectures (issue 9), where ONNX Runtime supports them.

Each architecture's tiny checkpoint is merged with a D2-LoRA adapter (so the exported weights are merged
weights), exported with ``export_onnx(target="plain")`` and run by a plain ONNX Runtime session, compared
with transformers float32 logits of the same merged checkpoint. Run under ``flock /tmp/d2s-heavy.lock``.
"""

from __future__ import annotations

import numpy as np
import pytest
import onnxruntime as ort
import torch

from archs import ARCHS, Bases, load_model

pytestmark = pytest.mark.onnx


ATOL = 1e-3  # float32 logits, ONNX Runtime vs transformers


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    return Bases(tmp_path_factory.mktemp("export_bases"))


@pytest.mark.parametrize("arch", ["llama", "qwen2_tied", "phi3", "gemma_tied"])
def test_plain_export_parity(bases, tmp_path, arch):
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.export.onnx import export_onnx
    from d2serve.merge import merge

    ad = random_adapter(bases.dir(arch), tmp_path / "ad", target_modules=ARCHS[arch].d2lora_targets, std=0.2)
    merge(base=bases.dir(arch), adapter=ad, out=tmp_path / "m", dtype="float32")
    rep = export_onnx(merged=tmp_path / "m", out=tmp_path / "onnx", target="plain")
    assert rep.passed, rep.failures

    hf = load_model(tmp_path / "m")
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for b, s in [(1, 1), (2, 9)]:
        ids = rng.integers(3, hf.config.vocab_size, (b, s), dtype=np.int64)
        pos = np.broadcast_to(np.arange(s), (b, s)).astype(np.int64)
        got = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": pos})[0]
        with torch.no_grad():
            ref = hf(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        assert np.isfinite(got).all() and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
        assert np.abs(ref).max() > 100 * ATOL  # logits are not flat: the comparison can fail
