"""`d2serve bench serve`: the online serving benchmark.

Fast tests (no server): an unfair pair (a merged checkpoint whose dtype and tokenizer differ from the base's)
is refused with exit 1 and the diff printed, or labelled with --allow-not-comparable; the prompt file has the
exact token length; the `bench` group keeps the offline syntax. The vllm-marked test runs the whole thing on a
tiny vLLM-compatible Llama (head_dim 32): two servers, one request rate, one concurrency, a few prompts.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from d2serve.bench.online import (
    EngineOptions,
    OnlinePlan,
    arm_settings,
    bench_serve,
    plan_arms,
)
from d2serve.bench.sweep import max_sustainable_rate, summarize_point
from d2serve.bench.online_data import build_prompts, write_prompts
from d2serve.cli import app

import conftest


def make_vllm_tiny_llama(out: Path, seed: int = 0) -> Path:
    """The vLLM-sized tiny Llama (conftest), max_position_embeddings 256, weights N(0, 0.1)."""
    return conftest.make_vllm_tiny_llama(out, seed=seed, std=0.1, max_position_embeddings=256)


@pytest.fixture(scope="module")
def serve_arms(tmp_path_factory):
    """(base, adapter, merged) of the vLLM-compatible tiny Llama; merged by d2serve merge (with its manifest)."""
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.merge import merge

    root = tmp_path_factory.mktemp("bench_serve")
    base = make_vllm_tiny_llama(root / "base")
    adapter = random_adapter(base, root / "adapter", std=0.05, seed=3)
    merge(base=base, adapter=adapter, out=root / "merged")
    return base, adapter, root / "merged"


def _unfair_copy(merged: Path, dst: Path) -> Path:
    """The merged checkpoint with a float16 config dtype and an edited tokenizer: what the fairness check must catch."""
    shutil.copytree(merged, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((dst / "tokenizer_config.json").read_text())
    tc["model_max_length"] = 7
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    return dst


@pytest.mark.extras
def test_unfair_pair_is_refused_with_the_diff(serve_arms, tmp_path):
    base, adapter, merged = serve_arms
    unfair = _unfair_copy(merged, tmp_path / "unfair")
    rep = tmp_path / "rep"
    r = CliRunner().invoke(app, ["bench", "serve", "--base", str(base), "--merged", str(unfair),
                                 "--adapter", str(adapter), "--report", str(rep)])
    assert r.exit_code == 1, r.output
    out = " ".join(r.output.split())
    assert "NOT COMPARABLE" in out and "dtype: base='float32' merged='float16'" in out
    assert "tokenizer_sha256" in out and "server_args" in out
    assert not (rep / "online.json").exists()  # refused before any server starts or anything is written


@pytest.mark.extras
def test_unfair_pair_labelled_when_allowed(serve_arms, tmp_path):
    """The settings diff itself, without the CLI: dtype/tokenizer differences are found, the merged path and its
    (unapplied) generation config are not differences."""
    from d2serve.bench.comparability import check_comparable
    from d2serve.bench.online import ALLOWED_TO_DIFFER

    base, adapter, merged = serve_arms
    unfair = _unfair_copy(merged, tmp_path / "unfair")
    specs, _ = plan_arms(base=base, merged=unfair, adapter=adapter, arms=("base", "merged"))
    plan, eng = OnlinePlan(), EngineOptions()
    s = {a.name: arm_settings(a, plan=plan, engine=eng, prompts_sha256="x") for a in specs}
    (d,) = check_comparable(s, strict=False, allowed=ALLOWED_TO_DIFFER)
    assert set(d.differences) == {"dtype", "server_args", "tokenizer_sha256"}
    assert d.differences["dtype"] == ("float32", "float16")
    fair = {a.name: arm_settings(a, plan=plan, engine=eng, prompts_sha256="x")
            for a in plan_arms(base=base, merged=merged, adapter=adapter, arms=("base", "merged"))[0]}
    (d,) = check_comparable(fair, strict=True, allowed=ALLOWED_TO_DIFFER)
    assert d.comparable
    # a merged checkpoint of another base is refused through its manifest (sha256 of the base shards)
    other = make_vllm_tiny_llama(tmp_path / "other_base", seed=9)
    r = CliRunner().invoke(app, ["bench", "serve", "--base", str(other), "--merged", str(merged),
                                 "--report", str(tmp_path / "rep2")])
    assert r.exit_code == 1 and "was not made from base" in " ".join(r.output.split()), r.output


def test_prompts_have_the_exact_token_length(serve_arms, tmp_path):
    from transformers import AutoTokenizer

    base, _, _ = serve_arms
    tok = AutoTokenizer.from_pretrained(str(base))
    ps = build_prompts(tok, input_len=24, num_prompts=6)
    assert len(ps) == len(set(ps)) == 6
    assert [len(tok(p)["input_ids"]) for p in ps] == [24] * 6
    h1, h2 = write_prompts(tmp_path / "a.jsonl", ps), write_prompts(tmp_path / "b.jsonl", ps[::-1])
    assert h1 != h2 and json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0]) == {"prompt": ps[0]}


def test_sustainable_rate_and_summary_from_vllm_results():
    """Aggregation from vLLM result dicts: medians over repeats, SLO attainment = goodput / throughput."""
    plan = OnlinePlan(request_rates=(1, 2, 4), concurrencies=(), repeats=2, goodput={"ttft": 100})

    def rep(tp, good, failed=0):
        d = {"request_throughput": tp, "request_goodput": good, "output_throughput": 10 * tp,
             "total_token_throughput": 50 * tp, "failed": failed, "completed": 8 - failed}
        for m in ("ttft", "tpot", "itl", "e2el"):
            d |= {f"mean_{m}_ms": tp, f"median_{m}_ms": tp, f"p90_{m}_ms": 2 * tp, f"p99_{m}_ms": 3 * tp}
        return d

    pts = {"rate_1": [rep(1.0, 1.0), rep(1.0, 0.95)], "rate_2": [rep(2.0, 1.9), rep(2.0, 1.8)],
           "rate_4": [rep(3.0, 1.5), rep(3.0, 3.0)]}
    points = {}
    for k, reps in pts.items():
        points[k] = {"kind": "rate", "value": float(k.split("_")[1]), "repeats": reps,
                     "summary": summarize_point(reps, plan)}
    assert points["rate_2"]["summary"]["slo_attainment"] == pytest.approx(0.925)
    assert points["rate_4"]["summary"]["slo_attainment"] == pytest.approx(0.75)
    assert points["rate_2"]["summary"]["latency_ms"]["e2el"]["p99"] == pytest.approx(6.0)
    assert points["rate_4"]["summary"]["throughput"]["request_goodput"] == {"median": 2.25, "min": 1.5, "max": 3.0}
    assert max_sustainable_rate(points, plan)["rate"] == 2.0
    points["rate_2"]["summary"]["failed"] = 1  # a failed request makes a rate unsustainable
    assert max_sustainable_rate(points, plan)["sustainable_rates"] == [1.0]
    assert max_sustainable_rate(points, OnlinePlan())["rate"] is None  # no SLO: no claim


@pytest.mark.parametrize("bad", [{"request_rates": (0,)}, {"concurrencies": (0,)}, {"output_len": 0},
                                 {"goodput": {"latency": 5.0}}, {"slo_attainment": 1.5},
                                 {"request_rates": (math.inf,)}])
def test_bad_plan_is_input_error(bad):
    from d2serve.errors import InputError

    with pytest.raises(InputError):
        OnlinePlan(**bad).validate()


def test_offline_bench_syntax_still_routes_to_the_offline_command():
    r = CliRunner().invoke(app, ["bench", "--help"])
    assert r.exit_code == 0 and "--workloads" in r.output and "bench serve" in r.output
    r = CliRunner().invoke(app, ["bench", "serve", "--help"])
    assert r.exit_code == 0 and "--request-rates" in r.output and "--goodput" in r.output


@pytest.mark.vllm
def test_tiny_online_run_writes_the_schema(serve_arms, tmp_path):
    """Two servers (base, merged), one Poisson rate and one concurrency point, 6 prompts of 16 tokens, 4 output
    tokens: every request completes with exactly that work, and the report carries vLLM's keys, our aggregates,
    the ratios, the sustainable rate and the plots; no server process is left."""
    import psutil

    base, adapter, merged = serve_arms
    rep = tmp_path / "rep"
    plan = OnlinePlan(request_rates=(4.0,), concurrencies=(2,), num_prompts=6, input_len=16, output_len=4,
                      repeats=1, warmups=1, goodput={"ttft": 60000, "e2el": 120000})
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    res = bench_serve(base=base, merged=merged, report=rep, plan=plan, arms=("base", "merged"),
                      engine=EngineOptions(max_num_seqs=4, kv_cache_gib=1))
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before  # servers stopped
    assert res["status"] == "complete" and res["comparability"]["comparable"]
    assert set(res["points"]) == {"base", "merged"}
    for arm in ("base", "merged"):
        for key in ("rate_4", "concurrency_2"):
            p = res["points"][arm][key]
            (r,) = p["repeats"]
            assert r["completed"] == 6 and r["failed"] == 0 and r["total_output_tokens"] == 6 * 4
            assert r["total_input_tokens"] == 6 * 16
            for k in ("median_ttft_ms", "p99_tpot_ms", "p90_itl_ms", "mean_e2el_ms", "request_throughput",
                      "output_throughput", "request_goodput", "max_concurrency", "request_rate"):
                assert k in r, k
            assert r["median_ttft_ms"] > 0 and r["median_e2el_ms"] >= r["median_ttft_ms"]
            raw = json.loads((rep / r["raw_file"]).read_text())  # vLLM's own file, per-request lists included
            assert raw["output_lens"] == [4] * 6 and len(raw["ttfts"]) == 6 and len(raw["itls"][0]) == 3
            assert p["summary"]["slo_attainment"] == 1.0
        assert res["max_sustainable_rate"][arm]["rate"] == 4.0
    assert res["points"]["base"]["concurrency_2"]["repeats"][0]["max_concurrency"] == 2
    r = res["ratios"]["rate_4"]["output_throughput"]
    b = res["points"]["base"]["rate_4"]["repeats"][0]["output_throughput"]
    m = res["points"]["merged"]["rate_4"]["repeats"][0]["output_throughput"]
    assert r["merged_over_base"] == pytest.approx(m / b)
    assert set(res["plots"]) == {"latency_vs_rate.png", "throughput_vs_concurrency.png", "pareto.png"}
    assert all((rep / f).stat().st_size > 5000 for f in res["plots"])
    md = (rep / "online.md").read_text()
    assert "merged/base" in md and "Highest sustainable" in md and "--generation-config vllm" in md
    assert json.loads((rep / "online.json").read_text())["status"] == "complete"
    assert len(res["rounds"]) == 2 and all(x["load_avg_after"] for x in res["rounds"])


@pytest.mark.vllm
def test_tiny_online_run_with_the_unmerged_arm(serve_arms, tmp_path):
    """The unmerged arm: `d2serve serve --adapter` (d2serve's vLLM plugin) beside the merged arm, one rate point:
    every request completes with exactly the planned work and merged/unmerged ratios are reported."""
    from d2serve.bench.online import unmerged_arm_available

    assert unmerged_arm_available()  # the plugin is part of the package: the arm must run, never be skipped
    base, adapter, merged = serve_arms
    rep = tmp_path / "rep"
    plan = OnlinePlan(request_rates=(4.0,), concurrencies=(), num_prompts=4, input_len=16, output_len=4,
                      repeats=1, warmups=1, goodput={"ttft": 60000, "e2el": 120000})
    res = bench_serve(base=base, merged=merged, adapter=adapter, report=rep, plan=plan, arms=("merged", "unmerged"),
                      engine=EngineOptions(max_num_seqs=4, kv_cache_gib=1))
    assert res["status"] == "complete" and set(res["points"]) == {"merged", "unmerged"}
    for arm in ("merged", "unmerged"):
        (r,) = res["points"][arm]["rate_4"]["repeats"]
        assert r["completed"] == 4 and r["failed"] == 0 and r["total_output_tokens"] == 4 * 4
    assert res["ratios"]["rate_4"]["output_throughput"]["merged_over_unmerged"] > 0
