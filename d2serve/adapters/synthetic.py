"""Random, non-identity adapters for a given base checkpoint (tests, benchmarks, demos).

Unlike a freshly initialised adapter (B = 0, so dW = 0), every factor here is
random, so a merge that ignores a branch, the projection or tau is caught.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from d2serve.adapters.config import parse_config
from d2serve.adapters.io import base_weight_name, linear_modules, save_adapter
from d2serve.adapters.methods import LayerFactors, row_norm
from d2serve.checkpoint import Checkpoint


def random_adapter(
    base: str | Path,
    out: str | Path,
    *,
    method: str = "d2lora",
    r: int = 4,
    lora_alpha: float = 6.0,
    tau: float = 0.7,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    std: float = 0.05,
    seed: int = 0,
    with_magnitude: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a random adapter fitting every targeted nn.Linear of ``base``.

    Args:
        base: HF checkpoint directory (read lazily, one tensor at a time).
        out: adapter directory to write.
        method: ``d2lora``, ``lora`` or ``dora``.
        r, lora_alpha, tau, target_modules: adapter config fields.
        std: standard deviation of every factor entry (A and B alike), float32.
        seed: torch RNG seed.
        with_magnitude: D2LORA only: store ``d2_magnitude`` = ||W0|| rows (float32).

    Returns:
        ``out``.
    """
    ckpt = Checkpoint(base)
    raw = {"peft_type": "D2LORA" if method == "d2lora" else "LORA", "r": r, "lora_alpha": lora_alpha,
           "target_modules": list(target_modules), "base_model_name_or_path": str(base)}
    if method == "d2lora":
        raw["tau"] = tau
    if method == "dora":
        raw["use_dora"] = True
    config = parse_config(raw)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for module, (out_f, in_f) in linear_modules(ckpt).items():
        if not config.targets(module) or module.endswith("embed_tokens"):
            continue

        def rnd(*shape):
            return torch.randn(*shape, generator=gen) * std

        if method == "d2lora":
            tensors = {"lora_A_plus": rnd(r, in_f), "lora_B_plus": rnd(out_f, r),
                       "lora_A_minus": rnd(r, in_f), "lora_B_minus": rnd(out_f, r)}
        else:
            tensors = {"lora_A": rnd(r, in_f), "lora_B": rnd(out_f, r)}
        magnitude = None
        if method == "dora" or (method == "d2lora" and with_magnitude):
            w0 = ckpt.get_tensor(base_weight_name(module, ckpt)).double()
            norms = row_norm(w0).float()
            if method == "dora":  # a learned magnitude: the base norm, perturbed
                tensors["lora_magnitude_vector"] = norms * (1 + 0.1 * torch.randn(out_f, generator=gen)).abs()
            else:
                magnitude = norms
        layers[module] = LayerFactors(module, tensors, config.scale_for(module), config.tau, magnitude)
    return save_adapter(out, config, layers, overwrite=overwrite)
