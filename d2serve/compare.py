"""The comparison primitives every d2serve check uses: max |a - b|, top-1 agreement, KL in float64.

One rule for all of them: a non-finite value (NaN, +inf, -inf) is never "no
difference". Python's ``max`` drops NaN (``max(0.0, nan) == 0.0``), ``nan <= tol``
is False but ``nan > tol`` is False too, and the argmax of an all-NaN row is 0
on both sides; so each primitive first checks both inputs and raises
:class:`NonFiniteError` naming *where* (the comparison, which side, the index
of the first non-finite element with named dimensions, and how many there
are). Callers catch it to record a named failure (verify, export parity) or let
it propagate as a failed check (CLI exit 1).

Inputs may be torch tensors or numpy arrays of any float dtype; all arithmetic
is in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from d2serve.errors import CheckFailedError


class NonFiniteError(CheckFailedError):
    """A compared value is NaN or infinite; the message names the comparison, the side and the first location.

    Attributes:
        where: the comparison, e.g. ``logits[wikitext2]``.
        side: which input held it (e.g. ``merged``).
        count: number of non-finite elements.
        index: index of the first non-finite element (tuple of ints, row-major order).
        value: that element as a string (``nan``, ``inf``, ``-inf``).
        location: ``index`` rendered with the dimension names, e.g. ``window 0, position 3, vocab 17``.
    """

    def __init__(self, where: str, side: str, count: int, index: tuple[int, ...], value: str, location: str):
        self.where, self.side, self.count, self.index, self.value, self.location = where, side, count, index, value, location
        super().__init__(f"{where}: {side} has {count} non-finite value{'s' if count != 1 else ''} "
                         f"(first {value} at {location})")

    def to_json(self) -> dict:
        """JSON-ready description (stable keys: where, side, count, index, value, location, message)."""
        return {"where": self.where, "side": self.side, "count": self.count, "index": list(self.index),
                "value": self.value, "location": self.location, "message": str(self)}


def as_float64(x) -> torch.Tensor:
    """``x`` (torch tensor, numpy array, nested list or scalar) as a float64 CPU tensor (a copy only if needed)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _location(index: tuple[int, ...], dims: Sequence[str] | None) -> str:
    if not index:
        return "the scalar"
    if dims is None or len(dims) != len(index):
        return "index " + str(list(index))
    return ", ".join(f"{d} {i}" for d, i in zip(dims, index))


def check_finite(x, *, where: str, side: str = "value", dims: Sequence[str] | None = None) -> torch.Tensor:
    """Return ``x`` as float64 after checking every element is finite.

    Args:
        x: values of any shape (torch or numpy).
        where: the comparison being made (for the message), e.g. ``logits[wikitext2]``.
        side: which input this is, e.g. ``merged``.
        dims: names of the dimensions of ``x`` (e.g. ``("window", "position", "vocab")``).

    Raises:
        NonFiniteError: naming ``where``, ``side``, the count and the first non-finite index.
    """
    t = as_float64(x)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        v = float(t[first]) if first else float(t)
        raise NonFiniteError(where, side, int(bad.sum()), first, str(v), _location(first, dims))
    return t


def _pair(a, b, where: str, names: tuple[str, str], dims) -> tuple[torch.Tensor, torch.Tensor]:
    ta = check_finite(a, where=where, side=names[0], dims=dims)
    tb = check_finite(b, where=where, side=names[1], dims=dims)
    if ta.shape != tb.shape:
        raise ValueError(f"{where}: {names[0]} has shape {tuple(ta.shape)}, {names[1]} {tuple(tb.shape)}")
    return ta, tb


def max_abs_diff(a, b, *, where: str, names: tuple[str, str] = ("reference", "candidate"),
                 dims: Sequence[str] | None = None) -> float:
    """max |a - b| over all elements, in float64 (0.0 for empty inputs).

    Args:
        a, b: same-shape values (torch or numpy, any float dtype).
        where, names, dims: for the messages (see :func:`check_finite`).

    Raises:
        NonFiniteError: a or b holds a NaN/inf (named side and location).
        ValueError: the shapes differ.
    """
    ta, tb = _pair(a, b, where, names, dims)
    if ta.numel() == 0:
        return 0.0
    return float((ta - tb).abs().max())


def top1_matches(a, b, *, where: str, names: tuple[str, str] = ("reference", "candidate"),
                 dims: Sequence[str] | None = None) -> torch.Tensor:
    """Per row (all dims but the last), whether argmax(a) == argmax(b): a bool tensor of shape ``a.shape[:-1]``.

    Raises:
        NonFiniteError: a or b holds a NaN/inf (an all-NaN row would otherwise give argmax 0 on both sides).
        ValueError: the shapes differ.
    """
    ta, tb = _pair(a, b, where, names, dims)
    return ta.argmax(-1) == tb.argmax(-1)


def top1_agreement(a, b, *, where: str, names: tuple[str, str] = ("reference", "candidate"),
                   dims: Sequence[str] | None = None) -> tuple[int, int]:
    """(rows whose argmax agrees, rows compared) of two logit arrays (..., vocab).

    Raises:
        NonFiniteError / ValueError: as :func:`top1_matches`.
    """
    m = top1_matches(a, b, where=where, names=names, dims=dims)
    return int(m.sum()), int(m.numel())


def kl_per_row(ref_logits, logits, *, where: str, names: tuple[str, str] = ("reference", "candidate"),
               dims: Sequence[str] | None = None) -> torch.Tensor:
    """KL(softmax(ref) || softmax(other)) per row in nats, float64 ``log_softmax``; shape ``ref.shape[:-1]``.

    Tiny negative values from rounding are clamped to 0.

    Raises:
        NonFiniteError: either input holds a NaN/inf, or a KL value is not finite.
        ValueError: the shapes differ.
    """
    ta, tb = _pair(ref_logits, logits, where, names, dims)
    lpa, lpb = torch.log_softmax(ta, -1), torch.log_softmax(tb, -1)
    kl = (lpa.exp() * (lpa - lpb)).sum(-1).clamp_min(0.0)
    return check_finite(kl, where=f"{where} KL", side="KL", dims=list(dims)[:-1] if dims else None)


def finite_scalar(v: float, *, where: str, side: str = "value") -> float:
    """``v`` as float after checking it is finite.

    Raises:
        NonFiniteError: ``v`` is NaN or infinite.
    """
    fv = float(v)
    if not np.isfinite(fv):
        raise NonFiniteError(where, side, 1, (), str(fv), "the scalar")
    return fv


def content_token_count(tokens: Sequence[int], special_ids) -> int:
    """How many of ``tokens`` are content tokens (not in ``special_ids``: EOS, pad, BOS, other special tokens)."""
    special = set(special_ids)
    return sum(1 for t in tokens if int(t) not in special)


def special_token_ids(tokenizer, extra=()) -> set[int]:
    """The ids a content-token count excludes: the tokenizer's special ids, EOS/pad/BOS ids, plus ``extra``."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    for v in extra:
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple, set)):
            ids.update(int(x) for x in v)
    return ids
