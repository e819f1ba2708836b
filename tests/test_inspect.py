"""`d2serve inspect`: what an adapter holds and whether it fits a base."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from d2serve.adapters.io import load_adapter
from d2serve.adapters.methods import get_method
from d2serve.cli import app
from d2serve.inspect import inspect_adapter



def test_inspect_reports_layers_and_fit(tiny_llama_dir, tiny_d2lora_adapter, tmp_path):
    info = inspect_adapter(tiny_d2lora_adapter, tiny_llama_dir)
    assert info["method"] == "d2lora" and info["num_layers"] == 8 and info["fits_base"]["ok"]
    adp = load_adapter(tiny_d2lora_adapter)
    f = adp.layers["model.layers.0.self_attn.k_proj"]
    row = next(r for r in info["layers"] if r["module"] == "model.layers.0.self_attn.k_proj")
    assert row["shape"] == [32, 64] and row["rank"] == 4 and row["tau"] == 0.7
    assert abs(row["delta_fro"] - float(torch.linalg.norm(get_method("d2lora").delta(f, torch.float64)))) < 1e-12
    assert info["num_parameters"] == sum(t.numel() for f in adp.layers.values() for t in f.tensors.values())


def test_inspect_cli_says_when_the_base_does_not_fit(tiny_d2lora_adapter, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    res = CliRunner().invoke(app, ["inspect", str(tiny_d2lora_adapter), "--base", str(other)])
    assert res.exit_code == 1, res.output
    assert "does not fit" in res.output and "q_proj" in res.output
    ok = CliRunner().invoke(app, ["inspect", str(tiny_d2lora_adapter)])
    assert ok.exit_code == 0 and "method d2lora" in ok.output and "r=4" in ok.output


def _with_base_name(adapter, tmp_path, name):
    import json
    import shutil

    out = tmp_path / f"adapter-{abs(hash(name))}"
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = name
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_inspect_warns_when_the_adapter_names_another_base(tiny_llama_dir, tiny_d2lora_adapter, tmp_path):
    """Shapes fit, but the adapter says it was trained on another model: warn (inspect, merge, verify)."""
    from d2serve.inspect import base_name_warning

    base = tmp_path / "SmolLM2-135M-Instruct"
    import shutil

    shutil.copytree(tiny_llama_dir, base)
    v1 = _with_base_name(tiny_d2lora_adapter, tmp_path, "HuggingFaceTB/SmolLM-135M-Instruct")
    info = inspect_adapter(v1, base)
    assert info["fits_base"]["ok"] is True
    w = info["fits_base"]["warning"]
    assert w and "'HuggingFaceTB/SmolLM-135M-Instruct'" in w and "SmolLM2-135M-Instruct" in w
    # owner/name vs folder name, case and separators normalised; a path to the base itself: no warning
    for same in ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2_135m_instruct", str(base) + "/"):
        assert base_name_warning(_with_base_name(tiny_d2lora_adapter, tmp_path, same), base) is None, same
    assert base_name_warning(_with_base_name(tiny_d2lora_adapter, tmp_path, ""), base) is None
    res = CliRunner().invoke(app, ["inspect", str(v1), "--base", str(base)])
    assert res.exit_code == 0 and "warning:" in res.output and "SmolLM-135M-Instruct" in res.output
    merged = CliRunner().invoke(app, ["merge", "--base", str(base), "--adapter", str(v1), "--out", str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output
    assert "warning:" in merged.output and "SmolLM-135M-Instruct" in merged.output
