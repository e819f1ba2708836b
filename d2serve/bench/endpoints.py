"""``bench_endpoints(...)``: the online serving sweep against OpenAI-compatible servers that are already running.

Where :func:`d2serve.bench.online.bench_serve` starts every arm itself on loopback, this drives servers someone
else started (a multi-GPU vLLM deployment with TP/PP, another machine, ``d2serve serve`` with adapters):
``--endpoint NAME=URL[#MODEL]`` per arm (``MODEL``: the served model name the requests ask for; default: the
endpoint's only model). The load generator, the sweep, the fixed-work check (exact prompt and output token counts
from the servers' usage) and the report are ``bench_serve``'s; repeats re-run the sweep on the same servers, arm
order rotated.

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
from .online import (
    _PER_REQUEST,
    SCHEMA_VERSION,
    OnlinePlan,
    _loadavg,
    check_work,
    finalize,
    run_vllm_bench,
    vllm_bench_argv,
)
from .online_data import build_prompts, write_prompts

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


def bench_endpoints(*, endpoints: list[str] | tuple[str, ...], tokenizer: str | Path, report: str | Path,
                    plan: OnlinePlan | None = None, data_dir: str | Path | None = None, strict: bool = True,
                    log=print) -> dict:
    """Run the online sweep against running servers and write ``online.json``, ``online.md``, plots, ``raw/``.

    Args:
        endpoints: ``NAME=URL[#MODEL]`` per arm (:func:`parse_endpoints`); names ``base``/``merged``/``unmerged``
            get the merged/base and merged/unmerged ratios.
        tokenizer: the tokenizer folder the prompts are built with (the served model's; the servers' own token
            counts are checked against the plan, :func:`d2serve.bench.online.check_work`).
        plan: the load sweep (:class:`OnlinePlan`); ``repeats`` re-run it on the same servers.
        data_dir: evaluation data folder with ``text/wiki.test.raw`` (default: bundled samples).
        strict: refuse arms whose exposed settings differ (else the report says NOT COMPARABLE).

    Raises:
        InputError: bad endpoint specs, a server that does not answer, an unknown model, bad plan values.
        NotComparableError: ``strict`` and the endpoints' exposed settings differ (the message lists them).
        CheckFailedError: a request did not do the fixed work.
    """
    from transformers import AutoTokenizer

    from d2serve.extras import require

    from .environment import environment
    from .online_report import write_online_report

    plan = plan or OnlinePlan()
    plan.validate()
    arms = parse_endpoints(endpoints)
    require("vllm", purpose="d2serve bench serve --endpoint (vLLM's load generator)")
    probed = [probe_endpoint(a) for a in arms]
    arms = [a for a, _ in probed]
    records = {a.name: rec for a, rec in probed}
    diffs, unchecked = compare_endpoints(records)
    if diffs and strict:
        raise NotComparableError("the endpoints' settings differ:\n" + "\n".join(diffs)
                                 + "\n(pass strict=False / --no-strict to run and label the report NOT COMPARABLE)")
    tok = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    prompts = build_prompts(tok, input_len=plan.input_len, num_prompts=plan.num_prompts, data_dir=data_dir)
    report = Path(report)
    report.mkdir(parents=True, exist_ok=True)
    prompt_file = report / "prompts.jsonl"
    prompts_sha = write_prompts(prompt_file, prompts)
    results: dict = {
        "schema_version": SCHEMA_VERSION,
        "kind": "online_serving_endpoints",
        "status": "running",
        "inputs": {"endpoints": list(endpoints), "tokenizer": str(tokenizer)},
        "plan": asdict(plan) | {"points": [p.key for p in plan.points()]},
        "environment": environment() | {"load_avg_start": _loadavg(),
                                        "note": "the load generator's machine (the servers' may differ)"},
        "arms": {a.name: records[a.name] | {"arm": a.name, "served_model_name": a.model, "prompts_sha256": prompts_sha,
                                            "server_args": [], "server_env": {}} for a in arms},
        "fairness": {"compared": list(COMPARED), "diffs": diffs, "not_checked": list(NOT_CHECKED) + unchecked},
        "comparability": {"comparable": not diffs, "diffs": diffs, "merged_provenance": None},
        "load_generator": "vllm bench serve (vllm.benchmarks.serve), in-process, against the given endpoints",
        "rounds": [],
        "points": {a.name: {} for a in arms},
    }
    raw = report / "raw"
    raw.mkdir(exist_ok=True)
    import tempfile

    logs = Path(tempfile.mkdtemp(prefix="d2serve-bench-endpoints-"))

    def save():
        finalize(results, plan)
        write_online_report(report, results, plots=False)

    try:
        for r in range(plan.repeats):
            k = r % len(arms)
            for arm in arms[k:] + arms[:k]:
                rnd = {"repeat": r, "arm": arm.name, "load_avg_before": _loadavg(), "url": arm.url}
                results["rounds"].append(rnd)
                log(f"repeat {r + 1}/{plan.repeats}, arm {arm.name}: {arm.url} model {arm.model}")
                for p in plan.points():
                    fname = f"{arm.name}-{p.key}-r{r}.json"
                    res = run_vllm_bench(vllm_bench_argv(arm=arm, base_url=arm.url, tokenizer=Path(tokenizer),
                                                         prompts=prompt_file, point=p, plan=plan, result_dir=raw,
                                                         result_file=fname, repeat=r),
                                         logs / f"bench-{arm.name}-r{r}.log")
                    check_work(res, arm=arm.name, point=p.key, plan=plan)
                    slim = {k2: v for k2, v in res.items() if k2 not in _PER_REQUEST} | {"raw_file": f"raw/{fname}"}
                    results["points"][arm.name].setdefault(p.key, {"kind": p.kind, "value": p.value,
                                                                   "repeats": []})["repeats"].append(slim)
                    log(f"  {p.key}: {res['completed']}/{plan.num_prompts} ok, {res['output_throughput']:.1f} "
                        f"output tok/s, median TTFT {res['median_ttft_ms']:.0f} ms")
                    save()
                rnd["load_avg_after"] = _loadavg()
        results["status"] = "complete"
    except KeyboardInterrupt:
        results["status"] = "interrupted"
        raise
    finally:
        if results["status"] == "running":
            results["status"] = "failed"
        results["environment"]["load_avg_end"] = _loadavg()
        finalize(results, plan)
        write_online_report(report, results, plots=True)
    return results
