"""Pair-wise ratios between arms within one run, with their spread across repeats."""

from __future__ import annotations

from .timing import median

# (key in bench.json, numerator arm, denominator arm)
RATIO_PAIRS = (
    ("merged_over_unmerged", "merged", "unmerged"),
    ("merged_over_unmerged_cached", "merged", "unmerged_cached"),
    ("merged_over_base", "merged", "base"),
    # the plugin's cost: throughput of the plain rank-R LoRA in vanilla vLLM over the same folded D2-LoRA served
    # through d2serve's plugin = plugin-D2 time / vanilla-LoRA time (> 1: the plugin costs time)
    ("vanilla_lora_over_unmerged", "vanilla_lora", "unmerged"),
)


def pairwise_ratios(per_repeat: dict[str, list[float]], metric: str) -> dict:
    """Ratios of a higher-is-better metric between arms, repeat by repeat.

    Args:
        per_repeat: ``{arm: [value of repeat 0, value of repeat 1, ...]}`` measured in the same
            repeats (the i-th values of two arms were measured back to back).
        metric: the metric's name (recorded in the result).

    Returns:
        ``{"metric", "merged_over_unmerged": median or None, "merged_over_base": ...,
        "spread": {key: {"min", "max", "per_repeat": [...]}}}``; a ratio is None when an arm is absent.
    """
    out: dict = {"metric": metric, "spread": {}}
    for key, num, den in RATIO_PAIRS:
        a, b = per_repeat.get(num), per_repeat.get(den)
        if not a or not b:
            out[key] = None
            continue
        rs = [x / y for x, y in zip(a, b) if y > 0]
        out[key] = median(rs) if rs else None
        out["spread"][key] = {"min": min(rs), "max": max(rs), "per_repeat": rs} if rs else {}
    return out


def combine_ratios(parts: list[dict], metric: str) -> dict:
    """Workload-level ratios: the median over cases of each case's median ratio."""
    out: dict = {"metric": metric, "spread": {}}
    for key, _, _ in RATIO_PAIRS:
        vals = [p[key] for p in parts if p.get(key) is not None]
        out[key] = median(vals) if vals else None
        if vals:
            out["spread"][key] = {"min": min(vals), "max": max(vals), "per_case": vals}
    return out
