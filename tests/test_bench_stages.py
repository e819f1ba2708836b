"""``bench`` and ``bench serve`` as plan -> load -> measure -> report stages over one settings dataclass, and the
one load-sweep loop both online modes share (issue 22 item 5).

Settings builders: the command line's text becomes the same settings the API takes (sweep overrides, comma lists,
SLO pairs, server arguments, the backend's default dtype); bad text names its option. Stages: plan refuses bad
input before any backend or model is built; the stages run one after another give bench()'s report. The sweep:
arm order rotates per repeat, every (arm, point, repeat) is recorded, the report is written complete / failed.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from d2serve.bench import QUICK_PLAN
from d2serve.bench.online_plan import EngineOptions, OnlinePlan
from d2serve.bench.settings import (
    BenchSettings,
    ServeBenchSettings,
    parse_goodput,
    parse_names,
    parse_numbers,
)
from d2serve.errors import CheckFailedError, InputError

from test_bench import mc_file, tiny_arms  # noqa: F401 (fixtures)


# ---- settings from the command line's text --------------------------------------------------------------------


def test_comma_lists_and_slo_pairs_parse_or_name_the_option():
    assert parse_names(" base, merged ,") == ("base", "merged")
    assert parse_names(None) is None and parse_names(" , ") is None
    assert parse_numbers("1, 4,8", "--batches") == (1, 4, 8)
    assert parse_numbers("0.5,2", "--request-rates", float) == (0.5, 2.0)
    assert parse_numbers("", "--concurrencies") is None
    with pytest.raises(InputError, match=r"^--batches expects comma-separated integers, got '1,x'$"):
        parse_numbers("1,x", "--batches")
    with pytest.raises(InputError, match=r"^--request-rates expects comma-separated numbers, got 'fast'$"):
        parse_numbers("fast", "--request-rates", float)
    assert parse_goodput(["ttft:500", "tpot:50,e2el:2000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    assert parse_goodput(None) == {}
    with pytest.raises(InputError, match=r"--goodput expects KEY:MS pairs .* got 'ttft=5'"):
        parse_goodput(["ttft=5"])


def test_bench_settings_from_options_apply_the_sweep_overrides_and_backend_defaults(tmp_path):
    s = BenchSettings.from_options(base=tmp_path, report=tmp_path / "r", quick=True, batches="1,2", repeats=7,
                                   arms="base, merged", workloads="generation")
    assert s.plan == replace(QUICK_PLAN, batches=(1, 2), repeats=7)  # the quick sweep, two fields overridden
    assert (s.arms, s.workloads, s.strict) == (("base", "merged"), ("generation",), True)
    assert (s.device, s.dtype) == ("cpu", "float32")  # hf on a CPU: float32 (bfloat16 only on CUDA)
    assert BenchSettings.from_options(base=tmp_path, report=tmp_path, dtype="bfloat16").dtype == "bfloat16"
    full = BenchSettings.from_options(base=tmp_path, report=tmp_path, allow_not_comparable=True)
    assert full.plan.repeats == 5 and full.strict is False and full.eval_data is None
    data = tmp_path / "data"
    (data / "ARC-Easy").mkdir(parents=True)
    (data / "ARC-Easy" / "ARC-Easy-Test.jsonl").write_text("{}\n")
    assert BenchSettings.from_options(base=tmp_path, report=tmp_path, data=data).eval_data == \
        data / "ARC-Easy" / "ARC-Easy-Test.jsonl"
    with pytest.raises(InputError, match="--prompt-lens expects comma-separated integers"):
        BenchSettings.from_options(base=tmp_path, report=tmp_path, prompt_lens="64;256")
    with pytest.raises(InputError, match="nope"):
        BenchSettings.from_options(base=tmp_path, report=tmp_path, backend="nope")


def test_serve_settings_from_options(tmp_path):
    s = ServeBenchSettings.from_options(base=tmp_path, report=tmp_path / "r", merged=tmp_path, request_rates="0.5,2",
                                        concurrencies="", goodput=["ttft:300 tpot:40"], arms="base,merged",
                                        server_arg=["--gpu-memory-utilization 0.8", "--swap-space=2"], kv_cache_gib=3)
    assert s.plan == OnlinePlan(request_rates=(0.5, 2.0), concurrencies=(), goodput={"ttft": 300.0, "tpot": 40.0})
    assert s.engine == EngineOptions(kv_cache_gib=3, extra_args=("--gpu-memory-utilization", "0.8", "--swap-space=2"))
    assert s.arms == ("base", "merged") and s.endpoints is None
    e = ServeBenchSettings.from_options(base=tmp_path, report=tmp_path, endpoint=["merged=http://h:1"])
    assert e.endpoints == ("merged=http://h:1",) and e.merged is None
    with pytest.raises(InputError, match=r"^--endpoint drives running servers: --merged, --adapter and --arms"):
        ServeBenchSettings.from_options(base=tmp_path, report=tmp_path, endpoint=["a=http://h:1"], arms="base")
    with pytest.raises(InputError, match=r"^--merged is required"):
        ServeBenchSettings.from_options(base=tmp_path, report=tmp_path)
    with pytest.raises(InputError, match="--concurrencies expects comma-separated integers"):
        ServeBenchSettings.from_options(base=tmp_path, report=tmp_path, merged=tmp_path, concurrencies="1.5")


def test_settings_take_exactly_the_api_s_options(tmp_path):
    import d2serve.bench
    from d2serve.bench import bench
    from d2serve.bench.online import bench_serve

    assert (d2serve.bench.BenchSettings, d2serve.bench.ServeBenchSettings) == (BenchSettings, ServeBenchSettings)

    with pytest.raises(TypeError, match="repeets"):
        bench(base=tmp_path, report=tmp_path, repeets=3)
    with pytest.raises(TypeError, match="enigne"):
        bench_serve(base=tmp_path, merged=tmp_path, report=tmp_path, enigne=None)


# ---- offline bench: the stages ---------------------------------------------------------------------------------


def test_plan_refuses_bad_settings_before_any_backend(tiny_arms, tmp_path, monkeypatch):
    from d2serve.bench.api import plan_bench
    from d2serve.bench.backends.hf import HFBackend

    monkeypatch.setattr(HFBackend, "__init__", lambda *a, **k: pytest.fail("a backend was built"))
    base, adapter, merged = tiny_arms
    common = dict(base=base, adapter=adapter, merged=merged, report=tmp_path / "r")
    with pytest.raises(InputError, match=r"^dtype 'int8' not supported"):
        plan_bench(BenchSettings(**common, dtype="int8"))
    with pytest.raises(InputError, match=r"^unknown workload\(s\) \['train'\]"):
        plan_bench(BenchSettings(**common, workloads=("eval", "train")))
    with pytest.raises(InputError, match=r"backend 'onnx' cannot run arm\(s\) \['unmerged'\]"):
        plan_bench(BenchSettings(**common, backend="onnx", arms=("base", "unmerged")))
    run = plan_bench(BenchSettings(**common, arms=("base", "merged", "unmerged")))
    assert [a.name for a in run.specs] == ["base", "merged", "unmerged"] and run.provenance["matches"]
    assert run.backend is None and run.results == {}
    assert not (tmp_path / "r").exists()  # nothing written by the plan


def test_stages_in_order_give_bench_s_report(tiny_arms, mc_file, tmp_path):  # noqa: F811
    from d2serve.bench.api import load_arms, measure, plan_bench, report_results
    from test_bench import MC_ROWS, TINY_PLAN

    base, adapter, merged = tiny_arms
    s = BenchSettings(base=base, adapter=adapter, merged=merged, report=tmp_path / "r", arms=("base", "merged"),
                      plan=replace(TINY_PLAN, repeats=1, batches=(1,)), eval_data=mc_file, progress=False)
    run = plan_bench(s)
    try:
        load_arms(run)
        assert set(run.results["arms"]) == {"base", "merged"} and run.results["comparability"]["comparable"]
        assert run.requests and [c.key for c in run.cases] == ["b1_p12_n5"]
        assert not (tmp_path / "r" / "bench.json").exists()  # loading measures nothing and writes nothing
        measure(run)
        assert run.results["status"] == "complete"
        res = report_results(run)
    finally:
        run.close()
    assert res is run.results
    on_disk = json.loads((tmp_path / "r" / "bench.json").read_text())
    assert on_disk["status"] == "complete" and set(on_disk["workloads"]) == {"eval_throughput", "generation"}
    ev = on_disk["workloads"]["eval_throughput"]
    assert len(ev["arms"]["merged"]["predictions"]) == ev["examples"] == min(len(MC_ROWS), TINY_PLAN.eval_examples)
    assert (tmp_path / "r" / "bench.md").stat().st_size > 0


# ---- online: the one sweep loop ---------------------------------------------------------------------------------


def _fake_vllm_result(argv: list[str], plan: OnlinePlan) -> dict:
    """What vLLM's load generator returns for one point: exact work, throughput encoding the arm and point."""
    a = dict(zip(argv[::2], argv[1::2]))
    tp = {"d2serve-a": 10.0, "d2serve-b": 20.0}[a["--model"]] + (1.0 if "--max-concurrency" in argv else 0.0)
    d = {"completed": plan.num_prompts, "failed": 0, "request_throughput": tp / 10, "output_throughput": tp,
         "total_token_throughput": 2 * tp, "input_lens": [plan.input_len] * plan.num_prompts,
         "output_lens": [plan.output_len] * plan.num_prompts, "errors": [""] * plan.num_prompts}
    for m in ("ttft", "tpot", "itl", "e2el"):
        d |= {f"{s}_{m}_ms": 100.0 / tp for s in ("mean", "median", "p90", "p99")}
    return d


class _Arm:
    def __init__(self, name):
        self.name, self.served_model_name = name, f"d2serve-{name}"


def _sweep(tmp_path, plan, log):
    from d2serve.bench.sweep import Sweep

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    results = {"schema_version": 1, "kind": "online_serving_endpoints", "status": "running",
               "plan": asdict(plan) | {"points": [p.key for p in plan.points()]}, "environment": {},
               "arms": {n: {"arm": n} for n in ("a", "b")}, "comparability": {"comparable": True, "diffs": []},
               "rounds": [], "points": {"a": {}, "b": {}}}
    return Sweep(plan, tmp_path, tmp_path, prompts, [_Arm("a"), _Arm("b")], results, log)


def test_the_sweep_rotates_arms_records_every_point_and_writes_the_report(tmp_path, monkeypatch):
    from d2serve.bench import sweep as sweep_mod

    plan = OnlinePlan(request_rates=(2.0,), concurrencies=(4,), num_prompts=3, input_len=8, output_len=4, repeats=3)
    calls, opened = [], []
    monkeypatch.setattr(sweep_mod, "run_vllm_bench",
                        lambda argv, log: calls.append(argv) or _fake_vllm_result(argv, plan))

    @contextlib.contextmanager
    def open_arm(arm, r, rnd, logs):
        opened.append((r, arm.name))
        rnd["port"] = 1000 + r
        yield f"http://127.0.0.1:{1000 + r}"

    lines = []
    sw = _sweep(tmp_path, plan, lines.append)
    res = sweep_mod.run_sweep(sw, open_arm)
    assert opened == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]  # arm order rotates per repeat
    assert [(x["repeat"], x["arm"], x["port"]) for x in res["rounds"]] == [(r, a, 1000 + r) for r, a in opened]
    assert all("load_avg_after" in x for x in res["rounds"])
    assert len(calls) == 6 * 2 and calls[0][calls[0].index("--base-url") + 1] == "http://127.0.0.1:1000"
    assert res["status"] == "complete"
    for arm, tp in (("a", 10.0), ("b", 20.0)):
        pts = res["points"][arm]
        assert set(pts) == {"rate_2", "concurrency_4"} and len(pts["rate_2"]["repeats"]) == 3
        assert pts["rate_2"]["summary"]["throughput"]["output_throughput"]["median"] == tp
        assert pts["concurrency_4"]["summary"]["throughput"]["output_throughput"]["median"] == tp + 1
        assert "input_lens" not in pts["rate_2"]["repeats"][0]  # per-request lists stay in raw/
    on_disk = json.loads((tmp_path / "online.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["points"]["b"]["rate_2"]["repeats"][2]["raw_file"] == \
        "raw/b-rate_2-r2.json"
    assert (tmp_path / "online.md").stat().st_size > 0
    assert sum("output tok/s" in m for m in lines) == 12


def test_a_point_that_did_not_do_the_fixed_work_fails_the_sweep_and_keeps_what_completed(tmp_path, monkeypatch):
    from d2serve.bench import sweep as sweep_mod

    plan = OnlinePlan(request_rates=(1.0,), concurrencies=(), num_prompts=2, input_len=8, output_len=4, repeats=1)
    seen = []

    def fake(argv, log):
        seen.append(argv)
        d = _fake_vllm_result(argv, plan)
        if len(seen) == 2:  # arm b's server stopped early: 3 tokens instead of 4
            d["output_lens"] = [4, 3]
        return d

    monkeypatch.setattr(sweep_mod, "run_vllm_bench", fake)
    sw = _sweep(tmp_path, plan, lambda m: None)
    with pytest.raises(CheckFailedError, match=r"arm 'b', load rate_1: .*output tokens \[3\] instead of 4"):
        sweep_mod.run_sweep(sw, lambda arm, r, rnd, logs: sweep_mod.running_server("http://h:1"))
    on_disk = json.loads((tmp_path / "online.json").read_text())
    assert on_disk["status"] == "failed" and set(on_disk["points"]["a"]) == {"rate_1"} and on_disk["points"]["b"] == {}


def test_both_online_modes_run_the_one_sweep(monkeypatch, tmp_path):
    """bench serve's started servers and --endpoint's running ones both measure through sweep.run_sweep."""
    import d2serve.bench.endpoints as endpoints
    import d2serve.bench.online as online

    ran = []
    monkeypatch.setattr(online, "run_sweep", lambda sw, open_arm: ran.append(("serve", open_arm)) or {})
    monkeypatch.setattr(endpoints, "run_sweep", lambda sw, open_arm: ran.append(("endpoints", open_arm)) or {})
    monkeypatch.setattr(online, "plan_serve", lambda s: type("R", (), {"engine": EngineOptions()})())
    monkeypatch.setattr(online, "load_serve", lambda run: None)
    monkeypatch.setattr(endpoints, "plan_endpoints", lambda s: ([], {}, [], []))
    monkeypatch.setattr(endpoints, "load_endpoints", lambda s, *a: None)
    s = ServeBenchSettings(base=tmp_path, report=tmp_path)
    online.serve_run(s)
    endpoints.endpoints_run(s)
    assert [k for k, _ in ran] == ["serve", "endpoints"]
    assert Path(online.__file__).read_text().count("run_vllm_bench") == 0  # the loop is sweep.py's alone
    assert Path(endpoints.__file__).read_text().count("run_vllm_bench") == 0
