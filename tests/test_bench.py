"""Tests of `d2serve bench` on the tiny Llama: comparability, statistics, report keys, quick run, Ctrl-C."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from d2serve.bench import QUICK_PLAN, NotComparableError, bench
from d2serve.bench.comparability import check_comparable, diff_settings
from d2serve.bench.ratios import pairwise_ratios
from d2serve.bench.timing import percentile, summarize
from d2serve.bench.workloads import load_mc_items, prompt_ids, tokenize_mc

TINY_PLAN = replace(QUICK_PLAN, eval_examples=6, eval_batch=4, batches=(1, 2), prompt_lens=(12,), max_new_tokens=5,
                    warmup=1, repeats=2)
MC_ROWS = [
    {"question": {"stem": "Is the sky blue?", "choices": [{"text": "yes", "label": "A"}, {"text": "no", "label": "B"}]},
     "answerKey": "A"},
    {"question": {"stem": "Is fire cold?", "choices": [{"text": "yes", "label": "A"}, {"text": "no", "label": "B"},
                                                       {"text": "to be or not", "label": "C"}]}, "answerKey": "B"},
    {"question": {"stem": "The quick brown fox jumps over the", "choices": [{"text": "lazy dog", "label": "1"},
                                                                           {"text": "sea", "label": "2"}]},
     "answerKey": "1"},
    {"passage": "The capital of France is Paris.", "question": "is paris the capital of france", "label": "true"},
]


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("mc") / "mc.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in MC_ROWS) + "\n")
    return p


@pytest.fixture(scope="module")
def tiny_arms(tiny_llama_dir, tmp_path_factory):
    """A random D2-LoRA adapter for the tiny Llama and its merged checkpoint."""
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.merge import merge

    d = tmp_path_factory.mktemp("bench_arms")
    adapter = random_adapter(tiny_llama_dir, d / "adapter", target_modules=("q_proj", "v_proj", "up_proj"), seed=3)
    merged = merge(base=tiny_llama_dir, adapter=adapter, out=d / "merged").out
    return tiny_llama_dir, adapter, merged


# ---- statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_percentiles_match_numpy(n):
    xs = np.random.default_rng(n).exponential(size=n).tolist()
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    s = summarize(xs, scale=1e3)
    assert s["p99"] == pytest.approx(float(np.percentile(xs, 99)) * 1e3)
    assert s["mean"] == pytest.approx(float(np.mean(xs)) * 1e3)
    assert s["std"] == pytest.approx(float(np.std(xs, ddof=1)) * 1e3 if n > 1 else 0.0)


def test_percentile_rejects_empty_and_bad_q():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_pairwise_ratios_are_per_repeat():
    r = pairwise_ratios({"merged": [2.0, 4.0, 9.0], "unmerged": [1.0, 1.0, 3.0], "base": [2.0, 5.0, 9.0]}, "x")
    assert r["spread"]["merged_over_unmerged"]["per_repeat"] == [2.0, 4.0, 3.0]
    assert r["merged_over_unmerged"] == 3.0  # median of per-repeat ratios, not ratio of medians (4/1)
    assert r["merged_over_base"] == 1.0
    assert r["merged_over_unmerged_cached"] is None


# ---- comparability ----------------------------------------------------------------------------


def test_diff_settings_ignores_only_adapter_mode():
    a = {"dtype": "float32", "threads": 2, "adapter_mode": "merged", "arm": "merged"}
    assert diff_settings("m", a, "u", a | {"adapter_mode": "unmerged", "arm": "unmerged"}).comparable
    d = diff_settings("m", a, "u", a | {"adapter_mode": "unmerged", "threads": 1})
    assert d.differences == {"threads": (2, 1)}
    assert "threads" in d.render() and "NOT COMPARABLE" in d.render()
    with pytest.raises(NotComparableError, match="threads"):
        check_comparable({"m": a, "u": a | {"threads": 1}})


def test_bench_refuses_arms_that_differ_beyond_adapter_mode(tiny_arms, mc_file, tmp_path):
    base, adapter, merged = tiny_arms
    with pytest.raises(NotComparableError, match="dtype"):
        bench(base=base, adapter=adapter, merged=merged, report=tmp_path / "r", plan=TINY_PLAN, eval_data=mc_file,
              progress=False, settings_override={"merged": {"dtype": "bfloat16"}})
    assert not (tmp_path / "r" / "bench.json").exists()  # refused before any timing
    res = bench(base=base, merged=merged, report=tmp_path / "r2", plan=TINY_PLAN, eval_data=mc_file,
                workloads=("eval",), progress=False, strict=False, settings_override={"merged": {"batches": [3]}})
    assert res["comparability"]["comparable"] is False
    assert "batches" in res["comparability"]["diffs"][0]
    assert "NOT COMPARABLE" in (tmp_path / "r2" / "bench.md").read_text()


# ---- workloads --------------------------------------------------------------------------------


def test_eval_scores_match_unbatched_reference(tiny_llama_dir, mc_file):
    """Batched, padded scoring picks the same answers as scoring each sequence alone."""
    from d2serve.bench.arms import ArmSpec
    from d2serve.bench.backends.hf import HFBackend

    be = HFBackend(dtype=torch.float32, device="cpu", tokenizer_dir=tiny_llama_dir)
    be.load(ArmSpec("base", tiny_llama_dir))
    items = load_mc_items(mc_file)
    assert [it.gold for it in items] == [0, 1, 0, 1]
    reqs = tokenize_mc(items, be.tokenizer)
    got = be.eval_once("base", reqs, batch=3)["pred"]
    model = be.models["base"]
    best = {}
    with torch.no_grad():
        for r in reqs:
            ids = torch.tensor([r.tokens])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            n = r.n_cont
            s = sum(logp[len(r.tokens) - n - 1 + k, r.tokens[len(r.tokens) - n + k]].item() for k in range(n))
            if r.example not in best or s > best[r.example][0]:
                best[r.example] = (s, r.choice)
    assert got == [best[i][1] for i in range(len(items))]


def test_prompt_ids_have_exact_length(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    rows = prompt_ids(tok, 37, 3)
    assert [len(r) for r in rows] == [37, 37, 37] and rows[0] != rows[1]


def test_bad_eval_data_names_the_file(tmp_path, tiny_llama_dir):
    from d2serve.bench import WorkloadError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(WorkloadError, match="bad.jsonl:1"):
        load_mc_items(bad)


# ---- the whole run ----------------------------------------------------------------------------


def test_quick_run_writes_report_with_stable_keys(tiny_arms, mc_file, tmp_path):
    base, adapter, merged = tiny_arms
    from typer.testing import CliRunner

    from d2serve.cli import app

    rep = tmp_path / "report"
    data = tmp_path / "data"  # --data DIR: verify's folder layout; the eval workload reads ARC-Easy/ARC-Easy-Test.jsonl
    (data / "ARC-Easy").mkdir(parents=True)
    (data / "ARC-Easy" / "ARC-Easy-Test.jsonl").write_bytes(mc_file.read_bytes())
    args = ["bench", "--base", str(base), "--adapter", str(adapter), "--merged", str(merged), "--report", str(rep),
            "--quick", "--data", str(data), "--batches", "1,2", "--prompt-lens", "12", "--max-new-tokens", "5",
            "--repeats", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "bench.md" in r.output
    for f in ("bench.json", "bench.md", "throughput_vs_batch.png", "latency_cdf.png"):
        assert (rep / f).stat().st_size > 0, f
    res = json.loads((rep / "bench.json").read_text())
    assert res["status"] == "complete" and res["comparability"]["comparable"] is True
    assert set(res["arms"]) == {"base", "merged", "unmerged", "unmerged_cached"}
    assert {s["adapter_mode"] for s in res["arms"].values()} == {"none", "merged", "unmerged", "unmerged_cached_scale"}
    for key in ("cpu_model", "torch_threads", "versions", "logical_cpus"):
        assert key in res["environment"]
    ev, gen = res["workloads"]["eval_throughput"], res["workloads"]["generation"]
    for wl in (ev, gen):
        assert wl["ratios"]["merged_over_unmerged"] > 0 and wl["ratios"]["merged_over_base"] > 0
    # pair-wise: the reported median equals the median of per-repeat ratios computed from the samples
    m, u = ev["arms"]["merged"]["samples"]["examples_per_s"], ev["arms"]["unmerged"]["samples"]["examples_per_s"]
    assert ev["ratios"]["merged_over_unmerged"] == pytest.approx(float(np.median([a / b for a, b in zip(m, u)])))
    # the merged model answers like the unmerged one (fidelity before speed)
    assert ev["arms"]["merged"]["accuracy"] == ev["arms"]["unmerged"]["accuracy"]
    assert set(gen["cases"]) == {"b1_p12_n5", "b2_p12_n5"}
    case = gen["cases"]["b2_p12_n5"]
    for arm in res["arms"]:
        a = case["arms"][arm]
        assert a["ttft_ms"]["n"] == 2 and len(a["samples"]["itl_ms"]) == 2 * 4  # 5 tokens -> 4 gaps per run
        assert a["tpot_ms"]["p50"] > 0 and a["decode_tokens_per_s"]["p50"] > 0
        assert gen["kv_cache"][arm]["past_key_values_returned"] is True
    assert "merged_over_unmerged" in case["ratios"]


def test_interrupt_keeps_completed_results(tiny_arms, mc_file, tmp_path, monkeypatch):
    from d2serve.bench.backends.hf import HFBackend

    base, adapter, merged = tiny_arms

    def boom(self, arm, case):
        raise KeyboardInterrupt

    monkeypatch.setattr(HFBackend, "generate_once", boom)
    with pytest.raises(KeyboardInterrupt):
        bench(base=base, adapter=adapter, merged=merged, report=tmp_path / "r", plan=TINY_PLAN, eval_data=mc_file,
              progress=False)
    res = json.loads((tmp_path / "r" / "bench.json").read_text())
    assert res["status"] == "interrupted"
    assert res["workloads"]["eval_throughput"]["arms"]["merged"]["examples_per_s"]["n"] == TINY_PLAN.repeats
    assert "interrupted" in (tmp_path / "r" / "bench.md").read_text()


@pytest.mark.extras
def test_backend_refuses_unsupported_arm(tiny_arms, tmp_path):
    base, adapter, merged = tiny_arms
    with pytest.raises(ValueError, match="cannot run arm"):
        bench(base=base, adapter=adapter, merged=merged, report=tmp_path / "r", backend="vllm",
              arms=("base", "unmerged_cached"), progress=False)


def test_interrupt_mid_workload_keeps_completed_repeats(tiny_arms, mc_file, tmp_path, monkeypatch):
    from d2serve.bench.backends.hf import HFBackend

    base, adapter, merged = tiny_arms
    real = HFBackend.eval_once
    calls = {"n": 0}
    n_arms = 4
    stop_at = n_arms * TINY_PLAN.warmup + n_arms + 1  # warm-ups, one full repeat, then Ctrl-C

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(HFBackend, "eval_once", flaky)
    with pytest.raises(KeyboardInterrupt):
        bench(base=base, adapter=adapter, merged=merged, report=tmp_path / "r", plan=TINY_PLAN, eval_data=mc_file,
              progress=False)
    res = json.loads((tmp_path / "r" / "bench.json").read_text())
    ev = res["workloads"]["eval_throughput"]
    assert res["status"] == "interrupted"
    assert {a: v["examples_per_s"]["n"] for a, v in ev["arms"].items()} == {a: 1 for a in res["arms"]}
    assert len(ev["ratios"]["spread"]["merged_over_unmerged"]["per_repeat"]) == 1


def test_report_renders_a_case_without_decode_samples(tiny_arms, tmp_path):
    """A case whose N-token call was not slower than its 1-token call has no decode tokens/s sample (nothing to
    divide by): the report shows "-" there instead of failing."""
    from d2serve.bench.report import render_markdown

    base, adapter, merged = tiny_arms
    res = bench(base=base, adapter=adapter, merged=merged, report=tmp_path / "r", arms=("base", "merged"),
                plan=TINY_PLAN, workloads=("generation",), progress=False)
    for c in res["workloads"]["generation"]["cases"].values():
        for a in c["arms"].values():
            a.pop("decode_tokens_per_s")
    rows = [ln for ln in render_markdown(res).splitlines() if ln.startswith("| b") and ln.split("|")[2].strip()
            in ("base", "merged")]  # the per-arm rows of the generation table
    assert rows and all(ln.rstrip().endswith("| - |") for ln in rows), rows


# ---- the plugin-cost control arm (vanilla_lora) -----------------------------------------------------------------


def test_vanilla_lora_arm_is_opt_in_and_vllm_only(tiny_arms, mc_file, tmp_path):
    """``vanilla_lora`` never joins the default arm set, and the hf backend refuses it by name."""
    base, adapter, merged = tiny_arms
    res = bench(base=base, adapter=adapter, merged=merged, report=tmp_path / "r", plan=TINY_PLAN, eval_data=mc_file,
                workloads=("eval",), progress=False)
    assert set(res["arms"]) == {"base", "merged", "unmerged", "unmerged_cached"}
    assert res["workloads"]["eval_throughput"]["ratios"]["vanilla_lora_over_unmerged"] is None
    with pytest.raises(ValueError, match=r"cannot run arm\(s\) \['vanilla_lora'\]"):
        bench(base=base, adapter=adapter, report=tmp_path / "r2", arms=("unmerged", "vanilla_lora"), progress=False)


def test_plugin_cost_ratio_and_report(tiny_arms):
    """vanilla_lora_over_unmerged = vanilla throughput / plugin throughput per repeat = plugin time / vanilla time;
    the report prints it for eval and per case for decode, TTFT and end-to-end time."""
    from d2serve.bench.report import PLUGIN_COST, render_markdown

    r = pairwise_ratios({"unmerged": [10.0, 8.0, 9.0], "vanilla_lora": [10.5, 8.0, 9.9]}, "examples_per_s")
    assert r["spread"]["vanilla_lora_over_unmerged"]["per_repeat"] == pytest.approx([1.05, 1.0, 1.1])
    assert r["vanilla_lora_over_unmerged"] == pytest.approx(1.05)
    gen_arm = {"ttft_ms": {"p50": 1, "p90": 1, "p99": 1}, "tpot_ms": {"p50": 1}, "e2e_ms": {"p50": 1, "p90": 1, "p99": 1}}
    by = {m: pairwise_ratios({"unmerged": [1.0, 1.0], "vanilla_lora": [1.02, 1.04]}, m)
          for m in ("decode_tokens_per_s", "prefill_tokens_per_s")}
    res = {"backend": "vllm", "status": "complete", "plan": {"warmup": 0, "repeats": 3}, "arms": {},
           "workloads": {
               "eval_throughput": {"dataset": "x.jsonl", "examples": 3, "batch": 1, "ratios": r,
                                   "arms": {"unmerged": {"examples_per_s": {"p50": 9.0, "min": 8.0, "max": 10.0}}}},
               "generation": {"max_new_tokens": 4, "ratios": {}, "cases": {"b1_p8_n4": {
                   "arms": {"unmerged": gen_arm}, "ratios": pairwise_ratios(
                       {"unmerged": [1.0, 1.0], "vanilla_lora": [1.01, 1.03]}, "tokens_per_s"),
                   "ratios_by_metric": by}}}}}
    md = render_markdown(res)
    assert f"- {PLUGIN_COST}, eval time: 1.050 [1.000, 1.100]" in md
    assert "| b1_p8_n4 | 1.030 [1.020, 1.040] | 1.030 [1.020, 1.040] | 1.020 [1.010, 1.030] |" in md


def test_plain_lora_copy_keeps_the_tensors_and_drops_the_scales(tiny_llama_dir, tmp_path):
    """The control's folder: the folded lora_A/lora_B file byte for byte, a PEFT LoRA config without use_dora or
    d2serve's marker (what vanilla vLLM serves as a plain LoRA), no scales file; a folder without weights is
    refused by name."""
    import shutil

    from d2serve.adapters.synthetic import random_adapter
    from d2serve.bench.backends.vllm import plain_lora_copy
    from d2serve.errors import InputError
    from d2serve.export.vllm_lora import MARKER, SCALES_NAME, export_vllm_lora

    adapter = random_adapter(tiny_llama_dir, tmp_path / "d2", method="d2lora", r=2, lora_alpha=4.0, std=0.1, seed=1)
    folded = tmp_path / "folded"
    export_vllm_lora(base=tiny_llama_dir, adapter=adapter, out=folded)
    src_cfg = json.loads((folded / "adapter_config.json").read_text())
    assert src_cfg["use_dora"] is True and MARKER in src_cfg  # what the plugin needs, vanilla vLLM refuses
    out = plain_lora_copy(folded)
    try:
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["use_dora"] is False and MARKER not in cfg
        assert {k: v for k, v in cfg.items() if k not in ("use_dora",)} == {
            k: v for k, v in src_cfg.items() if k not in ("use_dora", MARKER)}
        assert (out / "adapter_model.safetensors").read_bytes() == (folded / "adapter_model.safetensors").read_bytes()
        assert not (out / SCALES_NAME).exists() and (folded / SCALES_NAME).is_file()
    finally:
        shutil.rmtree(out.parent)
    (folded / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="adapter_model.safetensors: missing"):
        plain_lora_copy(folded)
