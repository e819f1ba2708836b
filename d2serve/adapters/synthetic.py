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
from d2serve.adapters.methods import DEFAULT_METHOD, LayerFactors, get_method, row_norm
from d2serve.checkpoint import Checkpoint


def random_adapter(
    base: str | Path,
    out: str | Path,
    *,
    method: str = DEFAULT_METHOD,
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
        method: a registry name (d2serve.adapters.methods: ``d2lora``, ``lora``, ``dora``); what its config and
            tensors hold comes from its entry (``peft_type``, ``selector``, ``synthetic_config``, ``pairs``,
            ``synthetic_vectors``, ``fingerprint_key``).
        r, lora_alpha, tau, target_modules: adapter config fields (``tau`` where the method's config has one).
        std: standard deviation of every A and B factor entry, float32.
        seed: torch RNG seed.
        with_magnitude: methods with a base fingerprint (``fingerprint_key``, D2-LoRA's ``d2_magnitude``): store
            ||W0|| rows (float32).

    Returns:
        ``out``.

    Raises:
        KeyError: unknown method name.
    """
    m = get_method(method)
    ckpt = Checkpoint(base)
    raw = {"peft_type": m.peft_type, "r": r, "lora_alpha": lora_alpha, "target_modules": list(target_modules),
           "base_model_name_or_path": str(base)}
    raw |= m.synthetic_config(dict(tau=tau)) | ({m.selector: True} if m.selector else {})
    config = parse_config(raw)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for module, (out_f, in_f) in linear_modules(ckpt).items():
        if not config.targets(module) or module.endswith("embed_tokens"):
            continue

        def rnd(*shape):
            return torch.randn(*shape, generator=gen) * std

        tensors = {}
        for a, b in m.pairs:  # A (r, in) then B (out, r) of every branch, in the registry's order
            tensors[a], tensors[b] = rnd(r, in_f), rnd(out_f, r)
        magnitude = None
        fingerprint = m.fingerprint_key is not None and with_magnitude
        if m.vectors or fingerprint:
            norms = row_norm(ckpt.get_tensor(base_weight_name(module, ckpt)).double()).float()
            tensors |= m.synthetic_vectors(norms, gen)  # e.g. a learned magnitude: the base norm, perturbed
            magnitude = norms if fingerprint else None
        layers[module] = LayerFactors(module, tensors, config.scale_for(module), config.tau, magnitude)
    return save_adapter(out, config, layers, overwrite=overwrite)
