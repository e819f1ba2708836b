"""``d2serve bench``: honest base / merged / unmerged benchmarks on the user's hardware.

Public API: ``bench(...)`` (see ``d2serve.bench.api``), ``bench_run(BenchSettings)``, ``BenchSettings`` and
``ServeBenchSettings`` (``d2serve.bench.settings``), ``NotComparableError``, ``BenchPlan``, ``QUICK_PLAN``,
``FULL_PLAN``, ``ARM_NAMES``. They are imported on first use (PEP 562), so that importing a
light submodule (the backend registry the CLI reads, ``d2serve.bench.backends``) loads no torch.
"""

from __future__ import annotations

import importlib

_PUBLIC = {"bench": ".api", "bench_run": ".api", "BenchSettings": ".settings", "ServeBenchSettings": ".settings",
           "ARM_NAMES": ".arms", "ArmError": ".arms", "NotComparableError": ".comparability",
           "BenchPlan": ".workloads", "QUICK_PLAN": ".workloads", "FULL_PLAN": ".workloads",
           "WorkloadError": ".workloads"}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
