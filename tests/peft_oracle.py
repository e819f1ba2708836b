"""Helpers for tests that use PEFT's unmerged model as the oracle: tiny random Qwen2/GPT-2 bases, PEFT adapters
with random non-identity weights, and merged-vs-unmerged logits."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import make_tiny_tokenizer

IDS = torch.tensor([[1, 5, 17, 42, 99, 150, 201, 250, 7, 3, 88, 120]])
LOGITS_ATOL = 1e-4  # float32 merged vs unmerged


def _save(model, tok, out: Path, drop_tie_key: bool = False) -> Path:
    with torch.no_grad():  # larger-than-init weights so the logits are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if drop_tie_key:
        cfg = json.loads((out / "config.json").read_text())
        cfg.pop("tie_word_embeddings", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def make_tiny_qwen2(out: Path, *, tied: bool, seed: int = 0) -> Path:
    """A random Qwen2ForCausalLM checkpoint (hidden 64, 2 layers, GQA 4/2 heads), float32."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = make_tiny_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _save(Qwen2ForCausalLM(cfg), tok, out)


def make_tiny_gpt2(out: Path, *, drop_tie_key: bool = True, seed: int = 0) -> Path:
    """A random GPT2LMHeadModel checkpoint (n_embd 64, 2 layers, Conv1D layers stored (in, out)), float32.

    ``drop_tie_key``: remove ``tie_word_embeddings`` from config.json (GPT2Config's default, True, then decides).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = make_tiny_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _save(GPT2LMHeadModel(cfg), tok, out, drop_tie_key)


def peft_adapter(base: Path, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    """Save a PEFT LoRA/DoRA adapter on ``base`` with random non-zero B (and perturbed magnitudes / saved modules)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n or "lora_magnitude_vector" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)
    return out


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    """Logits (float32) of PEFT's unmerged model: the base with the adapter applied on the fly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, str(adapter)).eval()(IDS).logits.float()


def hf_logits(path: Path) -> torch.Tensor:
    """Logits (float32) of a plain checkpoint loaded by transformers."""
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(IDS).logits.float()


def assert_merge_equals_peft(base: Path, adapter: Path, out: Path, **merge_kw) -> float:
    """Merge; the merged model's logits equal PEFT's unmerged ones (float32, within LOGITS_ATOL), the adapter
    changes them, and the weight check passes with nothing changed or missing. Returns the max abs logit diff."""
    from d2serve.adapters.io import load_adapter
    from d2serve.merge import merge
    from d2serve.verify.weights import check_weights

    merge(base=base, adapter=adapter, out=out, **merge_kw)
    ref, got, plain = peft_logits(base, adapter), hf_logits(out), hf_logits(base)
    assert (ref - plain).abs().max() > 100 * LOGITS_ATOL, "the adapter does not change the logits (vacuous test)"
    diff = float((ref - got).abs().max())
    assert diff < LOGITS_ATOL, f"merged vs PEFT unmerged: max abs logit diff {diff}"
    rep = check_weights(str(base), load_adapter(adapter), str(out))
    assert all(lay.passed for lay in rep.layers), [lay.to_json() for lay in rep.layers if not lay.passed]
    assert rep.untouched_changed == [] and rep.missing_in_merged == []
    return diff
