"""Architecture knowledge (d2serve.architecture): layer kinds, tie defaults, the full tensor list; GPT-2 Conv1D
merges exactly for every method (or is refused by name); every tensor written is checked."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2serve.adapters.io import AdapterError, load_adapter
from d2serve.adapters.methods import MergeMathError
from d2serve.adapters.synthetic import random_adapter
from d2serve.architecture import CONV1D, EMBEDDING, LINEAR, architecture_at
from d2serve.checkpoint import Checkpoint, CheckpointError
from d2serve.merge import merge
from d2serve.verify.weights import check_weights

from peft_oracle import assert_merge_equals_peft, make_tiny_gpt2, peft_adapter
from test_bad_inputs import expect_refused


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "base", drop_tie_key=True)


def test_llama_architecture(tiny_llama_dir, tiny_llama_tied_dir):
    arch = architecture_at(tiny_llama_dir)
    assert (arch.model_type, arch.config_class, arch.tie_default, arch.tied) == ("llama", "LlamaConfig", False, False)
    assert arch.layer("model.layers.0.self_attn.k_proj").kind == LINEAR and not arch.layer("lm_head").transposed
    assert arch.layer("model.embed_tokens").kind == EMBEDDING
    assert (arch.input_embedding, arch.output_embedding) == ("model.embed_tokens.weight", "lm_head.weight")
    stored = Checkpoint(tiny_llama_dir).tensors
    assert {k: e.shape for k, e in arch.expected.items()} == {k: tuple(v.shape) for k, v in stored.items()}
    tied = architecture_at(tiny_llama_tied_dir)
    assert tied.tied and "lm_head.weight" not in tied.expected
    assert set(tied.expected) == set(Checkpoint(tiny_llama_tied_dir).tensors)


def test_gpt2_architecture_from_the_config_class(gpt2):
    arch = architecture_at(gpt2)
    assert arch.config_class == "GPT2Config" and arch.tie_default is True and arch.tied  # no key in config.json
    c_attn, c_proj = arch.layer("transformer.h.0.attn.c_attn"), arch.layer("transformer.h.1.mlp.c_proj")
    assert (c_attn.kind, c_attn.transposed, c_attn.fused) == (CONV1D, True, True)  # fused q|k|v
    assert (c_proj.kind, c_proj.transposed, c_proj.fused) == (CONV1D, True, False)
    assert arch.expected["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # stored (in, out)
    assert set(arch.expected) == set(Checkpoint(gpt2).tensors)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_gpt2_conv1d_lora_follows_the_architecture_not_the_flag(gpt2, tmp_path, fan_in_fan_out):
    # PEFT corrects fan_in_fan_out for Conv1D itself (with a warning) and saves true; a file saying false
    # must merge the same (it merged untransposed before)
    ad = peft_adapter(gpt2, tmp_path / "ad", target_modules=["attn.c_proj"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps(cfg | {"fan_in_fan_out": fan_in_fan_out}))
    assert_merge_equals_peft(gpt2, ad, tmp_path / "m")


def test_gpt2_conv1d_dora_norm_axis_is_peft_s(gpt2, tmp_path):
    ad = peft_adapter(gpt2, tmp_path / "ad", target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True)
    assert load_adapter(ad).method == "dora"
    assert_merge_equals_peft(gpt2, ad, tmp_path / "m")


def test_gpt2_conv1d_d2lora_is_refused_by_name(gpt2, tmp_path):
    ad = random_adapter(gpt2, tmp_path / "ad", target_modules=["attn.c_proj"], std=0.2, with_magnitude=False)
    expect_refused(gpt2, ad, tmp_path / "out", AdapterError,
                   r"method d2lora is merged on linear layers only; 2 adapter layers are not: "
                   r"transformer\.h\.0\.attn\.c_proj \(a conv1d layer of GPT2\)")


def _base_copy(src, tmp_path, fn, cfg_fn=None):
    base = tmp_path / "base"
    shutil.copytree(src, base)
    t = load_file(str(base / "model.safetensors"))
    fn(t)
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    if cfg_fn:
        cfg = json.loads((base / "config.json").read_text())
        cfg_fn(cfg)
        (base / "config.json").write_text(json.dumps(cfg))
    return base


def test_untouched_tensor_overflowing_float16_is_refused(tiny_llama_dir, tmp_path):
    base = _base_copy(tiny_llama_dir, tmp_path, lambda t: t["model.layers.1.input_layernorm.weight"].__setitem__(7, 1e5))
    ad = random_adapter(base, tmp_path / "ad", std=0.2)
    expect_refused(base, ad, tmp_path / "out", MergeMathError,
                   r"^base tensor model\.layers\.1\.input_layernorm\.weight overflows torch\.float16 "
                   r"\(max \|value\| 1e\+05 > 6\.55e\+04\); choose the output dtype bfloat16 or float32$",
                   dtype="float16")
    merge(base=base, adapter=ad, out=tmp_path / "ok", dtype="bfloat16")  # representable there: merges
    assert float(load_file(str(tmp_path / "ok" / "model.safetensors"))["model.layers.1.input_layernorm.weight"][7]) == 99840.0


def test_base_missing_a_non_adapted_tensor_is_refused(tiny_llama_dir, tmp_path):
    base = _base_copy(tiny_llama_dir, tmp_path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    ad = random_adapter(base, tmp_path / "ad", std=0.2)
    expect_refused(base, ad, tmp_path / "out", CheckpointError,
                   r"1 tensors of the architecture's state dict are missing \(transformers would re-initialise them "
                   r"at random\), e\.g\. \['model\.layers\.1\.mlp\.down_proj\.weight'\]")


def test_verify_reports_a_tensor_missing_from_the_merged_checkpoint(tiny_llama_dir, tiny_d2lora_adapter, tmp_path):
    merge(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, out=tmp_path / "m")
    t = load_file(str(tmp_path / "m" / "model.safetensors"))
    t.pop("model.norm.weight")
    save_file(t, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    rep = check_weights(str(tiny_llama_dir), load_adapter(tiny_d2lora_adapter), str(tmp_path / "m"))
    assert rep.missing_in_merged == ["model.norm.weight"] and all(lay.passed for lay in rep.layers)


def test_integer_weights_are_refused_by_name(tiny_llama_dir, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    base = _base_copy(tiny_llama_dir, tmp_path, lambda t: t.__setitem__(name, (t[name] * 100).to(torch.int8)))
    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", std=0.2)
    expect_refused(base, ad, tmp_path / "out", CheckpointError,
                   r"1 floating-point weights of the architecture are stored as integers \(a quantized checkpoint; "
                   r"d2serve reads full-precision weights only\), e\.g\. \['model\.layers\.0\.mlp\.up_proj\.weight: stored int8'\]")


def test_quantization_config_is_refused_by_name(tiny_llama_dir, tmp_path):
    base = _base_copy(tiny_llama_dir, tmp_path, lambda t: None,
                      lambda c: c.__setitem__("quantization_config", {"quant_method": "bitsandbytes"}))
    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", std=0.2)
    expect_refused(base, ad, tmp_path / "out", CheckpointError,
                   r"config\.json: has 'quantization_config' \(quant_method 'bitsandbytes'\): a quantized base is not merged")


def test_integer_extra_tensor_passes_through_intact(tiny_llama_dir, tmp_path):
    extra = torch.arange(-5, 5, dtype=torch.int8)
    base = _base_copy(tiny_llama_dir, tmp_path, lambda t: t.__setitem__("model.step_counter", extra))
    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", std=0.2)
    merge(base=base, adapter=ad, out=tmp_path / "m", dtype="bfloat16")
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert got["model.step_counter"].dtype == torch.int8 and torch.equal(got["model.step_counter"], extra)


def test_plain_llama_lora_still_equals_peft(tiny_llama_dir, tmp_path):
    ad = peft_adapter(tiny_llama_dir, tmp_path / "ad", target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    assert_merge_equals_peft(tiny_llama_dir, ad, tmp_path / "m")
