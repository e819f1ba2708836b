"""Per-layer weight check: each merged tensor against a float64 recomputation of the merge formula.

For every adapted layer, the reference is ``method.merged_weight(W0, factors,
dtype=float64)`` with W0 read from the base checkpoint. The merged tensor
(stored in bf16/fp16/fp32) can only match the reference up to rounding, so the
per-element tolerance is

    tol = tol_ulps * ulp_d(|ref|) + fp32_slack * eps_fp32 * (|W0| + |ref - W0|)

where ``ulp_d`` is the spacing of the merged dtype at the reference value
(a correct round-to-nearest cast is within 0.5 ulp) and the second term admits
merges computed in float32 instead of float64. ``err_over_tol`` > 1 anywhere
means the tensor is not a rounding of the right formula (projection left out,
a branch left out, wrong tau, ...).

Also reported: max abs error; relative error ||merged - ref||_F / ||ref||_F;
the fraction of elements where the cast lost the update (merged equals
cast(W0) although ref differs from W0); and tensors that the adapter does not
touch but that differ from the (cast) base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from d2serve.adapters.io import Adapter
from d2serve.architecture import compare_tensor_list, to_out_in
from d2serve.checkpoint import Checkpoint
from d2serve.errors import InputError
from d2serve.fitting import Fit, fit

_EPS32 = torch.finfo(torch.float32).eps


class WeightLayoutError(InputError):
    """The merged checkpoint lacks an adapted tensor or stores it with another shape."""


@dataclass
class LayerError:
    """Merge error of one adapted layer (all errors in the units of the weights, computed in float64).

    Attributes:
        module: module path, e.g. ``model.layers.0.self_attn.q_proj``.
        tensor: merged tensor name.
        shape: (out_features, in_features).
        dtype: merged tensor dtype name.
        max_abs_err: max |merged - ref|.
        rel_err: ||merged - ref||_F / ||ref||_F.
        max_err_over_tol: max over elements of |merged - ref| / tol (> 1: not a rounding of the formula).
        n_out_of_tol: elements with |merged - ref| > tol.
        update_rel_norm: ||ref - W0||_F / ||W0||_F, the size of the merge update.
        frac_update_lost: fraction of elements with ref != W0 but merged == cast(W0).
        worst_index: (row, col) of the element with the largest err/tol (of the first NaN/inf if any).
        n_nonfinite: elements of the merged tensor that are NaN or infinite (each also counts in
            ``n_out_of_tol``; the error statistics above are over the finite elements).
    """

    module: str
    tensor: str
    shape: tuple[int, int]
    dtype: str
    max_abs_err: float
    rel_err: float
    max_err_over_tol: float
    n_out_of_tol: int
    update_rel_norm: float
    frac_update_lost: float
    worst_index: tuple[int, int]
    n_nonfinite: int = 0

    @property
    def passed(self) -> bool:
        """True when every element is within tolerance."""
        return self.n_out_of_tol == 0

    def to_json(self) -> dict:
        """JSON-ready dict (stable keys)."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["worst_index"] = list(self.worst_index)
        d["passed"] = self.passed
        return d


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |x| (float64 result, same shape): 2^(floor(log2|x|)) * eps, floored at the smallest normal."""
    fi = torch.finfo(dtype)
    ax = x.abs().to(torch.float64).clamp_min(fi.tiny)
    _, e = torch.frexp(ax)  # ax = m * 2^e with m in [0.5, 1)
    return torch.ldexp(torch.full_like(ax, fi.eps), (e - 1).to(torch.int32))


def layer_error(module: str, tensor: str, w0: torch.Tensor, ref: torch.Tensor, merged: torch.Tensor,
                tol_ulps: float, fp32_slack: float) -> LayerError:
    """Compare one merged weight with its float64 reference.

    Args:
        w0: base weight (out, in): the stored values, in their dtype or float64 (exact either way).
        ref: float64 reference merged weight (out, in).
        merged: stored merged weight (out, in), any float dtype.
        tol_ulps / fp32_slack: tolerance parameters (module docstring).
    """
    w0d = w0.to(torch.float64)
    m = merged.to(torch.float64)
    nonfinite = ~torch.isfinite(m)  # NaN/inf never compare as "within tolerance" (nan > tol is False too)
    n_bad = int(nonfinite.sum())
    bad_at = tuple(int(i) for i in torch.nonzero(nonfinite)[0].tolist()) if n_bad else None
    err_raw = (m - ref).abs()
    err = err_raw.masked_fill(nonfinite, 0.0)  # statistics over the finite elements; n_nonfinite reports the rest
    tol = tol_ulps * ulp(ref, merged.dtype) + fp32_slack * _EPS32 * (w0d.abs() + (ref - w0d).abs())
    ratio = err / tol
    flat = int(ratio.argmax())
    m = m.masked_fill(nonfinite, 0.0)
    changed = ref != w0d
    lost = changed & (merged == w0.to(merged.dtype))
    ref_norm = float(torch.linalg.vector_norm(ref))
    w0_norm = float(torch.linalg.vector_norm(w0d))
    return LayerError(
        module=module,
        tensor=tensor,
        shape=tuple(int(s) for s in ref.shape),
        dtype=str(merged.dtype).removeprefix("torch."),
        max_abs_err=float(err.max()),
        rel_err=float(torch.linalg.vector_norm(m - ref)) / ref_norm if ref_norm else float(err.max()),
        max_err_over_tol=float(ratio.max()),
        n_out_of_tol=int((~(err_raw <= tol)).sum()),
        update_rel_norm=float(torch.linalg.vector_norm(ref - w0d)) / w0_norm if w0_norm else float("inf"),
        frac_update_lost=float(lost.sum()) / max(int(changed.sum()), 1),
        worst_index=bad_at or (flat // ref.shape[1], flat % ref.shape[1]),
        n_nonfinite=n_bad,
    )


@dataclass
class WeightReport:
    """Result of :func:`check_weights`.

    Attributes:
        layers: one :class:`LayerError` per adapted layer, in adapter order.
        untouched_changed: names of non-adapted tensors whose merged value differs from what the
            unmerged model uses: cast(base), cast(adapter's ``modules_to_save`` tensor), or, for
            ``lm_head`` untied by the merge (d2serve.architecture.tie_plan), cast(original embedding).
        missing_in_merged: non-adapted tensors absent from the merged checkpoint, and tensors of the
            merged architecture's full list that it does not store (transformers would re-initialise them).
        merged_dtype: dtype name of the merged adapted weights.
    """

    layers: list[LayerError]
    untouched_changed: list[str]
    missing_in_merged: list[str]
    merged_dtype: str

    def worst(self, k: int = 5) -> list[LayerError]:
        """The ``k`` layers with the largest ``max_err_over_tol``."""
        return sorted(self.layers, key=lambda e: e.max_err_over_tol, reverse=True)[:k]

    def to_json(self, k: int = 5) -> dict:
        """JSON-ready summary and per-layer table (stable keys)."""
        lay = self.layers
        return {
            "n_layers": len(lay),
            "merged_dtype": self.merged_dtype,
            "n_layers_failed": sum(not e.passed for e in lay),
            "max_err_over_tol": max((e.max_err_over_tol for e in lay), default=0.0),
            "max_abs_err": max((e.max_abs_err for e in lay), default=0.0),
            "max_rel_err": max((e.rel_err for e in lay), default=0.0),
            "mean_frac_update_lost": sum(e.frac_update_lost for e in lay) / len(lay) if lay else 0.0,
            "max_frac_update_lost": max((e.frac_update_lost for e in lay), default=0.0),
            "worst_layers": [e.module for e in self.worst(k)],
            "untouched_changed": self.untouched_changed,
            "missing_in_merged": self.missing_in_merged,
            "layers": [e.to_json() for e in lay],
        }


def check_weights(base: str | Path, adapter: Adapter, merged: str | Path, *, tol_ulps: float = 1.0,
                  fp32_slack: float = 64.0) -> WeightReport:
    """:func:`check_merged_weights` of ``adapter`` fitted to ``base`` (:func:`d2serve.fitting.fit`) and ``merged``.

    Args:
        base / merged: HF checkpoint directories.
        adapter: the loaded adapter.
        tol_ulps / fp32_slack: tolerance parameters (module docstring).

    Raises:
        CheckpointError, AdapterError, WrongBaseError: the adapter does not fit the base (d2serve.fitting.fit).
        WeightLayoutError: see :func:`check_merged_weights`.
    """
    return check_merged_weights(fit(Checkpoint(base), adapter), Checkpoint(merged), tol_ulps=tol_ulps,
                                fp32_slack=fp32_slack)


def check_merged_weights(fitted: Fit, merged_ck: Checkpoint, *, tol_ulps: float = 1.0,
                         fp32_slack: float = 64.0) -> WeightReport:
    """Check every adapted weight of ``merged_ck`` against a float64 recomputation, and the other tensors against
    the base.

    Args:
        fitted: the adapter checked against the base (:func:`d2serve.fitting.fit`); W0 is read through
            :meth:`d2serve.fitting.Fit.base_weight` (its ``d2_magnitude`` fingerprint checked).
        merged_ck: the merged checkpoint.
        tol_ulps / fp32_slack: tolerance parameters (module docstring).

    Conv1D weights (stored (in, out)) are compared in their (out, in) form; tie
    semantics come from the fit's :func:`d2serve.architecture.tie_plan`, as in the merge.

    Raises:
        WrongBaseError: a layer's fingerprint differs from the base.
        WeightLayoutError: an adapted tensor is missing from ``merged`` or has another shape;
            merged tensors with the wrong shape or integer dtype for the architecture.
    """
    base_ck, adapter, method, ties = fitted.ckpt, fitted.adapter, fitted.method, fitted.ties
    arch = base_ck.architecture
    layers = []
    for module, factors in adapter.layers.items():
        base_name = fitted.w0_names[module]
        mname = f"{module}.weight" if f"{module}.weight" in merged_ck.tensors else base_name
        if mname not in merged_ck.tensors:
            raise WeightLayoutError(f"{merged_ck.path}: adapted tensor {module}.weight is missing from the merged checkpoint")
        stored, base_shape = tuple(merged_ck.tensors[mname].shape), tuple(base_ck.tensors[base_name].shape)
        if stored != base_shape:
            raise WeightLayoutError(f"{merged_ck.path}: tensor {mname} has shape {stored}, base {base_name} has {base_shape}")
        w0 = fitted.base_weight(module)  # (out, in) float64: exact for every stored dtype
        merged_t = to_out_in(merged_ck.get_tensor(mname), arch.layer(module))  # Conv1D stored (in, out)
        ref = method.merged_weight(w0, factors, dtype=torch.float64)
        layers.append(layer_error(module, mname, w0, ref, merged_t, tol_ulps, fp32_slack))
    adapted = {f"{m}.weight" for m in adapter.layers}
    changed, missing = [], []
    # every other tensor the merged model uses, with the base tensor (or adapter tensor) it must be a cast of
    expected_from: dict[str, tuple[str, torch.Tensor | None]] = {}
    for name in base_ck.tensors:
        if name not in adapted:
            expected_from[name] = (name, adapter.modules_to_save.get(name))
    if ties.lm_head_from is not None and ties.lm_head not in adapted:
        # untied: lm_head keeps the original embedding, or is the adapter's modules_to_save copy of lm_head
        expected_from[ties.lm_head] = (ties.lm_head_from, adapter.modules_to_save.get(ties.lm_head))
    merged_tied = merged_ck.tied_embeddings
    for name, (src, replacement) in expected_from.items():
        stored = name
        if name not in merged_ck.tensors and name == ties.lm_head and merged_tied:
            stored = ties.embedding  # the merged model ties lm_head to its (possibly replaced) embedding
        if stored not in merged_ck.tensors:
            missing.append(name)
            continue
        b = replacement if replacement is not None else base_ck.get_tensor(src)
        m = merged_ck.get_tensor(stored)
        if b.shape != m.shape or not torch.equal(b.to(m.dtype), m):
            changed.append(name)
    diff = compare_tensor_list(merged_ck.tensors, merged_ck.architecture)  # what transformers would re-initialise
    missing += [n for n in diff.missing if n not in missing]
    if diff.wrong_shape or diff.not_float:
        raise WeightLayoutError("\n".join(diff.problems(merged_ck.path, extra=False)))
    dtype = layers[0].dtype if layers else str(merged_ck.dtype).removeprefix("torch.")
    return WeightReport(layers, changed, missing, dtype)
