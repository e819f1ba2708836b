"""Task loading from the bundled / --data files, lm-eval scoring vs hand-computed log-likelihoods, user task YAMLs,
lm-eval names without cached data, paired statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from d2serve.models import load_hf_model, load_tokenizer
from d2serve.verify.data import BUNDLED_DATA_DIR, DataNotFoundError, data_file, resolve_data_dir
from d2serve.verify.stats import bootstrap_gap_ci, compare_paired, mcnemar_exact
from d2serve.verify.tasks import TASKS, TaskNotAvailableError, hf_lm, load_tasks, parse_task_names, score_tasks
from d2serve.verify.weights import ulp

DATA = BUNDLED_DATA_DIR  # the samples shipped in the package (the default data folder)


@pytest.mark.parametrize("name", list(TASKS))
def test_loaders_read_the_bundled_samples(name):
    """Each bundled file holds the first 200 upstream items (a byte-exact prefix: whole lines, no trailing partial row)."""
    docs = TASKS[name].loader(DATA)
    assert len(docs) == 200
    for rel in TASKS[name].files:
        assert data_file(DATA, rel).read_bytes().endswith(b"\n")


def test_default_data_dir_is_the_bundled_samples(monkeypatch):
    monkeypatch.delenv("D2SERVE_DATA_DIR", raising=False)
    assert resolve_data_dir() == DATA
    assert DATA.parts[-3:] == ("d2serve", "data", "eval")
    # enough WikiText-2 for verify's default 4 windows x 256 tokens (whole lines, upstream's CRLF kept)
    text = (DATA / "text/wiki.test.raw").read_bytes()
    assert 120_000 < len(text) < 150_000 and text.startswith(b" = Robert Boulter = ") and text.endswith(b"\n")


def test_loader_conversions():
    boolq = TASKS["boolq"].loader(DATA)
    assert {d["label"] for d in boolq} == {0, 1}
    first = (DATA / "boolq/val.jsonl").read_text().splitlines()[0]
    assert boolq[0]["label"] == int('"label": "true"' in first)
    arc = TASKS["arc_easy"].loader(DATA)
    numeric = [d for d in arc if d["answerKey"] in "1234"]
    assert len(numeric) == 8 and all(d["answerKey"] in d["choices"]["label"] for d in numeric)
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


def _small_data_dir(root: Path, n: int) -> Path:
    """A --data folder in the upstream layout with the first ``n`` items of every bundled file (labels alike)."""
    for src in DATA.rglob("*"):
        if src.is_file():
            dst = root / src.relative_to(DATA)
            dst.parent.mkdir(parents=True, exist_ok=True)
            lines = src.read_bytes().splitlines(keepends=True)
            keep = n + 1 if src.suffix == ".tsv" else n  # the TSV has a header row
            dst.write_bytes(b"".join(lines[:keep]) if src.parent.name != "text" else src.read_bytes())
    return root


def test_data_dir_option_and_env_override(tmp_path, monkeypatch):
    small = _small_data_dir(tmp_path / "mine", 3)
    monkeypatch.delenv("D2SERVE_DATA_DIR", raising=False)
    assert resolve_data_dir(small) == small.resolve()
    assert [len(TASKS[n].loader(resolve_data_dir(small))) for n in TASKS] == [3] * len(TASKS)
    monkeypatch.setenv("D2SERVE_DATA_DIR", str(small))
    assert resolve_data_dir() == small.resolve()
    assert resolve_data_dir(DATA) == DATA  # an explicit folder wins over the variable
    monkeypatch.setenv("D2SERVE_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError, match=r"missing \(from \$D2SERVE_DATA_DIR\)"):
        resolve_data_dir()
    with pytest.raises(DataNotFoundError, match=r"nowhere \(from data_dir \(CLI: --data DIR\)\).*ARC-Easy/"):
        resolve_data_dir(tmp_path / "nowhere")
    (small / "piqa/valid-labels.lst").unlink()
    with pytest.raises(DataNotFoundError, match=r"must hold piqa/valid-labels.lst"):
        load_tasks(("piqa",), small)


def test_verify_cli_data_option_reads_the_named_folder(tmp_path, tiny_llama_dir, tiny_d2lora_adapter):
    """`d2serve verify --data DIR` scores the folder's items (3 per task), `--tasks` picks built-in names."""
    from typer.testing import CliRunner

    from d2serve.cli import app
    from d2serve.merge import merge

    merged = tmp_path / "merged"
    merge(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, out=merged)
    small = _small_data_dir(tmp_path / "mine", 3)
    r = CliRunner().invoke(app, ["verify", "--base", str(tiny_llama_dir), "--adapter", str(tiny_d2lora_adapter),
                                 "--merged", str(merged), "--report", str(tmp_path / "rep"), "--data", str(small),
                                 "--tasks", "piqa,social_iqa", "--limit", "0", "--windows", "1", "--window-len", "16",
                                 "--max-new-tokens", "8", "--no-base"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["inputs"]["data_dir"] == str(small.resolve()) and rep["inputs"]["data_source"] == "folder"
    assert [(t["task"], t["n"]) for t in rep["tasks"]["per_task"]] == [("piqa", 3), ("social_iqa", 3)]
    r = CliRunner().invoke(app, ["verify", "--base", str(tiny_llama_dir), "--adapter", str(tiny_d2lora_adapter),
                                 "--merged", str(merged), "--report", str(tmp_path / "rep2"),
                                 "--data", str(tmp_path / "nowhere"), "--tasks", "piqa"])
    assert r.exit_code == 2 and "data_dir (CLI: --data DIR)" in r.output
    assert not (tmp_path / "rep2").exists()
    r = CliRunner().invoke(app, ["verify", "--base", str(tiny_llama_dir), "--adapter", str(tiny_d2lora_adapter),
                                 "--merged", str(merged), "--report", str(tmp_path / "rep3"), "--tasks", "piqa,hellaswag"])
    assert r.exit_code == 2 and "task 'hellaswag'" in " ".join(r.output.split())
    assert not (tmp_path / "rep3").exists()


def test_task_names_parse():
    assert parse_task_names(None) == parse_task_names("all") == tuple(n for n in TASKS if not TASKS[n].chat)
    assert parse_task_names("none") == ()
    assert parse_task_names("arc_easy, hellaswag,arc_easy") == ("arc_easy", "hellaswag")
    with pytest.raises(TaskNotAvailableError, match="task YAML nope/t.yaml: file not found"):
        parse_task_names("arc_easy,nope/t.yaml")


def test_lm_eval_name_without_cached_data_is_a_clear_input_error():
    """An lm-eval registry task whose dataset is not in the local HF datasets cache: exit-2 error, no download."""
    import time

    t = time.perf_counter()
    with pytest.raises(TaskNotAvailableError) as ei:
        load_tasks(("arc_easy", "hellaswag"), DATA)
    msg = str(ei.value)
    assert msg.startswith("task 'hellaswag': its data (dataset 'Rowan/hellaswag') could not be loaded offline")
    assert "data_dir, CLI: --data DIR" in msg and "local lm-eval task YAML" in msg
    assert "Hugging Face datasets cache" in msg and "nothing is downloaded" in msg
    assert time.perf_counter() - t < 60  # no network retries
    with pytest.raises(TaskNotAvailableError, match="task 'no_such_task_d2s': not a built-in task .*not an lm-eval"):
        load_tasks(("no_such_task_d2s",), DATA)


def test_user_task_yaml_scored_on_the_tiny_model(tmp_path, tiny_llama_dir):
    """A user's lm-eval YAML (dataset_path: json, local data_files) is loaded by lm-eval and scored like the rest."""
    items = [{"q": "Is the sky blue?", "choices": ["no", "yes"], "label": 1},
             {"q": "Is fire cold?", "choices": ["no", "yes", "maybe"], "label": 0},
             {"q": "The capital of France is", "choices": ["Paris", "the fox", "a question"], "label": 0},
             {"q": "To be, or not to be", "choices": ["that is", "slings"], "label": 0}]
    jl = tmp_path / "mine.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in items))
    cfg = {"task": "my_yes_no", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(jl)}},
           "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{q}}\nAnswer:",
           "doc_to_choice": "{{choices}}", "doc_to_target": "label",
           "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
           "metadata": {"version": 1.0}}
    y = tmp_path / "my_task.yaml"
    y.write_text(yaml.safe_dump(cfg))
    names = parse_task_names(f"{y},piqa")
    assert list(load_tasks(names, DATA)) == ["my_yes_no", "piqa"]
    model, tok = load_hf_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    s = score_tasks(hf_lm(model, tok, batch_size=4), names, DATA, limit=2)
    assert (s["piqa"].n, s["my_yes_no"].n) == (2, 2)
    mine = s["my_yes_no"]
    assert mine.correct_norm is None and mine.split.startswith("test (json")
    for i, it in enumerate(items[:2]):
        hand = [_hand_loglik(model, tok, f"Question: {it['q']}\nAnswer:", " " + c) for c in it["choices"]]
        assert mine.loglikelihoods[i] == pytest.approx(hand, abs=1e-4)
        assert mine.targets[i] == it["label"]
        assert mine.correct[i] == (max(range(len(hand)), key=hand.__getitem__) == it["label"])
    bad = tmp_path / "gen.yaml"
    bad.write_text(yaml.safe_dump(cfg | {"task": "my_gen", "output_type": "generate_until", "doc_to_target": "q",
                                         "metric_list": [{"metric": "exact_match"}]}))
    with pytest.raises(TaskNotAvailableError, match=r"my_gen \(from YAML .*gen.yaml\): output_type 'generate_until'"):
        load_tasks((str(bad),), DATA)


def _hand_loglik(model, tok, context: str, continuation: str, max_length: int | None = None) -> float:
    """Sum of log p(continuation tokens | context), tokenised as lm-eval does (whole string, context prefix);
    with ``max_length``, the input keeps only its last ``max_length`` tokens (lm-eval's left truncation).
    Trailing white space of the context moves to the continuation (lm-eval's ``_encode_pair`` rule)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    inp = whole[:-1] if max_length is None else whole[-(max_length + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([inp])).logits[0].double(), -1)
    first = len(inp) - len(cont)  # position predicting the first continuation token
    return float(sum(logp[first + i, t] for i, t in enumerate(cont)))


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


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_boolq_chat_scores_yes_no_as_the_assistant_turn_by_hand(tiny_llama_dir):
    """boolq_chat: the BoolQ prompt is the user turn of the chat template; "no"/"yes" open the assistant turn
    (no target delimiter). Log-likelihoods equal a hand computation; the plain boolq task in the same call is
    scored without the template."""
    model, tok = load_hf_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    tok.chat_template = CHAT_TEMPLATE
    lm = hf_lm(model, tok, batch_size=4)
    scores = score_tasks(lm, ("boolq", "boolq_chat"), DATA, limit=3)
    docs = TASKS["boolq"].loader(DATA)[:3]
    for i, d in enumerate(docs):
        user = f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
        ctx = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
        assert ctx.endswith("<s>assistant\n")
        hand_chat = [_hand_loglik(model, tok, ctx, c, lm.max_length) for c in ("no", "yes")]
        hand_plain = [_hand_loglik(model, tok, user, " " + c, lm.max_length) for c in ("no", "yes")]
        assert scores["boolq_chat"].loglikelihoods[i] == pytest.approx(hand_chat, abs=1e-4)
        assert scores["boolq"].loglikelihoods[i] == pytest.approx(hand_plain, abs=1e-4)
        assert scores["boolq_chat"].targets[i] == d["label"]
    assert scores["boolq_chat"].loglikelihoods != scores["boolq"].loglikelihoods


def test_chat_task_needs_a_chat_template(tiny_llama_dir):
    model, tok = load_hf_model(tiny_llama_dir), load_tokenizer(tiny_llama_dir)
    assert not tok.chat_template
    with pytest.raises(TaskNotAvailableError, match=r"\['boolq_chat'\] are asked through the chat template, but the "
                                                    "model's tokenizer has none"):
        score_tasks(hf_lm(model, tok, batch_size=4), ("boolq_chat",), DATA, limit=2)
