"""Pass/fail thresholds of ``d2serve verify`` and the rules that turn measurements into failure messages.

Defaults (overridable with ``--threshold key=value``):

* ``weight_tol_ulps`` = 1.0 and ``weight_fp32_slack`` = 64: per-element weight
  tolerance (see :mod:`d2serve.verify.weights`); any element beyond it fails
  the layer. A correct float64 merge cast once is within 0.5 ulp.
* ``max_mean_kl`` = 0.01 nats: mean KL(unmerged || merged) per position, on every text.
* ``min_top1_agreement`` = 0.95: fraction of positions with the same argmax token.
* ``max_acc_gap_pp`` = 1.0 with ``alpha`` = 0.05: a task fails only when
  |merged - unmerged| accuracy exceeds 1 pp AND the exact McNemar test
  rejects "no difference" at level alpha (a gap that noise explains does not fail).
  The D2-LoRA paper reports 0.03 pp average and 0.7 pp worst gap.
* ``min_generation_identical`` = 0.0: fraction of prompts whose greedy output
  must be identical (reported, not gated, by default: bf16 rounding may change
  a near-tie token late in a long output).
* ``min_content_tokens_per_prompt`` = 8: the greedy comparison must compare, on
  average over prompts, at least this many *content* tokens (not EOS, pad or
  another special token) of the unmerged model's output; fewer (e.g. a model
  that answers every prompt with EOS) is not evidence and fails the check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from d2serve.errors import InputError


@dataclass(frozen=True)
class Thresholds:
    """See the module docstring for the meaning and defaults of each field."""

    weight_tol_ulps: float = 1.0
    weight_fp32_slack: float = 64.0
    max_mean_kl: float = 0.01
    min_top1_agreement: float = 0.95
    max_acc_gap_pp: float = 1.0
    alpha: float = 0.05
    min_generation_identical: float = 0.0
    min_content_tokens_per_prompt: float = 8.0

    def to_json(self) -> dict:
        """The thresholds as a dict."""
        return asdict(self)


def apply_overrides(base, overrides, *, label: str = "threshold", example: str = "max_mean_kl=0.005",
                    finite: bool = True):
    """``base`` (a dataclass of float thresholds) with overrides given as a dict or as ``key=value`` strings.

    Args:
        base: the defaults (returned unchanged when ``overrides`` is empty; an instance of the same
            class given as ``overrides`` replaces it).
        label: what the keys are called in messages ("threshold", "quant threshold").
        example: a ``key=value`` example for the message about a malformed item.
        finite: refuse ``inf`` (True) or allow it as "reported only" (False).

    Raises:
        InputError: malformed item, unknown key (the message lists the known ones), a non-numeric,
            negative (or, with ``finite``, infinite) value.
    """
    if not overrides:
        return base
    if isinstance(overrides, type(base)):
        return overrides
    items: dict[str, object] = {}
    if isinstance(overrides, dict):
        items = dict(overrides)
    else:
        for s in overrides:
            if "=" not in s:
                raise InputError(f"threshold {s!r}: expected key=value, e.g. {example}")
            k, v = s.split("=", 1)
            items[k.strip()] = v.strip()
    known = {f.name for f in fields(base)}
    out = {}
    for k, v in items.items():
        if k not in known:
            raise InputError(f"unknown {label} {k!r}; known: {sorted(known)}")
        try:
            fv = float(v)
        except (TypeError, ValueError) as e:
            raise InputError(f"threshold {k}={v!r}: expected a number") from e
        if not fv >= 0 or (finite and fv == float("inf")):
            raise InputError(f"threshold {k}={v}: must be a {'finite ' if finite else ''}number >= 0")
        out[k] = fv
    return replace(base, **out)


def parse_thresholds(overrides: dict[str, float] | list[str] | None, base: Thresholds | None = None) -> Thresholds:
    """Apply overrides given as a dict or as ``key=value`` strings (see :func:`apply_overrides`).

    Raises:
        InputError: unknown key (the message lists the known ones) or a non-numeric / negative / infinite value.
    """
    return apply_overrides(base or Thresholds(), overrides)
