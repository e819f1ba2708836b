"""The registry of adapter methods: the one place where merge formulas live.

Every method is a pair of pure tensor functions for ONE nn.Linear layer:

* ``delta(f, dtype)``: the low-rank update dW, shape (out_features, in_features).
* ``merged_weight(W0, f, dtype)``: the merged weight W_hat, same shape as W0.
* ``fold(W0, f, dtype)``: the layer for unmerged serving, (s, A', B') with W_hat = diag(s) W0 + B' @ A'
  exactly (s scales the base layer's output rows, B' A' is a plain LoRA; d2serve.export.vllm_lora).
* ``merge(W0, f, dtype, dw, base_norms)``: :class:`Merged`, W_hat and the per-row rescaling it
  applied (what the merge statistics need, computed once); ``merged_weight`` is its ``weight``.
* ``low_rank(f, dtype)``: (B', A') with dW = B' @ A', B' (out_features, k), A' (k, in_features):
  the scale (and D2-LoRA's tau and two branches) folded into B', so dW is one matrix product.
* ``as_dora(W0, f, scaling, dtype)`` (D2-LoRA only): the layer as an exact PEFT DoRA layer of rank 2r
  (:func:`d2lora_as_dora`, d2serve.export.peft); :func:`truncated_svd_lora` is the plain-LoRA approximation of
  any method's update W_hat - W0 (``d2serve export lora``).

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
from typing import NamedTuple

import torch

from d2serve.errors import InputError


class MergeMathError(InputError):
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
        row_offset: index of this object's first output row in the whole weight (non-zero for a row
            block, see :meth:`row_block`), so that errors name the row of the whole weight.
    """

    module: str
    tensors: dict[str, torch.Tensor]
    scale: float
    tau: float | None = None
    magnitude: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    row_offset: int = 0

    def row_block(self, start: int, end: int, row_factors: tuple[str, ...]) -> LayerFactors:
        """The factors of output rows [start, end): ``row_factors`` and ``magnitude`` sliced, A factors shared.

        Every formula here is row-wise (row i of W_hat depends on row i of W0, of the B
        factors and of the magnitudes only), so merging row blocks gives the same values.
        """
        tensors = {n: (t[start:end] if n in row_factors else t) for n, t in self.tensors.items()}
        mag = self.magnitude[start:end] if self.magnitude is not None else None
        return LayerFactors(self.module, tensors, self.scale, self.tau, mag, self.extra, self.row_offset + start)

    @property
    def rank(self) -> int:
        """Rank r of the factors (rows of the first A factor: ``lora_A`` / ``lora_A_plus``)."""
        a = self.tensors.get("lora_A_plus", self.tensors.get("lora_A"))
        return int(a.shape[0])


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row of a (out, in) weight, over in_features: shape (out,)."""
    return torch.linalg.vector_norm(w, ord=2, dim=1)


class Merged(NamedTuple):
    """What a method's ``merge`` returns for (a row block of) one layer.

    Attributes:
        weight: W_hat, (out, in), in the compute dtype.
        scale: the per-output-row rescaling (out,) it applied (D2-LoRA m / ||W0 + dW||, DoRA
            magnitude / ||W0 + dW||), or None (plain LoRA).
    """

    weight: torch.Tensor
    scale: torch.Tensor | None


def _f(f: LayerFactors, name: str, dtype: torch.dtype) -> torch.Tensor:
    return f.tensors[name].to(dtype)


def _base_row_norms(w0: torch.Tensor, f: LayerFactors, norms: torch.Tensor | None = None) -> torch.Tensor:
    """m = ||W0|| per output row (out,) (``norms`` when the caller already has ``row_norm(w0)``), refusing a
    zero row of W0 (D2-LoRA's m would be 0 and its training-time scale m / ||W0 + dW|| is 0/0 at
    initialisation, so no trained adapter can mean it)."""
    m = row_norm(w0) if norms is None else norms.to(w0.dtype)
    zero = (m == 0).nonzero().flatten()
    if zero.numel():
        raise MergeMathError(
            f"{f.module}: {zero.numel()} output row(s) of W0 have zero norm (first row {f.row_offset + int(zero[0])}) "
            "in the base weight; the D2-LoRA magnitude m = ||W0|| of that row is 0, so its scale m / ||W0 + dW|| "
            "is 0/0 at initialisation and undefined for a trained adapter: check the base checkpoint"
        )
    return m


# ---- lora -------------------------------------------------------------------------------------


def lora_low_rank(f: LayerFactors, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale * B (out, r), A (r, in)) in ``dtype``: dW = scale * B @ A (PEFT ``get_delta_weight``)."""
    return f.scale * _f(f, "lora_B", dtype), _f(f, "lora_A", dtype)


def lora_delta(f: LayerFactors, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """dW = scale * B @ A, shape (out, in), in ``dtype`` (PEFT ``get_delta_weight``)."""
    b, a = lora_low_rank(f, dtype)
    return b @ a


def lora_merge(
    w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64, dw: torch.Tensor | None = None,
    base_norms: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> Merged:
    """W_hat = W0 + scale * B @ A (W0 (out, in) of any float dtype, result in ``dtype``); no row scale.

    ``dw``: the precomputed ``lora_delta(f, dtype)``; ``base_norms`` is unused (LoRA reads no norm);
    ``out``: a (out, in) ``dtype`` buffer (not overlapping ``w0`` or ``dw``) that receives W_hat, so a caller
    merging many blocks allocates nothing per block (the values are those of the call without it).
    """
    return Merged(torch.add(w0.to(dtype), lora_delta(f, dtype) if dw is None else dw, out=out), None)


def lora_merged(
    w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64, dw: torch.Tensor | None = None
) -> torch.Tensor:
    """W_hat = W0 + scale * B @ A (:func:`lora_merge`), (out, in) in ``dtype``."""
    return lora_merge(w0, f, dtype, dw).weight


# ---- dora -------------------------------------------------------------------------------------


def dora_merge(
    w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64, dw: torch.Tensor | None = None,
    base_norms: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> Merged:
    """W_hat = diag(s)(W0 + dW), s = magnitude / ||W0 + dW|| (out,), magnitude = ``lora_magnitude_vector``.

    Returns W_hat and s (``base_norms`` is unused; ``out`` as in :func:`lora_merge`). Raises MergeMathError
    for a zero-norm row of W0 + dW.
    """
    w = torch.add(w0.to(dtype), lora_delta(f, dtype) if dw is None else dw, out=out)
    s = _checked_scale(w, _f(f, "lora_magnitude_vector", dtype), f.module, f.row_offset)
    return Merged(w.mul_(s.unsqueeze(1)), s)


def dora_merged(
    w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64, dw: torch.Tensor | None = None
) -> torch.Tensor:
    """W_hat = diag(magnitude / ||W0 + dW||)(W0 + dW) (:func:`dora_merge`), magnitude = ``lora_magnitude_vector``."""
    return dora_merge(w0, f, dtype, dw).weight


# ---- d2lora -----------------------------------------------------------------------------------


def d2lora_low_rank(f: LayerFactors, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """([scale B+, -tau scale B-] (out, 2r), [A+; A-] (2r, in)) in ``dtype``: dW = scale (B+ A+ - tau B- A-)
    as one product of rank <= 2r (arXiv 2602.14728)."""
    b = torch.cat([f.scale * _f(f, "lora_B_plus", dtype), (-f.tau * f.scale) * _f(f, "lora_B_minus", dtype)], 1)
    return b, torch.cat([_f(f, "lora_A_plus", dtype), _f(f, "lora_A_minus", dtype)], 0)


def d2lora_delta(f: LayerFactors, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """dW = scale * (B+ @ A+ - tau * B- @ A-), shape (out, in), signed, rank <= 2r (arXiv 2602.14728)."""
    b, a = d2lora_low_rank(f, dtype)
    return b @ a


def d2lora_merge(
    w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64, dw: torch.Tensor | None = None,
    base_norms: torch.Tensor | None = None, out: torch.Tensor | None = None,
) -> Merged:
    """W_hat = diag(s)(W0 + dW) + dW, s = m / ||W0 + dW|| with m = ||W0|| per output row; returns W_hat and s.

    Args:
        w0: (out_features, in_features) base weight as stored by nn.Linear, any float dtype.
        f: the layer's factors (``lora_A_plus``, ``lora_B_plus``, ``lora_A_minus``, ``lora_B_minus``).
        dtype: compute dtype (float64 by default; the caller casts the result once).
        dw: the precomputed ``d2lora_delta(f, dtype)``, to avoid computing it twice.
        base_norms: the precomputed ``row_norm(w0)`` (out,), to avoid computing it twice.
        out: a (out, in) ``dtype`` buffer (not overlapping ``w0`` or ``dw``) that receives W_hat (no allocation per
            call; the values are those of the call without it).

    Raises:
        MergeMathError: a row of W0 or of W0 + dW has zero norm (the message names the module and row).
    """
    w0 = w0.to(dtype)
    dw = d2lora_delta(f, dtype) if dw is None else dw
    m = _base_row_norms(w0, f, base_norms)
    v = torch.add(w0, dw, out=out)
    s = _checked_scale(v, m, f.module, f.row_offset)
    return Merged(torch.addcmul(dw, v, s.unsqueeze(1), out=v), s)  # s * (W0 + dW) + dW, in place of W0 + dW


def d2lora_merged(
    w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64, dw: torch.Tensor | None = None
) -> torch.Tensor:
    """W_hat = diag(m / ||W0 + dW||)(W0 + dW) + dW with m = ||W0|| per output row (:func:`d2lora_merge`)."""
    return d2lora_merge(w0, f, dtype, dw).weight


# ---- unmerged serving: diag(s) W0 + B' A' ----------------------------------------------------


def _checked_scale(w: torch.Tensor, magnitude: torch.Tensor, module: str, row_offset: int = 0) -> torch.Tensor:
    """magnitude / ||w|| per output row (out,), refusing zero-norm rows of ``w`` (a division by zero)."""
    norm = row_norm(w)
    zero = (norm == 0).nonzero().flatten()
    if zero.numel():
        raise MergeMathError(
            f"{module}: {zero.numel()} output row(s) of W0 + dW have zero norm (first row {row_offset + int(zero[0])}); "
            "the magnitude rescaling m / ||W0 + dW|| is undefined"
        )
    return magnitude.to(w.dtype) / norm


def lora_fold(w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64):
    """Plain LoRA as (s, A', B') with W_hat = diag(s) W0 + B' @ A': s = 1, A' = A (r, in), B' = scale * B (out, r)."""
    ones = torch.ones(w0.shape[0], dtype=dtype)
    return ones, _f(f, "lora_A", dtype), f.scale * _f(f, "lora_B", dtype)


def dora_fold(w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64):
    """DoRA as (s, A', B'): s = magnitude / ||W0 + dW|| (out,), A' = A, B' = diag(s) scale B.

    diag(s) W0 + B' A' = diag(s)(W0 + dW), PEFT's DoRA merge (:func:`dora_merged`).
    """
    dw = lora_delta(f, dtype)
    s = _checked_scale(w0.to(dtype) + dw, _f(f, "lora_magnitude_vector", dtype), f.module, f.row_offset)
    return s, _f(f, "lora_A", dtype), s.unsqueeze(1) * (f.scale * _f(f, "lora_B", dtype))


def d2lora_fold(w0: torch.Tensor, f: LayerFactors, dtype: torch.dtype = torch.float64):
    """D2-LoRA as (s, A', B') with W_hat = diag(s) W0 + B' @ A' (rank 2r):

    s = m / ||W0 + dW|| (out,), m = ||W0|| rows; A' = [A+; A-] (2r, in);
    B' = diag(s + 1) [scale B+, -tau scale B-] (out, 2r), so B' A' = diag(s + 1) dW and
    diag(s) W0 + B' A' = diag(s)(W0 + dW) + dW = W_hat (:func:`d2lora_merged`).
    """
    w0 = w0.to(dtype)
    dw = d2lora_delta(f, dtype)
    s = _checked_scale(w0 + dw, _base_row_norms(w0, f), f.module, f.row_offset)
    a = torch.cat([_f(f, "lora_A_plus", dtype), _f(f, "lora_A_minus", dtype)], 0)
    b = torch.cat([f.scale * _f(f, "lora_B_plus", dtype), (-f.tau * f.scale) * _f(f, "lora_B_minus", dtype)], 1)
    return s, a, (s + 1).unsqueeze(1) * b


# ---- leaving d2serve: exact PEFT DoRA and truncated-SVD plain LoRA ----------------------------


class DoraFactors(NamedTuple):
    """One layer as a PEFT DoRA layer (PEFT ``DoraLinearLayer``): W = diag(m / ||W0 + scaling B A||)(W0 + scaling B A).

    Attributes:
        lora_A: (R, in_features); lora_B: (out_features, R); magnitude: ``lora_magnitude_vector`` (out,).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor


def d2lora_as_dora(
    w0: torch.Tensor, f: LayerFactors, scaling: float, dtype: torch.dtype = torch.float64,
    factor_dtype: torch.dtype | None = torch.float32,
) -> DoraFactors:
    """D2-LoRA as an exact PEFT DoRA layer of rank 2r (the identity of docs/adapter-format.md, "Exports").

    With dW = scale (B+ A+ - tau B- A-) and s = m / ||W0 + dW|| (out,), m = ||W0|| per output row:

    * A' = [A+; A-]                                           (2r, in)
    * B' = diag((1 + s) / s) [B+, -tau B-] * (scale / scaling) (out, 2r), so scaling B' A' = diag((1 + s) / s) dW
    * m' = s * ||W0 + scaling B' A'||                         (out,)

    Then PEFT's DoRA weight m' / ||W0 + scaling B'A'|| (W0 + scaling B'A') = s (W0 + dW) + dW = W_hat
    (:func:`d2lora_merge`): the DoRA rescaling of the row is s again, and s * (1 + s)/s dW = (1 + s) dW.

    Args:
        w0: (out, in) base weight (nn.Linear layout), any float dtype.
        f: the D2-LoRA layer factors.
        scaling: the scaling PEFT will apply to the exported layer (its lora_alpha' / r', or / sqrt(r') with
            rsLoRA); equal to ``f.scale`` up to rounding, kept exact by the factor ``scale / scaling`` in B'.
        dtype: compute dtype (float64).
        factor_dtype: dtype A' and B' are stored in (float32): m' is computed from the ROUNDED A', B' so that
            PEFT's norm of the stored layer gives back exactly s; None keeps ``dtype``.

    Returns:
        :class:`DoraFactors` in ``dtype`` (A', B' already rounded to ``factor_dtype`` and back).

    Raises:
        MergeMathError: a zero-norm row of W0 or of W0 + dW (s undefined).
    """
    w0 = w0.to(dtype)
    dw = d2lora_delta(f, dtype)
    s = _checked_scale(w0 + dw, _base_row_norms(w0, f), f.module, f.row_offset)
    a = torch.cat([_f(f, "lora_A_plus", dtype), _f(f, "lora_A_minus", dtype)], 0)
    b = torch.cat([_f(f, "lora_B_plus", dtype), -f.tau * _f(f, "lora_B_minus", dtype)], 1)
    b = b * ((1 + s) / s * (f.scale / scaling)).unsqueeze(1)
    if factor_dtype is not None:
        a, b = a.to(factor_dtype).to(dtype), b.to(factor_dtype).to(dtype)
    magnitude = s * row_norm(w0 + scaling * (b @ a))
    return DoraFactors(a, b, magnitude)


class LowRankFit(NamedTuple):
    """A truncated SVD of a layer's update (:func:`truncated_svd_lora`).

    Attributes:
        lora_A: (k, in) = sqrt(S_k) V_k^T; lora_B: (out, k) = U_k sqrt(S_k): B A is the best rank-k approximation
            of the update in Frobenius norm (Eckart-Young).
        rank: k.
        rel_error: ||W_hat - (W0 + B A)||_F / ||W_hat||_F, the relative Frobenius error of the merged weight.
        singular_values: every singular value of the update (min(out, in),), descending, float64.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    rel_error: float
    singular_values: torch.Tensor


def truncated_svd_lora(
    update: torch.Tensor, merged_norm: float, *, rank: int | None = None, max_rel_error: float | None = None,
) -> LowRankFit:
    """A plain LoRA (B A, scaling 1) for a full update U = W_hat - W0 (out, in), float64, by truncated SVD.

    Exactly one of ``rank`` (k = min(rank, min(out, in))) and ``max_rel_error`` (the smallest k >= 1 with
    sqrt(sum_{i > k} sigma_i^2) / merged_norm <= max_rel_error) chooses k; ``merged_norm`` is ||W_hat||_F.
    Whatever the method, U holds the whole change of the merged weight (DoRA / D2-LoRA magnitudes included).

    Raises:
        ValueError: neither or both of rank / max_rel_error, rank < 1, a negative budget.
    """
    if (rank is None) == (max_rel_error is None):
        raise ValueError("give exactly one of rank and max_rel_error")
    u = update.to(torch.float64)
    uu, sv, vh = torch.linalg.svd(u, full_matrices=False)
    # tail[k] = sqrt(sum_{i >= k} sigma_i^2): the Frobenius error of keeping the first k
    tail = torch.cat([sv.flip(0).square().cumsum(0).flip(0), sv.new_zeros(1)]).sqrt()
    denom = merged_norm if merged_norm > 0 else 1.0
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        k = min(int(rank), sv.numel())
    else:
        if not max_rel_error >= 0:
            raise ValueError(f"max_rel_error must be >= 0, got {max_rel_error}")
        ok = (tail / denom <= max_rel_error).nonzero().flatten()
        k = max(1, int(ok[0]) if ok.numel() else sv.numel())
    root = sv[:k].sqrt()
    return LowRankFit(root.unsqueeze(1) * vh[:k], uu[:, :k] * root.unsqueeze(0), k, float(tail[k] / denom), sv)


@dataclass(frozen=True)
class Method:
    """A merge method: its file format (factor keys, which factors are A-like / B-like, per-layer
    extras, config fields) and its pure functions. io, inspect, config and merge ask this entry
    instead of branching on method names; a new method is one more entry of :data:`METHODS`.

    Attributes:
        name: registry name (``lora``, ``dora``, ``d2lora``).
        peft_type: the ``peft_type`` of its ``adapter_config.json``.
        selector: the boolean config field that selects it among the methods of that peft_type
            (``use_dora``), or None for the method used when no selector is true.
        pairs: (A factor, B factor) names of each low-rank branch: A is (r, in_features),
            B is (out_features, r).
        vectors: per-output-row factors, shape (out_features,) (DoRA's magnitude).
        file_keys: tensor-key suffix in ``adapter_model.safetensors`` -> factor name.
        tau_key: key suffix of a learned per-layer scalar tau (``d2_tau``), or None.
        fingerprint_key: key suffix of the base fingerprint ||W0|| per output row (``d2_magnitude``), or None.
        branches: a label of each pair for messages (``plus``, ``minus``), or ().
        config_fields: the method's own ``adapter_config.json`` fields beyond the shared ones (``r``,
            ``lora_alpha``, ``target_modules``, ...), each with the reason quoted in d2serve.adapters.config's table
            of fields (``FIELDS``) and docs/adapter-format.md; its ``selector`` among them. An :class:`AdapterConfig`
            attribute of the same name holds each value, and ``to_json_dict`` writes every such field of the
            config's ``peft_type`` (d2serve.adapters.config asks this entry, never names a method).
        format_label: what the ``peft_type``'s files are, for messages (``d2serve format v1``, ``PEFT``).
        strict_fields: the format is d2serve's own: every key of its ``adapter_config.json`` must be known (a
            typo is an error, even when null); False for a PEFT format (an unknown key is accepted while unset,
            the value PEFT writes for an option not in use).
        required_fields: the ``adapter_config.json`` fields a file of this method must carry (no default is
            assumed), in the order the "missing required field" problems are listed.
        check_config(raw): the problems (messages) of the method's own field values in the raw config dict (e.g.
            a non-finite ``tau``), [] when they are valid; the shared fields are checked by d2serve.adapters.config.
        config_values(raw): the :class:`AdapterConfig` values of the method's own fields from a valid raw config
            (e.g. ``{"tau": 0.5, "magnitude_axis": "out"}``); the selector is set by the config (a bool).
        synthetic_config(settings): the raw config fields a random adapter of this method carries beyond the
            shared ones and the selector (d2serve.adapters.synthetic; ``settings`` holds e.g. ``tau``).
        synthetic_vectors(norms, gen): the per-output-row factors (``vectors``) of a random adapter, from the base
            row norms ||W0|| (float64, (out_features,)) and a torch.Generator; float32, (out_features,) each.
        uses_base_norms: the formula reads ||W0 + dW|| or ||W0|| of the base it is merged into,
            so the result depends on which base (refused onto an already-merged folder without a fingerprint).
        delta, merged_weight, merge: the pure functions (module docstring); ``merge`` returns W_hat and
            the per-output-row rescaling it applied (:class:`Merged`, what the merge statistics need).
        low_rank(factors, dtype): (B' (out, k), A' (k, in)) with dW = B' @ A' (module docstring).
        fold(W0, factors, dtype): the layer for unmerged serving as (s (out,), A' (R, in), B' (out, R)) with
            W_hat = diag(s) W0 + B' @ A' exactly (``lora_fold``, ``dora_fold``, ``d2lora_fold``); s scales
            the base layer's output rows (not its bias), B' A' is a plain LoRA (d2serve.export.vllm_lora).
        fused_form: the shape of ``merge`` as the fused merge kernel (d2serve.merge_fused) computes it, with the
            same roundings in the same order: ``add`` W0 + dW (``lora_merge``), ``rescale`` diag(v / ||W0 + dW||)(W0 + dW)
            with v the factor ``fused_magnitude`` (``dora_merge``), ``rescale_add`` diag(m / ||W0 + dW||)(W0 + dW) + dW
            with m = ||W0|| per row (``d2lora_merge``); None: only the torch path merges this method.
        fused_magnitude: the (out_features,) factor v of the ``rescale`` form (DoRA's ``lora_magnitude_vector``).
        as_dora(W0, factors, scaling, dtype): the layer as an exact PEFT DoRA layer (:class:`DoraFactors`), for
            methods PEFT cannot read (``d2lora_as_dora``; d2serve.export.peft), else None.
        layer_kinds: the layer kinds (d2serve.architecture: ``linear``, ``conv1d``, ``embedding``) the method is
            defined and merged on: LoRA on all three (PEFT ``lora.Linear`` / Conv1D / ``lora.Embedding``), DoRA on
            linear and Conv1D (PEFT's DoRA embedding norms another axis; not merged), D2-LoRA on nn.Linear only.
    """

    name: str
    peft_type: str
    pairs: tuple[tuple[str, str], ...]
    delta: Callable[[LayerFactors, torch.dtype], torch.Tensor]
    merged_weight: Callable[..., torch.Tensor]
    merge: Callable[..., Merged]
    low_rank: Callable[[LayerFactors, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = lora_low_rank
    vectors: tuple[str, ...] = ()
    selector: str | None = None
    file_keys: dict[str, str] = field(default_factory=dict)
    tau_key: str | None = None
    fingerprint_key: str | None = None
    config_fields: dict[str, str] = field(default_factory=dict)
    uses_base_norms: bool = False
    branches: tuple[str, ...] = ()
    fold: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    as_dora: Callable[..., DoraFactors] | None = None
    layer_kinds: tuple[str, ...] = ("linear", "conv1d")
    fused_form: str | None = None
    fused_magnitude: str | None = None
    format_label: str = "PEFT"
    strict_fields: bool = False
    required_fields: tuple[str, ...] = ("r", "lora_alpha", "target_modules")
    check_config: Callable[[dict], list[str]] = lambda raw: []
    config_values: Callable[[dict], dict] = lambda raw: {}
    synthetic_config: Callable[[dict], dict] = lambda settings: {}
    synthetic_vectors: Callable[..., dict[str, torch.Tensor]] = lambda norms, gen: {}

    @property
    def factor_names(self) -> tuple[str, ...]:
        """Every factor a layer of this method must carry: A and B of each pair, then the vectors."""
        return tuple(n for pair in self.pairs for n in pair) + self.vectors

    @property
    def row_factors(self) -> tuple[str, ...]:
        """Factors indexed by output row (the B factors and the vectors), sliced when merging row blocks."""
        return tuple(b for _, b in self.pairs) + self.vectors

    @property
    def extra_keys(self) -> tuple[str, ...]:
        """Per-layer key suffixes besides the factors (learned tau, base fingerprint)."""
        return tuple(k for k in (self.tau_key, self.fingerprint_key) if k)


def _weight_keys(*names: str) -> dict[str, str]:
    return {f"{n}.weight": n for n in names}


# PEFT's LoRA on nn.Embedding (``lora.Embedding``) stores its factors as plain parameters: lora_embedding_A
# (r, num_embeddings) is A (r, in_features) and lora_embedding_B (embedding_dim, r) is B (out_features, r) of
# the embedding read as a layer whose weight is stored (in_features, out_features), like Conv1D: PEFT's
# ``Embedding.get_delta_weight`` = (B @ A).T * scaling = the stored-layout transpose of scale * B @ A.
_EMBEDDING_KEYS = {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}


def _d2lora_config_problems(raw: dict) -> list[str]:
    """Format v1's own fields: ``tau`` a finite number (when given: its absence is a missing required field),
    ``magnitude_axis`` ``"out"`` (the only axis format v1 defines)."""
    import math

    problems = []
    tau = raw.get("tau")
    if tau is not None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)):
            problems.append(f"field 'tau' must be a number, got {type(tau).__name__} {tau!r}")
        elif not math.isfinite(tau):
            problems.append(f"field 'tau' must be finite, got {tau}")
    axis = raw.get("magnitude_axis", "out")
    if axis != "out":
        problems.append(
            f"field 'magnitude_axis' is {axis!r}; only 'out' (norm per output row over in_features, "
            "PEFT's DoRA axis) is defined in format v1"
        )
    return problems


def _dora_vectors(norms: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A learned DoRA magnitude of a random adapter: the base row norms, each perturbed by up to ~10%."""
    n = norms.float()
    return {"lora_magnitude_vector": n * (1 + 0.1 * torch.randn(n.shape[0], generator=gen)).abs()}


METHODS: dict[str, Method] = {
    "lora": Method("lora", "LORA", (("lora_A", "lora_B"),), lora_delta, lora_merged, lora_merge,
                   file_keys=_weight_keys("lora_A", "lora_B") | _EMBEDDING_KEYS, fold=lora_fold,
                   layer_kinds=("linear", "conv1d", "embedding"), fused_form="add"),
    "dora": Method("dora", "LORA", (("lora_A", "lora_B"),), lora_delta, dora_merged, dora_merge,
                   vectors=("lora_magnitude_vector",), selector="use_dora",
                   file_keys=_weight_keys("lora_A", "lora_B", "lora_magnitude_vector")
                   | {"lora_magnitude_vector": "lora_magnitude_vector"} | _EMBEDDING_KEYS,
                   config_fields={"use_dora": "selects method dora"}, uses_base_norms=True, fold=dora_fold,
                   fused_form="rescale", fused_magnitude="lora_magnitude_vector", synthetic_vectors=_dora_vectors),
    "d2lora": Method(
        "d2lora", "D2LORA",
        (("lora_A_plus", "lora_B_plus"), ("lora_A_minus", "lora_B_minus")),
        d2lora_delta,
        d2lora_merged,
        d2lora_merge,
        low_rank=d2lora_low_rank,
        file_keys=_weight_keys("lora_A_plus", "lora_B_plus", "lora_A_minus", "lora_B_minus"),
        tau_key="d2_tau", fingerprint_key="d2_magnitude",
        config_fields={"tau": "D2-LoRA negative-branch weight", "magnitude_axis": "D2-LoRA norm axis ('out' only)"},
        uses_base_norms=True, branches=("plus", "minus"),
        fold=d2lora_fold, as_dora=d2lora_as_dora, layer_kinds=("linear",), fused_form="rescale_add",
        format_label="d2serve format v1", strict_fields=True,
        required_fields=("r", "lora_alpha", "tau", "target_modules"),
        check_config=_d2lora_config_problems,
        config_values=lambda raw: {"tau": float(raw["tau"]), "magnitude_axis": raw.get("magnitude_axis", "out")},
        synthetic_config=lambda settings: {"tau": settings["tau"]},
    ),
}


DEFAULT_METHOD = "d2lora"
"""d2serve's own method: what a random adapter (d2serve.adapters.synthetic) is unless another is asked for."""


def method_for(peft_type: str, config: dict) -> Method | None:
    """The method a config selects: the entry of ``peft_type`` whose ``selector`` field is true,
    else the entry of ``peft_type`` without a selector; None for an unknown ``peft_type``."""
    candidates = [m for m in METHODS.values() if m.peft_type == peft_type]
    chosen = [m for m in candidates if m.selector and config.get(m.selector)]
    plain = [m for m in candidates if m.selector is None]
    return (chosen or plain or [None])[0]


def peft_types() -> tuple[str, ...]:
    """Every ``peft_type`` some method reads, in registry order."""
    return tuple(dict.fromkeys(m.peft_type for m in METHODS.values()))


def methods_of(peft_type: str) -> tuple[Method, ...]:
    """The methods whose files carry ``peft_type``, in registry order (``LORA``: lora, dora)."""
    return tuple(m for m in METHODS.values() if m.peft_type == peft_type)


def format_fields(peft_type: str) -> tuple[str, ...]:
    """The ``adapter_config.json`` fields the methods of ``peft_type`` add to the shared ones (their selectors
    and ``config_fields``), in registry order: what ``AdapterConfig.to_json_dict`` writes for that format."""
    return tuple(dict.fromkeys(f for m in methods_of(peft_type) for f in ((m.selector,) if m.selector else ())
                               + tuple(m.config_fields)))


def selector_fields() -> tuple[str, ...]:
    """Every boolean field that selects a method among those of its ``peft_type`` (``use_dora``)."""
    return tuple(dict.fromkeys(m.selector for m in METHODS.values() if m.selector))


def get_method(name: str) -> Method:
    """Look a method up by registry name (``d2lora``, ``lora``, ``dora``).

    Raises:
        KeyError: unknown method name.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown adapter method {name!r}; known: {sorted(METHODS)}") from None
