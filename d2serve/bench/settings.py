"""The settings of one ``bench`` run and of one ``bench serve`` run, and how command-line text becomes them.

Each benchmark runs as stages over one frozen settings object (issue 22 item 5):

- ``bench``: :class:`BenchSettings` -> :func:`d2serve.bench.api.plan_bench` (validate, choose arms, check the
  merged checkpoint's provenance; no model) -> ``load_arms`` (the backend, the workload data, every arm's
  settings diffed) -> ``measure`` (the workloads) -> ``report_results``.
- ``bench serve``: :class:`ServeBenchSettings` -> :func:`d2serve.bench.online.plan_serve` or
  :func:`d2serve.bench.endpoints.plan_endpoints` (arms, provenance or endpoint probes; no server) -> the shared
  prompt file and fairness record -> the shared load sweep (:mod:`d2serve.bench.sweep`) -> the report.

The ``from_options`` builders take the options as the command line gives them (comma lists, ``KEY:MS`` pairs,
unset values as None) and apply the defaults that depend on other options (the sweep of ``--quick`` with
per-field overrides, the backend's default dtype on the resolved device). The CLI only parses and calls them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from d2serve.errors import InputError

from .online_plan import EngineOptions, OnlinePlan
from .workloads import DEFAULT_EVAL_DATA, FULL_PLAN, QUICK_PLAN, BenchPlan

WORKLOADS = ("eval", "generation")


def parse_names(text: str | None) -> tuple[str, ...] | None:
    """A comma list of names (``"base, merged"`` -> ``("base", "merged")``); None or blank -> None (the default)."""
    if text is None:
        return None
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    return names or None


def parse_numbers(text: str | None, option: str, cast: Callable = int) -> tuple | None:
    """A comma list of numbers (``"1,4,8"``) cast with ``cast``; None or blank -> None.

    Raises:
        InputError: an item ``cast`` refuses, naming ``option`` and the text.
    """
    if text is None or not text.strip():
        return None
    try:
        return tuple(cast(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        kind = "integers" if cast is int else "numbers"
        raise InputError(f"{option} expects comma-separated {kind}, got {text!r}") from e


def parse_goodput(pairs: list[str] | tuple[str, ...] | None) -> dict[str, float]:
    """vLLM bench's ``--goodput`` SLOs: ``["ttft:500", "tpot:50 e2el:2000"]`` (repeated, space or comma separated)
    -> ``{"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}`` (milliseconds). Keys are checked by
    :meth:`OnlinePlan.validate`.

    Raises:
        InputError: a pair that is not ``KEY:NUMBER``.
    """
    slo: dict[str, float] = {}
    for pair in " ".join(pairs or []).replace(",", " ").split():
        key, _, value = pair.partition(":")
        try:
            slo[key] = float(value)
        except ValueError as e:
            raise InputError(f"--goodput expects KEY:MS pairs (ttft, tpot, e2el), got {pair!r}") from e
    return slo


@dataclass(frozen=True)
class BenchSettings:
    """Every option of one offline ``bench`` run (what :func:`d2serve.bench.api.bench` takes; see its Args).

    Validated once, by :func:`d2serve.bench.api.plan_bench`; the stages after it read it and never re-check it.
    """

    base: str | Path
    report: str | Path
    adapter: str | Path | None = None
    merged: str | Path | None = None
    backend: str = "hf"
    arms: tuple[str, ...] | None = None
    quick: bool = False
    plan: BenchPlan | None = None
    workloads: tuple[str, ...] = WORKLOADS
    threads: int | None = None
    dtype: str = "float32"
    device: str | None = None
    eval_data: str | Path | None = None
    strict: bool = True
    progress: bool = True
    settings_override: dict[str, dict] | None = None
    vllm_prefix_caching: bool = False
    vllm_compile: bool = False

    @property
    def sweep(self) -> BenchPlan:
        """The sweep this run measures: ``plan``, else the quick or the full plan."""
        return self.plan or (QUICK_PLAN if self.quick else FULL_PLAN)

    @classmethod
    def from_options(cls, *, base: Path, report: Path, adapter: Path | None = None, merged: Path | None = None,
                     backend: str = "hf", arms: str | None = None, workloads: str | None = "eval,generation",
                     quick: bool = False, repeats: int | None = None, warmup: int | None = None,
                     batches: str | None = None, prompt_lens: str | None = None, max_new_tokens: int | None = None,
                     eval_examples: int | None = None, eval_batch: int | None = None, data: Path | None = None,
                     threads: int | None = None, dtype: str | None = None, device: str | None = None,
                     allow_not_comparable: bool = False, vllm_compile: bool = False) -> BenchSettings:
        """The settings of ``d2serve bench run`` from its options as given on the command line.

        ``quick`` picks the sweep, every sweep option given overrides its field (``--batches 1,4`` ->
        ``plan.batches == (1, 4)``); ``data`` is an evaluation data folder (verify's layout; the eval workload
        reads its ARC-Easy file); ``dtype`` None -> the backend's default on the resolved device (bfloat16 for
        hf on CUDA, else float32); ``device`` is resolved for backends that run torch models.

        Raises:
            InputError: a comma list that does not parse (naming the option), an unknown backend, a bad device.
        """
        from .backends import backend_entry

        sweep = QUICK_PLAN if quick else FULL_PLAN
        over = {"repeats": repeats, "warmup": warmup, "batches": parse_numbers(batches, "--batches"),
                "prompt_lens": parse_numbers(prompt_lens, "--prompt-lens"), "max_new_tokens": max_new_tokens,
                "eval_examples": eval_examples, "eval_batch": eval_batch}
        sweep = replace(sweep, **{k: v for k, v in over.items() if v is not None})
        entry = backend_entry(backend)  # the registry: d2serve.bench.backends
        if entry.torch_device:
            from d2serve.models import resolve_device

            device = resolve_device(device)
        eval_data = None
        if data is not None:
            from d2serve.verify.data import resolve_data_dir

            eval_data = resolve_data_dir(data) / DEFAULT_EVAL_DATA
        return cls(base=base, report=report, adapter=adapter, merged=merged, backend=backend,
                   arms=parse_names(arms), quick=quick, plan=sweep, workloads=parse_names(workloads) or (),
                   threads=threads, dtype=dtype or entry.default_dtype(device), device=device, eval_data=eval_data,
                   strict=not allow_not_comparable, vllm_compile=vllm_compile)


@dataclass(frozen=True)
class ServeBenchSettings:
    """Every option of one online ``bench serve`` run: either servers d2serve starts (``merged`` given) or servers
    already running (``endpoints`` given). See :func:`d2serve.bench.online.bench_serve` and
    :func:`d2serve.bench.endpoints.bench_endpoints` for each field.

    Attributes:
        base: the base checkpoint; with ``endpoints``, the tokenizer folder the prompts are built with.
        report: output folder (online.json, online.md, plots, raw/, prompts.jsonl).
        merged / adapter / arms: the arms d2serve starts (``arms`` None: all the inputs allow).
        endpoints: ``NAME=URL[#MODEL]`` per running server (then ``merged``/``adapter``/``arms`` do not apply).
        plan: the load sweep; engine: the server options of every arm d2serve starts.
        data_dir: evaluation data folder with ``text/wiki.test.raw`` (None: $D2SERVE_DATA_DIR or the bundled
            samples).
        strict: refuse arms whose settings differ beyond the adapter (else label NOT COMPARABLE).
        startup_timeout_s: seconds a started server may take to answer ``/health``.
        log: progress printer, one line per server start / round and load point.
    """

    base: str | Path
    report: str | Path
    merged: str | Path | None = None
    adapter: str | Path | None = None
    arms: tuple[str, ...] | None = None
    endpoints: tuple[str, ...] | None = None
    plan: OnlinePlan = field(default_factory=OnlinePlan)
    engine: EngineOptions = field(default_factory=EngineOptions)
    data_dir: str | Path | None = None
    strict: bool = True
    startup_timeout_s: float = 900.0
    log: Callable[[str], None] = print

    @classmethod
    def from_options(cls, *, base: Path, report: Path, merged: Path | None = None, adapter: Path | None = None,
                     endpoint: list[str] | None = None, arms: str | None = None, request_rates: str = "1,2,4",
                     concurrencies: str = "1,4", num_prompts: int = 32, input_len: int = 128, output_len: int = 32,
                     repeats: int = 2, warmups: int = 2, goodput: list[str] | None = None,
                     slo_attainment: float = 0.9, dtype: str = "auto", max_model_len: int | None = None,
                     max_num_seqs: int = 16, kv_cache_gib: int = 1, prefix_caching: bool = False,
                     enforce_eager: bool = True, server_arg: list[str] | None = None, data: Path | None = None,
                     seed: int = 0, allow_not_comparable: bool = False,
                     log: Callable[[str], None] = print) -> ServeBenchSettings:
        """The settings of ``d2serve bench serve`` from its options as given on the command line.

        ``request_rates`` / ``concurrencies``: comma lists (``"1,2,4"``; blank: none of that kind);
        ``goodput``: ``KEY:MS`` pairs (:func:`parse_goodput`); ``server_arg``: extra server options, each split
        shell-like (``"--gpu-memory-utilization 0.8"``).

        Raises:
            InputError: a list or pair that does not parse (naming the option); ``endpoint`` together with
                ``merged``/``adapter``/``arms``; neither ``endpoint`` nor ``merged``.
        """
        plan = OnlinePlan(request_rates=parse_numbers(request_rates, "--request-rates", float) or (),
                          concurrencies=parse_numbers(concurrencies, "--concurrencies", int) or (),
                          num_prompts=num_prompts, input_len=input_len, output_len=output_len, repeats=repeats,
                          warmups=warmups, goodput=parse_goodput(goodput), slo_attainment=slo_attainment, seed=seed)
        if endpoint:
            if merged is not None or adapter is not None or arms:
                raise InputError("--endpoint drives running servers: --merged, --adapter and --arms do not apply")
        elif merged is None:
            raise InputError("--merged is required (or drive running servers with --endpoint NAME=URL)")
        engine = EngineOptions(dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                               kv_cache_gib=kv_cache_gib, prefix_caching=prefix_caching, enforce_eager=enforce_eager,
                               extra_args=tuple(a for x in server_arg or [] for a in shlex.split(x)))
        return cls(base=base, report=report, merged=merged, adapter=adapter, arms=parse_names(arms),
                   endpoints=tuple(endpoint) if endpoint else None, plan=plan, engine=engine, data_dir=data,
                   strict=not allow_not_comparable, log=log)
