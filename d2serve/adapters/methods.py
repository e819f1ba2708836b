"""The registry of adapter methods: the one place where merge formulas live.

Every method is a pair of pure tensor functions for ONE nn.Linear layer:

* ``delta(f, dtype)``: the low-rank update dW, shape (out_features, in_features).
* ``merged_weight(W0, f, dtype)``: the merged weight W_hat, same shape as W0.

Layout (the nn.Linear convention): ``W0`` is (out_features, in_features);
``lora_A*`` factors are (r, in_features); ``lora_B*`` factors are
(out_features, r); magnitudes are (out_features,), the norm of each output
row taken over in_features (PEFT's DoRA axis). The merge engine looks a
method up by name and never branches on the method itself.

Formulas:

* ``lora`` (Hu et al., 2021; PEFT ``LoraLayer.get_delta_weight``):
  W_hat = W0 + scale * B @ A.
* ``dora`` (Liu et al., 2024; PEFT ``DoraLinearLayer`` merge):
  W_hat = diag(magnitude / ||W0 + dW||) (W0 + dW), dW = scale * B @ A.
* ``d2lora`` (Fujisawa & Kondo, 2026, arXiv 2602.14728; d2serve format v1):
  dW = scale * (B+ @ A+ - tau * B- @ A-), m = ||W0|| per output row,
  W* = diag(m / ||W0 + dW||) (W0 + dW), W_hat = W* + dW.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class MergeMathError(ValueError):
    """A layer's merge produced a non-finite value or divides by a zero-norm row."""


@dataclass
class LayerFactors:
    """The adapter tensors of one adapted nn.Linear and its per-layer settings.

    Attributes:
        module: module path in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
        tensors: method-specific factors, by format name without prefix/suffix:
            d2lora: ``lora_A_plus`` / ``lora_A_minus`` (r, in), ``lora_B_plus`` /
            ``lora_B_minus`` (out, r); lora: ``lora_A`` (r, in), ``lora_B`` (out, r);
            dora: those two plus ``lora_magnitude_vector`` (out,).
        scale: lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA).
        tau: D2-LoRA negative-branch weight (learned ``d2_tau`` if present, else the config's).
        magnitude: D2-LoRA ``d2_magnitude`` (out,), ||W0|| rows of the training base (a fingerprint).
    """

    module: str
    tensors: dict[str, torch.Tensor]
    scale: float
    tau: float | None = None
    magnitude: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def row_block(self, start: int, end: int, row_factors: tuple[str, ...]) -> LayerFactors:
        """The factors of output rows [start, end): ``row_factors`` and ``magnitude`` sliced, A factors shared.

        Every formula here is row-wise (row i of W_hat depends on row i of W0, of the B
        factors and of the magnitudes only), so merging row blocks gives the same values.
        """
        tensors = {n: (t[start:end] if n in row_factors else t) for n, t in self.tensors.items()}
        mag = self.magnitude[start:end] if self.magnitude is not None else None
        return LayerFactors(self.module, tensors, self.scale, self.tau, mag, self.extra)

    @property
    def rank(self) -> int:
        """Rank r of the factors (rows of ``lora_A`` / ``lora_A_plus``)."""
        a = self.tensors.get("lora_A_plus", self.tensors.get("lora_A"))
        return int(a.shape[0])


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of a (out, in) weight, over in_features: shape (out,)."""
    return torch.linalg.vector_norm(w, ord=2, dim=1)


def _f(f: LayerFactors, name: str, dtype: torch.dtype) -> torch.Tensor:
    return f.tensors[name].to(dtype)


def _rescale(w: torch.Tensor, magnitude: torch.Tensor, module: str) -> torch.Tensor:
    """diag(magnitude / ||w||) w, refusing zero-norm rows (which would divide by zero)."""
    norm = row_norm(w)
    zero = (norm == 0).nonzero().flatten()
    if zero.numel():
        raise MergeMathError(
            f"{module}: {zero.numel()} output row(s) of W0 + dW have zero norm (first row {int(zero[0])}); "
            "the magnitude rescaling m / ||W0 + dW|| is undefined"
        )
    return (magnitude.to(w.dtype) / norm).unsqueeze(1) * w


# ---- lora -------------------------------------------------------------------------------------


def lora_delta(f: LayerFactors, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """dW = scale * B @ A, shape (out, in), in ``dtype`` (PEFT ``get_delta_weight``)."""
    return f.scale * (_f(f, "lora_B", dtype) @ _f(f, "lora_A", dtype))


def lora_merged(
    w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64, dw: torch.Tensor | None = None
) -> torch.Tensor:
    """W_hat = W0 + scale * B @ A; W0 (out, in) of any float dtype; result in ``dtype``.

    ``dw``: the precomputed ``lora_delta(f, dtype)``, to avoid computing it twice.
    """
    return w0.to(dtype) + (lora_delta(f, dtype) if dw is None else dw)


# ---- dora -------------------------------------------------------------------------------------


def dora_merged(
    w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64, dw: torch.Tensor | None = None
) -> torch.Tensor:
    """W_hat = diag(magnitude / ||W0 + dW||)(W0 + dW), magnitude = ``lora_magnitude_vector`` (out,)."""
    w = w0.to(dtype) + (lora_delta(f, dtype) if dw is None else dw)
    return _rescale(w, _f(f, "lora_magnitude_vector", dtype), f.module)


# ---- d2lora -----------------------------------------------------------------------------------


def d2lora_delta(f: LayerFactors, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """dW = scale * (B+ @ A+ - tau * B- @ A-), shape (out, in), signed, rank <= 2r (arXiv 2602.14728)."""
    pos = _f(f, "lora_B_plus", dtype) @ _f(f, "lora_A_plus", dtype)
    neg = _f(f, "lora_B_minus", dtype) @ _f(f, "lora_A_minus", dtype)
    return f.scale * (pos - f.tau * neg)


def d2lora_scale(w0: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """s = m / ||W0 + dW|| per output row, m = ||W0|| rows: shape (out,), in dw's dtype."""
    w0 = w0.to(dw.dtype)
    norm = row_norm(w0 + dw)
    return row_norm(w0) / norm


def d2lora_merged(
    w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64, dw: torch.Tensor | None = None
) -> torch.Tensor:
    """W_hat = diag(m / ||W0 + dW||)(W0 + dW) + dW with m = ||W0|| per output row.

    Args:
        w0: (out_features, in_features) base weight as stored by nn.Linear, any float dtype.
        f: the layer's factors (``lora_A_plus``, ``lora_B_plus``, ``lora_A_minus``, ``lora_B_minus``).
        dtype: compute dtype (float64 by default; the caller casts the result once).
        dw: the precomputed ``d2lora_delta(f, dtype)``, to avoid computing it twice.

    Raises:
        MergeMathError: a row of W0 + dW has zero norm.
    """
    w0 = w0.to(dtype)
    dw = d2lora_delta(f, dtype) if dw is None else dw
    return _rescale(w0 + dw, row_norm(w0), f.module) + dw


def dora_scale(w0: torch.Tensor, dw: torch.Tensor, f: LayerFactors) -> torch.Tensor:
    """DoRA's row scale magnitude / ||W0 + dW||: shape (out,), in dw's dtype."""
    return f.tensors["lora_magnitude_vector"].to(dw.dtype) / row_norm(w0.to(dw.dtype) + dw)


@dataclass(frozen=True)
class Method:
    """A merge method: the factor names it needs and its pure functions.

    ``row_scale(W0, dW, factors)`` returns the per-output-row rescaling (out,)
    the method applies (None for plain LoRA); used only for merge statistics.
    ``row_factors`` names the factors indexed by output row (B factors,
    magnitudes), so the engine can merge a weight in row blocks.
    """

    name: str
    factor_names: tuple[str, ...]
    delta: Callable[[LayerFactors, torch.dtype], torch.Tensor]
    merged_weight: Callable[..., torch.Tensor]
    row_scale: Callable[[torch.Tensor, torch.Tensor, LayerFactors], torch.Tensor] | None = None
    row_factors: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    "lora": Method("lora", ("lora_A", "lora_B"), lora_delta, lora_merged, row_factors=("lora_B",)),
    "dora": Method("dora", ("lora_A", "lora_B", "lora_magnitude_vector"), lora_delta, dora_merged, dora_scale,
                   row_factors=("lora_B", "lora_magnitude_vector")),
    "d2lora": Method(
        "d2lora",
        ("lora_A_plus", "lora_B_plus", "lora_A_minus", "lora_B_minus"),
        d2lora_delta,
        d2lora_merged,
        lambda w0, dw, f: d2lora_scale(w0, dw),
        row_factors=("lora_B_plus", "lora_B_minus"),
    ),
}


def get_method(name: str) -> Method:
    """Look a method up by registry name (``d2lora``, ``lora``, ``dora``).

    Raises:
        KeyError: unknown method name.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown adapter method {name!r}; known: {sorted(METHODS)}") from None
