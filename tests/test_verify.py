"""d2serve verify on the tiny Llama: correct merges pass, deliberately wrong merges fail naming the layer, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from d2serve.adapters.io import load_adapter
from d2serve.adapters.methods import d2lora_delta, row_norm
from d2serve.adapters.synthetic import random_adapter
from d2serve.cli import app
from d2serve.merge import merge
from d2serve.verify import verify

LAYER = "model.layers.1.self_attn.v_proj"
FAST = dict(limit=2, tasks="arc_easy", windows=1, window_len=48, prompts=["The capital of France is"],
            max_new_tokens=10, base_accuracy=False)


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    """Tiny base, a random D2-LoRA adapter on q/k/v/o, and its correct fp32 and bf16 merges."""
    root = tmp_path_factory.mktemp("verify")
    adp = random_adapter(tiny_llama_dir, root / "adapter", tau=0.7, seed=3)
    m32 = merge(base=tiny_llama_dir, adapter=adp, out=root / "merged_fp32", dtype="float32").out
    m16 = merge(base=tiny_llama_dir, adapter=adp, out=root / "merged_bf16", dtype="bfloat16").out
    return {"root": root, "base": tiny_llama_dir, "adapter": adp, "fp32": m32, "bf16": m16}


def _wrong_merge(setup, kind: str, dtype: str, out: Path) -> Path:
    """Copy the correct merged checkpoint and rewrite LAYER's weight with a wrong formula."""
    src = setup["fp32" if dtype == "float32" else "bf16"]
    shutil.copytree(src, out)
    f = load_adapter(setup["adapter"]).layers[LAYER]
    w0 = load_file(str(setup["base"] / "model.safetensors"))[f"{LAYER}.weight"].double()
    dw = d2lora_delta(f, torch.float64)
    w_star = (row_norm(w0) / row_norm(w0 + dw)).unsqueeze(1) * (w0 + dw)
    if kind == "projection_left_out":
        wrong = w0 + 2 * dw
    elif kind == "extra_dw_left_out":
        wrong = w_star
    elif kind == "wrong_tau":
        f.tau = f.tau * 0.5
        dw2 = d2lora_delta(f, torch.float64)
        wrong = (row_norm(w0) / row_norm(w0 + dw2)).unsqueeze(1) * (w0 + dw2) + dw2
    else:
        raise AssertionError(kind)
    tensors = load_file(str(out / "model.safetensors"))
    tensors[f"{LAYER}.weight"] = wrong.to(tensors[f"{LAYER}.weight"].dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_correct_merge_passes_and_writes_report(setup, dtype, tmp_path):
    merged = setup["fp32" if dtype == "float32" else "bf16"]
    rep = verify(base=setup["base"], adapter=setup["adapter"], merged=merged, report_dir=tmp_path / "r", **FAST)
    assert rep.passed, rep.failures
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["passed"] is True and data["failures"] == []
    for key in ("inputs", "settings", "thresholds", "weights", "logits", "generation", "tasks", "timings_s"):
        assert key in data
    w = data["weights"]
    assert w["n_layers"] == 8 and w["merged_dtype"] == dtype
    # a correct merge is a round-to-nearest of the float64 value: within half an ulp
    assert w["max_err_over_tol"] <= 0.5 + 1e-6
    if dtype == "float32":
        assert w["max_abs_err"] < 1e-6 and w["max_frac_update_lost"] == 0.0
    src = data["logits"]["sources"][0]
    assert src["source"] == "wikitext2" and src["n_positions"] == 48
    assert src["mean_kl"] >= 0 and src["top1_agreement"] >= 0.95
    assert len(src["kl_per_position"]) == 48
    t = data["tasks"]["per_task"][0]
    assert t["task"] == "arc_easy" and t["n"] == 2
    for f in ("report.md", "report.html", "layer_error.png", "kl_per_position.png", "accuracy.png"):
        assert (tmp_path / "r" / f).stat().st_size > 0
    assert "data:image/png;base64," in (tmp_path / "r" / "report.html").read_text()


@pytest.mark.parametrize(
    "kind,dtype",
    [("projection_left_out", "float32"), ("extra_dw_left_out", "float32"), ("wrong_tau", "float32"),
     ("projection_left_out", "bfloat16"), ("wrong_tau", "bfloat16")],
)
def test_wrong_merge_fails_naming_the_layer(setup, kind, dtype, tmp_path):
    bad = _wrong_merge(setup, kind, dtype, tmp_path / "bad")
    rep = verify(base=setup["base"], adapter=setup["adapter"], merged=bad, report_dir=None,
                 **{**FAST, "tasks": "none"})
    assert not rep.passed
    weight_fails = [f for f in rep.failures if f.startswith("weights:")]
    assert len(weight_fails) == 1, rep.failures
    assert LAYER in weight_fails[0] and "float64 recomputation" in weight_fails[0]
    lay = {x["module"]: x for x in rep.data["weights"]["layers"]}
    assert not lay[LAYER]["passed"] and lay[LAYER]["max_err_over_tol"] > 1
    assert all(v["passed"] for k, v in lay.items() if k != LAYER)
    assert rep.data["weights"]["worst_layers"][0] == LAYER


def test_cli_exit_codes(setup, tmp_path):
    runner = CliRunner()
    common = ["--base", str(setup["base"]), "--adapter", str(setup["adapter"]), "--limit", "1", "--tasks", "none",
              "--windows", "1", "--window-len", "32", "--max-new-tokens", "10", "--no-base"]
    ok = runner.invoke(app, ["verify", *common, "--merged", str(setup["bf16"]), "--report", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "ok" / "report.json").read_text())["passed"] is True
    bad = _wrong_merge(setup, "extra_dw_left_out", "float32", tmp_path / "bad")
    res = runner.invoke(app, ["verify", *common, "--merged", str(bad), "--report", str(tmp_path / "fail")])
    assert res.exit_code == 1, res.output
    assert LAYER in res.output and "FIDELITY FAILED" in res.output
    assert json.loads((tmp_path / "fail" / "report.json").read_text())["passed"] is False  # report kept
    usage = [
        ["--merged", str(tmp_path / "nope"), "--report", str(tmp_path / "u1")],
        ["--merged", str(setup["fp32"]), "--report", str(tmp_path / "u2"), "--threshold", "bogus=1"],
        ["--merged", str(setup["fp32"]), "--report", str(tmp_path / "u3"), "--tasks", "mmlu"],
        ["--merged", str(setup["fp32"]), "--report", str(tmp_path / "u4"), "--data", str(tmp_path / "nodata")],
    ]
    for extra in usage:
        r = runner.invoke(app, ["verify", *common, *extra])
        assert r.exit_code == 2, (extra, r.output)
    assert not any((tmp_path / u).exists() for u in ("u1", "u2", "u3", "u4"))


def test_threshold_override_turns_bf16_into_failure(setup):
    """A zero KL budget must fail the bf16 checkpoint (its rounding moves the logits a little)."""
    rep = verify(base=setup["base"], adapter=setup["adapter"], merged=setup["bf16"], report_dir=None,
                 **{**FAST, "tasks": "none"}, thresholds=["max_mean_kl=0"])
    assert not rep.passed
    assert any(f.startswith("logits[wikitext2]: mean KL") for f in rep.failures)


def test_generation_comparison_matches_transformers_generate_and_ignores_eos(tiny_llama_dir):
    """Greedy tokens equal HF generate's (EOS suppressed) and the first divergence is located exactly."""
    import copy

    from d2serve.models import load_hf_model, load_tokenizer
    from d2serve.verify.generation import compare_generation, encode_prompt

    tok = load_tokenizer(tiny_llama_dir)
    a = load_hf_model(tiny_llama_dir)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight.mul_(1.05)
    prompts = ["The quick brown fox", "Question: is fire cold?"]
    res = compare_generation(a, b, tok, prompts, max_new_tokens=12, chat=False)

    def hf(model, prompt):
        ids = encode_prompt(tok, prompt, chat=False)
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, repetition_penalty=None,
                             suppress_tokens=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
        return out[0, ids.shape[1]:].tolist()

    n_diverged = 0
    for r, prompt in zip(res, prompts):
        ra, rb = hf(a, prompt), hf(b, prompt)
        assert r.n_tokens_a == r.n_tokens_b == 12
        expected = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None)
        if tok.eos_token_id not in ra + rb:  # HF's suppressed EOS can only differ where greedy picked EOS
            assert r.first_divergence == expected
        n_diverged += r.first_divergence is not None
    assert n_diverged >= 1  # the perturbation is visible: the comparison is not vacuous
    same = compare_generation(a, a, tok, prompts, max_new_tokens=12, chat=False)
    assert all(r.identical and r.n_tokens_a == 12 for r in same)
