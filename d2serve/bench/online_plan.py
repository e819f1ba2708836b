"""The online benchmark's load sweep and the server options every arm gets (no I/O; light to import).

:class:`OnlinePlan` is the same for every arm (its :meth:`OnlinePlan.points`: the Poisson request-rate sweep, then
the max-concurrency sweep); :class:`EngineOptions` are the vLLM server options of every arm ``d2serve bench serve``
starts itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from d2serve.errors import InputError

GOODPUT_KEYS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class LoadPoint:
    """One load point: Poisson arrivals at ``request_rate`` req/s (no cap), or ``max_concurrency`` in flight
    with every request sent at time 0 (``request_rate`` inf)."""

    kind: str  # "rate" | "concurrency"
    value: float

    @property
    def key(self) -> str:
        """Stable name: ``rate_2`` / ``concurrency_4``."""
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.kind}_{v}"

    @property
    def request_rate(self) -> float:
        return self.value if self.kind == "rate" else math.inf

    @property
    def max_concurrency(self) -> int | None:
        return int(self.value) if self.kind == "concurrency" else None


@dataclass(frozen=True)
class OnlinePlan:
    """The load sweep (the same for every arm).

    Attributes:
        request_rates: Poisson arrival rates, requests/s.
        concurrencies: max-concurrency points (all requests queued at t=0, at most this many in flight).
        num_prompts: requests per load point (vLLM ``--num-prompts``).
        input_len, output_len: prompt tokens (exact) and generated tokens (exact: EOS ignored).
        repeats: each arm's server is started ``repeats`` times; every load point runs once per start.
        warmups: requests vLLM's load generator sends (and discards) before each load point.
        goodput: SLOs in ms, keys ``ttft``/``tpot``/``e2el`` (vLLM ``--goodput``); empty = no goodput.
        slo_attainment: fraction of requests meeting every SLO for a request rate to count as sustainable.
        seed: vLLM's ``--seed`` (arrival times), the same for every arm.
    """

    request_rates: tuple[float, ...] = (1.0, 2.0, 4.0)
    concurrencies: tuple[int, ...] = (1, 4)
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 32
    repeats: int = 2
    warmups: int = 2
    goodput: dict = field(default_factory=dict)
    slo_attainment: float = 0.9
    seed: int = 0

    def points(self) -> list[LoadPoint]:
        """The rate sweep, then the concurrency sweep."""
        return [LoadPoint("rate", float(r)) for r in self.request_rates] + [
            LoadPoint("concurrency", float(c)) for c in self.concurrencies]

    def validate(self) -> None:
        """Raises InputError naming the field that is out of range."""
        if not self.request_rates and not self.concurrencies:
            raise InputError("request_rates and concurrencies are both empty: no load point to run")
        if any(not (r > 0 and math.isfinite(r)) for r in self.request_rates):
            raise InputError(f"request_rates must be finite and > 0, got {list(self.request_rates)}")
        if any(c < 1 for c in self.concurrencies):
            raise InputError(f"concurrencies must be >= 1, got {list(self.concurrencies)}")
        for name in ("num_prompts", "input_len", "output_len", "repeats"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmups < 0:
            raise InputError(f"warmups must be >= 0, got {self.warmups}")
        bad = set(self.goodput) - set(GOODPUT_KEYS)
        if bad or any(not (v > 0 and math.isfinite(v)) for v in self.goodput.values()):
            raise InputError(f"goodput SLOs must be {'/'.join(GOODPUT_KEYS)} with a positive number of ms, "
                             f"got {self.goodput}")
        if not 0 < self.slo_attainment <= 1:
            raise InputError(f"slo_attainment must be within (0, 1], got {self.slo_attainment}")


@dataclass(frozen=True)
class EngineOptions:
    """Server options given identically to every arm.

    Attributes:
        dtype: vLLM ``--dtype``; ``auto`` records each arm's config dtype (a difference refuses the run).
        max_model_len: ``--max-model-len`` (None: input_len + output_len + 16).
        max_num_seqs: ``--max-num-seqs`` (the scheduler's batch limit).
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB of KV cache on the CPU backend; ignored on GPUs).
        prefix_caching: ``--enable-prefix-caching`` (off by default: every request pays its prefill).
        enforce_eager: ``--enforce-eager`` (no graph compilation / CUDA graphs; the compile mode).
        extra_args: further vLLM server options, passed unchanged to every arm (e.g. ``--gpu-memory-utilization 0.8``).
    """

    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 16
    kv_cache_gib: int = 1
    prefix_caching: bool = False
    enforce_eager: bool = True
    extra_args: tuple[str, ...] = ()

    def server_args(self, dtype: str, max_model_len: int) -> list[str]:
        """The vLLM options every arm's server gets (after model/host/port/name)."""
        args = ["--dtype", dtype, "--max-model-len", str(max_model_len), "--max-num-seqs", str(self.max_num_seqs),
                "--generation-config", "vllm", "--seed", "0",
                "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching"]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args + list(self.extra_args)
