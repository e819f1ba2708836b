"""One fitting step: an adapter checked against a base once, and what every reader of the pair needs.

:func:`fit` runs every check of an adapter against a base checkpoint (the merge, verify, the unmerged model,
the exports, serving and ``inspect`` all take its :class:`Fit` instead of checking again) and returns the
method, the base tensor holding each layer's W0, the tie plan, the stacking decision and the record of the
``d2_magnitude`` base fingerprints.

The fingerprint of a layer (its training base's ||W0|| per output row) is checked where W0 is read, never
in a pass of its own: the merge streams W0 in row blocks and checks each block
(:meth:`Fit.fingerprint_checker`); verify and the exports read W0 through :meth:`Fit.base_weight`. Every
check is recorded in :attr:`Fit.fingerprints` (the merge manifest's ``base_fingerprint``).

A base that is itself a merge output is recognised by the merge manifest ``d2serve_merge.json``
(:data:`MANIFEST_NAME`, read by :func:`read_manifest`; d2serve.merge writes it).
"""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from d2serve.adapters.io import Adapter, match_to_base
from d2serve.adapters.methods import Method, get_method, row_norm
from d2serve.architecture import (
    TiePlan,
    check_base_copies,
    check_layer_kinds,
    require_full_precision_base,
    tie_plan,
    to_out_in,
)
from d2serve.checkpoint import Checkpoint
from d2serve.errors import InputError
from d2serve.export.manifest import MERGE_MANIFEST

MANIFEST_NAME = MERGE_MANIFEST  # d2serve.export.manifest: every manifest name, once
MAGNITUDE_RTOL = 2e-3  # relative tolerance of the d2_magnitude fingerprint (per output row)


class WrongBaseError(InputError):
    """The adapter's ``d2_magnitude`` fingerprint does not match the base weights given (or the base is a merge
    output a norm-reading method cannot be stacked on)."""


def read_manifest(merged: str | Path) -> dict:
    """Read ``d2serve_merge.json`` of a merged checkpoint (an empty dict when absent)."""
    p = Path(merged) / MANIFEST_NAME
    return json.loads(p.read_text()) if p.is_file() else {}


def check_fingerprint(module: str, w0: torch.Tensor, magnitude: torch.Tensor, base: Path, rtol: float,
                      norms: torch.Tensor | None = None) -> float:
    """Refuse a base whose rows' norms differ from the adapter's ``d2_magnitude``.

    Args:
        w0: (rows, in_features) rows of W0 (all of them or one row block), any float dtype.
        magnitude: (rows,) the fingerprint of the same rows.
        base: the base folder (named in the error).
        rtol: relative tolerance; at least 2 eps of the fingerprint's dtype (a bf16 fingerprint is only that precise).
        norms: (rows,) ``row_norm`` of ``w0`` in float64 when the caller already has it.

    Returns:
        the largest relative row difference found (at most the tolerance).

    Raises:
        WrongBaseError: a row differs by more than the tolerance (names the module, the base and the difference).
    """
    norms = row_norm(w0.double()) if norms is None else norms
    rtol = max(rtol, 2 * torch.finfo(magnitude.dtype).eps)
    rel = ((norms - magnitude.double()).abs() / norms.clamp_min(1e-30)).max()
    if float(rel) > rtol:
        raise WrongBaseError(
            f"{module}: the adapter's d2_magnitude (||W0|| per output row of its training base) differs from "
            f"the rows of {base} by up to {float(rel):.3g} relative (tolerance {rtol:g}): the adapter was trained "
            "on a different base model"
        )
    return float(rel)


class FingerprintRecord:
    """The fingerprint checks of one (base, adapter) pair as W0 is read, and their record (thread-safe: the merge
    checks row blocks from several worker threads).

    Attributes:
        key: the method's fingerprint key (``d2_magnitude``) or None; rtol: the tolerance (:func:`check_fingerprint`).
        max_rel: module -> the largest relative row difference checked so far.
    """

    def __init__(self, method: Method, adapter: Adapter, base: Path, rtol: float):
        self.key, self.rtol = method.fingerprint_key, rtol
        self._layers, self._base = adapter.layers, base
        self.max_rel: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, module: str, rows: torch.Tensor, magnitude: torch.Tensor,
              norms: torch.Tensor | None = None) -> None:
        """Check rows of ``module``'s W0 ((rows, in); ``norms``: their float64 row norms when known) against the
        same rows of its fingerprint ``magnitude`` (rows,) and record the worst difference.

        Raises:
            WrongBaseError: see :func:`check_fingerprint`.
        """
        rel = check_fingerprint(module, rows, magnitude, self._base, self.rtol, norms)
        with self._lock:
            self.max_rel[module] = max(self.max_rel.get(module, 0.0), rel)

    def to_json(self) -> dict:
        """The merge manifest's ``base_fingerprint``. ``status``: ``matched`` (every layer carried one and it
        matched), ``partial`` (some layers carried one, all matched), ``absent`` (none; ``supported`` says whether
        the method's format has one); ``checked``: some layer was checked."""
        carried = [m for m, f in self._layers.items() if f.magnitude is not None]
        n = len(self._layers)
        status = "absent" if not carried else "matched" if len(carried) == n else "partial"
        with self._lock:
            max_rel = dict(self.max_rel)
        return {"key": self.key, "supported": self.key is not None, "checked": bool(max_rel), "status": status,
                "layers_checked": len(max_rel), "layers_without": n - len(carried),
                "max_rel_row_diff": max(max_rel.values(), default=None), "rtol": self.rtol}


def check_stacking(base: Path, method: Method, adapter: Adapter) -> dict | None:
    """A base that is itself a d2serve merge output: allowed for methods that do not read the base's row
    norms (plain LoRA adds dW, so the order of merges does not matter); for the others (d2lora, dora)
    only when every layer carries a base fingerprint (checked where W0 is read), which proves the adapter
    was trained on this merged folder.

    Returns:
        what the merge manifest records (``stacked_on``), None for a plain base.

    Raises:
        WrongBaseError: a norm-reading method without a fingerprint on every layer.
    """
    prior = read_manifest(base)
    if not prior:
        return None
    missing = [m for m, f in adapter.layers.items() if f.magnitude is None]
    if method.uses_base_norms and missing:
        raise WrongBaseError(
            f"{base} is itself a d2serve merge output ({MANIFEST_NAME}: method {prior.get('method')}, adapter "
            f"{prior.get('adapter')}); method {method.name} takes row norms ||W0|| / ||W0 + dW|| from the base it is "
            f"merged into, and {len(missing)} of {len(adapter.layers)} adapter layers (e.g. {missing[0]}) carry no "
            f"{method.fingerprint_key or 'base fingerprint'} proving the adapter was trained on this merged folder, "
            "so the result would depend on the order of the merges: merge it into the original base instead"
        )
    return {"base": prior.get("base"), "method": prior.get("method"), "adapter": prior.get("adapter"),
            "adapter_sha256": (prior.get("sha256") or {}).get("adapter"),
            "why_allowed": "fingerprint matched on every layer" if method.uses_base_norms else
            f"method {method.name} adds dW without reading the base's norms: merges commute"}


@dataclass(frozen=True)
class Fit:
    """An adapter checked against a base by :func:`fit`: what every reader of (base, adapter) needs.

    Attributes:
        ckpt: the base :class:`Checkpoint`; adapter: the loaded :class:`Adapter`; method: its registry entry.
        w0_names: module path -> base tensor holding its W0 (d2serve.adapters.io.match_to_base; the input
            embedding for the ``lm_head`` of a tied base).
        ties: the :class:`d2serve.architecture.TiePlan` of the pair.
        stacked_on: what :func:`check_stacking` records when the base is itself a merge output, else None.
        fingerprints: the :class:`FingerprintRecord` of every W0 read through this Fit (the fields never change;
            the record fills as W0 is read).
    """

    ckpt: Checkpoint
    adapter: Adapter
    method: Method
    w0_names: dict[str, str]
    ties: TiePlan
    stacked_on: dict | None
    fingerprints: FingerprintRecord = field(repr=False, compare=False)

    def base_weight(self, module: str) -> torch.Tensor:
        """W0 of ``module`` as (out_features, in_features) float64 (Conv1D transposed), after checking the layer's
        ``d2_magnitude`` fingerprint against it (recorded in :attr:`fingerprints`).

        Raises:
            WrongBaseError: the fingerprint differs (see :func:`check_fingerprint`).
            KeyError: ``module`` is not an adapter layer.
        """
        w0 = to_out_in(self.ckpt.get_tensor(self.w0_names[module]), self.ckpt.architecture.layer(module)).double()
        magnitude = self.adapter.layers[module].magnitude
        if magnitude is not None:
            self.fingerprints.check(module, w0, magnitude)
        return w0

    def fingerprint_checker(self, module: str):
        """``check(W0 rows float64, fingerprint rows, their norms or None)`` for the merge's row blocks of ``module``
        (d2serve.merge_blocks.LayerMerge), recording the worst difference in :attr:`fingerprints`
        (raises WrongBaseError, see :func:`check_fingerprint`)."""
        return functools.partial(self.fingerprints.check, module)


def fit(ckpt: Checkpoint, adapter: Adapter, *, magnitude_rtol: float = MAGNITUDE_RTOL) -> Fit:
    """Every check of ``adapter`` against the base ``ckpt``, once, in this order:

    1. full-precision base (d2serve.architecture.require_full_precision_base): no ``quantization_config``,
       every tensor of the architecture's full list stored with its shape, floating weights stored as floats;
    2. every adapter tensor matched to a base module with its shape, every targeted module given tensors
       (d2serve.adapters.io.match_to_base);
    3. layer kinds the method is merged on (d2serve.architecture.check_layer_kinds);
    4. tied embeddings (d2serve.architecture.tie_plan);
    5. saved base-tensor copies equal to the base (d2serve.architecture.check_base_copies);
    6. merges stacked on merges (:func:`check_stacking`).

    The per-layer ``d2_magnitude`` fingerprint is checked where W0 is read (:meth:`Fit.base_weight`,
    :meth:`Fit.fingerprint_checker`) with ``magnitude_rtol``.

    Raises:
        CheckpointError: 1 (a quantized base, or one missing tensors / with integer weights).
        AdapterError: 2-5 (names the layers, tensors or config field).
        WrongBaseError: 6 (a norm-reading method on a merge output without a fingerprint on every layer).
        Nothing is read beyond the headers, the base copies of 5 and the manifest of 6.
    """
    require_full_precision_base(ckpt)  # nothing for transformers to re-initialise, nothing quantized
    w0_names = match_to_base(adapter, ckpt)
    check_layer_kinds(ckpt, adapter)
    ties = tie_plan(ckpt, adapter)
    check_base_copies(ckpt, adapter)
    method = get_method(adapter.method)
    stacked_on = check_stacking(ckpt.path, method, adapter)
    return Fit(ckpt, adapter, method, w0_names, ties, stacked_on,
               FingerprintRecord(method, adapter, ckpt.path, magnitude_rtol))
