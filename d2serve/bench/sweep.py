"""The online load sweep: one loop for the servers ``bench serve`` starts and for servers already running.

:func:`run_sweep` runs, for every repeat and every arm (arm order rotated per repeat), every load point of the
plan with vLLM's own load generator against the arm's server, checks each result did the fixed work, keeps vLLM's
result file under ``raw/`` and rewrites ``online.json`` / ``online.md`` after every load point, so Ctrl-C or an
error leaves the completed measurements saved (``status`` interrupted / failed). How an arm's server comes to be
(started on loopback and stopped after its round, or already running) is the caller's ``open_arm``.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

from d2serve.errors import CheckFailedError

from .online_plan import LoadPoint, OnlinePlan
from .ratios import pairwise_ratios
from .timing import median

#: online.json's schema version (both online modes)
SCHEMA_VERSION = 1
#: vLLM result keys holding one value per request: kept in raw/, left out of online.json
PER_REQUEST = ("input_lens", "output_lens", "ttfts", "itls", "start_times", "generated_texts", "errors",
               "latencies", "queue_times")

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "p90", "p99")  # vLLM's key prefixes: mean_ttft_ms, median_ttft_ms, p90_ttft_ms, ...
THROUGHPUTS = ("request_throughput", "output_throughput", "total_token_throughput", "request_goodput")
# metrics whose merged/base and merged/unmerged ratios are reported per load point (throughputs: > 1 is better
# for merged; latencies: < 1 is better for merged)
RATIO_METRICS = ("output_throughput", "request_throughput", "request_goodput", "median_ttft_ms", "p99_ttft_ms",
                 "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "median_e2el_ms", "p99_e2el_ms")


def vllm_bench_argv(*, arm, base_url: str, tokenizer: Path, prompts: Path, point: LoadPoint,
                    plan: OnlinePlan, result_dir: Path, result_file: str, repeat: int) -> list[str]:
    """Arguments of ``vllm bench serve`` for one load point (the same for every arm but the model name).

    ``arm``: any arm with ``name`` and ``served_model_name`` (a started :class:`d2serve.bench.online.ServeArm` or a
    running :class:`d2serve.bench.endpoints.EndpointArm`)."""
    argv = [
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", arm.served_model_name, "--served-model-name", arm.served_model_name,
        "--tokenizer", str(tokenizer),
        "--dataset-name", "custom", "--dataset-path", str(prompts), "--skip-chat-template", "--disable-shuffle",
        "--custom-output-len", str(plan.output_len), "--num-prompts", str(plan.num_prompts),
        "--request-rate", "inf" if math.isinf(point.request_rate) else str(point.request_rate),
        "--burstiness", "1.0", "--seed", str(plan.seed), "--ignore-eos", "--temperature", "0",
        "--num-warmups", str(plan.warmups),
        "--percentile-metrics", ",".join(LATENCY_METRICS), "--metric-percentiles", "50,90,99",
        "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", result_file,
        "--label", arm.name, "--disable-tqdm",
        "--metadata", f"d2serve_arm={arm.name}", f"d2serve_point={point.key}", f"d2serve_repeat={repeat}",
    ]
    if point.max_concurrency is not None:
        argv += ["--max-concurrency", str(point.max_concurrency)]
    if plan.goodput:
        argv += ["--goodput", *(f"{k}:{v:g}" for k, v in plan.goodput.items())]
    return argv


def run_vllm_bench(argv: list[str], log: Path) -> dict:
    """Run vLLM's load generator in this process (``vllm.benchmarks.serve.main``); its printout goes to ``log``."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(argv)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            return main(args)
    finally:
        with open(log, "a") as f:
            f.write(buf.getvalue())


def check_work(res: dict, *, arm: str, point: str, plan: OnlinePlan) -> None:
    """Every completed request read exactly ``input_len`` prompt tokens and produced exactly ``output_len`` tokens
    (token counts from the server's usage report).

    Raises:
        CheckFailedError: naming the arm, load point and the counts seen.
    """
    ins = [n for n, e in zip(res.get("input_lens", []), res.get("errors", [])) if not e]
    outs = [n for n in res.get("output_lens", []) if n]
    bad_in = sorted({n for n in ins if n != plan.input_len})
    bad_out = sorted({n for n in outs if n != plan.output_len})
    if bad_in or bad_out:
        raise CheckFailedError(
            f"arm {arm!r}, load {point}: requests did not do the fixed work (prompt tokens {bad_in or 'ok'} "
            f"instead of {plan.input_len}, output tokens {bad_out or 'ok'} instead of {plan.output_len}); "
            "the arms would not be measured on the same work")


def summarize_point(repeats: list[dict], plan: OnlinePlan) -> dict:
    """Aggregate one arm's load point over repeats: the median of each of vLLM's statistics (and min/max of the
    throughputs), plus the SLO attainment (good requests / completed requests)."""
    out: dict = {"n_repeats": len(repeats), "latency_ms": {}, "throughput": {}}
    for m in LATENCY_METRICS:
        out["latency_ms"][m] = {s: median([r[f"{s}_{m}_ms"] for r in repeats]) for s in STATS
                                if all(f"{s}_{m}_ms" in r for r in repeats)}
    for t in THROUGHPUTS:
        vals = [r.get(t) for r in repeats]
        if all(v is not None for v in vals):
            out["throughput"][t] = {"median": median(vals), "min": min(vals), "max": max(vals)}
    att = [r["request_goodput"] / r["request_throughput"] for r in repeats
           if r.get("request_goodput") is not None and r.get("request_throughput")]
    out["slo_attainment"] = median(att) if plan.goodput and att else None
    out["failed"] = sum(int(r.get("failed", 0)) for r in repeats)
    out["completed"] = sum(int(r.get("completed", 0)) for r in repeats)
    return out


def max_sustainable_rate(points: dict, plan: OnlinePlan) -> dict:
    """The highest request rate at which an arm met the SLOs (no failed request and median SLO attainment >=
    ``plan.slo_attainment``) with every lower rate tried meeting them too; None when the lowest rate did not
    (or no SLO was given)."""
    if not plan.goodput:
        return {"rate": None, "note": "no goodput SLO given"}
    rates = sorted((p for p in points.values() if p["kind"] == "rate"), key=lambda p: p["value"])
    ok = [p["value"] for p in rates if p["summary"]["failed"] == 0
          and (p["summary"]["slo_attainment"] or 0) >= plan.slo_attainment - 1e-9]
    best = None
    for p in rates:  # the highest rate below which every tried rate was sustainable too
        if p["value"] not in ok:
            break
        best = p["value"]
    return {"rate": best, "sustainable_rates": ok, "rates_tried": [p["value"] for p in rates],
            "slo_attainment_required": plan.slo_attainment}


def point_ratios(points_by_arm: dict[str, dict], key: str) -> dict:
    """merged/base and merged/unmerged ratios of ``RATIO_METRICS`` at load point ``key``, per repeat (repeat i of
    every arm ran in the same round), as median with min/max over repeats."""
    out = {}
    for m in RATIO_METRICS:
        per_repeat = {a: [r.get(m) for r in pts[key]["repeats"]] for a, pts in points_by_arm.items() if key in pts}
        per_repeat = {a: v for a, v in per_repeat.items() if v and all(x is not None for x in v)}
        n = min((len(v) for v in per_repeat.values()), default=0)
        out[m] = pairwise_ratios({a: v[:n] for a, v in per_repeat.items()}, m)
    return out


def finalize(results: dict, plan: OnlinePlan) -> None:
    """Fill the aggregated parts of ``results`` (per-point summaries, ratios, max sustainable rate) in place."""
    pts = results["points"]
    for arm_pts in pts.values():
        for p in arm_pts.values():
            p["summary"] = summarize_point(p["repeats"], plan)
    keys = [p.key for p in plan.points()]
    results["ratios"] = {k: point_ratios(pts, k) for k in keys if sum(k in v for v in pts.values()) > 1}
    results["max_sustainable_rate"] = {a: max_sustainable_rate(v, plan) for a, v in pts.items()}


def loadavg() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (other processes competing for the CPU skew timings), or None."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_sweep_prompts(tokenizer: str | Path, plan: OnlinePlan, data_dir: str | Path | None,
                        report: Path) -> tuple[Path, str]:
    """Build ``plan.num_prompts`` prompts of exactly ``plan.input_len`` tokens of ``tokenizer`` (from the data
    folder's WikiText-2) and write them to ``report/prompts.jsonl`` (vLLM's custom dataset format).

    Returns:
        (the prompt file, its sha256 recorded in every arm's settings).

    Raises:
        InputError: too little text for the asked prompts, a missing data file.
    """
    from transformers import AutoTokenizer

    from .online_data import build_prompts, write_prompts

    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    prompts = build_prompts(tok, input_len=plan.input_len, num_prompts=plan.num_prompts, data_dir=data_dir)
    report.mkdir(parents=True, exist_ok=True)
    prompt_file = report / "prompts.jsonl"
    return prompt_file, write_prompts(prompt_file, prompts)


@dataclass
class Sweep:
    """One online run being measured.

    Attributes:
        plan: the load sweep; report: the output folder; tokenizer: the folder vLLM's load generator tokenizes with.
        prompt_file: the prompts (:func:`write_sweep_prompts`).
        arms: the arms in their first-repeat order; each has ``name`` and ``served_model_name``.
        results: online.json as it is filled (``rounds`` and ``points`` are appended to).
        log: progress printer.
    """

    plan: OnlinePlan
    report: Path
    tokenizer: Path
    prompt_file: Path
    arms: list
    results: dict
    log: Callable[[str], None]

    def save(self, *, plots: bool = False) -> None:
        """online.json / online.md (and the plots) from the measurements so far."""
        from .online_report import write_online_report

        finalize(self.results, self.plan)
        write_online_report(self.report, self.results, plots=plots)


def run_sweep(sw: Sweep, open_arm: Callable[[object, int, dict, Path], ContextManager[str]]) -> dict:
    """Measure every (repeat, arm, load point) and write the report; returns ``sw.results``.

    Args:
        open_arm: ``open_arm(arm, repeat, round_record, log_dir)`` -> a context manager that makes the arm's server
            answer and yields its base URL (``http://host:port``); it may add facts to ``round_record`` (port,
            start-up seconds) and is left before the next arm's round.

    Raises:
        CheckFailedError: a request did not do the fixed work (:func:`check_work`).
        whatever ``open_arm`` or vLLM's load generator raise; KeyboardInterrupt. The report is written in every
        case, ``status`` saying complete / interrupted / failed.
    """
    plan, results = sw.plan, sw.results
    raw = sw.report / "raw"
    raw.mkdir(exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="d2serve-bench-serve-"))
    try:
        for r in range(plan.repeats):
            k = r % len(sw.arms)
            for arm in sw.arms[k:] + sw.arms[:k]:
                rnd = {"repeat": r, "arm": arm.name, "load_avg_before": loadavg()}
                results["rounds"].append(rnd)
                with open_arm(arm, r, rnd, logs) as url:
                    for p in plan.points():
                        fname = f"{arm.name}-{p.key}-r{r}.json"
                        res = run_vllm_bench(
                            vllm_bench_argv(arm=arm, base_url=url, tokenizer=Path(sw.tokenizer),
                                            prompts=sw.prompt_file, point=p, plan=plan, result_dir=raw,
                                            result_file=fname, repeat=r),
                            logs / f"bench-{arm.name}-r{r}.log")
                        check_work(res, arm=arm.name, point=p.key, plan=plan)
                        slim = {k2: v for k2, v in res.items() if k2 not in PER_REQUEST} | {"raw_file": f"raw/{fname}"}
                        results["points"][arm.name].setdefault(
                            p.key, {"kind": p.kind, "value": p.value, "repeats": []})["repeats"].append(slim)
                        sw.log(f"  {p.key}: {res['completed']}/{plan.num_prompts} ok, "
                               f"{res['output_throughput']:.1f} output tok/s, median TTFT {res['median_ttft_ms']:.0f}"
                               f" ms, median TPOT {res['median_tpot_ms']:.1f} ms")
                        sw.save()
                rnd["load_avg_after"] = loadavg()
                sw.save()
        results["status"] = "complete"
    except KeyboardInterrupt:
        results["status"] = "interrupted"
        raise
    finally:
        if results["status"] == "running":  # an error other than Ctrl-C: keep what completed, say so
            results["status"] = "failed"
        results["environment"]["load_avg_end"] = loadavg()
        sw.save(plots=True)
    return results


@contextlib.contextmanager
def running_server(url: str):
    """``open_arm``'s context for a server someone else runs: nothing to start or stop, its URL."""
    yield url
