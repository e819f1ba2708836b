"""``bench_endpoints(...)``: the online serving sweep against OpenAI-compatible servers that are already running.

Where :func:`d2serve.bench.online.bench_serve` starts every arm itself on loopback, this drives servers someone
else started (a multi-GPU vLLM deployment with TP/PP, another machine, ``d2serve serve`` with adapters):
``--endpoint NAME=URL[#MODEL]`` per arm (``MODEL``: the served model name the requests ask for; default: the
endpoint's only model). The load generator, the sweep, the fixed-work check (exact prompt and output token counts
from the servers' usage) and the report are ``bench_serve``'s (one loop: :mod:`d2serve.bench.sweep`); repeats re-run
the sweep on the same servers, arm order rotated. Stages: :func:`plan_endpoints` (probe) -> :func:`load_endpoints`
(prompts, fairness record) -> the sweep.

Fairness record, per endpoint, before any load: ``/v1/models`` (served model names, the chosen one's
``max_model_len`` (an adapter's: its parent's, vLLM lists none for LoRA cards), ``root``/``parent``), ``/version`` (vLLM's version), ``/metrics`` (vLLM's
``vllm:cache_config_info`` labels: block size, KV cache dtype, prefix caching, GPU memory utilization, number of
KV blocks..., and ``vllm:lora_requests_info``'s ``max_lora``). A difference between arms in max_model_len, vLLM
version or cache config refuses the run (``strict``) or labels it NOT COMPARABLE; what an endpoint does not expose
(TP/PP size, max-num-seqs, compile mode, dtype, hardware) is listed under ``not_checked`` and in the report.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from d2serve.errors import InputError

from .comparability import NotComparableError
from .online_plan import OnlinePlan
from .settings import ServeBenchSettings
from .sweep import SCHEMA_VERSION, Sweep, loadavg, run_sweep, running_server, write_sweep_prompts

#: what an OpenAI-compatible endpoint does not expose, so this harness cannot check it is equal between arms
NOT_CHECKED = ("tensor/pipeline parallel size", "max-num-seqs and other scheduler options", "compile mode / CUDA graphs",
               "model dtype", "hardware (GPU type and count) and load from other clients", "the model weights themselves")
#: fairness fields that must be equal between arms (when every arm exposes them)
COMPARED = ("max_model_len", "vllm_version", "cache_config")
_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class EndpointArm:
    """One arm served by a running server: ``url`` (scheme://host:port, no path) and the ``model`` requested."""

    name: str
    url: str
    model: str | None = None

    @property
    def served_model_name(self) -> str:
        """The model name the requests ask for (resolved from ``/v1/models`` when not given)."""
        if self.model is None:
            raise ValueError(f"endpoint {self.name}: model not resolved yet")
        return self.model


def parse_endpoints(specs: list[str] | tuple[str, ...]) -> list[EndpointArm]:
    """``["base=http://127.0.0.1:8000", "unmerged=http://h:8001#my-adapter"]`` -> :class:`EndpointArm` list.

    Raises:
        InputError: not ``NAME=URL[#MODEL]``, a name given twice, a URL that is not http(s)://host[:port].
    """
    out, seen = [], set()
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise InputError(f"--endpoint {spec!r}: expected NAME=URL or NAME=URL#MODEL")
        if name in seen:
            raise InputError(f"--endpoint: arm name {name!r} given twice")
        seen.add(name)
        url, _, model = rest.partition("#")
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname or u.path.strip("/") or u.query:
            raise InputError(f"--endpoint {spec!r}: the URL must be http(s)://HOST[:PORT] (the server root, "
                             f"without /v1), got {url!r}")
        out.append(EndpointArm(name, url.rstrip("/"), model or None))
    if not out:
        raise InputError("no --endpoint given")
    return out


def _get(url: str) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None, ""


_LABELS = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _info_labels(metrics: str, name: str) -> dict | None:
    """The labels of the first sample of Prometheus gauge ``name`` (e.g. ``vllm:cache_config_info``), or None."""
    for line in metrics.splitlines():
        if line.startswith(name + "{"):
            labels = dict(_LABELS.findall(line[len(name) + 1: line.rindex("}")]))
            labels.pop("engine", None)  # the engine index, not a setting
            return labels
    return None


def probe_endpoint(arm: EndpointArm) -> tuple[EndpointArm, dict]:
    """What ``arm``'s server says about itself; resolves its model name.

    Returns:
        (the arm with ``model`` set, its fairness record: ``models`` [{id, root, parent, max_model_len}],
        ``model``, ``max_model_len``, ``vllm_version``, ``cache_config``, ``lora_info``, ``not_exposed`` [names]).

    Raises:
        InputError: the server does not answer ``/v1/models``, lists no model, lists several and none was named,
            or does not serve the named one.
    """
    code, body = _get(f"{arm.url}/v1/models")
    if code != 200:
        raise InputError(f"endpoint {arm.name} ({arm.url}): GET /v1/models answered {code or 'nothing'}; is an "
                         "OpenAI-compatible server running there?")
    try:
        models = [{k: m.get(k) for k in ("id", "root", "parent", "max_model_len")} for m in json.loads(body)["data"]]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"endpoint {arm.name} ({arm.url}): /v1/models is not an OpenAI model list: {e}") from e
    ids = [m["id"] for m in models]
    if arm.model is None:
        if len(ids) != 1:
            raise InputError(f"endpoint {arm.name} ({arm.url}) serves {ids}; name the one to benchmark: "
                             f"{arm.name}={arm.url}#MODEL")
        arm = EndpointArm(arm.name, arm.url, ids[0])
    elif arm.model not in ids:
        raise InputError(f"endpoint {arm.name} ({arm.url}) does not serve model {arm.model!r}; it serves {ids}")
    chosen = next(m for m in models if m["id"] == arm.model)
    max_len, source = chosen.get("max_model_len"), "model"
    if max_len is None and chosen.get("parent"):  # a LoRA card (vLLM lists none): it runs in its base's engine
        parent = next((m for m in models if m["id"] == chosen["parent"]), {})
        max_len, source = parent.get("max_model_len"), f"parent {chosen['parent']}"
    rec: dict = {"url": arm.url, "model": arm.model, "models": models, "max_model_len": max_len,
                 "max_model_len_from": source if max_len is not None else None, "not_exposed": []}
    code, body = _get(f"{arm.url}/version")
    try:
        rec["vllm_version"] = json.loads(body).get("version") if code == 200 else None
    except (json.JSONDecodeError, AttributeError):
        rec["vllm_version"] = None
    code, body = _get(f"{arm.url}/metrics")
    rec["cache_config"] = _info_labels(body, "vllm:cache_config_info") if code == 200 else None
    rec["lora_info"] = _info_labels(body, "vllm:lora_requests_info") if code == 200 else None
    for key, what in (("max_model_len", "/v1/models max_model_len"), ("vllm_version", "/version"),
                      ("cache_config", "/metrics vllm:cache_config_info")):
        if rec[key] is None:
            rec["not_exposed"].append(what)
    return arm, rec


def compare_endpoints(records: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(differences between arms in :data:`COMPARED` fields, fields not checked because some arm lacks them)."""
    diffs, unchecked = [], []
    for key in COMPARED:
        vals = {a: r.get(key) for a, r in records.items()}
        if any(v is None for v in vals.values()):
            unchecked.append(f"{key} (not exposed by {', '.join(a for a, v in vals.items() if v is None)})")
            continue
        if len({json.dumps(v, sort_keys=True) for v in vals.values()}) > 1:
            if key == "cache_config":
                names = sorted({k for v in vals.values() for k in v})
                for k in names:
                    per = {a: v.get(k) for a, v in vals.items()}
                    if len(set(per.values())) > 1:
                        diffs.append(f"cache_config.{k}: " + ", ".join(f"{a}={x}" for a, x in per.items()))
            else:
                diffs.append(f"{key}: " + ", ".join(f"{a}={v}" for a, v in vals.items()))
    return diffs, unchecked


def plan_endpoints(s: ServeBenchSettings) -> tuple[list[EndpointArm], dict[str, dict], list[str], list[str]]:
    """Parse the endpoint specs and probe every server before any load: (arms with their model resolved, the
    fairness record per arm, differences between arms, fields not checked). No prompt is built yet.

    Raises:
        InputError: bad plan values or endpoint specs, a server that does not answer, an unknown model.
        MissingExtraError: vLLM (its load generator) is not installed.
        NotComparableError: ``strict`` and the endpoints' exposed settings differ (the message lists them).
    """
    from d2serve.extras import require

    s.plan.validate()
    arms = parse_endpoints(s.endpoints or ())
    require("vllm", purpose="d2serve bench serve --endpoint (vLLM's load generator)")
    probed = [probe_endpoint(a) for a in arms]
    records = {a.name: rec for a, rec in probed}
    diffs, unchecked = compare_endpoints(records)
    if diffs and s.strict:
        raise NotComparableError("the endpoints' settings differ:\n" + "\n".join(diffs)
                                 + "\n(pass strict=False / --no-strict to run and label the report NOT COMPARABLE)")
    return [a for a, _ in probed], records, diffs, unchecked


def load_endpoints(s: ServeBenchSettings, arms: list[EndpointArm], records: dict[str, dict], diffs: list[str],
                   unchecked: list[str]) -> Sweep:
    """The prompt file (built with ``s.base``, the tokenizer) and the report's skeleton with the fairness record.

    Raises:
        InputError: too little text for the prompts, a tokenizer folder that does not load.
    """
    from .environment import environment

    report = Path(s.report)
    prompt_file, prompts_sha = write_sweep_prompts(s.base, s.plan, s.data_dir, report)
    results: dict = {
        "schema_version": SCHEMA_VERSION,
        "kind": "online_serving_endpoints",
        "status": "running",
        "inputs": {"endpoints": list(s.endpoints or ()), "tokenizer": str(s.base)},
        "plan": asdict(s.plan) | {"points": [p.key for p in s.plan.points()]},
        "environment": environment() | {"load_avg_start": loadavg(),
                                        "note": "the load generator's machine (the servers' may differ)"},
        "arms": {a.name: records[a.name] | {"arm": a.name, "served_model_name": a.model, "prompts_sha256": prompts_sha,
                                            "server_args": [], "server_env": {}} for a in arms},
        "fairness": {"compared": list(COMPARED), "diffs": diffs, "not_checked": list(NOT_CHECKED) + unchecked},
        "comparability": {"comparable": not diffs, "diffs": diffs, "merged_provenance": None},
        "load_generator": "vllm bench serve (vllm.benchmarks.serve), in-process, against the given endpoints",
        "rounds": [],
        "points": {a.name: {} for a in arms},
    }
    return Sweep(s.plan, report, Path(s.base), prompt_file, arms, results, s.log)


def running_endpoints(sw: Sweep):
    """The sweep's ``open_arm`` for servers someone else runs: nothing started or stopped; the round records the
    URL."""

    def open_arm(arm: EndpointArm, r: int, rnd: dict, logs: Path):
        rnd["url"] = arm.url
        sw.log(f"repeat {r + 1}/{sw.plan.repeats}, arm {arm.name}: {arm.url} model {arm.model}")
        return running_server(arm.url)

    return open_arm


def endpoints_run(s: ServeBenchSettings) -> dict:
    """:func:`bench_endpoints` over settings already built (the CLI's entry): :func:`plan_endpoints` ->
    :func:`load_endpoints` -> the load sweep (:func:`d2serve.bench.sweep.run_sweep`, which writes the report
    whatever happens) over :func:`running_endpoints`."""
    sw = load_endpoints(s, *plan_endpoints(s))
    return run_sweep(sw, running_endpoints(sw))


def bench_endpoints(*, endpoints: list[str] | tuple[str, ...], tokenizer: str | Path, report: str | Path,
                    plan: OnlinePlan | None = None, data_dir: str | Path | None = None, strict: bool = True,
                    log=print) -> dict:
    """Run the online sweep against running servers and write ``online.json``, ``online.md``, plots, ``raw/``.

    Args:
        endpoints: ``NAME=URL[#MODEL]`` per arm (:func:`parse_endpoints`); names ``base``/``merged``/``unmerged``
            get the merged/base and merged/unmerged ratios.
        tokenizer: the tokenizer folder the prompts are built with (the served model's; the servers' own token
            counts are checked against the plan, :func:`d2serve.bench.sweep.check_work`).
        plan: the load sweep (:class:`OnlinePlan`); ``repeats`` re-run it on the same servers.
        data_dir: evaluation data folder with ``text/wiki.test.raw`` (default: bundled samples).
        strict: refuse arms whose exposed settings differ (else the report says NOT COMPARABLE).

    Returns:
        The dict written to ``online.json`` (``status`` complete | interrupted | failed).

    Raises:
        InputError: bad endpoint specs, a server that does not answer, an unknown model, bad plan values.
        NotComparableError: ``strict`` and the endpoints' exposed settings differ (the message lists them).
        CheckFailedError: a request did not do the fixed work.
    """
    return endpoints_run(ServeBenchSettings(base=tokenizer, report=report, endpoints=tuple(endpoints),
                                            plan=plan or OnlinePlan(), data_dir=data_dir, strict=strict, log=log))
