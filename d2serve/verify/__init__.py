"""``d2serve verify``: fidelity of a merged checkpoint against the unmerged adapter model.

Modules (one job each): :mod:`.data` (locate the evaluation data),
:mod:`.weights` (per-layer merged tensor vs float64 recomputation),
:mod:`.logits` (teacher-forced KL / top-1 / perplexity), :mod:`.generation`
(greedy comparison), :mod:`.tasks` (multiple-choice tasks from local files,
scored by lm-eval), :mod:`.stats` (McNemar / bootstrap), :mod:`.thresholds`
(pass/fail rules), :mod:`.plots` and :mod:`.report` (report files),
:mod:`.api` (the ``verify`` orchestration, which asks the runtime under test: :mod:`d2serve.runtimes`).
"""

from d2serve.verify.api import VerifyReport, verify
from d2serve.verify.thresholds import Thresholds

__all__ = ["Thresholds", "VerifyReport", "verify"]
