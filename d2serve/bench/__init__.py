"""``d2serve bench``: honest base / merged / unmerged benchmarks on the user's hardware.

Public API: ``bench(...)`` (see ``d2serve.bench.api``), ``NotComparableError``, ``BenchPlan``,
``QUICK_PLAN``, ``FULL_PLAN``, ``ARM_NAMES``.
"""

from .api import bench
from .arms import ARM_NAMES, ArmError
from .comparability import NotComparableError
from .workloads import FULL_PLAN, QUICK_PLAN, BenchPlan, WorkloadError

__all__ = ["bench", "ARM_NAMES", "ArmError", "NotComparableError", "BenchPlan", "QUICK_PLAN", "FULL_PLAN", "WorkloadError"]
