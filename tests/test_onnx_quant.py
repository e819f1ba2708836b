"""The quantization fidelity gate (d2serve.export.onnx_quant) and ONNX exports as verify's model under test.

ORT-GenAI runs on the tiny random Llama (tied embeddings). The gate must pass the fp32 export (equal to the
reference to float32 rounding) and fail an export whose weights were corrupted, with numbers that match an
independent transformers-vs-transformers computation; the lm-eval adapter's log-likelihoods must equal HFLM's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from d2serve.errors import InputError
from d2serve.export.onnx_quant import QuantGate, gate_failures, get_recipe, parse_gate

TASKS = "arc_easy,piqa"
LIMIT = 8


def _long_context_copy(src: Path, dst: Path) -> Path:
    """Copy a checkpoint with max_position_embeddings 4096 (task contexts exceed the fixture's 256; RoPE is unchanged)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _fid(w_top1=1.0, kl=0.0, greedy=1.0, gap=0.0) -> dict:
    return {"nonfinite": None, "wikitext2": {"top1_agreement": w_top1, "mean_kl": kl},
            "greedy": {"agreement": greedy},
            "tasks": {"gap_pp": gap, "acc_onnx": 0.5 + gap / 100, "acc_merged": 0.5, "n": 100}}


def test_gate_rules_and_overrides():
    g = QuantGate()
    assert (g.min_top1_agreement, g.max_acc_gap_pp) == (0.95, 2.0)
    assert gate_failures(_fid(), g) == []
    assert gate_failures(_fid(w_top1=0.9499), g)[0].startswith("wikitext2 top-1 agreement 0.9499 < min_top1_agreement 0.95")
    assert "gap -2.50 pp exceeds max_acc_gap_pp 2" in gate_failures(_fid(gap=-2.5), g)[0]
    assert gate_failures(_fid(gap=2.0), g) == []  # the bound is inclusive
    assert gate_failures(_fid(kl=5.0, greedy=0.0), g) == []  # reported only by default
    strict = parse_gate(["max_mean_kl=0.1", "min_greedy_agreement=0.5", "max_acc_gap_pp=1"])
    assert len(gate_failures(_fid(kl=0.2, greedy=0.4, gap=1.5), strict)) == 3
    nan = _fid()
    nan["wikitext2"]["top1_agreement"] = float("nan")  # NaN never passes
    assert gate_failures(nan, g)
    assert gate_failures({"nonfinite": {"message": "x: onnx has 1 non-finite value"}}, g)[0].startswith("non-finite")
    assert g.to_json()["max_mean_kl"] is None
    with pytest.raises(InputError, match="unknown quant threshold 'top1'"):
        parse_gate(["top1=0.9"])
    with pytest.raises(InputError, match="expected a number"):
        parse_gate({"max_acc_gap_pp": "two"})
    with pytest.raises(InputError, match="expected auto or one of int4, "):
        get_recipe("int3")


@pytest.fixture(scope="module")
def gate_setup(tiny_llama_tied_dir, tmp_path_factory):
    """The tiny tied model (long context), its fp32 genai export, a corrupted copy's fp32 export, the gate reference."""
    from d2serve.export.onnx import export_onnx
    from d2serve.export.onnx_quant import build_reference

    root = tmp_path_factory.mktemp("quant")
    good = _long_context_copy(tiny_llama_tied_dir, root / "good")
    bad = _long_context_copy(tiny_llama_tied_dir, root / "bad")
    from safetensors.torch import load_file, save_file

    sd = load_file(bad / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    key = "model.layers.1.mlp.down_proj.weight"
    sd[key] = sd[key] + 0.5 * torch.randn(sd[key].shape, generator=g)  # a corrupted projection
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    export_onnx(merged=good, out=root / "good_onnx", target="genai", precision="fp32", max_new_tokens=16)
    export_onnx(merged=bad, out=root / "bad_onnx", target="genai", precision="fp32", max_new_tokens=16)
    ref = build_reference(good, windows=2, window_len=64, max_new_tokens=16, tasks=TASKS, limit=LIMIT)
    return {"good": good, "bad": bad, "good_onnx": root / "good_onnx", "bad_onnx": root / "bad_onnx", "ref": ref}


def _hf_window_metrics(ref, other_dir: Path) -> tuple[float, float]:
    """Independent: (top-1 agreement, mean KL) of transformers(other) vs the reference logits, float64 numpy."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(other_dir), dtype=torch.float32)
    with torch.no_grad():
        ol = np.stack([m(input_ids=w.unsqueeze(0)).logits[0].numpy() for w in ref.windows]).astype(np.float64)
    rl = ref.window_logits.astype(np.float64)

    def logsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lr, lo = logsm(rl), logsm(ol)
    kl = (np.exp(lr) * (lr - lo)).sum(-1)
    return float((rl.argmax(-1) == ol.argmax(-1)).mean()), float(kl.mean())


@pytest.mark.onnx
def test_gate_passes_fp32_export(gate_setup):
    from d2serve.export.onnx_quant import measure_fidelity

    fid = measure_fidelity(gate_setup["good_onnx"], gate_setup["ref"])
    w, t = fid["wikitext2"], fid["tasks"]
    assert w["n_positions"] == 2 * 64 and w["top1_agreement"] == 1.0 and w["mean_kl"] < 1e-8
    assert w["max_abs_logit_diff"] < 1e-3 and fid["greedy"]["agreement"] == 1.0
    assert [p["task"] for p in t["per_task"]] == ["arc_easy", "piqa"] and t["n"] == 2 * LIMIT
    assert t["gap_pp"] == 0.0 and all(p["n_prediction_changed"] == 0 for p in t["per_task"])
    assert gate_failures(fid, QuantGate()) == []


@pytest.mark.onnx
def test_gate_fails_corrupted_weights_with_independent_numbers(gate_setup):
    from d2serve.export.onnx_quant import measure_fidelity

    fid = measure_fidelity(gate_setup["bad_onnx"], gate_setup["ref"])
    top1, kl = _hf_window_metrics(gate_setup["ref"], gate_setup["bad"])
    w = fid["wikitext2"]
    assert top1 < 0.95 and kl > 0.01  # the corruption is large by an independent measure
    assert abs(w["top1_agreement"] - top1) <= 1 / w["n_positions"]  # ONNX fp32 = transformers fp32 up to a near-tie
    assert w["mean_kl"] == pytest.approx(kl, rel=1e-3)
    fails = gate_failures(fid, QuantGate())
    assert fails and fails[0].startswith(f"wikitext2 top-1 agreement {w['top1_agreement']:.4f} < min_top1_agreement")


@pytest.mark.onnx
def test_ort_lm_loglikelihoods_equal_hflm(gate_setup):
    """The lm-eval adapter over ORT-GenAI gives HFLM's log-likelihoods and greedy flags on the fp32 export."""
    from lm_eval.api.instance import Instance

    from d2serve.runtimes.ort_genai import OrtGenaiLM, OrtGenaiModel

    like = gate_setup["ref"].hf_like
    reqs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate([
        ("Question: is the sky blue?\nAnswer:", " yes"), ("Question: is fire cold?\nAnswer:", " no"),
        ("The quick brown fox ", "jumps over the lazy dog."), ("", "To be, or not to be")])]
    ours = OrtGenaiLM(OrtGenaiModel(gate_setup["good_onnx"]), like).loglikelihood(reqs, disable_tqdm=True)
    theirs = like.loglikelihood(reqs, disable_tqdm=True)
    assert len(ours) == 4
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb


@pytest.mark.onnx
def test_cli_quant_failing_gate_exits_1_keeps_folder_and_records_every_recipe(gate_setup, tmp_path):
    """--quant with two recipes and an impossible gate: both tried and recorded, the last kept, passed false, exit 1."""
    from typer.testing import CliRunner

    from d2serve.cli import app

    out = tmp_path / "q"
    res = CliRunner().invoke(app, [
        "export", "onnx", "--merged", str(gate_setup["good"]), "--out", str(out), "--quant", "int4,int8-acc1",
        "--limit", "4", "--max-new-tokens", "16", "--threshold", "min_top1_agreement=1.0",
        "--threshold", "max_acc_gap_pp=0"])
    assert res.exit_code == 1, res.output
    man = json.loads((out / "d2serve_export.json").read_text())
    assert man["passed"] is False and man["failures"][0].startswith("quant gate: no recipe passed (int4, int8-acc1)")
    q = man["quant"]
    assert q["recipe"] == "int8-acc1" and man["precision"] == "int8" and [t["recipe"] for t in q["tried"]] == ["int4", "int8-acc1"]
    assert q["gate"]["min_top1_agreement"] == 1.0
    for t in q["tried"]:
        assert t["passed"] is False and t["size_bytes"] > 0 and t["speed"]["decode_tokens_per_s"] > 0
        assert 0 <= t["fidelity"]["wikitext2"]["top1_agreement"] < 1.0
    assert "accuracy_level=1" in man["parity"]["builder_args"]
    assert (out / "model.onnx").is_file() and not list(tmp_path.glob(".q*"))  # no trial folders left behind


@pytest.mark.onnx
def test_cli_quant_passing_recipe_exits_0(gate_setup, tmp_path):
    from typer.testing import CliRunner

    from d2serve.cli import app

    out = tmp_path / "q"
    res = CliRunner().invoke(app, [
        "export", "onnx", "--merged", str(gate_setup["good"]), "--out", str(out), "--quant", "int8-acc1",
        "--limit", "4", "--max-new-tokens", "16", "--threshold", "min_top1_agreement=0.9"])
    assert res.exit_code == 0, res.output
    man = json.loads((out / "d2serve_export.json").read_text())
    assert man["passed"] is True and man["quant"]["recipe"] == "int8-acc1"
    assert man["quant"]["tried"][0]["fidelity"]["wikitext2"]["top1_agreement"] >= 0.9


@pytest.mark.onnx
def test_verify_accepts_an_onnx_export_as_the_model_under_test(tiny_llama_dir, tiny_d2lora_adapter, tmp_path):
    """verify --merged <genai export of the merge>: weights skipped with a reason, logits/generation/tasks via ORT."""
    from d2serve.export.onnx import export_onnx
    from d2serve.merge import merge
    from d2serve.verify import verify

    merged = tmp_path / "merged"
    merge(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, out=merged, dtype="float32")
    cfg = json.loads((merged / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (merged / "config.json").write_text(json.dumps(cfg))
    export_onnx(merged=merged, out=tmp_path / "onnx", target="genai", precision="fp32", max_new_tokens=16)
    rep = verify(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, merged=tmp_path / "onnx", report_dir=tmp_path / "r",
                 tasks="arc_easy", limit=4, windows=1, window_len=64, max_new_tokens=16, base_accuracy=False)
    d = rep.data
    assert d["weights"] is None and d["settings"]["weights_check"].startswith("skipped: the model under test is an ONNX")
    assert d["inputs"]["merged_dtype"].startswith("onnx genai fp32")
    src = d["logits"]["sources"][0]
    assert src["top1_agreement"] == 1.0 and src["mean_kl"] < 1e-8
    assert d["generation"]["n_identical"] == d["generation"]["n_prompts"]
    t = d["tasks"]["per_task"][0]
    assert t["n"] == 4 and t["gap_pp"] == 0.0 and t["max_abs_loglikelihood_diff"] < 1e-3
    assert rep.passed, rep.failures
    assert json.loads((tmp_path / "r" / "report.json").read_text())["weights"] is None
