"""d2serve verify on the real SmolLM2-135M: a correct bf16 merge of a D2-LoRA adapter passes against fp32 unmerged."""

from __future__ import annotations

import pytest

from d2serve.adapters.synthetic import random_adapter
from d2serve.merge import merge
from d2serve.verify import verify


@pytest.mark.real
def test_smollm2_bf16_merge_passes(smollm2_dir, tmp_path):
    adp = random_adapter(smollm2_dir, tmp_path / "adapter", r=8, lora_alpha=16, tau=0.5, std=0.02,
                         target_modules=("q_proj", "v_proj"), seed=1)
    merged = merge(base=smollm2_dir, adapter=adp, out=tmp_path / "merged", dtype="bfloat16").out
    rep = verify(base=smollm2_dir, adapter=adp, merged=merged, report_dir=tmp_path / "report", limit=8,
                 tasks="arc_easy", windows=1, window_len=128, max_new_tokens=8,
                 prompts=["The capital of France is"], base_accuracy=False)
    assert rep.passed, rep.failures
    w = rep.data["weights"]
    assert w["n_layers"] == 60 and w["max_err_over_tol"] <= 0.5 + 1e-6
    assert 0 < w["mean_frac_update_lost"] < 1  # bf16 rounds some of the update away: reported, not hidden
    src = rep.data["logits"]["sources"][0]
    assert 0 < src["mean_kl"] < 0.01 and src["top1_agreement"] >= 0.95
    assert abs(src["ppl_merged"] / src["ppl_unmerged"] - 1) < 0.05
    assert rep.data["tasks"]["per_task"][0]["n"] == 8
