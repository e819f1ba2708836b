"""A synthetic sharded Llama checkpoint with random weights, written shard by shard (never all in memory).

Used by ``bench/merge_cost.py`` to show the merge's memory stays flat as the model grows. Never commit its output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from d2serve.checkpoint import atomic_output_dir
from d2serve.errors import InputError


def llama_config(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, dtype: str = "bfloat16"
) -> dict:
    """A LlamaForCausalLM ``config.json`` dict (untied embeddings; ``dtype``: ``bfloat16`` or ``float32``)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "dtype": dtype,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _layer_tensors(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, h),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
    }


def write_synthetic_llama(
    out: str | Path,
    *,
    hidden: int = 2048,
    intermediate: int = 5632,
    layers: int = 24,
    heads: int = 16,
    kv_heads: int = 4,
    vocab: int = 32000,
    shards: int = 8,
    seed: int = 0,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> Path:
    """Write a random Llama checkpoint (``dtype`` bfloat16 or float32) in ``shards`` HF shards plus ``model.safetensors.index.json``.

    Defaults give ~1.36e9 parameters (~2.7 GB in bf16, ~5.4 GB in float32). Weights are N(0, 0.02) (norms: 1.0), generated
    one shard at a time, so peak memory is about one shard.

    Returns:
        ``out``.

    Raises:
        InputError: ``shards`` < 1 or more shards than layers + 1, or an unknown ``dtype``.
    """
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    if dtype not in dtypes:
        raise InputError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    tdtype = dtypes[dtype]
    if shards < 1 or shards > layers + 1:
        raise InputError(f"shards must be in [1, layers + 1 = {layers + 1}], got {shards}")
    cfg = llama_config(hidden, intermediate, layers, heads, kv_heads, vocab, dtype)
    groups: list[dict[str, tuple[int, ...]]] = [dict() for _ in range(shards)]
    groups[0]["model.embed_tokens.weight"] = (vocab, hidden)
    for i in range(layers):
        groups[min(shards - 1, i * shards // layers)].update(_layer_tensors(cfg, i))
    groups[-1].update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    with atomic_output_dir(out, overwrite) as tmp:
        for s, names in enumerate(groups):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            tensors = {}
            for name, shape in names.items():
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=tdtype)
                else:
                    t = (torch.randn(shape, generator=gen) * 0.02).to(tdtype)
                tensors[name] = t
                weight_map[name] = fname
                total += t.numel() * t.element_size()
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return Path(out)
