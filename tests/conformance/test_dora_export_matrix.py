"""``d2serve export dora`` over the conformance architectures (issues 9 and 19): every architecture where D2-LoRA
applies (all but GPT-2, whose Conv1D layers D2-LoRA does not adapt).

Per cell, the D2-LoRA adapter of the merge matrix is exported to a PEFT DoRA folder and read by stock PEFT:

* ``PeftModel.from_pretrained(base, DIR)`` float32 logits within ``ATOL`` of d2serve's own unmerged D2-LoRA model
  (d2serve/layers.py), while the base differs from it by more than ``MARGIN``;
* PEFT's ``merge_and_unload`` equals ``d2serve merge`` of the D2-LoRA adapter within 1e-6 relative (max |diff| /
  max |W|) on every adapted weight, and ``d2serve verify`` of the DoRA export against that merge passes (untied bases; on a tied base PEFT's merge writes an adapted lm_head into the
  shared embedding, which is PEFT's own semantics, not D2-LoRA's: those cells check the unmerged model only).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from archs import ARCHS, Bases, logits
from test_merge_matrix import MARGIN, d2lora_oracle, make_adapter

ATOL = 1e-4
MERGE_RTOL = 1e-6
D2_ARCHS = [a for a, spec in ARCHS.items() if spec.d2lora_targets is not None]
CELLS = [(a, "d2lora") for a in D2_ARCHS] + [(a, "d2lora_lm_head") for a in ("llama", "llama_tied", "qwen2_tied",
                                                                                 "gemma_tied")]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    return Bases(tmp_path_factory.mktemp("dora_export_bases"))


@pytest.mark.parametrize(("arch", "feature"), CELLS, ids=[f"{a}-{f}" for a, f in CELLS])
def test_dora_export_cell(bases, tmp_path, arch, feature):
    from peft import PeftModel

    from d2serve.adapters.io import load_adapter
    from d2serve.export.peft import export_dora
    from d2serve.merge import merge

    adapter, _ = make_adapter(bases, arch, feature, tmp_path / "d2")
    man = export_dora(base=bases.dir(arch), adapter=adapter, out=tmp_path / "dora")
    assert man["max_rel_error"] < 1e-6
    oracle = d2lora_oracle(bases, arch, adapter)
    pm = PeftModel.from_pretrained(bases.model(arch), str(tmp_path / "dora"), is_trainable=False).eval()
    got = logits(pm)
    assert float((logits(bases.model(arch)) - oracle).abs().max()) > MARGIN
    assert float((got - oracle).abs().max()) < ATOL
    if ARCHS[arch].tied and feature == "d2lora_lm_head":
        return
    unloaded = pm.merge_and_unload()
    merged = unloaded.state_dict()
    ours = merge(base=bases.dir(arch), adapter=adapter, out=tmp_path / "m", dtype="float32").out
    ref = load_file(str(ours / "model.safetensors"))
    for m in load_adapter(adapter).layers:
        w, r = merged[f"{m}.weight"].double(), ref[f"{m}.weight"].double()
        assert float((w - r).abs().max() / r.abs().max()) < MERGE_RTOL, m
    torch.testing.assert_close(logits(unloaded), got, atol=ATOL, rtol=0)  # PEFT's merged model = its unmerged one
    if feature == "d2lora":  # d2serve verify: the exported DoRA (unmerged, PEFT) vs the D2-LoRA merge
        from d2serve.verify import verify

        rep = verify(base=bases.dir(arch), adapter=tmp_path / "dora", merged=ours, report_dir=None, tasks="none",
                     windows=1, window_len=32, prompts=["The capital of France is"], max_new_tokens=8,
                     base_accuracy=False, device="cpu")
        assert rep.passed, rep.failures
        assert rep.data["inputs"]["method"] == "dora" and rep.data["weights"]["n_layers_failed"] == 0
