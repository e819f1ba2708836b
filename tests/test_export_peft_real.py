"""export dora / export lora on the real SmolLM2-135M (issue 19) with a short-trained D2-LoRA adapter.

The adapter is trained by ``d2serve train`` for a few steps (the demo's recipe at a larger learning rate, so the
update is not negligible; the 24-step demo adapter itself is too slow to train in the suite).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from d2serve.adapters.io import load_adapter
from d2serve.export.peft import export_dora, export_lora
from d2serve.merge import merge
from d2serve.models import load_hf_model, load_tokenizer, load_unmerged_model


@pytest.mark.real
def test_smollm2_trained_d2lora_exports(smollm2_dir, tmp_path):
    from peft import PeftModel

    from d2serve.train import TrainSettings, train

    train(base=smollm2_dir, out=tmp_path / "d2",
          settings=TrainSettings(max_steps=6, batch_size=2, max_length=128, lr=2e-3, seed=0))
    man = export_dora(base=smollm2_dir, adapter=tmp_path / "d2", out=tmp_path / "dora")
    assert man["num_layers"] == 120 and man["max_rel_error"] < 1e-6
    tok = load_tokenizer(smollm2_dir)
    ids = tok(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = load_unmerged_model(smollm2_dir, tmp_path / "d2")(input_ids=ids).logits
        base = load_hf_model(smollm2_dir, torch.float32)(input_ids=ids).logits
        pm = PeftModel.from_pretrained(load_hf_model(smollm2_dir, torch.float32), str(tmp_path / "dora")).eval()
        theirs = pm(input_ids=ids).logits
    print(f"SmolLM2: PEFT DoRA vs d2serve unmerged max |logit diff| {float((theirs - ours).abs().max()):.3g}, "
          f"base vs adapter {float((base - ours).abs().max()):.3g}")
    assert float((base - ours).abs().max()) > 0.1
    assert float((theirs - ours).abs().max()) < 1e-4
    unloaded = pm.merge_and_unload().state_dict()
    ref = load_file(str(merge(base=smollm2_dir, adapter=tmp_path / "d2", out=tmp_path / "m",
                              dtype="float32").out / "model.safetensors"))
    worst = 0.0
    for m in load_adapter(tmp_path / "d2").layers:
        w, r = unloaded[f"{m}.weight"].double(), ref[f"{m}.weight"].double()
        worst = max(worst, float((w - r).abs().max() / r.abs().max()))
    print(f"SmolLM2: PEFT merge_and_unload vs d2serve merge, worst layer max rel diff {worst:.3g}")
    assert worst < 1e-6
    lman = export_lora(base=smollm2_dir, adapter=tmp_path / "d2", out=tmp_path / "lora", windows=1,
                       prompts=["The capital of France is", "Once upon a time, in a small village,"])
    ranks = sorted(v["rank"] for v in lman["layers"].values())
    fid = lman["fidelity"]
    print(f"SmolLM2: export lora (budget {lman['max_rel_error_option']}): ranks {ranks[0]}..{ranks[-1]} "
          f"(median {ranks[len(ranks) // 2]}), worst rel error {lman['worst_rel_error']:.3g}, mean KL "
          f"{fid['logits']['mean_kl']:.3g}, top-1 {fid['logits']['top1_agreement']:.4f}, greedy identical "
          f"{fid['generation']['n_identical']}/{fid['generation']['n_prompts']}")
    assert fid["passed"] and lman["worst_rel_error"] <= 0.01
