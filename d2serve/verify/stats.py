"""Paired statistics for merged-vs-unmerged accuracy: exact McNemar test and a paired bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class PairedComparison:
    """Paired comparison of two models on the same items (``a`` = reference, ``b`` = candidate).

    Attributes:
        n: number of items.
        acc_a, acc_b: accuracies (fractions).
        gap_pp: (acc_b - acc_a) in percentage points.
        only_a_right: items only ``a`` got right (``b`` flipped them to wrong).
        only_b_right: items only ``b`` got right (``b`` flipped them to right).
        mcnemar_p: two-sided exact McNemar p-value (binomial test on the discordant pairs; 1.0 with none).
        ci_low_pp, ci_high_pp: paired bootstrap confidence interval of ``gap_pp`` (items resampled jointly).
    """

    n: int
    acc_a: float
    acc_b: float
    gap_pp: float
    only_a_right: int
    only_b_right: int
    mcnemar_p: float
    ci_low_pp: float
    ci_high_pp: float

    @property
    def n_flipped(self) -> int:
        """Items whose correctness differs between the two models."""
        return self.only_a_right + self.only_b_right


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> tuple[int, int, float]:
    """Exact (binomial) two-sided McNemar test.

    Returns:
        (only_a_right, only_b_right, p_value); p = 1.0 when no item is discordant.

    Raises:
        ValueError: the sequences differ in length.
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired test needs equal lengths, got {len(a_correct)} and {len(b_correct)}")
    only_a = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    only_b = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    if only_a + only_b == 0:
        return 0, 0, 1.0
    return only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def bootstrap_gap_ci(
    a_correct: Sequence[bool], b_correct: Sequence[bool], *, iters: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile paired-bootstrap interval of acc_b - acc_a, in percentage points.

    Items are resampled with replacement, the same indices for both models. Seeded, so reproducible.
    """
    a = np.asarray(a_correct, dtype=np.float64)
    b = np.asarray(b_correct, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs equal lengths, got {a.shape} and {b.shape}")
    if a.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(iters, a.size))
    gaps = (b[idx].mean(axis=1) - a[idx].mean(axis=1)) * 100.0
    lo, hi = np.quantile(gaps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def compare_paired(a_correct: Sequence[bool], b_correct: Sequence[bool], *, seed: int = 0) -> PairedComparison:
    """Accuracy gap (pp), flips, McNemar p-value and bootstrap CI of ``b`` against ``a``."""
    n = len(a_correct)
    only_a, only_b, p = mcnemar_exact(a_correct, b_correct)
    acc_a = sum(a_correct) / n if n else float("nan")
    acc_b = sum(b_correct) / n if n else float("nan")
    lo, hi = bootstrap_gap_ci(a_correct, b_correct, seed=seed)
    return PairedComparison(n, acc_a, acc_b, (acc_b - acc_a) * 100.0, only_a, only_b, p, lo, hi)
