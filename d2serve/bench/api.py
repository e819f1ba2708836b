"""``bench(...)``: run the arms x workloads with identical settings and write the report.

Stages over one :class:`d2serve.bench.settings.BenchSettings`: :func:`plan_bench` (validate, choose the arms, check
the merged checkpoint's provenance; no model) -> :func:`load_arms` (the backend, the workloads' data, each arm
loaded and its settings recorded; a comparison whose arms differ in more than the adapter mode is refused or
labelled) -> :func:`measure` (evaluation-throughput workload, then the generation sweep) -> :func:`report_results`.
Within each repeat every arm is measured back to back (the arm order rotates per repeat), so ratios are pair-wise
within one run. bench.json is rewritten after every completed measurement, so Ctrl-C leaves the completed results
saved.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from d2serve.errors import InputError
from d2serve.verify.data import resolve_data_dir

from .arms import ARM_NAMES, OPT_IN_ARMS, plan_arms
from .backends import get_backend
from .comparability import (
    ALLOWED_TO_DIFFER,
    NotComparableError,
    check_comparable,
    generation_config_of,
    merged_provenance,
)
from .environment import environment
from .ratios import combine_ratios, pairwise_ratios
from .settings import WORKLOADS, BenchSettings
from .report import SCHEMA_VERSION, write_bench_json, write_report
from .timing import summarize
from .workloads import (
    DEFAULT_EVAL_DATA,
    BenchPlan,
    load_mc_items,
    token_hash,
    tokenize_mc,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rotated(arms: list[str], r: int) -> list[str]:
    k = r % len(arms)
    return arms[k:] + arms[:k]


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
    if not enabled:
        yield lambda desc: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
    ) as p:
        task = p.add_task("bench", total=total)

        def step(desc: str):
            p.update(task, advance=1, description=desc)

        yield step


@dataclass
class BenchRun:
    """A validated ``bench`` run (:func:`plan_bench`), then loaded (:func:`load_arms`) and measured.

    Attributes:
        settings: the run's :class:`d2serve.bench.settings.BenchSettings`.
        plan: the sweep measured.
        requested / threads / gen_threads: the ``--threads`` asked (None: chosen), the torch threads of the eval
            workload (and loading) and of the generation workload.
        device: where the hf backend's models run.
        backend_cls: the backend's class (d2serve.bench.backends registry); backend: its instance, once loaded.
        extra / allowed: the engine options the backend takes, the settings allowed to differ between arms.
        specs: the arms in run order; provenance: the merged checkpoint's manifest check, or None.
        eval_path / items / requests: the eval workload's file, its items and tokenized requests (None: not run).
        cases: the generation cases (empty: not run).
        results: bench.json as it is filled.
    """

    settings: BenchSettings
    plan: BenchPlan
    requested: int | None
    threads: int
    gen_threads: int
    device: str
    backend_cls: type
    extra: dict
    allowed: frozenset
    specs: list
    provenance: dict | None
    backend: object = None
    eval_path: Path | None = None
    items: list = field(default_factory=list)
    requests: list | None = None
    cases: list = field(default_factory=list)
    results: dict = field(default_factory=dict)

    def close(self) -> None:
        """Stop the backend's workers / delete its exports (also after an error)."""
        if self.backend is not None:
            self.backend.close()


def plan_bench(s: BenchSettings) -> BenchRun:
    """Validate every setting, choose the arms and check the merged checkpoint's provenance, before any model is
    loaded (bad input: exit 2).

    Raises:
        the errors listed by :func:`bench`.
    """
    from d2serve.threads import check_requested, pick

    if s.dtype not in _DTYPES:
        raise InputError(f"dtype {s.dtype!r} not supported; expected one of {', '.join(_DTYPES)}")
    bad = set(s.workloads) - set(WORKLOADS)
    if bad or not s.workloads:
        raise InputError(f"unknown workload(s) {sorted(bad)}; expected a subset of {WORKLOADS}")
    requested = check_requested(s.threads)
    threads = pick("forward", requested)  # the eval workload (and loading); generation picks its own
    gen_threads = pick("generate", requested)
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend_cls = get_backend(s.backend)
    base, adapter, merged = Path(s.base), s.adapter and Path(s.adapter), s.merged and Path(s.merged)
    arms = s.arms
    if arms is None:
        arms = tuple(
            a
            for a in ARM_NAMES
            if a in backend_cls.arms_supported
            and a not in OPT_IN_ARMS
            and (a != "merged" or merged is not None)
            and (not a.startswith("unmerged") or adapter is not None)
        )
    unsupported = [a for a in arms if a not in backend_cls.arms_supported]
    if unsupported:
        raise InputError(
            f"backend {s.backend!r} cannot run arm(s) {unsupported}; it supports {list(backend_cls.arms_supported)}"
        )
    specs = plan_arms(base=base, adapter=adapter, merged=merged, arms=arms)
    provenance = None
    if merged is not None and "merged" in arms:  # the merged arm must be this base + this adapter, else nothing compares
        provenance = merged_provenance(base, adapter, merged)
        if not provenance["matches"] and s.strict:
            raise NotComparableError(f"the merged checkpoint {merged} was not made from base {base}"
                                     + (f" + adapter {adapter}" if adapter else "") + ":\n"
                                     + "\n".join(provenance["problems"]))
    # the backend says what it takes and what may differ (d2serve.bench.backends.protocol); no branch on its name
    extra = backend_cls.engine_options(prefix_caching=s.vllm_prefix_caching, compile=s.vllm_compile, arms=tuple(arms))
    allowed = ALLOWED_TO_DIFFER | backend_cls.allowed_to_differ(extra)
    return BenchRun(s, s.sweep, requested, threads, gen_threads, device, backend_cls, extra, allowed, specs,
                    provenance)


def load_arms(run: BenchRun) -> None:
    """Start the backend, read and tokenize the workloads' data, load every arm and record its settings, then diff
    the arms (refused or labelled). ``run.backend`` is set first, so :meth:`BenchRun.close` stops it after an error.

    Raises:
        NotComparableError: ``strict`` and the arms differ in more than the adapter mode.
        InputError / WorkloadError: bad eval data (the file named).
    """
    from d2serve.threads import record

    s, plan = run.settings, run.plan
    torch.set_num_threads(run.threads)
    torch.manual_seed(0)
    be = run.backend = run.backend_cls(dtype=_DTYPES[s.dtype], device=run.device, tokenizer_dir=Path(s.base),
                                       **run.extra)
    results = run.results = {
        "schema_version": SCHEMA_VERSION,
        "status": "running",
        "backend": s.backend,
        "inputs": {"base": str(s.base), "adapter": s.adapter and str(s.adapter), "merged": s.merged and str(s.merged)},
        "plan": asdict(plan) | {"quick": s.quick},
        "environment": environment(run.threads),
        "threads": record(run.requested, eval=run.threads, generation=run.gen_threads),
        "arms": {},
        "comparability": {},
        "workloads": {},
    }
    run.eval_path = Path(s.eval_data) if s.eval_data else resolve_data_dir() / DEFAULT_EVAL_DATA
    if "eval" in s.workloads and not be.supports_eval:
        results["skipped"] = {"eval": f"the {s.backend} backend does not run the eval-throughput workload"}
    elif "eval" in s.workloads:
        run.items = load_mc_items(run.eval_path, limit=plan.eval_examples)
        run.requests = tokenize_mc(run.items, be.tokenizer)
    run.cases = cases = plan.generation_cases() if "generation" in s.workloads else []
    requests = run.requests
    common = be.settings() | {
        "eval_examples": plan.eval_examples if requests else None,
        "eval_batch": plan.eval_batch if requests else None,
        "eval_data_hash": token_hash([r.tokens for r in requests]) if requests else None,
        "batches": list(plan.batches) if cases else None,
        "prompt_lens": list(plan.prompt_lens) if cases else None,
        "max_new_tokens": plan.max_new_tokens if cases else None,
        "prompt_hash": token_hash([be.prompts(c) for c in cases]) if cases else None,
        "warmup": plan.warmup,
        "repeats": plan.repeats,
        "greedy": True,
        "ignore_eos": True,
    }
    for spec in run.specs:
        facts = be.load(spec)
        arm = dict(common) | facts | {
            "arm": spec.name,
            "adapter_mode": spec.adapter_mode,
            "generation_config": generation_config_of(spec.model_dir),
            "model_dir": str(spec.model_dir),
            "adapter_dir": spec.adapter_dir and str(spec.adapter_dir),
        }
        arm |= (s.settings_override or {}).get(spec.name, {})
        results["arms"][spec.name] = arm
    diffs = check_comparable(dict(results["arms"]), strict=s.strict, allowed=run.allowed)
    mode = run.backend_cls.comparison_mode(run.extra)
    if mode is not None:
        results["comparison_mode"] = mode
    prov = run.provenance
    results["comparability"] = {
        "comparable": all(d.comparable for d in diffs) and (prov is None or prov["matches"]),
        "diffs": [d.render() for d in diffs if not d.comparable]
        + ([] if prov is None or prov["matches"] else
           ["merged checkpoint not made from this base + adapter:\n" + "\n".join(prov["problems"])]),
        "merged_provenance": prov,
    }


def measure(run: BenchRun) -> None:
    """The workloads (eval throughput, then the generation sweep), bench.json rewritten after every completed
    measurement; on Ctrl-C the report of the completed repeats is written (``status`` interrupted) and the
    interrupt re-raised."""
    from d2serve.threads import torch_threads

    s, plan, results = run.settings, run.plan, run.results
    names = [spec.name for spec in run.specs]
    total = 0
    if run.requests:
        total += len(names) * (plan.warmup + plan.repeats)
    total += len(run.cases) * len(names) * (plan.warmup + plan.repeats)

    def save():
        write_bench_json(Path(s.report), results)

    try:
        with _progress(s.progress, total) as step:
            results["environment"]["load_avg_1m_start"] = _loadavg()
            if run.requests:
                wl = results["workloads"]["eval_throughput"] = {}  # filled in place: partial saves see it
                _run_eval(wl, run.backend, names, run.requests, [it.gold for it in run.items], plan, run.eval_path,
                          step, save)
            if run.cases:
                wl = results["workloads"]["generation"] = {}
                with torch_threads(run.gen_threads):
                    _run_generation(wl, run.backend, names, run.cases, plan, step, save)
        results["status"] = "complete"
    except KeyboardInterrupt:
        results["status"] = "interrupted"
        write_report(Path(s.report), results)
        raise
    finally:
        results["environment"]["load_avg_1m_end"] = _loadavg()


def report_results(run: BenchRun) -> dict:
    """bench.json, bench.md and the plots of the measured run; returns the results dict."""
    write_report(Path(run.settings.report), run.results)
    return run.results


def bench(**kwargs) -> dict:
    """Benchmark base / merged / unmerged arms and write bench.json, bench.md and plots to ``report``.

    Stages over one :class:`d2serve.bench.settings.BenchSettings`: :func:`plan_bench` -> :func:`load_arms` ->
    :func:`measure` -> :func:`report_results`.

    Args (keyword only; the fields of :class:`d2serve.bench.settings.BenchSettings`):
        base, adapter, merged: the base checkpoint, the adapter dir and the merged checkpoint.
        report: output directory (created; bench.json/bench.md/PNGs overwritten).
        backend: a name of d2serve.bench.backends.BACKENDS: ``"hf"`` (all arms), ``"vllm"`` (base, merged,
            unmerged through d2serve's vLLM plugin) or ``"onnx"`` (base and merged only).
        arms: subset of ``ARM_NAMES``; default all arms the inputs and backend allow, except the opt-in
            ``vanilla_lora`` (vLLM backend: the plugin-cost control, see d2serve.bench.arms).
        quick: the reduced sweep (~1 minute on SmolLM2, 2 CPU threads).
        plan: explicit sweep (overrides ``quick``).
        workloads: subset of ``("eval", "generation")``.
        threads: torch intra-op threads for every workload; None: chosen per workload from the cores this process
            may use (:func:`d2serve.threads.pick`: all of them for eval throughput, half of them for generation,
            the same for every arm). Recorded (``threads`` in bench.json, each arm's settings).
        dtype: compute dtype of every arm: float32, bfloat16 or float16.
        eval_data: multiple-choice jsonl (ARC or BoolQ) for the eval-throughput workload.
        strict: refuse non-comparable arms (raise); False labels the report NOT COMPARABLE instead.
        settings_override: test hook: extra settings merged into an arm's settings dict.
        vllm_prefix_caching: run the vLLM arms with prefix caching (default off: every repeat recomputes
            its prompts; recorded in the settings as ``enable_prefix_caching``).
        vllm_compile: False (default): every vLLM arm runs eager, one compilation mode for all (the fair
            ratio, ``comparison_mode`` "fair"); True: each arm gets vLLM's default compilation, which on CPU
            compiles base and merged but not the LoRA-enabled unmerged arm (the practical ratio,
            ``comparison_mode`` "practical"; ``compile_mode`` is then allowed to differ and is recorded per arm).

    Returns:
        The results dict written to bench.json (``status`` is "complete" or "interrupted").

    Raises:
        TypeError: an unknown keyword.
        ArmError / ValueError: bad inputs (missing dirs, unknown arm/backend/workload/dtype).
        NotComparableError: ``strict`` and the arms differ in more than the adapter mode (settings, including
            each arm's ``generation_config.json``), or the merged checkpoint's ``d2serve_merge.json`` does not
            match the sha256 of the given base shards and adapter files (the file is named).
        KeyboardInterrupt: re-raised after saving the completed measurements.
    """
    return bench_run(BenchSettings(**kwargs))


def bench_run(s: BenchSettings) -> dict:
    """:func:`bench` over settings already built (the CLI's entry)."""
    run = plan_bench(s)
    try:
        load_arms(run)
        measure(run)
        return report_results(run)
    finally:
        run.close()  # stop vLLM workers / delete ONNX exports even on errors


def _loadavg() -> float | None:
    """1-minute system load average (other processes competing for the CPU skew timings)."""
    import os

    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _run_eval(wl: dict, be, names, requests, golds: list[int], plan: BenchPlan, path: Path, step, save) -> dict:
    """Fill ``wl`` (the eval_throughput workload record) repeat by repeat, calling ``save`` after each."""
    n_ex = max(r.example for r in requests) + 1
    wl |= {
        "metric": "examples_per_s",
        "dataset": path.name,
        "examples": n_ex,
        "sequences": len(requests),
        "batch": plan.eval_batch,
        "arms": {},
    }
    per_repeat: dict[str, list[float]] = {n: [] for n in names}
    preds: dict[str, list[int]] = {}
    for n in names:
        for _ in range(plan.warmup):
            out = be.eval_once(n, requests, plan.eval_batch)
            preds[n] = out["pred"]
            step(f"eval warm-up {n}")
    for r in range(plan.repeats):
        for n in _rotated(names, r):
            out = be.eval_once(n, requests, plan.eval_batch)
            preds[n] = out["pred"]
            per_repeat[n].append(out["examples"] / out["seconds"])
            step(f"eval repeat {r + 1} {n}")
        wl["arms"] = {
            n: {"examples_per_s": summarize(v), "samples": {"examples_per_s": v}} for n, v in per_repeat.items()
        }
        wl["ratios"] = pairwise_ratios(per_repeat, "examples_per_s")
        save()
    for n in names:
        if n in preds:
            wl["arms"][n]["accuracy"] = sum(int(p == g) for p, g in zip(preds[n], golds)) / n_ex
            wl["arms"][n]["predictions"] = list(preds[n])  # chosen answer index per example (arms' agreement)
    return wl


def _run_generation(wl: dict, be, names, cases, plan: BenchPlan, step, save) -> dict:
    """Fill ``wl`` (the generation workload record) case by case and repeat by repeat, saving after each."""
    wl |= {"metric": "tokens_per_s", "max_new_tokens": plan.max_new_tokens, "cases": {}, "kv_cache": {}}
    for n in names:
        wl["kv_cache"][n] = be.kv_cache_check(n, cases[-1])
    for case in cases:
        samples = {n: {"ttft_ms": [], "e2e_ms": [], "tpot_ms": [], "itl_ms": []} for n in names}
        for n in names:
            for _ in range(plan.warmup):
                be.generate_once(n, case)
                step(f"{case.key} warm-up {n}")
        c: dict = {"batch": case.batch, "prompt_len": case.prompt_len, "max_new_tokens": case.max_new_tokens}
        for r in range(plan.repeats):
            for n in _rotated(names, r):
                out = be.generate_once(n, case)
                if out["new_tokens"] != case.max_new_tokens:
                    raise RuntimeError(
                        f"arm {n} generated {out['new_tokens']} tokens, expected exactly {case.max_new_tokens}"
                    )
                s = samples[n]
                s["ttft_ms"].append(out["ttft_s"] * 1e3)
                s["e2e_ms"].append(out["e2e_s"] * 1e3)
                s["tpot_ms"].append((out["e2e_s"] - out["ttft_s"]) / max(case.max_new_tokens - 1, 1) * 1e3)
                s["itl_ms"].extend(x * 1e3 for x in out["itl_s"])
                step(f"{case.key} repeat {r + 1} {n}")
            c["arms"] = {n: _gen_summary(samples[n], case) for n in names if samples[n]["e2e_ms"]}
            c["ratios"] = pairwise_ratios(
                {n: c["arms"][n]["samples"]["tokens_per_s"] for n in c["arms"]}, "tokens_per_s"
            )
            c["ratios_by_metric"] = {
                m: pairwise_ratios({n: c["arms"][n]["samples"][m] for n in c["arms"]}, m)
                for m in ("prefill_tokens_per_s", "decode_tokens_per_s")
            }
            wl["cases"][case.key] = c
            wl["ratios"] = combine_ratios([x["ratios"] for x in wl["cases"].values()], "tokens_per_s")
            save()
    return wl


def _gen_summary(s: dict, case) -> dict:
    b, L, N = case.batch, case.prompt_len, case.max_new_tokens
    tps = [b * N / (e / 1e3) for e in s["e2e_ms"]]
    prefill = [b * L / (t / 1e3) for t in s["ttft_ms"]]
    decode = [b * (N - 1) / ((e - t) / 1e3) for e, t in zip(s["e2e_ms"], s["ttft_ms"]) if e > t and N > 1]
    samples = {
        "ttft_ms": s["ttft_ms"],
        "e2e_ms": s["e2e_ms"],
        "tpot_ms": s["tpot_ms"],
        "itl_ms": s["itl_ms"],
        "tokens_per_s": tps,
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s": decode,
    }
    out = {k: summarize(v) for k, v in samples.items() if v}
    out["samples"] = samples
    return out
