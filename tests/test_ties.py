"""Tied embeddings: one decision (d2serve.architecture.tie_plan) for merge, verify and exports; PEFT's unmerged
model is the oracle for every merge that succeeds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2serve.adapters.io import AdapterError, load_adapter
from d2serve.architecture import tie_plan
from d2serve.checkpoint import Checkpoint
from d2serve.export.checks import check_hf_checkpoint
from d2serve.merge import merge
from d2serve.verify.weights import check_weights

from conftest import make_tiny_llama
from peft_oracle import assert_merge_equals_peft, make_tiny_gpt2, make_tiny_qwen2, peft_adapter
from test_bad_inputs import expect_refused

W = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tl") / "base", tied=True, seed=2)


@pytest.fixture(scope="module")
def tied_qwen2(tmp_path_factory):
    return make_tiny_qwen2(tmp_path_factory.mktemp("tq") / "base", tied=True)


def test_modules_to_save_embedding_on_tied_base_unties(tied_llama, tmp_path):
    # PEFT default ensure_weight_tying=False: the new embedding feeds the input, lm_head keeps the old one
    ad = peft_adapter(tied_llama, tmp_path / "ad", target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    assert "base_model.model.model.embed_tokens.weight" in load_file(str(ad / W))
    assert_merge_equals_peft(tied_llama, ad, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    merged, base = load_file(str(tmp_path / "m" / "model.safetensors")), load_file(str(tied_llama / "model.safetensors"))
    assert cfg["tie_word_embeddings"] is False
    assert torch.equal(merged["lm_head.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    man = json.loads((tmp_path / "m" / "d2serve_merge.json").read_text())
    assert man["untied_embeddings"] is True and "modules_to_save replaces model.embed_tokens.weight" in man["embeddings"]
    assert check_hf_checkpoint(tmp_path / "m", tied_llama) == []


def test_verify_flags_a_merge_that_kept_the_tie(tied_llama, tmp_path):
    # what d2serve wrote before: the new embedding, still tied, so lm_head changed too
    ad = peft_adapter(tied_llama, tmp_path / "ad", target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    merge(base=tied_llama, adapter=ad, out=tmp_path / "m")
    t = load_file(str(tmp_path / "m" / "model.safetensors"))
    del t["lm_head.weight"]
    save_file(t, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg | {"tie_word_embeddings": True}))
    rep = check_weights(str(tied_llama), load_adapter(ad), str(tmp_path / "m"))
    assert rep.untouched_changed == ["lm_head.weight"]


def test_lm_head_lora_on_tied_qwen2_with_peft_saved_copy(tied_qwen2, tmp_path):
    ad = peft_adapter(tied_qwen2, tmp_path / "ad", target_modules=["q_proj", "lm_head"])
    assert "base_model.model.lm_head.base_layer.weight" in load_file(str(ad / W))  # PEFT's default save
    assert_merge_equals_peft(tied_qwen2, ad, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in Checkpoint(tmp_path / "m").tensors


def test_saved_copy_differing_from_base_is_refused(tied_qwen2, tmp_path):
    ad = peft_adapter(tied_qwen2, tmp_path / "ad", target_modules=["q_proj", "lm_head"])
    t = load_file(str(ad / W))
    t["base_model.model.lm_head.base_layer.weight"][0, 0] += 1e-3
    save_file(t, str(ad / W), metadata={"format": "pt"})
    expect_refused(tied_qwen2, ad, tmp_path / "out", AdapterError,
                   r"its saved copy of base tensor lm_head\.weight differs from model\.embed_tokens\.weight of base")


def test_missing_tie_key_follows_the_architecture_default(tmp_path):
    # GPT2Config's default ties; LlamaConfig's does not (read from the config class, not hard-coded)
    gpt2 = make_tiny_gpt2(tmp_path / "gpt2", drop_tie_key=True)
    assert "tie_word_embeddings" not in json.loads((gpt2 / "config.json").read_text())
    plan = tie_plan(Checkpoint(gpt2))
    assert plan.tied_base and plan.embedding == "transformer.wte.weight" and plan.lm_head == "lm_head.weight"
    ad = peft_adapter(gpt2, tmp_path / "ad", target_modules=["c_attn", "lm_head"])
    assert_merge_equals_peft(gpt2, ad, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False

    llama = make_tiny_llama(tmp_path / "llama", tied=False)
    cfg = json.loads((llama / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    (llama / "config.json").write_text(json.dumps(cfg))
    assert not Checkpoint(llama).tied_embeddings and not Checkpoint(llama).architecture.tie_default
    ad = peft_adapter(llama, tmp_path / "ad2", target_modules=["q_proj", "lm_head"])
    assert_merge_equals_peft(llama, ad, tmp_path / "m2")


def test_tied_llama_without_tie_key_is_refused_not_reinitialised(tied_llama, tmp_path):
    # LlamaConfig defaults to untied: transformers would build a random lm_head; the old default (True) hid it
    base = tmp_path / "base"
    shutil.copytree(tied_llama, base)
    cfg = json.loads((base / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    (base / "config.json").write_text(json.dumps(cfg))
    ad = peft_adapter(tied_llama, tmp_path / "ad", target_modules=["q_proj"])
    from d2serve.checkpoint import CheckpointError

    expect_refused(base, ad, tmp_path / "out", CheckpointError,
                   r"1 tensors of the architecture's state dict are missing \(transformers would re-initialise "
                   r"them at random\), e\.g\. \['lm_head\.weight'\]")


def test_ensure_weight_tying_with_adapted_embedding_is_refused(tied_llama, tmp_path):
    ad = peft_adapter(tied_llama, tmp_path / "ad", target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps(cfg | {"ensure_weight_tying": True}))
    expect_refused(tied_llama, ad, tmp_path / "out", AdapterError,
                   r"ensure_weight_tying is true and the tied model\.embed_tokens\.weight is adapted")


def test_d2lora_with_saved_embedding_on_tied_base_matches_its_unmerged_model(tied_llama, tmp_path):
    # the same tie semantics for d2serve's own unmerged D2-LoRA forward: new embedding for input, lm_head kept
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.models import load_unmerged_model
    from peft_oracle import IDS, LOGITS_ATOL, hf_logits

    ad = random_adapter(tied_llama, tmp_path / "ad", target_modules=["q_proj", "lm_head"], std=0.2, seed=4)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps(cfg | {"modules_to_save": ["embed_tokens"]}))
    t = load_file(str(ad / W))
    emb = load_file(str(tied_llama / "model.safetensors"))["model.embed_tokens.weight"]
    t["base_model.model.model.embed_tokens.weight"] = emb + 0.3 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    save_file(t, str(ad / W), metadata={"format": "pt"})
    merge(base=tied_llama, adapter=ad, out=tmp_path / "m")
    with torch.no_grad():
        ref = load_unmerged_model(tied_llama, ad)(IDS).logits.float()
    diff = float((ref - hf_logits(tmp_path / "m")).abs().max())
    assert diff < LOGITS_ATOL and float((ref - hf_logits(tied_llama)).abs().max()) > 100 * LOGITS_ATOL
    rep = check_weights(str(tied_llama), load_adapter(ad), str(tmp_path / "m"))
    assert all(lay.passed for lay in rep.layers) and rep.untouched_changed == [] and rep.missing_in_merged == []


def test_tied_config_with_a_stored_lm_head_and_adapted_head_is_refused(tied_llama, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tied_llama, base)
    t = load_file(str(base / "model.safetensors"))
    t["lm_head.weight"] = t["model.embed_tokens.weight"] * 2  # transformers ignores it: the config ties
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    ad = peft_adapter(tied_llama, tmp_path / "ad", target_modules=["q_proj", "lm_head"])
    expect_refused(base, ad, tmp_path / "out", AdapterError,
                   r"config\.json ties lm_head to model\.embed_tokens\.weight but the base also stores lm_head\.weight")
