"""Task loading from the local data files, lm-eval scoring vs hand-computed log-likelihoods, paired statistics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from d2serve.models import load_hf_model, load_tokenizer
from d2serve.verify.data import DataNotFoundError, resolve_data_dir
from d2serve.verify.stats import bootstrap_gap_ci, compare_paired, mcnemar_exact
from d2serve.verify.tasks import TASKS, hf_lm, parse_task_names, score_tasks
from d2serve.verify.weights import ulp

DATA = resolve_data_dir()


@pytest.mark.parametrize(
    "name,n", [("boolq", 3270), ("arc_easy", 2376), ("arc_challenge", 1172), ("piqa", 1838), ("openbookqa", 500),
               ("social_iqa", 1954)]
)
def test_loaders_read_the_local_files(name, n):
    docs = TASKS[name].loader(DATA)
    assert len(docs) == n


def test_loader_conversions():
    boolq = TASKS["boolq"].loader(DATA)
    assert {d["label"] for d in boolq} == {0, 1}
    first = (DATA / "boolq/val.jsonl").read_text().splitlines()[0]
    assert boolq[0]["label"] == int('"label": "true"' in first)
    arc = TASKS["arc_easy"].loader(DATA)
    numeric = [d for d in arc if d["answerKey"] in "1234"]
    assert len(numeric) == 97 and all(d["answerKey"] in d["choices"]["label"] for d in numeric)
    obqa = TASKS["openbookqa"].loader(DATA)
    assert all(d["choices"]["label"] == ["A", "B", "C", "D"] and len(d["choices"]["text"]) == 4 for d in obqa)
    piqa = TASKS["piqa"].loader(DATA)
    labels = [int(x) for x in (DATA / "piqa/valid-labels.lst").read_text().split()]
    assert [d["label"] for d in piqa] == labels
    siqa = TASKS["social_iqa"].loader(DATA)
    assert siqa[0]["label"] == "3" and siqa[0]["answerC"] == "Find somewhere to go"


def _upstream(rel: str) -> dict:
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    cfg = yaml.safe_load((root / rel).read_text())
    if "include" in cfg:
        cfg = {**_upstream(str(Path(rel).parent / cfg.pop("include"))), **cfg}
    return cfg


@pytest.mark.parametrize("name", list(TASKS))
def test_prompts_equal_lm_eval_upstream_yaml(name):
    spec = TASKS[name]
    up = _upstream(spec.upstream_yaml)
    for key, value in spec.prompt.items():
        assert up[key] == value, (name, key)
    assert up.get("target_delimiter", " ") == spec.prompt.get("target_delimiter", " ")
    assert [m["metric"] for m in up["metric_list"]] == list(spec.metrics)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("D2SERVE_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("D2SERVE_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError, match="D2SERVE_DATA_DIR"):
        resolve_data_dir()
    with pytest.raises(ValueError, match="unknown task"):
        parse_task_names("arc_easy,mmlu")


def _hand_loglik(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), tokenised as lm-eval does (whole string, context prefix)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_scoring_matches_hand_computed_loglikelihoods(tiny_llama_dir):
    model, tok = load_hf_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    scores = score_tasks(hf_lm(model, tok, batch_size=4), ("arc_easy", "piqa"), DATA, limit=3)
    arc = TASKS["arc_easy"].loader(DATA)[:3]
    piqa = TASKS["piqa"].loader(DATA)[:3]
    cases = {
        "arc_easy": [(f"Question: {d['question']}\nAnswer:", d["choices"]["text"],
                      d["choices"]["label"].index(d["answerKey"])) for d in arc],
        "piqa": [(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]) for d in piqa],
    }
    for name, items in cases.items():
        s = scores[name]
        assert s.n == 3
        for i, (ctx, choices, target) in enumerate(items):
            assert len(tok(ctx + " " + max(choices, key=len))["input_ids"]) < 256  # no truncation in play
            hand = [_hand_loglik(model, tok, ctx, " " + c) for c in choices]
            assert s.loglikelihoods[i] == pytest.approx(hand, abs=1e-4)
            pred = max(range(len(hand)), key=hand.__getitem__)
            assert s.predictions[i] == pred and s.targets[i] == target
            assert s.correct[i] == (pred == target)
            # acc_norm: log-likelihood per byte of the continuation
            norm = [h / len((" " + c).encode()) for h, c in zip(hand, choices)]
            assert s.correct_norm[i] == (max(range(len(norm)), key=norm.__getitem__) == target)
    assert scores["arc_easy"].acc == sum(scores["arc_easy"].correct) / 3


def test_mcnemar_and_bootstrap_by_hand():
    a = [True] * 5 + [False] * 3 + [True] * 2
    b = [False] * 5 + [False] * 3 + [True] * 2
    only_a, only_b, p = mcnemar_exact(a, b)
    assert (only_a, only_b) == (5, 0) and p == pytest.approx(2 * 0.5**5)
    assert mcnemar_exact(a, a) == (0, 0, 1.0)
    pc = compare_paired(a, b)
    assert pc.gap_pp == pytest.approx(-50.0) and pc.n_flipped == 5
    lo, hi = bootstrap_gap_ci(a, b, iters=500)
    assert lo <= -50.0 <= hi and hi < 0
    assert bootstrap_gap_ci(a, a) == (0.0, 0.0)


def test_ulp():
    x = torch.tensor([1.0, 0.75, 3.0, -2.0], dtype=torch.float64)
    assert ulp(x, torch.bfloat16).tolist() == [2**-7, 2**-8, 2**-6, 2**-6]
    assert ulp(x, torch.float32).tolist() == [2**-23, 2**-24, 2**-22, 2**-22]
    y = torch.tensor([1.0 + 2**-7], dtype=torch.float64)
    assert float(y.to(torch.bfloat16).double() - 1.0) == pytest.approx(float(ulp(y, torch.bfloat16)[0]))
    assert math.isclose(float(ulp(torch.tensor([0.0], dtype=torch.float64), torch.float32)[0]),
                        torch.finfo(torch.float32).tiny * torch.finfo(torch.float32).eps)
