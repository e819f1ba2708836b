"""ONNX export parity gates: NaN logits fail naming them; an EOS-only model's genai parity is not evidence."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import make_eos_only_llama

pytestmark = pytest.mark.onnx


def test_plain_export_with_nan_weight_fails_parity_naming_nonfinite_logits(tiny_llama_dir, tmp_path):
    from d2serve.export.onnx import export_onnx

    bad = tmp_path / "nan_model"
    shutil.copytree(tiny_llama_dir, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    rep = export_onnx(merged=bad, out=tmp_path / "onnx", target="plain")
    assert rep.passed is False
    assert rep.failures and all(f.startswith("non-finite logits: plain parity, case ") for f in rep.failures)
    assert "transformers has" in rep.failures[0] and "position 0, vocab 0" in rep.failures[0]
    assert rep.parity["max_abs_logit_diff"] is None and rep.parity["top1_agreement"] is None
    assert len(rep.parity["nonfinite"]) == len(rep.parity["cases"])  # every case saw it; none read as "0 diff"
    man = json.loads((tmp_path / "onnx" / "d2serve_export.json").read_text())
    assert man["passed"] is False and man["failures"] == rep.failures


def test_genai_parity_of_eos_only_model_fails_on_content_tokens(tiny_llama_dir, tmp_path):
    from d2serve.export.onnx import export_onnx

    model = make_eos_only_llama(tiny_llama_dir, tmp_path / "eos_model")
    rep = export_onnx(merged=model, out=tmp_path / "genai", target="genai", max_new_tokens=10,
                      prompts=["The capital of France is", "Question: is fire cold?"])
    p = rep.parity
    assert p["all_identical"] is True and p["top1_agreement"] == 1.0  # ORT-GenAI agrees token for token ...
    assert all(len(r["reference_tokens"]) == 10 for r in p["prompts"])  # EOS ignored: 10 tokens decoded ...
    assert p["n_content_tokens_compared"] == 0  # ... but they are all EOS
    assert not rep.passed
    assert len(rep.failures) == 1 and "0 content tokens compared" in rep.failures[0], rep.failures


def test_genai_parity_of_ordinary_model_counts_content_tokens(tiny_llama_dir, tmp_path):
    from d2serve.export.onnx import export_onnx

    rep = export_onnx(merged=tiny_llama_dir, out=tmp_path / "genai", target="genai", max_new_tokens=10,
                      prompts=["The capital of France is", "Question: is fire cold?"])
    assert rep.passed, rep.failures
    assert rep.parity["n_content_tokens_compared"] >= 16
    assert all(r["n_compared"] == 10 for r in rep.parity["prompts"])
