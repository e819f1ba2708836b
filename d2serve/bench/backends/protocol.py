"""The protocol every ``d2serve bench`` backend follows (d2serve.bench.api asks it, never branches on a name).

A backend runs the arms (d2serve.bench.arms: base, merged, unmerged, ...) of one runtime with identical settings.
It is one module under ``d2serve/bench/backends/`` with a subclass of :class:`Backend`, plus one
:class:`d2serve.bench.backends.BackendEntry` in :data:`d2serve.bench.backends.BACKENDS` (its name, description,
class and required extra); a new runtime (SGLang, say) is that module and that entry.

What d2serve.bench.api calls, in order: the class methods :meth:`Backend.engine_options`,
:meth:`Backend.allowed_to_differ` and :meth:`Backend.comparison_mode` (before any model is loaded); the constructor
``cls(dtype=torch.dtype, device=str, tokenizer_dir=Path, **engine_options)``; :meth:`settings` once and
:meth:`load` per arm (each arm's recorded settings: compared across arms, any difference beyond the adapter mode
refuses the run); then per repeat :meth:`eval_once` (when :attr:`supports_eval`) and :meth:`generate_once`,
:meth:`kv_cache_check` once per arm, and :meth:`close` at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

from typing import Any

from ..arms import ArmSpec
from ..workloads import GenerationCase, ScoringRequest


class Backend:
    """Base class of the bench backends: the protocol (abstract methods raise NotImplementedError) and defaults.

    Attributes:
        name: the ``--backend`` value.
        arms_supported: the arm names it can run (d2serve.bench.arms.ARM_NAMES).
        supports_eval: whether it runs the eval-throughput workload (multiple-choice log-likelihood scoring);
            False: the report says it was skipped.
        tokenizer: the tokenizer every arm shares (the base's), set by the constructor.
    """

    name: str = ""
    arms_supported: tuple[str, ...] = ()
    supports_eval: bool = True
    tokenizer: Any = None

    @classmethod
    def engine_options(cls, *, prefix_caching: bool, compile: bool, arms: tuple[str, ...]) -> dict[str, Any]:
        """The keyword arguments of this backend's constructor beyond dtype/device/tokenizer_dir, from bench's
        engine settings (``prefix_caching``, ``compile``) and the arms of the run; the default takes none (the
        settings do not apply to it)."""
        return {}

    @classmethod
    def allowed_to_differ(cls, options: dict[str, Any]) -> set[str]:
        """Settings keys that may differ between arms under ``options`` beyond d2serve.bench.comparability's
        ALLOWED_TO_DIFFER (e.g. vLLM's per-arm ``compile_mode`` when each arm compiles as vLLM defaults)."""
        return set()

    @classmethod
    def comparison_mode(cls, options: dict[str, Any]) -> str | None:
        """A line for bench.json's ``comparison_mode`` (what kind of ratio the run gives), or None."""
        return None

    def settings(self) -> dict:
        """Backend settings recorded for every arm (versions, engine options); JSON-serialisable."""
        raise NotImplementedError

    def load(self, spec: ArmSpec) -> dict:
        """Load one arm (its model, adapter mode); returns facts recorded in that arm's settings."""
        raise NotImplementedError

    def prompts(self, case: GenerationCase) -> list[list[int]]:
        """The prompt token ids of a generation case (the same for every arm; hashed into the settings)."""
        raise NotImplementedError

    def eval_once(self, arm: str, requests: list[ScoringRequest], batch: int) -> dict:
        """Score every request once: ``{"examples": int, "seconds": float, "pred": [chosen index per example]}``."""
        raise NotImplementedError

    def generate_once(self, arm: str, case: GenerationCase) -> dict:
        """Greedy generation of exactly ``case.max_new_tokens`` tokens (EOS ignored) for ``case.batch`` prompts:
        ``{"new_tokens": int, "ttft_s": float, "e2e_s": float, "itl_s": [float, ...]}`` (seconds)."""
        raise NotImplementedError

    def kv_cache_check(self, arm: str, case: GenerationCase) -> dict:
        """Evidence that the arm decodes with its KV cache (a cached step against a full recompute); a dict."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop workers and remove temporary files (idempotent); the default has none."""
        return None
