"""verify's gates: a NaN weight fails naming the tensor (no crash), an EOS-only model's generation check is not
evidence (fails on content tokens), and the adapter's training probe is compared when present."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from d2serve.adapters.synthetic import random_adapter
from d2serve.cli import app
from d2serve.merge import merge
from d2serve.probe import PROBE_NAME
from d2serve.verify import verify

from conftest import make_eos_only_llama

LAYER = "model.layers.1.self_attn.v_proj"
FAST = dict(tasks="none", windows=1, window_len=32, prompts=["The capital of France is", "Question: is fire cold?"],
            max_new_tokens=10, base_accuracy=False)


@pytest.fixture(scope="module")
def setup(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gates")
    adp = random_adapter(tiny_llama_dir, root / "adapter", tau=0.7, seed=3)
    m32 = merge(base=tiny_llama_dir, adapter=adp, out=root / "merged", dtype="float32").out
    return {"root": root, "base": tiny_llama_dir, "adapter": adp, "merged": m32}


def _with_nan(src: Path, out: Path, tensor: str, index=(3, 5)) -> Path:
    shutil.copytree(src, out)
    t = load_file(str(out / "model.safetensors"))
    t[tensor][index] = float("nan")
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_nan_weight_fails_naming_the_tensor_and_writes_report(setup, tmp_path):
    bad = _with_nan(setup["merged"], tmp_path / "nan", f"{LAYER}.weight")
    res = CliRunner().invoke(app, [
        "verify", "--base", str(setup["base"]), "--adapter", str(setup["adapter"]), "--merged", str(bad),
        "--report", str(tmp_path / "rep"), "--tasks", "none", "--windows", "1", "--window-len", "32",
        "--max-new-tokens", "10", "--no-base"])
    assert res.exit_code == 1, res.output  # a check failed; not a crash (which would be another exit code)
    assert res.exception is None or isinstance(res.exception, SystemExit)
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["passed"] is False
    f = data["failures"]
    assert any(x.startswith(f"weights: tensor {LAYER}.weight") and "1 non-finite" in x and "(3, 5)" in x for x in f), f
    lay = {x["module"]: x for x in data["weights"]["layers"]}
    assert lay[LAYER]["n_nonfinite"] == 1 and lay[LAYER]["passed"] is False
    assert lay[LAYER]["worst_index"] == [3, 5]
    assert all(v["n_nonfinite"] == 0 and v["passed"] for k, v in lay.items() if k != LAYER)
    # the logits of the merged model are NaN: named, not compared as "no difference"
    src = data["logits"]["sources"][0]
    assert src["nonfinite"]["side"] == "merged" and src["mean_kl"] is None
    assert any(x.startswith("logits[wikitext2]: merged has") for x in f), f
    # greedy generation saw NaN logits of the merged model at the first new token
    assert any("generation[prompt 0" in x and "merged has" in x and "new token 0" in x for x in f), f
    assert (tmp_path / "rep" / "report.html").stat().st_size > 0


def test_nan_in_untouched_tensor_fails(setup):
    bad = _with_nan(setup["merged"], setup["root"] / "nan_norm", "model.norm.weight", index=(0,))
    rep = verify(base=setup["base"], adapter=setup["adapter"], merged=bad, report_dir=None, **FAST)
    assert not rep.passed
    assert any("model.norm.weight" in x for x in rep.failures), rep.failures


def test_eos_only_model_generation_is_not_evidence(setup, tmp_path):
    base = make_eos_only_llama(setup["base"], tmp_path / "eos_base")
    adp = random_adapter(base, tmp_path / "adapter", tau=0.7, seed=3)
    merged = merge(base=base, adapter=adp, out=tmp_path / "merged", dtype="float32").out
    rep = verify(base=base, adapter=adp, merged=merged, report_dir=None, **FAST)
    gen = rep.data["generation"]
    assert gen["n_identical"] == gen["n_prompts"] == 2  # merged == unmerged: every token identical ...
    assert gen["n_content_tokens_compared"] == 0  # ... but every one of them is EOS
    assert all(p["n_compared"] == 10 and p["n_content_compared"] == 0 for p in gen["prompts"])
    fails = [x for x in rep.failures if x.startswith("generation:")]
    assert len(fails) == 1 and "0 content tokens compared" in fails[0], rep.failures
    assert not rep.passed
    # everything else about this merge is right: only the generation gate fails
    assert all(x.startswith("generation:") for x in rep.failures), rep.failures
    # the same models pass the gate once it is lowered to 0 (the gate is what failed)
    ok = verify(base=base, adapter=adp, merged=merged, report_dir=None, **FAST,
                thresholds={"min_content_tokens_per_prompt": 0})
    assert ok.passed, ok.failures


def test_ordinary_model_compares_content_tokens(setup):
    rep = verify(base=setup["base"], adapter=setup["adapter"], merged=setup["merged"], report_dir=None, **FAST)
    assert rep.passed, rep.failures
    gen = rep.data["generation"]
    assert gen["n_content_tokens_compared"] >= 8 * gen["n_prompts"]


def test_max_new_tokens_below_content_floor_is_bad_input(setup, tmp_path):
    from d2serve.errors import InputError

    with pytest.raises(InputError, match="max_new_tokens 4 < min_content_tokens_per_prompt 8"):
        verify(base=setup["base"], adapter=setup["adapter"], merged=setup["merged"], report_dir=tmp_path / "r",
               **{**FAST, "max_new_tokens": 4})
    assert not (tmp_path / "r").exists()


def _with_probe(setup, out: Path, corrupt: bool = False) -> Path:
    """A copy of the adapter with a probe file: the unmerged model's logits on fixed ids (as the trainer writes)."""
    from d2serve.models import load_unmerged_model

    shutil.copytree(setup["adapter"], out)
    ids = torch.tensor([[1, 5, 9, 17, 33, 60, 101, 7], [1, 8, 8, 40, 2, 90, 11, 3]], dtype=torch.long)
    model = load_unmerged_model(setup["base"], out, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    if corrupt:
        logits[1, 4, 7] = float("nan")
    save_file({"input_ids": ids, "logits": logits}, str(out / PROBE_NAME))
    return out


def test_training_probe_is_compared_and_reported(setup, tmp_path):
    adp = _with_probe(setup, tmp_path / "adapter_probe")
    rep = verify(base=setup["base"], adapter=adp, merged=setup["merged"], report_dir=tmp_path / "r", **FAST)
    assert rep.passed, rep.failures
    srcs = {s["source"]: s for s in rep.data["logits"]["sources"]}
    assert "training_probe" in srcs and srcs["training_probe"]["n_positions"] == 16
    assert srcs["training_probe"]["top1_agreement"] == 1.0
    probe = rep.data["logits"]["training_probe"]
    assert probe["n_sequences"] == 2 and probe["n_tokens"] == 8
    assert probe["max_abs_logit_diff_trainer_vs_unmerged"] < 1e-4
    assert "training probe" in (tmp_path / "r" / "report.md").read_text()


def test_training_probe_with_nan_fails_naming_it(setup, tmp_path):
    adp = _with_probe(setup, tmp_path / "adapter_probe_nan", corrupt=True)
    rep = verify(base=setup["base"], adapter=adp, merged=setup["merged"], report_dir=None, **FAST)
    assert not rep.passed
    assert any(x.startswith("logits[training_probe]: trainer has 1 non-finite value") and
               "sequence 1, position 4, vocab 7" in x for x in rep.failures), rep.failures


def test_bad_task_data_is_rejected_before_model_work(setup, tmp_path, monkeypatch):
    """A malformed task file is bad input (exit 2) found before any model is loaded."""
    import d2serve.models as models
    from d2serve.verify.data import bundled_data_dir

    data = tmp_path / "data"
    shutil.copytree(bundled_data_dir(), data)
    (data / "ARC-Easy" / "ARC-Easy-Test.jsonl").write_text('{"broken": \n')

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the task data was checked")

    monkeypatch.setattr(models, "load_unmerged_model", boom)
    monkeypatch.setattr(models, "unmerged_model", boom)
    monkeypatch.setattr(models, "load_hf_model", boom)
    from d2serve.errors import InputError

    with pytest.raises(InputError, match="ARC-Easy-Test.jsonl"):
        verify(base=setup["base"], adapter=setup["adapter"], merged=setup["merged"], report_dir=None,
               data_dir=data, **{**FAST, "tasks": "arc_easy"})
