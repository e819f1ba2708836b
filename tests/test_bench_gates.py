"""bench refuses what it cannot compare: a merged checkpoint of another base/adapter, a different
generation_config.json, a NaN score; the vLLM arms run without prefix caching unless asked."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from safetensors.torch import load_file, save_file

from d2serve.bench import QUICK_PLAN, NotComparableError, bench
from d2serve.compare import NonFiniteError

PLAN = replace(QUICK_PLAN, eval_examples=2, eval_batch=2, batches=(1,), prompt_lens=(8,), max_new_tokens=3,
               warmup=0, repeats=1)
ROWS = [
    {"question": {"stem": "Is the sky blue?", "choices": [{"text": "yes", "label": "A"}, {"text": "no", "label": "B"}]},
     "answerKey": "A"},
    {"question": {"stem": "Is fire cold?", "choices": [{"text": "yes", "label": "A"}, {"text": "no", "label": "B"}]},
     "answerKey": "B"},
]


@pytest.fixture(scope="module")
def arms(tiny_llama_dir, tmp_path_factory):
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.merge import merge

    d = tmp_path_factory.mktemp("bench_gates")
    adapter = random_adapter(tiny_llama_dir, d / "adapter", target_modules=("q_proj", "v_proj"), seed=3)
    other = random_adapter(tiny_llama_dir, d / "other_adapter", target_modules=("q_proj", "v_proj"), seed=4)
    merged = merge(base=tiny_llama_dir, adapter=adapter, out=d / "merged").out
    mc = d / "mc.jsonl"
    mc.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return {"d": d, "base": tiny_llama_dir, "adapter": adapter, "other": other, "merged": merged, "mc": mc}


def _run(a, tmp_path, **kw):
    args = dict(base=a["base"], adapter=a["adapter"], merged=a["merged"], report=tmp_path / "rep", plan=PLAN,
                eval_data=a["mc"], threads=1, progress=False, arms=("merged", "unmerged"), workloads=("eval",))
    return bench(**(args | kw))


def test_matching_merge_is_comparable_and_recorded(arms, tmp_path):
    res = _run(arms, tmp_path)
    prov = res["comparability"]["merged_provenance"]
    assert prov["matches"] is True and prov["problems"] == []
    assert prov["checked_files"] == 1 + 2  # one base shard, adapter config + weights
    assert res["comparability"]["comparable"] is True
    gc = {n: s["generation_config"] for n, s in res["arms"].items()}
    assert gc["merged"] == gc["unmerged"] and gc["merged"]["eos_token_id"] is not None


def test_merged_from_another_adapter_is_refused_naming_the_file(arms, tmp_path):
    with pytest.raises(NotComparableError) as ei:
        _run(arms, tmp_path, adapter=arms["other"])
    msg = str(ei.value)
    assert "was not made from base" in msg and str(arms["other"] / "adapter_model.safetensors") in msg
    assert "sha256" in msg
    assert not (tmp_path / "rep" / "bench.json").exists()  # refused before any timing
    # without strict: labelled NOT COMPARABLE and recorded
    res = _run(arms, tmp_path, adapter=arms["other"], strict=False)
    assert res["comparability"]["comparable"] is False
    assert res["comparability"]["merged_provenance"]["matches"] is False
    assert any("not made from this base + adapter" in d for d in res["comparability"]["diffs"])


def test_merged_without_manifest_is_refused(arms, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(arms["merged"], bare)
    (bare / "d2serve_merge.json").unlink()
    with pytest.raises(NotComparableError, match="d2serve_merge.json: missing"):
        _run(arms, tmp_path, merged=bare)


def test_generation_config_difference_is_not_comparable(arms, tmp_path):
    penalised = tmp_path / "penalised"
    shutil.copytree(arms["merged"], penalised)
    cfg = json.loads((penalised / "generation_config.json").read_text())
    (penalised / "generation_config.json").write_text(json.dumps(cfg | {"repetition_penalty": 1.3}))
    with pytest.raises(NotComparableError, match="generation_config"):
        _run(arms, tmp_path, merged=penalised)
    res = _run(arms, tmp_path, merged=penalised, strict=False)
    assert res["comparability"]["comparable"] is False
    assert any("repetition_penalty" in d for d in res["comparability"]["diffs"])


def test_nan_score_is_a_named_failure(arms, tmp_path):
    bad = tmp_path / "nan_merged"
    shutil.copytree(arms["merged"], bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")  # not adapted: the merge manifest's sums still hold
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=r"bench eval, arm 'merged', example 0 choice 0: continuation"):
        _run(arms, tmp_path, merged=bad)


@pytest.mark.extras
def test_vllm_backend_records_prefix_caching_off(tiny_llama_dir):
    from d2serve.bench.backends.vllm import VLLMBackend
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vllm is part of the pinned environment")
    be = VLLMBackend(dtype="float32", device="cpu", tokenizer_dir=tiny_llama_dir)
    assert be.settings()["enable_prefix_caching"] is False
    be2 = VLLMBackend(dtype="float32", device="cpu", tokenizer_dir=tiny_llama_dir, prefix_caching=True)
    assert be2.settings()["enable_prefix_caching"] is True
