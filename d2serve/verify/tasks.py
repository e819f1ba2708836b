"""Multiple-choice tasks read from the local data folder and scored with lm-evaluation-harness.

Each task is an lm-eval ``ConfigurableTask`` built from a config dict whose
prompt fields (``doc_to_text``, ``doc_to_choice``, ``doc_to_target``,
``target_delimiter``, metrics) are those of lm-eval 0.4's own YAML for the
task (``lm_eval/tasks/...``; a test checks they stay equal). Only the data
source differs: a ``custom_dataset`` loader reads the local file in place
(no copy, no network, no datasets cache) and converts each row to the schema
of the Hugging Face dataset the upstream YAML expects.

Scoring is lm-eval's: the log-likelihood of each choice continuation given
the context; ``acc`` picks the highest sum of log-probs, ``acc_norm`` the
highest per-byte (length-normalised) one.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from d2serve.verify.data import data_file

TASK_NAMES = ("boolq", "arc_easy", "arc_challenge", "piqa", "openbookqa", "social_iqa")
_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


class TaskDataError(ValueError):
    """A local task file has a row that does not fit its documented format."""


@dataclass(frozen=True)
class TaskSpec:
    """One multiple-choice task.

    Attributes:
        name: d2serve task name (also the lm-eval task name).
        files: data files relative to the data folder.
        loader: (data_dir) -> list of docs in the upstream HF schema.
        prompt: lm-eval config fields (doc_to_text, doc_to_choice, doc_to_target, ...).
        metrics: lm-eval metric names (``acc`` and, where upstream defines it, ``acc_norm``).
        upstream_yaml: the lm-eval YAML (relative to ``lm_eval/tasks``) these prompts mirror.
        split_note: which local split is scored.
    """

    name: str
    files: tuple[str, ...]
    loader: Callable[[Path], list[dict]]
    prompt: dict
    metrics: tuple[str, ...]
    upstream_yaml: str
    split_note: str = ""


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{i}: not valid JSON: {e}") from e
    return rows


def _labels(path: Path, n: int, allowed: set[int]) -> list[int]:
    labels = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            v = int(line.strip())
        except ValueError as e:
            raise TaskDataError(f"{path}:{i}: label {line.strip()!r} is not an integer") from e
        if v not in allowed:
            raise TaskDataError(f"{path}:{i}: label {v} not in {sorted(allowed)}")
        labels.append(v)
    if len(labels) != n:
        raise TaskDataError(f"{path}: {len(labels)} labels for {n} rows; expected one label per row, same order")
    return labels


def _field(row: dict, key: str, path: Path, i: int):
    if key not in row:
        raise TaskDataError(f"{path}: row {i} has no field {key!r} (fields: {sorted(row)})")
    return row[key]


def load_boolq(data_dir: Path) -> list[dict]:
    """BoolQ dev: ``label`` is the string "true"/"false" -> int 1/0 (super_glue schema)."""
    path = data_file(data_dir, "boolq/val.jsonl")
    docs = []
    for i, r in enumerate(_jsonl(path)):
        lab = _field(r, "label", path, i)
        if lab not in ("true", "false", True, False):
            raise TaskDataError(f"{path}: row {i} label {lab!r}; expected the string 'true' or 'false'")
        docs.append({"question": _field(r, "question", path, i), "passage": _field(r, "passage", path, i),
                     "idx": r.get("idx", i), "label": int(lab in ("true", True))})
    return docs


def _load_arc(rel: str) -> Callable[[Path], list[dict]]:
    def load(data_dir: Path) -> list[dict]:
        path = data_file(data_dir, rel)
        docs = []
        for i, r in enumerate(_jsonl(path)):
            q = _field(r, "question", path, i)
            choices = q.get("choices") if isinstance(q, dict) else None
            if not choices or "stem" not in q:
                raise TaskDataError(f"{path}: row {i}: expected question.stem and question.choices[{{text,label}}]")
            labels = [c["label"] for c in choices]
            key = _field(r, "answerKey", path, i)
            if key not in labels:
                raise TaskDataError(f"{path}: row {i}: answerKey {key!r} not among choice labels {labels}")
            docs.append({"id": r.get("id", str(i)), "question": q["stem"],
                         "choices": {"text": [c["text"] for c in choices], "label": labels}, "answerKey": key})
        return docs

    return load


def load_piqa(data_dir: Path) -> list[dict]:
    """PIQA validation: goal/sol1/sol2 rows joined with the labels file (0/1, same order)."""
    path = data_file(data_dir, "piqa/valid.jsonl")
    rows = _jsonl(path)
    labels = _labels(data_file(data_dir, "piqa/valid-labels.lst"), len(rows), {0, 1})
    return [{"goal": _field(r, "goal", path, i), "sol1": _field(r, "sol1", path, i),
             "sol2": _field(r, "sol2", path, i), "label": lab} for i, (r, lab) in enumerate(zip(rows, labels))]


_OBQA_CHOICE = re.compile(r"\(([A-D])\)\s")


def load_openbookqa(data_dir: Path) -> list[dict]:
    """OpenBookQA main test TSV: ``Choices`` "(A) .. (B) .. (C) .. (D) .." split into the HF schema."""
    path = data_file(data_dir, "openbookqa/test.tsv")
    docs = []
    with open(path, encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f, delimiter="\t")):
            raw = _field(r, "Choices", path, i)
            parts = _OBQA_CHOICE.split(raw)
            labels, texts = parts[1::2], [t.strip() for t in parts[2::2]]
            if labels != ["A", "B", "C", "D"] or parts[0].strip():
                raise TaskDataError(f"{path}: row {i}: Choices {raw!r}; expected '(A) .. (B) .. (C) .. (D) ..'")
            key = _field(r, "Answer Key", path, i).strip()
            if key not in labels:
                raise TaskDataError(f"{path}: row {i}: Answer Key {key!r} not in A-D")
            docs.append({"id": r.get("ID", str(i)), "question_stem": _field(r, "Question Stem", path, i),
                         "choices": {"text": texts, "label": labels}, "answerKey": key})
    return docs


def load_social_iqa(data_dir: Path) -> list[dict]:
    """Social IQa dev: options[3] + labels file (1-3) -> answerA/B/C and label "1"-"3" (lighteval/siqa schema)."""
    path = data_file(data_dir, "social_i_qa/dev.jsonl")
    rows = _jsonl(path)
    labels = _labels(data_file(data_dir, "social_i_qa/dev-labels.lst"), len(rows), {1, 2, 3})
    docs = []
    for i, (r, lab) in enumerate(zip(rows, labels)):
        opts = _field(r, "options", path, i)
        if not isinstance(opts, list) or len(opts) != 3:
            raise TaskDataError(f"{path}: row {i}: expected 3 options, got {opts!r}")
        if "answer" in r and r["answer"] != opts[lab - 1]:
            raise TaskDataError(f"{path}: row {i}: label {lab} names option {opts[lab - 1]!r} but answer is {r['answer']!r}")
        docs.append({"context": _field(r, "context", path, i), "question": _field(r, "question", path, i),
                     "answerA": opts[0], "answerB": opts[1], "answerC": opts[2], "label": str(lab)})
    return docs


_ARC_PROMPT = {"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
               "doc_to_choice": "{{choices.text}}"}

TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("boolq", ("boolq/val.jsonl",), load_boolq,
                      {"doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
                       "doc_to_choice": ["no", "yes"]}, ("acc",), "super_glue/boolq/default.yaml", "dev (SuperGLUE val)"),
    "arc_easy": TaskSpec("arc_easy", ("ARC-Easy/ARC-Easy-Test.jsonl",), _load_arc("ARC-Easy/ARC-Easy-Test.jsonl"),
                         _ARC_PROMPT, ("acc", "acc_norm"), "arc/arc_easy.yaml", "test"),
    "arc_challenge": TaskSpec("arc_challenge", ("ARC-Challenge/ARC-Challenge-Test.jsonl",),
                              _load_arc("ARC-Challenge/ARC-Challenge-Test.jsonl"), _ARC_PROMPT, ("acc", "acc_norm"),
                              "arc/arc_challenge.yaml", "test"),
    "piqa": TaskSpec("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), load_piqa,
                     {"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
                      "doc_to_choice": "{{[sol1, sol2]}}"}, ("acc", "acc_norm"), "piqa/piqa.yaml", "validation"),
    "openbookqa": TaskSpec("openbookqa", ("openbookqa/test.tsv",), load_openbookqa,
                           {"doc_to_text": "question_stem", "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
                            "doc_to_choice": "{{choices.text}}"}, ("acc", "acc_norm"), "openbookqa/openbookqa.yaml",
                           "test"),
    "social_iqa": TaskSpec("social_iqa", ("social_i_qa/dev.jsonl", "social_i_qa/dev-labels.lst"), load_social_iqa,
                           {"doc_to_text": "Q: {{context}} {{question}}\nA:", "target_delimiter": " ",
                            "doc_to_choice": "{{[answerA, answerB, answerC]}}", "doc_to_target": "{{ (label|int) - 1 }}"},
                           ("acc",), "siqa/siqa.yaml", "dev"),
}


def parse_task_names(names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Task names from a comma-separated string or a list; None/"all" -> every task; "" / "none" -> no task.

    Raises:
        ValueError: an unknown task name (the message lists the known ones).
    """
    if names is None:
        return TASK_NAMES
    if isinstance(names, str):
        if names.strip().lower() == "all":
            return TASK_NAMES
        if names.strip().lower() in ("", "none"):
            return ()
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(TASK_NAMES)}")
    return tuple(dict.fromkeys(names))


def lm_eval_config(spec: TaskSpec, data_dir: Path) -> dict:
    """The lm-eval task config dict for ``spec`` reading the local files of ``data_dir``."""
    import datasets

    def custom_dataset(**_):
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(spec.loader(data_dir))})

    metric_list = [_ACC if m == "acc" else _ACC_NORM for m in spec.metrics]
    return {"task": f"d2serve_{spec.name}", "dataset_path": "json", "custom_dataset": custom_dataset,
            "output_type": "multiple_choice", "test_split": "test", "num_fewshot": 0,
            "metric_list": metric_list, "metadata": {"version": 1.0}, **spec.prompt}


@dataclass
class TaskScores:
    """Per-item results of one model on one task (items in file order, the first ``n``).

    Attributes:
        task: task name.
        n: number of items scored.
        correct: per item, whether ``acc`` picked the target.
        correct_norm: per item, whether ``acc_norm`` picked the target (None if undefined).
        loglikelihoods: per item, the summed log-prob (nats) of each choice continuation.
        predictions: per item, argmax choice index by summed log-prob.
        targets: per item, the gold choice index.
    """

    task: str
    n: int
    correct: list[bool]
    correct_norm: list[bool] | None
    loglikelihoods: list[list[float]]
    predictions: list[int]
    targets: list[int]

    @property
    def acc(self) -> float:
        """Accuracy (fraction in [0, 1])."""
        return sum(self.correct) / self.n if self.n else float("nan")

    @property
    def acc_norm(self) -> float | None:
        """Length-normalised accuracy, or None where the upstream task does not define it."""
        if self.correct_norm is None:
            return None
        return sum(self.correct_norm) / self.n if self.n else float("nan")


def hf_lm(model, tokenizer, batch_size: int = 8):
    """Wrap an in-memory causal LM (plain, unmerged with d2serve layers, or PEFT) as an lm-eval ``HFLM``."""
    from lm_eval.models.huggingface import HFLM

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: LoRA layers stay active
    return HFLM(pretrained=inner, tokenizer=tokenizer, batch_size=batch_size)


def score_tasks(lm, names: tuple[str, ...], data_dir: Path, limit: int | None) -> dict[str, TaskScores]:
    """Score one model on several tasks with ``lm_eval.evaluator.evaluate`` (zero-shot, per-item samples logged).

    Args:
        lm: an lm-eval LM (see :func:`hf_lm`).
        names: task names (see :data:`TASK_NAMES`).
        data_dir: the evaluation data folder.
        limit: first ``limit`` items of each task; None or 0 -> all items.

    Returns:
        task name -> :class:`TaskScores`.

    Raises:
        DataNotFoundError / TaskDataError: missing or malformed local files.
    """
    from lm_eval import evaluator
    from lm_eval.api.task import ConfigurableTask

    tasks = {}
    for name in names:
        spec = TASKS[name]
        for rel in spec.files:
            data_file(data_dir, rel)
        tasks[f"d2serve_{name}"] = ConfigurableTask(config=lm_eval_config(spec, data_dir))
    if not tasks:
        return {}
    lm_log = logging.getLogger("lm_eval")
    old_level = lm_log.level
    lm_log.setLevel(logging.ERROR)  # per-item truncation warnings would flood the console
    try:
        res = evaluator.evaluate(lm, {"tasks": tasks}, limit=limit or None, log_samples=True, bootstrap_iters=0)
    finally:
        lm_log.setLevel(old_level)
    out = {}
    for name in names:
        samples = sorted(res["samples"][f"d2serve_{name}"], key=lambda s: s["doc_id"])
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        has_norm = "acc_norm" in TASKS[name].metrics
        out[name] = TaskScores(
            task=name,
            n=len(samples),
            correct=[bool(s["acc"]) for s in samples],
            correct_norm=[bool(s["acc_norm"]) for s in samples] if has_norm else None,
            loglikelihoods=lls,
            predictions=[max(range(len(ll)), key=ll.__getitem__) for ll in lls],
            targets=[int(s["target"]) for s in samples],
        )
    return out
