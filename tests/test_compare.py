"""d2serve.compare: the comparison primitives never let a NaN/inf compare as "no difference"."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from d2serve.compare import (
    NonFiniteError,
    check_finite,
    content_token_count,
    finite_scalar,
    kl_per_row,
    max_abs_diff,
    top1_agreement,
)
from d2serve.errors import CheckFailedError


def test_python_max_and_argmax_are_blind_to_nan():
    """The faults the primitives exist for: max drops NaN and an all-NaN argmax is 0 on both sides."""
    assert max(0.0, float("nan")) == 0.0
    nan_rows = torch.full((3, 5), float("nan"))
    assert bool((nan_rows.argmax(-1) == nan_rows.argmax(-1)).all())


def test_max_abs_diff_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 7, generator=g, dtype=torch.float32)
    b = a + torch.randn(4, 7, generator=g) * 1e-3
    ref = float(np.max(np.abs(a.numpy().astype(np.float64) - b.numpy().astype(np.float64))))
    assert max_abs_diff(a, b, where="t") == ref
    assert max_abs_diff(a.numpy(), b.numpy(), where="t") == ref  # numpy inputs too
    assert max_abs_diff(torch.zeros(0, 3), torch.zeros(0, 3), where="t") == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_max_abs_diff_raises_on_nonfinite_naming_side_and_location(bad):
    a = torch.zeros(2, 3, 5)
    b = torch.zeros(2, 3, 5)
    b[1, 2, 4] = bad
    with pytest.raises(NonFiniteError) as ei:
        max_abs_diff(a, b, where="logits[wiki]", names=("unmerged", "merged"), dims=("window", "position", "vocab"))
    e = ei.value
    assert isinstance(e, CheckFailedError)
    assert e.side == "merged" and e.count == 1 and e.index == (1, 2, 4)
    assert "logits[wiki]: merged has 1 non-finite value (first" in str(e)
    assert "window 1, position 2, vocab 4" in str(e) and str(bad) in str(e)
    # the reference side is named when it is the one holding the NaN
    with pytest.raises(NonFiniteError, match="unmerged has 1"):
        max_abs_diff(b, a, where="x", names=("unmerged", "merged"))


def test_top1_agreement_counts_and_rejects_all_nan_rows():
    a = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    b = torch.tensor([[0.0, 2.5, 1.0], [0.0, 3.0, 0.0], [0.0, 0.0, 9.0]])
    assert top1_agreement(a, b, where="t") == (2, 3)
    nan = torch.full_like(a, float("nan"))
    with pytest.raises(NonFiniteError, match="candidate has 9 non-finite values"):
        top1_agreement(a, nan, where="t")
    with pytest.raises(NonFiniteError, match="reference has 9 non-finite values"):
        top1_agreement(nan, nan, where="t")  # NaN on both sides is not agreement


def test_kl_per_row_float64_reference_and_nonfinite():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 11, generator=g)
    b = a + 0.1 * torch.randn(3, 11, generator=g)
    kl = kl_per_row(a, b, where="t")
    pa = np.exp(a.double().numpy()) / np.exp(a.double().numpy()).sum(-1, keepdims=True)
    pb = np.exp(b.double().numpy()) / np.exp(b.double().numpy()).sum(-1, keepdims=True)
    ref = (pa * (np.log(pa) - np.log(pb))).sum(-1)
    assert kl.dtype == torch.float64 and kl.shape == (3,)
    np.testing.assert_allclose(kl.numpy(), ref, rtol=1e-10, atol=1e-15)
    assert float(kl_per_row(a, a, where="t").max()) == 0.0
    b[2, 3] = float("-inf")
    with pytest.raises(NonFiniteError, match="first -inf at position 2, vocab 3"):
        kl_per_row(a, b, where="t", dims=("position", "vocab"))


def test_check_finite_and_scalar():
    x = np.array([1.0, 2.0, np.nan, np.nan])
    with pytest.raises(NonFiniteError) as ei:
        check_finite(x, where="tasks[boolq] item 3", side="merged log-likelihood", dims=("choice",))
    assert ei.value.count == 2 and ei.value.index == (2,) and "choice 2" in str(ei.value)
    assert ei.value.to_json()["location"] == "choice 2"
    assert finite_scalar(1.5, where="w") == 1.5
    with pytest.raises(NonFiniteError, match="w: value has 1 non-finite value"):
        finite_scalar(math.nan, where="w")


def test_content_token_count():
    assert content_token_count([2, 2, 2, 2], {2}) == 0
    assert content_token_count([5, 2, 7, 0], {0, 2}) == 2
