"""Unmerged vLLM serving of D2-LoRA / DoRA / LoRA: the fold math (fast, float64), the folder layout, and real vLLM
runs (marked vllm): three adapters served together from one engine match their merged checkpoints, base requests
are unchanged, a mixed batch equals solo runs, and vanilla vLLM (plugin disabled) refuses the folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_vllm_tiny_llama
from d2serve.adapters.io import load_adapter
from d2serve.adapters.methods import get_method
from d2serve.adapters.synthetic import random_adapter
from d2serve.checkpoint import Checkpoint
from d2serve.errors import InputError
from d2serve.export.vllm_lora import (
    MANIFEST_NAME, SCALES_NAME, export_vllm_lora, parse_adapter_specs, vllm_max_lora_rank,
)

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapters(base: Path, root: Path) -> dict[str, Path]:
    return {
        "d2": random_adapter(base, root / "d2", method="d2lora", r=4, lora_alpha=8.0, std=0.1, seed=1,
                             target_modules=ALL7),
        "dora": random_adapter(base, root / "dora", method="dora", r=4, lora_alpha=8.0, std=0.1, seed=2,
                               target_modules=ALL7),
        "lora": random_adapter(base, root / "lora", method="lora", r=4, lora_alpha=8.0, std=0.1, seed=3,
                               target_modules=("q_proj", "v_proj", "down_proj")),
    }


@pytest.mark.parametrize("method", ["d2lora", "dora", "lora"])
def test_fold_equals_merged_layer_float64(tiny_llama_dir, tmp_path, method):
    """s * (x W0^T) + x (B' A')^T + b == x W_hat^T + b for every adapted layer (float64, 1e-10)."""
    adp = load_adapter(random_adapter(tiny_llama_dir, tmp_path / "a", method=method, r=4, lora_alpha=8.0, std=0.2,
                                      seed=7, target_modules=ALL7))
    m = get_method(method)
    ckpt = Checkpoint(tiny_llama_dir)
    g = torch.Generator().manual_seed(0)
    worst, s_dev = 0.0, 0.0
    for module, f in adp.layers.items():
        w0 = ckpt.get_tensor(f"{module}.weight").double()
        x = torch.randn(5, w0.shape[1], generator=g, dtype=torch.float64)
        b = torch.randn(w0.shape[0], generator=g, dtype=torch.float64)
        s, a, bb = m.fold(w0, f, torch.float64)
        unmerged = s * (x @ w0.T) + x @ (bb @ a).T + b
        merged = x @ m.merged_weight(w0, f, torch.float64).T + b
        worst = max(worst, float(((unmerged - merged).abs() / merged.abs().max()).max()))
        s_dev = max(s_dev, float((s - 1).abs().max()))
        assert a.shape[0] == (2 * 4 if method == "d2lora" else 4)
    assert worst < 1e-10, worst
    assert (s_dev > 1e-3) == (method != "lora"), s_dev  # a real row scale except for plain LoRA


def test_export_folder_layout(tiny_llama_dir, tmp_path):
    """PEFT LoRA layout, r = lora_alpha = folded rank, use_dora + marker only where s != 1, scales per module,
    and the written float32 files rebuild W_hat."""
    ads = _adapters(tiny_llama_dir, tmp_path)
    ckpt = Checkpoint(tiny_llama_dir)
    for name, adapter in ads.items():
        out = tmp_path / f"{name}-vl"
        man = export_vllm_lora(base=tiny_llama_dir, adapter=adapter, out=out)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == cfg["lora_alpha"] == man["rank"] == (8 if name == "d2" else 4)
        assert cfg["use_dora"] is (name != "lora") and cfg["d2serve"]["format"] == 1
        assert set(cfg["d2serve"]["base_sha256"]) == set(ckpt.shards)
        assert json.loads((out / MANIFEST_NAME).read_text())["method"] == man["method"]
        w, s = load_file(str(out / "adapter_model.safetensors")), load_file(str(out / SCALES_NAME))
        adp = load_adapter(adapter)
        method = get_method(adp.method)
        assert len(s) == len(adp.layers) and len(w) == 2 * len(adp.layers)
        for module, f in adp.layers.items():
            key = f"base_model.model.{module}"
            sv = s[f"{key}.d2_scale"]
            assert sv.dtype == torch.float32 and sv.shape == (f.tensors[method.pairs[0][1]].shape[0],)
            w0 = ckpt.get_tensor(f"{module}.weight").double()
            rebuilt = sv.double()[:, None] * w0 + w[f"{key}.lora_B.weight"].double() @ w[f"{key}.lora_A.weight"].double()
            want = method.merged_weight(w0, f, torch.float64)
            assert float((rebuilt - want).abs().max() / want.abs().max()) < 1e-6
        if name == "lora":
            assert all(bool((v == 1).all()) for v in s.values())


def test_export_refuses_wrong_base_and_bad_specs(tiny_llama_dir, tiny_llama_tied_dir, tmp_path):
    ads = _adapters(tiny_llama_dir, tmp_path)
    with pytest.raises(InputError, match="d2_magnitude"):
        export_vllm_lora(base=tiny_llama_tied_dir, adapter=ads["d2"], out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="NAME=DIR"):
        parse_adapter_specs(["nodir"])
    with pytest.raises(InputError, match="twice"):
        parse_adapter_specs(["a=x", "a=y"])
    assert parse_adapter_specs(["a=x", "b=y=z"]) == {"a": Path("x"), "b": Path("y=z")}
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 320, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(InputError):
        vllm_max_lora_rank(513)


# ------------------------------------------------------------------------------------------ real vLLM runs

needs_vllm = pytest.mark.vllm  # vllm is pinned: a missing vllm fails these tests instead of skipping them


@pytest.fixture(scope="module")
def vllm_lora_setup(tmp_path_factory):
    """The vLLM-sized tiny Llama, a random D2-LoRA, a PEFT DoRA and a PEFT LoRA adapter (all with non-zero B),
    each folded for vLLM and merged in float32."""
    from peft_oracle import peft_adapter

    from d2serve.merge import merge

    root = tmp_path_factory.mktemp("vllm_lora")
    base = make_vllm_tiny_llama(root / "base")
    ads = {"d2": random_adapter(base, root / "d2", method="d2lora", r=4, lora_alpha=8.0, std=0.1, seed=1,
                                target_modules=ALL7),
           "dora": peft_adapter(base, root / "dora", seed=2, target_modules=list(ALL7), use_dora=True),
           "lora": peft_adapter(base, root / "lora", seed=3, target_modules=["q_proj", "v_proj", "down_proj"])}
    pairs = {}
    for n, a in ads.items():
        export_vllm_lora(base=base, adapter=a, out=root / f"{n}-vl")
        merge(base=base, adapter=a, out=root / f"{n}-merged", dtype="float32")
        pairs[n] = (root / f"{n}-vl", root / f"{n}-merged")
    return base, pairs


@pytest.mark.vllm
@needs_vllm
def test_vllm_unmerged_equals_merged_three_adapters_one_engine(vllm_lora_setup):
    from d2serve.export.vllm_lora_check import parity_check

    base, pairs = vllm_lora_setup
    rep = parity_check(base, pairs, dtype="float32", n_prompts=3, max_tokens=32, max_lora_rank=8)
    print(json.dumps({k: v for k, v in rep.items()}, indent=1))
    for n, a in rep["adapters"].items():
        assert a["passed"] and a["first_divergences"] == [None] * 3, (n, a)  # identical tokens, all 32
        assert a["max_abs_logprob_diff"] <= 1e-3, (n, a)
        assert a["n_prompts_differing_from_base"] >= 2, (n, a)  # the adapters change the outputs (not vacuous)
    assert rep["base"]["passed"] and rep["base"]["max_abs_logprob_diff"] <= 1e-5, rep["base"]
    assert rep["mixed_vs_alone"]["passed"] and rep["mixed_vs_alone"]["first_divergences"] == [None] * 12
    assert rep["passed"]


@pytest.mark.vllm
@needs_vllm
def test_vanilla_vllm_refuses_the_folder(vllm_lora_setup):
    """Without d2serve's plugin (VLLM_PLUGINS=''), vLLM refuses a folder whose row scales are not 1 (never serves
    it silently as a plain LoRA)."""
    from d2serve.childproc import child_env
    from d2serve.export.vllm import VllmLoadError
    from d2serve.export.vllm_lora_check import run_jobs

    base, pairs = vllm_lora_setup
    env = child_env(kv_cache_gib=1, vllm_plugins="")
    job = {"model": str(base), "dtype": "float32", "max_model_len": 256, "max_tokens": 4,
           "loras": {"d2": str(pairs["d2"][0])}, "max_lora_rank": 8, "max_loras": 2,
           "runs": [{"name": "x", "requests": [{"prompt_token_ids": [1, 5, 17], "lora": "d2"}]}]}
    with pytest.raises(VllmLoadError, match="does not yet support DoRA"):
        run_jobs([job], env=env, timeout_s=600)


def test_cli_serve_accepts_repeated_adapter_option():
    """``serve --adapter`` is repeatable (the single-value guard applies to other options only)."""
    from typer.testing import CliRunner

    from d2serve.cli import app

    r = CliRunner().invoke(app, ["serve", "--model", "/nonexistent", "--adapter", "a=x", "--adapter", "a=y"])
    assert r.exit_code == 2 and "given twice" in r.output, r.output
    assert "was given 2 times" not in r.output


@pytest.mark.vllm
def test_bench_vllm_unmerged_arm(vllm_lora_setup, tmp_path):
    """`d2serve bench --backend vllm` runs the unmerged arm through the plugin: generation with exactly the
    planned tokens in every arm, merged/unmerged ratios, every arm's compile mode recorded (one mode: the fair
    comparison), the arms comparable; the eval workload scores every arm with prompt_logprobs (the unmerged one
    through the plugin's per-row LoRA slots): merged/unmerged and merged/base examples/s ratios with their spread,
    and the unmerged arm picks the merged arm's answer on every example."""
    from dataclasses import replace

    from d2serve.bench import QUICK_PLAN, bench

    base, pairs = vllm_lora_setup
    adapter = pairs["d2"][0].parent / "d2"
    plan = replace(QUICK_PLAN, batches=(2,), prompt_lens=(16,), max_new_tokens=16, warmup=0, repeats=2,
                   eval_examples=6)
    res = bench(base=base, adapter=adapter, merged=pairs["d2"][1], report=tmp_path / "r", backend="vllm",
                arms=("base", "merged", "unmerged", "vanilla_lora"), plan=plan, workloads=("eval", "generation"),
                progress=False)
    assert res["comparability"]["comparable"], res["comparability"]
    assert "skipped" not in res, res.get("skipped")
    ev = res["workloads"]["eval_throughput"]
    assert ev["examples"] == 6 and set(ev["arms"]) == {"base", "merged", "unmerged", "vanilla_lora"}
    # the plugin-cost control: same LoRA slots and rank, no plugin in its engine; the plugin active in the others
    arms = res["arms"]
    assert arms["vanilla_lora"]["vllm_plugins"] == "" and arms["vanilla_lora"]["d2serve_plugin_active"] is False
    assert arms["unmerged"]["d2serve_plugin_active"] is True
    assert {k: arms["vanilla_lora"][k] for k in ("lora_max_rank", "lora_max_loras")} == {
        k: arms["unmerged"][k] for k in ("lora_max_rank", "lora_max_loras")}
    assert len(ev["ratios"]["spread"]["vanilla_lora_over_unmerged"]["per_repeat"]) == 2
    assert {s["eval_scoring"] for s in arms.values()} == {"one generate call per request"}  # vanilla vLLM's limit
    for c in res["workloads"]["generation"]["cases"].values():
        assert c["ratios_by_metric"]["decode_tokens_per_s"]["vanilla_lora_over_unmerged"] > 0
    assert "plugin cost" in (tmp_path / "r" / "bench.md").read_text()
    for key in ("merged_over_unmerged", "merged_over_base"):
        assert ev["ratios"][key] > 0 and len(ev["ratios"]["spread"][key]["per_repeat"]) == 2, ev["ratios"]
    assert ev["arms"]["unmerged"]["predictions"] == ev["arms"]["merged"]["predictions"]
    assert ev["arms"]["unmerged"]["accuracy"] == ev["arms"]["merged"]["accuracy"]
    assert res["comparison_mode"].startswith("fair")
    modes = {a: s["compile_mode"] for a, s in res["arms"].items()}
    assert len(set(modes.values())) == 1 and None not in modes.values(), modes
    assert res["arms"]["unmerged"]["lora_max_loras"] == 2
    gen = res["workloads"]["generation"]
    assert gen["ratios"]["merged_over_unmerged"] > 0 and gen["ratios"]["merged_over_base"] > 0
    assert "vLLM comparison mode: fair" in (tmp_path / "r" / "bench.md").read_text()


def test_served_adapter_folders_follow_the_cache_setting(tiny_llama_dir, tmp_path, monkeypatch):
    """prepare_served_adapters keeps folded folders in d2serve's cache (XDG_CACHE_HOME/d2serve/vllm-lora when
    D2SERVE_CACHE_DIR is unset), and with D2SERVE_CACHE_DIR=off in a fresh temporary folder, never ./off."""
    from peft_oracle import peft_adapter

    from d2serve.export.vllm_lora import prepare_served_adapters

    adapter = peft_adapter(tiny_llama_dir, tmp_path / "lora", seed=3, target_modules=["q_proj", "v_proj"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("D2SERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folders, _ = prepare_served_adapters(tiny_llama_dir, {"a": adapter})
    assert folders["a"].parent == tmp_path / "xdg" / "d2serve" / "vllm-lora"
    assert (folders["a"] / "adapter_config.json").is_file()
    monkeypatch.setenv("D2SERVE_CACHE_DIR", "off")
    off_folders, _ = prepare_served_adapters(tiny_llama_dir, {"a": adapter})
    assert (off_folders["a"] / "adapter_config.json").is_file()
    assert not (tmp_path / "off").exists() and tmp_path / "xdg" not in off_folders["a"].parents
    assert off_folders["a"].parent.name.startswith("d2serve-vllm-lora-")
    import shutil

    shutil.rmtree(off_folders["a"].parent)
