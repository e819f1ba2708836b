"""A base stored without its ``base_model_prefix`` (issue 20, item 4): openai-community/gpt2's layout, keys
``h.0.attn.c_attn.weight`` / ``wte.weight`` instead of ``transformer.h.0...``, which transformers loads (it adds
the prefix, ``core_model_loading.rename_source_key``). d2serve names such tensors as in the model everywhere it
compares names (architecture tensor list, adapter matching, ties, verify, export checks) and writes the merge
output under the base's own names. The references: PEFT's merge_and_unload and its unmerged model."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2serve.adapters.io import AdapterError, load_adapter
from d2serve.architecture import architecture_at, compare_tensor_list, require_full_precision_base
from d2serve.checkpoint import Checkpoint, CheckpointError
from d2serve.export.checks import check_hf_checkpoint, check_keys
from d2serve.merge import merge
from d2serve.verify.weights import check_weights

from peft_oracle import IDS, assert_merge_equals_peft, hf_logits, make_tiny_gpt2, peft_adapter
from test_bad_inputs import expect_refused

PREFIX = "transformer."


def _strip_prefix(src: Path, dst: Path, shards: int = 1, old_masks: bool = False) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with every ``transformer.`` key stored without the prefix, in ``shards``
    files (with an index when more than one). ``old_masks``: also store the per-layer causal masks
    ``h.<i>.attn.bias`` (1, 1, n_positions, n_positions) that openai-community/gpt2's file holds (transformers
    ignores them: GPT-2's ``_keys_to_ignore_on_load_unexpected``)."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    sd = {k.removeprefix(PREFIX): v for k, v in load_file(src / "model.safetensors").items()}
    assert not any(k.startswith(PREFIX) for k in sd) and "h.0.attn.c_attn.weight" in sd and "wte.weight" in sd
    if old_masks:
        n = json.loads((src / "config.json").read_text())["n_positions"]
        for i in range(json.loads((src / "config.json").read_text())["n_layer"]):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    if shards == 1:
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst
    names, weight_map = sorted(sd), {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in names[i::shards]}
        save_file(part, str(dst / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "prefixed", drop_tie_key=True)


@pytest.fixture(scope="module")
def bare(gpt2, tmp_path_factory) -> Path:
    return _strip_prefix(gpt2, tmp_path_factory.mktemp("gpt2_bare") / "base")


@pytest.fixture(scope="module")
def openai_layout(gpt2, tmp_path_factory) -> Path:
    """openai-community/gpt2's layout: no prefix, and the old causal-mask buffers stored."""
    return _strip_prefix(gpt2, tmp_path_factory.mktemp("gpt2_openai") / "base", old_masks=True)


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of ``adapter`` on ``base``: the model's state dict (model key names)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def test_transformers_loads_the_bare_layout_as_the_prefixed_one(gpt2, bare):
    # the premise: transformers really loads it (no missing or re-initialised tensor)
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(bare, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(hf_logits(bare), hf_logits(gpt2))


def test_the_bare_layout_is_named_as_in_the_model(gpt2, bare):
    arch, ck = architecture_at(bare), Checkpoint(bare)
    assert arch.base_model_prefix == "transformer"
    assert set(ck.tensors) == set(Checkpoint(gpt2).tensors) == set(arch.expected)
    assert set(ck.stored_tensors) == {k.removeprefix(PREFIX) for k in arch.expected}
    assert ck.stored_name("transformer.h.1.mlp.c_fc.weight") == "h.1.mlp.c_fc.weight"
    assert ck.stored_name("lm_head.weight") == "lm_head.weight"  # not under the prefix in GPT2LMHeadModel
    assert torch.equal(ck.get_tensor("transformer.wte.weight"), Checkpoint(gpt2).get_tensor("transformer.wte.weight"))
    require_full_precision_base(ck)  # was: "28 tensors of the architecture's state dict are missing"
    diff = compare_tensor_list(ck.stored_tensors, arch)  # stored names are renamed as transformers does
    assert (diff.missing, diff.extra, diff.wrong_shape) == ([], [], [])
    assert check_keys(bare, ck.stored_tensors) == []
    assert ck.tied_embeddings  # the tie is found through the renamed embedding


def test_the_old_mask_buffers_are_ignored_as_transformers_ignores_them(openai_layout):
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(openai_layout, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # ignored by its own patterns
    ck = Checkpoint(openai_layout)
    assert {"h.0.attn.bias", "h.1.attn.bias"} <= set(ck.tensors)  # not model keys: not renamed
    diff = compare_tensor_list(ck.tensors, ck.architecture)
    assert (diff.missing, diff.extra, diff.ignored) == ([], [], ["h.0.attn.bias", "h.1.attn.bias"])
    assert check_keys(openai_layout, ck.stored_tensors) == []
    stray = compare_tensor_list(ck.tensors | {"h.0.attn.c_attn.lora_A.weight": ck.tensors["h.0.attn.bias"]},
                                ck.architecture)
    assert stray.extra == ["h.0.attn.c_attn.lora_A.weight"]  # what transformers does not ignore is still reported


@pytest.mark.parametrize("layout", ["bare", "bare_3_shards", "openai"])
@pytest.mark.parametrize("targets", [["c_attn", "c_proj", "c_fc"], ["c_attn", "lm_head"]],
                         ids=["conv1d", "untied_lm_head"])
def test_peft_lora_on_a_bare_base_equals_peft_merge_and_unload(gpt2, bare, openai_layout, tmp_path, targets, layout):
    shards = 3 if layout == "bare_3_shards" else 1
    base = {"bare": bare, "openai": openai_layout}.get(layout) or _strip_prefix(gpt2, tmp_path / "sharded", shards=3)
    ad = peft_adapter(base, tmp_path / "ad", target_modules=targets)
    # PEFT names modules as in the model it wrapped: the prefixed names, whatever the base file stores
    assert all(k.startswith("base_model.model.transformer.") or k.startswith("base_model.model.lm_head.")
               for k in load_file(ad / "adapter_model.safetensors"))
    out = tmp_path / "m"
    assert_merge_equals_peft(base, ad, out)  # logits vs PEFT's unmerged model, merged loads in transformers,
    ref = _peft_merged(base, ad)  # check_weights passes with nothing changed or missing
    stored = {}
    for f in sorted(out.glob("*.safetensors")):
        stored |= load_file(f)
    untied = "lm_head" in targets
    # the output keeps the base's key names (plus lm_head.weight where the tie is undone)
    assert set(stored) == set(Checkpoint(base).stored_tensors) | ({"lm_head.weight"} if untied else set())
    if shards > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(stored)
    masks = {k: stored.pop(k) for k in list(stored) if k.endswith(".attn.bias")}  # passed through unchanged
    assert all(torch.equal(v, Checkpoint(base).get_tensor(k)) for k, v in masks.items())
    assert len(masks) == (2 if layout == "openai" else 0)
    got = {k if k == "lm_head.weight" else PREFIX + k: v for k, v in stored.items()}
    if not untied:
        ref.pop("lm_head.weight")  # tied: not stored (save_pretrained leaves it out as well)
    assert set(got) == set(ref)
    if untied:  # PEFT's merge_and_unload merges the lm_head LoRA into the weight it shares with wte (its own
        # warning: "tied_target_modules ... complications"): its unmerged model, checked above, keeps wte as is
        assert not torch.equal(ref.pop(PREFIX + "wte.weight"), Checkpoint(base).get_tensor(PREFIX + "wte.weight"))
        assert torch.equal(got[PREFIX + "wte.weight"], Checkpoint(base).get_tensor(PREFIX + "wte.weight"))
    worst = max(float((got[k].double() - ref[k].double()).abs().max()) for k in ref)
    assert worst <= 1e-6, worst
    changed = PREFIX + "h.0.attn.c_attn.weight"
    assert not torch.equal(got[changed], Checkpoint(base).get_tensor(changed))  # the merge did something
    rep = check_weights(str(base), load_adapter(ad), str(out))
    assert rep.layers and all(lay.passed for lay in rep.layers)
    assert check_hf_checkpoint(out, base) == []  # the static checks of the vLLM and ONNX exports


def _bare_adapter(base: Path, out: Path) -> Path:
    """A PEFT LoRA saved on GPT2Model (the base model without its LM head): keys ``base_model.model.h.0...``."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Model

    pm = get_peft_model(GPT2Model.from_pretrained(base, dtype=torch.float32),
                        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(out)
    assert all(k.startswith("base_model.model.h.") for k in load_file(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize("base_layout", ["prefixed", "bare"])
def test_an_adapter_without_the_prefix_is_refused_as_peft_ignores_it(gpt2, bare, tmp_path, base_layout):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = gpt2 if base_layout == "prefixed" else bare
    ad = _bare_adapter(base, tmp_path / "ad")
    # the reference: PEFT loads none of its tensors into GPT2LMHeadModel (warns, leaves lora_B at zero): the
    # unmerged model is the base, so a merge that applied the adapter would differ from PEFT
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(ad))
    assert any("missing adapter keys" in str(w.message) for w in caught)
    assert all(float(p.abs().max()) == 0 for n, p in pm.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        assert torch.equal(pm.eval()(IDS).logits, hf_logits(base))
    expect_refused(base, ad, tmp_path / "out", AdapterError,
                   r"matched 0 of 2 adapter layers.*h\.0\.attn\.c_attn \(nearest base module: "
                   r"transformer\.h\.0\.attn\.c_attn\).*lack the model's base_model_prefix 'transformer'")


def test_a_tensor_stored_with_and_without_the_prefix_is_refused(gpt2, tmp_path):
    base = shutil.copytree(gpt2, tmp_path / "both")
    sd = load_file(gpt2 / "model.safetensors")
    sd["h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"].clone()
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    ad = peft_adapter(gpt2, tmp_path / "ad", target_modules=["c_attn"])
    expect_refused(base, ad, tmp_path / "out", CheckpointError,
                   r"tensors h\.0\.attn\.c_attn\.weight and transformer\.h\.0\.attn\.c_attn\.weight are both stored")


def test_cli_merge_verify_of_a_bare_base(bare, tmp_path):
    import subprocess
    import sys

    ad = peft_adapter(bare, tmp_path / "ad", target_modules=["c_attn", "c_proj"])
    r = subprocess.run([sys.executable, "-m", "d2serve.cli", "merge", "--base", str(bare), "--adapter", str(ad),
                        "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "missing" not in r.stderr
    assert set(load_file(tmp_path / "m" / "model.safetensors")) == set(load_file(bare / "model.safetensors"))
