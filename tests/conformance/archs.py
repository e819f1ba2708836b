"""Tiny random architectures for the conformance matrix (issue 9), built and saved in the test session.

Every model has hidden size 64, 2 layers and the vocabulary of the tiny tokenizer of tests/conftest.py;
weights are redrawn with std 0.2 (2-D) so the logits are not flat, and 1-D norms/biases are perturbed
around their init so that a merge which reads the wrong tensor cannot agree by accident.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from conftest import make_tiny_tokenizer

HIDDEN, LAYERS, HEADS, KV_HEADS, MLP = 64, 2, 4, 2, 96


@dataclass(frozen=True)
class Arch:
    """One architecture of the matrix.

    Attributes:
        name: matrix id.
        attn: module-name suffixes of a typical attention LoRA (PEFT ``target_modules``).
        q, v: suffixes of the "query" and "value" modules (for layers_to_transform / exclude_modules).
        layer_prefix: module path of layer i, e.g. ``model.layers.{i}``.
        embed: suffix of the input embedding module.
        tied: ``tie_word_embeddings`` of the saved config.
        conv1d: GPT-2 Conv1D layers (weights stored (in, out)).
        d2lora_targets: D2-LoRA target suffixes, or None when no D2-LoRA adapter can exist (non nn.Linear layers).
    """

    name: str
    attn: tuple[str, ...]
    q: str
    v: str
    layer_prefix: str = "model.layers.{i}"
    embed: str = "embed_tokens"
    tied: bool = False
    conv1d: bool = False
    d2lora_targets: tuple[str, ...] | None = ("q_proj", "k_proj", "v_proj", "o_proj")


ARCHS: dict[str, Arch] = {a.name: a for a in [
    Arch("llama", ("q_proj", "v_proj"), "self_attn.q_proj", "self_attn.v_proj"),
    Arch("llama_tied", ("q_proj", "v_proj"), "self_attn.q_proj", "self_attn.v_proj", tied=True),
    Arch("qwen2_tied", ("q_proj", "k_proj", "v_proj"), "self_attn.q_proj", "self_attn.v_proj", tied=True),
    Arch("mistral", ("q_proj", "v_proj"), "self_attn.q_proj", "self_attn.v_proj"),
    Arch("gemma_tied", ("q_proj", "v_proj"), "self_attn.q_proj", "self_attn.v_proj", tied=True),
    Arch("phi3", ("qkv_proj", "o_proj"), "self_attn.qkv_proj", "self_attn.o_proj",
         d2lora_targets=("qkv_proj", "o_proj", "gate_up_proj")),
    Arch("gpt2_tied", ("c_attn", "c_proj"), "attn.c_attn", "attn.c_proj", layer_prefix="transformer.h.{i}",
         embed="wte", tied=True, conv1d=True, d2lora_targets=None),
    Arch("qwen2_moe", ("q_proj", "v_proj", "shared_expert.gate_proj", "shared_expert.down_proj"),
         "self_attn.q_proj", "self_attn.v_proj",
         d2lora_targets=("q_proj", "v_proj", "shared_expert.gate_proj", "shared_expert.down_proj")),
]}


def _config(arch: Arch, tok, hidden: int = HIDDEN):
    from transformers import (GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen2MoeConfig)

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common = dict(**ids, vocab_size=len(tok), hidden_size=hidden, intermediate_size=MLP, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                  tie_word_embeddings=arch.tied)
    family = arch.name.removesuffix("_tied")
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "gemma":
        return GemmaConfig(**common, head_dim=hidden // HEADS)
    if family == "phi3":
        return Phi3Config(**common)
    if family == "gpt2":
        return GPT2Config(**ids, vocab_size=len(tok), n_embd=hidden, n_layer=LAYERS, n_head=HEADS, n_positions=128,
                          n_inner=MLP, tie_word_embeddings=True)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**common, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
                              num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    raise KeyError(arch.name)


def build_arch(arch: Arch, out: Path, seed: int = 0, hidden: int = HIDDEN) -> Path:
    """Write a random float32 checkpoint of ``arch`` (model + tokenizer + generation config) to ``out``.

    ``hidden`` overrides the hidden size only (heads, KV heads, MLP and layers stay): head_dim = hidden / 4,
    e.g. 128 for vLLM's CPU attention, which needs head_dim >= 32 (tests/conformance/test_vllm_matrix.py).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = make_tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, tok, hidden)).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
            else:  # norms and biases: not their init constant (a Gemma norm is stored as w in (1 + w))
                p.add_(0.1 * torch.randn_like(p))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class Bases:
    """Session cache: architecture name -> saved checkpoint dir, its float32 model and its logits on ``IDS``.

    ``hidden``: the hidden size of every model (:func:`build_arch`).
    """

    def __init__(self, root: Path, hidden: int = HIDDEN):
        self.root = root
        self.hidden = hidden
        self._dirs: dict[str, Path] = {}
        self._models: dict[str, torch.nn.Module] = {}

    def dir(self, name: str) -> Path:
        """The checkpoint directory of ``name`` (built on first use)."""
        if name not in self._dirs:
            self._dirs[name] = build_arch(ARCHS[name], self.root / name, seed=len(self._dirs), hidden=self.hidden)
        return self._dirs[name]

    def model(self, name: str):
        """A fresh float32 copy of the base model (callers may mutate it, e.g. PEFT injection)."""
        if name not in self._models:
            self._models[name] = load_model(self.dir(name))
        return copy.deepcopy(self._models[name])


def load_model(path: Path):
    """transformers float32 model of a local checkpoint, eval mode (the independent reader of merged outputs)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


IDS = torch.randint(3, 290, (2, 11), generator=torch.Generator().manual_seed(11))


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    """float32 logits (batch, seq, vocab) without a KV cache."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A plain copy of a checkpoint directory (to edit its config or tensors)."""
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    """Set (value) or delete (``None``) keys of ``path/config.json``."""
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
