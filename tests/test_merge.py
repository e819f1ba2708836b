"""The merge against independent references: a float64 recomputation written here, the unmerged forward, PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from d2serve.adapters.io import load_adapter
from d2serve.adapters.synthetic import random_adapter
from d2serve.checkpoint import Checkpoint
from d2serve.merge import merge
from d2serve.models import load_hf_model, load_unmerged_model

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Tolerances per dtype, in one place.
RTOL_FP32 = 1e-6
LOGITS_ATOL_FP32 = 1e-4


def reference_d2lora(w0: torch.Tensor, f: dict[str, torch.Tensor], scale: float, tau: float) -> torch.Tensor:
    """Independent float64 recomputation of W_hat = diag(m/||W0+dW||)(W0+dW) + dW, m = ||W0|| rows."""
    w0 = w0.double()
    dw = scale * (f["lora_B_plus"].double() @ f["lora_A_plus"].double()
                  - tau * f["lora_B_minus"].double() @ f["lora_A_minus"].double())
    m = w0.pow(2).sum(dim=1).sqrt()
    v = w0 + dw
    return (m / v.pow(2).sum(dim=1).sqrt())[:, None] * v + dw


@pytest.fixture(scope="module")
def d2_adapter(tiny_llama_dir, tmp_path_factory):
    """Random D2-LoRA adapter on every linear layer: r=4, lora_alpha=6 (!= r), tau=0.7, GQA k/v (32x64)."""
    return random_adapter(tiny_llama_dir, tmp_path_factory.mktemp("ad") / "d2", r=4, lora_alpha=6.0, tau=0.7,
                          target_modules=ALL_LINEAR, std=0.2, seed=3)


def _factors_by_module(adapter_dir):
    adp = load_adapter(adapter_dir)
    return adp, {m: f.tensors for m, f in adp.layers.items()}


def test_fp32_merge_equals_float64_reference(tiny_llama_dir, d2_adapter, tmp_path):
    res = merge(base=tiny_llama_dir, adapter=d2_adapter, out=tmp_path / "m", dtype="float32")
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    adp, factors = _factors_by_module(d2_adapter)
    assert adp.config.lora_alpha != adp.config.r and adp.config.tau not in (0.0, 1.0)
    assert any(base[f"{m}.weight"].shape[0] != base[f"{m}.weight"].shape[1] for m in factors)  # non-square GQA
    for module, f in factors.items():
        name = f"{module}.weight"
        ref = reference_d2lora(base[name], f, 6.0 / 4, 0.7)
        rel = ((merged[name].double() - ref).abs().max() / ref.abs().max()).item()
        assert rel < RTOL_FP32, f"{name}: rel err {rel}"
        assert not torch.equal(merged[name], base[name]), f"{name} unchanged by the merge"
    untouched = [k for k in base if k.removesuffix(".weight") not in factors]
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)
    assert set(merged) == set(base)
    assert res.manifest["num_layers_merged"] == len(factors) == 14


def test_bf16_merge_is_bitwise_the_cast_float64_reference(tiny_llama_dir, d2_adapter, tmp_path):
    merge(base=tiny_llama_dir, adapter=d2_adapter, out=tmp_path / "m", dtype="bfloat16")
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    _, factors = _factors_by_module(d2_adapter)
    for module, f in factors.items():
        name = f"{module}.weight"
        expected = reference_d2lora(base[name], f, 1.5, 0.7).to(torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], expected), f"{name}: not bit-identical"
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["torch_dtype"] == "bfloat16"


def test_unmerged_logits_equal_merged_logits(tiny_llama_dir, d2_adapter, tmp_path):
    merge(base=tiny_llama_dir, adapter=d2_adapter, out=tmp_path / "m", dtype="float32")
    ids = torch.randint(0, 290, (3, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = load_hf_model(tmp_path / "m")(ids).logits
        unmerged = load_unmerged_model(tiny_llama_dir, d2_adapter)(ids).logits
        base = load_hf_model(tiny_llama_dir)(ids).logits
    assert (merged - unmerged).abs().max() < LOGITS_ATOL_FP32
    assert (base - unmerged).abs().max() > 0.1  # the adapter matters: the check above is not vacuous


def test_output_is_complete_checkpoint(tiny_llama_dir, d2_adapter, tmp_path):
    res = merge(base=tiny_llama_dir, adapter=d2_adapter, out=tmp_path / "m")
    out = tmp_path / "m"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json", "d2serve_merge.json"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg.get("use_cache") == base_cfg.get("use_cache")
    assert cfg["dtype"] == "float32"  # auto = the base's dtype
    assert not [k for k in Checkpoint(out).tensors if "lora" in k or "d2_" in k]
    man = res.manifest
    assert man["method"] == "d2lora" and set(man["sha256"]["adapter"]) == {"adapter_config.json", "adapter_model.safetensors"}
    layer = man["layers"]["model.layers.0.self_attn.k_proj"]
    assert layer["shape"] == [32, 64] and 0 < layer["scale_min"] <= layer["scale_max"]
    assert layer["delta_norm_ratio"] > 0


def test_sharded_base_keeps_shard_layout(tiny_llama_dir, d2_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="40KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((tiny_llama_dir / f).read_bytes())
    base = Checkpoint(sharded)
    assert base.sharded and len(base.shards) > 3
    merge(base=sharded, adapter=d2_adapter, out=tmp_path / "m")
    out = Checkpoint(tmp_path / "m")
    assert out.shards == base.shards
    assert {k: v.shard for k, v in out.tensors.items()} == {k: v.shard for k, v in base.tensors.items()}
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    sizes = sum(v.dtype.itemsize * torch.Size(v.shape).numel() for v in out.tensors.values())
    assert index["metadata"]["total_size"] == sizes
    merge(base=tiny_llama_dir, adapter=d2_adapter, out=tmp_path / "single")
    single = Checkpoint(tmp_path / "single")
    for k in out.tensors:
        assert torch.equal(out.get_tensor(k), single.get_tensor(k)), k


def test_tied_lm_head_is_untied_when_adapted(tiny_llama_tied_dir, tmp_path):
    ad = random_adapter(tiny_llama_tied_dir, tmp_path / "ad", target_modules=("q_proj", "lm_head"), std=0.2)
    merge(base=tiny_llama_tied_dir, adapter=ad, out=tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    tensors = Checkpoint(tmp_path / "m").tensors
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in tensors
    ids = torch.randint(0, 290, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = load_hf_model(tmp_path / "m")(ids).logits
        unmerged = load_unmerged_model(tiny_llama_tied_dir, ad)(ids).logits
    assert (merged - unmerged).abs().max() < LOGITS_ATOL_FP32


def test_tied_embeddings_stay_tied_when_not_adapted(tiny_llama_tied_dir, tmp_path):
    ad = random_adapter(tiny_llama_tied_dir, tmp_path / "ad", target_modules=("q_proj",), std=0.2)
    merge(base=tiny_llama_tied_dir, adapter=ad, out=tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in Checkpoint(tmp_path / "m").tensors


def _peft_adapter(base_dir, out, **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    model = load_hf_model(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=10, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                     init_lora_weights=False, **kw)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():  # B is zero-initialised by default; make it non-trivial
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


@pytest.mark.parametrize("kw", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_peft_adapters_merge_like_peft_merge_and_unload(tiny_llama_dir, tmp_path, kw):
    from peft import PeftModel

    ad = _peft_adapter(tiny_llama_dir, tmp_path / "peft", **kw)
    merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "m", dtype="float32")
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    peft_sd = PeftModel.from_pretrained(load_hf_model(tiny_llama_dir), str(ad)).merge_and_unload().state_dict()
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    changed = 0
    for k, v in ours.items():
        assert torch.allclose(v, peft_sd[k], rtol=0, atol=2e-6), k
        changed += not torch.equal(v, base[k])
    assert changed == 8  # 4 modules x 2 layers


@pytest.mark.real
def test_real_peft_lora_adapter_on_smollm2_matches_peft(smollm2_dir, tmp_path):
    """A PEFT LoRA adapter (r=16, alpha=32, q/v of all 30 layers) made by PEFT itself on the real SmolLM2."""
    from peft import LoraConfig, PeftModel, get_peft_model

    ad = tmp_path / "peft_lora"
    torch.manual_seed(11)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    pm = get_peft_model(load_hf_model(smollm2_dir), cfg)  # lora_A: PEFT's kaiming init; lora_B: zeros
    with torch.no_grad():  # non-zero B so the adapter is not an identity (|dW| ~ 1e-2 of |W0|)
        for n, prm in pm.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.02)
    pm.save_pretrained(ad)  # PEFT's own adapter_config.json + adapter_model.safetensors
    del pm
    saved = load_file(str(ad / "adapter_model.safetensors"))
    assert len(saved) == 120 and all(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    res = merge(base=smollm2_dir, adapter=ad, out=tmp_path / "m", dtype="float32")
    assert res.manifest["num_layers_merged"] == 60
    ours = Checkpoint(tmp_path / "m")
    peft_model = PeftModel.from_pretrained(load_hf_model(smollm2_dir), str(ad)).merge_and_unload()
    peft_sd = peft_model.state_dict()
    worst = 0.0
    for k in ours.tensors:
        a, b = ours.get_tensor(k), peft_sd[k]
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)))
    assert worst < 1e-6
    assert not torch.equal(ours.get_tensor("model.layers.3.self_attn.q_proj.weight"),
                           Checkpoint(smollm2_dir).get_tensor("model.layers.3.self_attn.q_proj.weight").float())


def test_rank_and_alpha_patterns_merge_like_peft(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    ad = _peft_adapter(tiny_llama_dir, tmp_path / "peft", rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 3})
    cfg = load_adapter(ad).config
    assert cfg.rank_for("model.layers.0.self_attn.k_proj") == 2 and cfg.scale_for("model.layers.1.mlp.down_proj") == 0.75
    merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "m", dtype="float32")
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    peft_sd = PeftModel.from_pretrained(load_hf_model(tiny_llama_dir), str(ad)).merge_and_unload().state_dict()
    for k, v in ours.items():
        assert torch.allclose(v, peft_sd[k], rtol=0, atol=2e-6), k


def test_learned_tau_overrides_config(tiny_llama_dir, d2_adapter, tmp_path):
    from safetensors.torch import save_file

    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_bytes((d2_adapter / "adapter_config.json").read_bytes())
    t = load_file(str(d2_adapter / "adapter_model.safetensors"))
    p = "base_model.model.model.layers.1.self_attn.v_proj"
    t[f"{p}.d2_tau"] = torch.tensor(-0.25)
    save_file(t, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "m", dtype="float32")
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    f = {n: t[f"{p}.{n}.weight"] for n in ("lora_A_plus", "lora_B_plus", "lora_A_minus", "lora_B_minus")}
    name = "model.layers.1.self_attn.v_proj.weight"
    ref = reference_d2lora(base[name], f, 1.5, -0.25)
    assert ((merged[name].double() - ref).abs().max() / ref.abs().max()) < RTOL_FP32
    assert ((merged[name].double() - reference_d2lora(base[name], f, 1.5, 0.7)).abs().max() / ref.abs().max()) > 1e-3
    with torch.no_grad():  # the unmerged layer uses the learned tau too
        ids = torch.randint(0, 290, (1, 7), generator=torch.Generator().manual_seed(2))
        diff = (load_hf_model(tmp_path / "m")(ids).logits - load_unmerged_model(tiny_llama_dir, ad)(ids).logits).abs().max()
    assert diff < LOGITS_ATOL_FP32


def test_modules_to_save_replace_base_tensors(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = load_hf_model(tiny_llama_dir)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                          init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n or "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "peft")
    merge(base=tiny_llama_dir, adapter=tmp_path / "peft", out=tmp_path / "m", dtype="float32")
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    ref = PeftModel.from_pretrained(load_hf_model(tiny_llama_dir), str(tmp_path / "peft")).merge_and_unload().state_dict()
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert not torch.equal(ours["lm_head.weight"], base["lm_head.weight"])
    for k, v in ours.items():
        assert torch.allclose(v, ref[k], rtol=0, atol=2e-6), k


@pytest.mark.parametrize("method", ["d2lora", "dora"])
def test_row_block_merge_equals_whole_tensor_merge(tiny_llama_dir, tmp_path, monkeypatch, method):
    """Merging in row blocks (1-3 rows here) gives the same bytes and statistics as one block per tensor."""
    import d2serve.merge_blocks as merge_mod

    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", method=method, target_modules=ALL_LINEAR, std=0.2, seed=9)
    whole = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "whole", dtype="bfloat16")
    monkeypatch.setattr(merge_mod, "ROW_BLOCK_ELEMENTS", 150)  # 2 rows of 64 inputs, 1 row of 96
    blocks = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "blocks", dtype="bfloat16")
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "blocks" / "model.safetensors").read_bytes()
    for module, st in whole.manifest["layers"].items():
        other = blocks.manifest["layers"][module]
        for key, v in st.items():
            assert v == pytest.approx(other[key], rel=1e-9), (module, key)
