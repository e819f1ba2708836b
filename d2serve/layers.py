"""``D2LoRALinear``: the training-time (unmerged) D2-LoRA layer, and its injection into a model.

Forward of one adapted nn.Linear (Fujisawa & Kondo, 2026, arXiv 2602.14728)::

    dW = scale * (B+ @ A+ - tau * B- @ A-)         # (out, in), never stored
    s  = m / ||W0 + dW||   per output row          # (out,), m = ||W0|| rows (buffer)
    y  = s * (x W0^T + x dW^T) + x dW^T + b

``x dW^T`` is computed through the rank-r factors; only the row norm needs the
dense (out, in) sum, recomputed from the current factors each call (or once,
with ``cache_scale``, for inference).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from d2serve.adapters.config import AdapterConfig
from d2serve.adapters.methods import LayerFactors, row_norm
from d2serve.errors import InputError

FACTORS = ("lora_A_plus", "lora_B_plus", "lora_A_minus", "lora_B_minus")


class D2LoRALinear(nn.Module):
    """A frozen nn.Linear plus trainable D2-LoRA factors (the unmerged forward).

    Args:
        base_layer: the wrapped nn.Linear; weight W0 (out_features, in_features), frozen.
        r: rank of each branch.
        scale: lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA).
        tau: weight of the negative branch.

    Attributes:
        lora_A_plus, lora_A_minus: nn.Linear(in, r) -> weights (r, in_features).
        lora_B_plus, lora_B_minus: nn.Linear(r, out) -> weights (out_features, r).
        d2_magnitude: buffer (out_features,) float32, m = ||W0|| per output row
            (norm over in_features, PEFT's DoRA axis), fixed at construction.
        d2_tau: buffer, scalar float32.
    """

    def __init__(self, base_layer: nn.Linear, r: int, scale: float, tau: float):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"D2LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(False)
        out_f, in_f = base_layer.weight.shape
        dtype, device = base_layer.weight.dtype, base_layer.weight.device
        self.r, self.scale = r, float(scale)
        self.lora_A_plus = nn.Linear(in_f, r, bias=False, dtype=dtype, device=device)
        self.lora_B_plus = nn.Linear(r, out_f, bias=False, dtype=dtype, device=device)
        self.lora_A_minus = nn.Linear(in_f, r, bias=False, dtype=dtype, device=device)
        self.lora_B_minus = nn.Linear(r, out_f, bias=False, dtype=dtype, device=device)
        self.register_buffer("d2_tau", torch.tensor(float(tau), dtype=torch.float32))
        self.register_buffer("d2_magnitude", row_norm(base_layer.weight.detach().float()))
        self._cached_scale: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise so that dW = 0: B+ = B- = 0; A+ Kaiming-uniform (PEFT's LoRA default), A- Gaussian std 1/r.

        The two A factors get different initialisations so the branches do not
        receive mirrored gradients.
        """
        with torch.no_grad():
            bound = 1 / math.sqrt(self.lora_A_plus.in_features)  # kaiming_uniform_(a=sqrt(5))
            self.lora_A_plus.weight.uniform_(-bound, bound, generator=generator)
            self.lora_A_minus.weight.normal_(0.0, 1.0 / self.r, generator=generator)
            self.lora_B_plus.weight.zero_()
            self.lora_B_minus.weight.zero_()
        self._cached_scale = None

    @property
    def tau(self) -> float:
        """The negative-branch weight tau as a Python float."""
        return float(self.d2_tau)

    def delta_weight(self) -> torch.Tensor:
        """dW = scale * (B+ @ A+ - tau * B- @ A-): (out_features, in_features), in the factors' dtype."""
        pos = self.lora_B_plus.weight @ self.lora_A_plus.weight
        neg = self.lora_B_minus.weight @ self.lora_A_minus.weight
        return self.scale * (pos - self.d2_tau.to(neg.dtype) * neg)

    def row_scale(self) -> torch.Tensor:
        """s = m / ||W0 + dW|| per output row: (out_features,), from the current factors (or the cache)."""
        if self._cached_scale is not None:
            return self._cached_scale
        w = self.base_layer.weight
        return self.d2_magnitude.to(w.dtype) / row_norm(w + self.delta_weight())

    def cache_scale(self, enabled: bool = True) -> None:
        """Freeze s = m / ||W0 + dW|| at its current value (inference only), or drop the cache."""
        with torch.no_grad():
            self._cached_scale = self.row_scale().detach().clone() if enabled else None
        if not enabled:
            self._cached_scale = None

    def lowrank(self, x: torch.Tensor) -> torch.Tensor:
        """x dW^T through the factors: (..., in_features) -> (..., out_features)."""
        pos = self.lora_B_plus(self.lora_A_plus(x))
        neg = self.lora_B_minus(self.lora_A_minus(x))
        return self.scale * (pos - self.d2_tau.to(x.dtype) * neg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = s * (x W0^T + x dW^T) + x dW^T + b for x (..., in_features) -> (..., out_features)."""
        base = nn.functional.linear(x, self.base_layer.weight)
        dx = self.lowrank(x)
        y = self.row_scale().to(x.dtype) * (base + dx) + dx
        if self.base_layer.bias is not None:
            y = y + self.base_layer.bias
        return y

    def factors(self, module: str) -> LayerFactors:
        """This layer's factors as :class:`LayerFactors` (detached CPU float32 copies)."""
        tensors = {n: getattr(self, n).weight.detach().float().cpu().clone() for n in FACTORS}
        return LayerFactors(module, tensors, self.scale, self.tau, self.d2_magnitude.detach().float().cpu().clone())

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, tau={self.tau:g}"


def inject_d2lora(
    model: nn.Module,
    config: AdapterConfig,
    factors: dict[str, LayerFactors] | None = None,
    *,
    seed: int | None = None,
) -> dict[str, D2LoRALinear]:
    """Replace every targeted nn.Linear of ``model`` with a :class:`D2LoRALinear`, in place.

    Args:
        model: a transformers model (module paths as in its state dict, e.g.
            ``model.layers.0.self_attn.q_proj``).
        config: a D2LORA :class:`AdapterConfig` (r, lora_alpha, tau, target_modules, patterns).
        factors: trained factors to load (module path -> LayerFactors); None to
            initialise fresh (dW = 0) for training. With factors, exactly their
            modules are wrapped.
        seed: RNG seed of the fresh initialisation.

    Returns:
        module path -> the injected layer.

    Raises:
        ValueError: no module matched, a factor module is not an nn.Linear of the
            model, or a factor shape does not fit.
    """
    if config.peft_type != "D2LORA":
        raise InputError(f"{config.source}: inject_d2lora needs a D2LORA config, got {config.peft_type}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    names = dict(model.named_modules())
    wanted = list(factors) if factors is not None else [
        n for n, m in names.items() if isinstance(m, nn.Linear) and config.targets(n)
    ]
    if not wanted:
        raise InputError(f"target_modules {config.target_modules!r} matches no nn.Linear of the model")
    injected: dict[str, D2LoRALinear] = {}
    for name in wanted:
        lin = names.get(name)
        if not isinstance(lin, nn.Linear):
            raise InputError(f"adapter layer {name} is not an nn.Linear of the model (found {type(lin).__name__})")
        layer = D2LoRALinear(lin, config.rank_for(name), config.scale_for(name), config.tau)
        if factors is None:
            layer.reset_parameters(gen)
        else:
            f = factors[name]
            layer.d2_tau.fill_(float(f.tau))
            layer.scale = float(f.scale)
            with torch.no_grad():
                for n in FACTORS:
                    dst = getattr(layer, n).weight
                    src = f.tensors[n]
                    if tuple(src.shape) != tuple(dst.shape):
                        raise InputError(f"{name}.{n}: adapter shape {tuple(src.shape)}, model expects {tuple(dst.shape)}")
                    dst.copy_(src.to(dst.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(names[parent_name] if parent_name else model, child, layer)
        injected[name] = layer
    return injected


def d2lora_layers(model: nn.Module) -> dict[str, D2LoRALinear]:
    """Module path -> :class:`D2LoRALinear` for every injected layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, D2LoRALinear)}
