"""Multiple-choice tasks scored with lm-evaluation-harness: built-in (local files), lm-eval registry names, user YAMLs.

Three kinds of task name are accepted (see :func:`parse_task_names` and :func:`load_tasks`):

* the six built-in names (:data:`TASK_NAMES`) read the evaluation data folder (the samples
  bundled with d2serve by default, or ``data_dir``; see :mod:`d2serve.verify.data`). Each is an
  lm-eval ``ConfigurableTask`` built from a config dict whose prompt fields (``doc_to_text``,
  ``doc_to_choice``, ``doc_to_target``, ``target_delimiter``, metrics) are those of lm-eval
  0.4's own YAML for the task (``lm_eval/tasks/...``; a test checks they stay equal). Only the
  data source differs: a ``custom_dataset`` loader reads the local file in place (no network,
  no datasets cache) and converts each row to the schema of the Hugging Face dataset the
  upstream YAML expects.
* any other lm-eval task or group name (e.g. ``hellaswag``, ``mmlu``) is resolved by lm-eval's
  own ``TaskManager`` and loaded from the local Hugging Face datasets cache, offline: nothing is
  downloaded. A group scores each of its tasks.
* a path to a user's lm-eval task YAML (``*.yaml`` / ``*.yml``), loaded by lm-eval
  (e.g. ``dataset_path: json`` with local ``dataset_kwargs.data_files``).

Only ``multiple_choice`` tasks with an ``acc`` metric are accepted (verify compares per-item
correctness of two models). Scoring is lm-eval's: the log-likelihood of each choice
continuation given the context; ``acc`` picks the highest sum of log-probs, ``acc_norm`` the
highest per-byte (length-normalised) one.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from d2serve.errors import InputError
from d2serve.verify.data import data_file

TASK_NAMES = ("boolq", "arc_easy", "arc_challenge", "piqa", "openbookqa", "social_iqa")
_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


class TaskDataError(InputError):
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
        chat: score through the model's chat template (lm-eval ``apply_chat_template=True``:
            the prompt is the user turn, each choice is the start of the assistant turn, no
            target delimiter), the format a chat-trained adapter is prompted with when served.
    """

    name: str
    files: tuple[str, ...]
    loader: Callable[[Path], list[dict]]
    prompt: dict
    metrics: tuple[str, ...]
    upstream_yaml: str
    split_note: str = ""
    chat: bool = False


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


_BOOLQ_PROMPT = {"doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
                 "doc_to_choice": ["no", "yes"]}
_ARC_PROMPT = {"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
               "doc_to_choice": "{{choices.text}}"}

TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("boolq", ("boolq/val.jsonl",), load_boolq, _BOOLQ_PROMPT, ("acc",), "super_glue/boolq/default.yaml",
                      "dev (SuperGLUE val)"),
    # the same items and prompt, asked through the chat template (how a chat model is served and how
    # `d2serve train` formats its records): the answer "yes"/"no" opens the assistant turn
    "boolq_chat": TaskSpec("boolq_chat", ("boolq/val.jsonl",), load_boolq, _BOOLQ_PROMPT, ("acc",),
                           "super_glue/boolq/default.yaml", "dev (SuperGLUE val), chat template", chat=True),
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


class TaskNotAvailableError(InputError):
    """A task name or YAML that cannot be scored here (unknown, data not available offline, not multiple-choice)."""


_YAML_SUFFIXES = (".yaml", ".yml")
_HOW_TO_PROVIDE = (
    "provide its data locally: the six built-in tasks ({builtin}) read the evaluation data folder "
    "(data_dir, CLI: --data DIR); any other task can be a local lm-eval task YAML passed as the task name "
    "(e.g. dataset_path: json with dataset_kwargs.data_files pointing at your files); an lm-eval task name works "
    "when its dataset is already in the Hugging Face datasets cache (nothing is downloaded)"
)


def is_task_yaml(name: str) -> bool:
    """Whether a task name is a path to an lm-eval task YAML (ends in .yaml / .yml)."""
    return name.lower().endswith(_YAML_SUFFIXES)


def parse_task_names(names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Task names from a comma-separated string or a list; None/"all" -> the six built-in tasks; "" / "none" -> none.

    A name is a built-in task (:data:`TASK_NAMES`), an lm-eval task/group name (checked by
    :func:`load_tasks`) or a path to a task YAML (``*.yaml``/``*.yml``).

    Raises:
        TaskNotAvailableError: a YAML path that is not a file.
    """
    if names is None:
        return TASK_NAMES
    if isinstance(names, str):
        if names.strip().lower() == "all":
            return TASK_NAMES
        if names.strip().lower() in ("", "none"):
            return ()
        names = [n.strip() for n in names.split(",") if n.strip()]
    for n in names:
        if is_task_yaml(n) and not Path(n).is_file():
            raise TaskNotAvailableError(f"task YAML {n}: file not found")
    return tuple(dict.fromkeys(names))


@contextmanager
def _datasets_offline():
    """Make ``datasets`` / ``huggingface_hub`` use only the local cache (no download, no network retry)."""
    import datasets
    import huggingface_hub.constants as hub_constants

    old = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = old


@functools.cache
def _task_manager():
    """lm-eval's TaskManager over its own task registry (indexing the YAMLs takes a few seconds, done once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _check_scorable(label: str, task) -> None:
    cfg = task.config
    metrics = [m.get("metric") for m in (cfg.metric_list or [])]
    if cfg.output_type != "multiple_choice" or "acc" not in metrics:
        raise TaskNotAvailableError(
            f"task {label}: output_type {cfg.output_type!r} with metrics {metrics}; verify scores multiple_choice "
            "tasks with an 'acc' metric (per-item correctness of two models is compared)"
        )


def _load_external(name: str) -> dict:
    """lm-eval tasks for one registry name or YAML path: {task name: Task} (a group gives each of its tasks)."""
    yaml = is_task_yaml(name)
    label = f"YAML {name}" if yaml else repr(name)
    if yaml:
        from lm_eval.tasks import TaskManager

        tm, spec = TaskManager(include_defaults=False), str(Path(name).resolve())
    else:
        tm, spec = _task_manager(), name
    dataset = None
    if not yaml:
        entry = tm.task_index.get(name)
        if entry is None:
            raise TaskNotAvailableError(
                f"task {name!r}: not a built-in task ({', '.join(TASK_NAMES)}), not an lm-eval task, group or tag "
                "name, and not a task YAML path (*.yaml)"
            )
        dataset = (entry.cfg or {}).get("dataset_path")
    lm_log = logging.getLogger("lm_eval")
    old_level = lm_log.level
    lm_log.setLevel(logging.ERROR)
    try:
        with _datasets_offline():
            loaded = tm.load([spec])["tasks"]
    except (OSError, ValueError, KeyError, TypeError) as e:  # OSError: ConnectionError / DatasetNotFoundError
        what = f"its data (dataset {dataset!r}) " if dataset else "its data "
        raise TaskNotAvailableError(
            f"task {label}: {what}could not be loaded offline ({type(e).__name__}: {e}); "
            + _HOW_TO_PROVIDE.format(builtin=", ".join(TASK_NAMES))
        ) from e
    finally:
        lm_log.setLevel(old_level)
    for tname, task in loaded.items():
        _check_scorable(f"{tname} (from {label})", task)
    return dict(loaded)


def load_tasks(names: tuple[str, ...], data_dir: Path | None) -> dict:
    """Build the lm-eval task objects for ``names`` (see :func:`parse_task_names`), checking their data.

    Args:
        names: built-in names, lm-eval task/group names and/or task YAML paths.
        data_dir: the evaluation data folder for the built-in tasks (may be None if none is asked for).

    Returns:
        report name -> lm-eval ``Task``, in request order (a group expands to its tasks).
        Built-in tasks keep their d2serve name (their lm-eval task is ``d2serve_<name>``).

    Raises:
        DataNotFoundError / TaskDataError: a built-in task's local file is missing or malformed.
        TaskNotAvailableError: an unknown name, data not available offline, a task that is not
            multiple-choice with ``acc``, or two tasks with the same name.
    """
    from lm_eval.api.task import ConfigurableTask

    out: dict = {}
    for name in names:
        if name in TASKS:
            spec = TASKS[name]
            if data_dir is None:
                raise TaskNotAvailableError(f"task {name!r} needs the evaluation data folder; data_dir is None")
            for rel in spec.files:
                data_file(data_dir, rel)
            got = {name: ConfigurableTask(config=lm_eval_config(spec, data_dir))}
        else:
            got = _load_external(name)
        for k, task in got.items():
            if k in out:
                raise TaskNotAvailableError(f"task name {k!r} requested twice (from {name!r}); task names must be unique")
            out[k] = task
    return out


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
        split: which split / data was scored (for the report).
    """

    task: str
    n: int
    correct: list[bool]
    correct_norm: list[bool] | None
    loglikelihoods: list[list[float]]
    predictions: list[int]
    targets: list[int]
    split: str = ""

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


def _split_note(name: str, task) -> str:
    if name in TASKS:
        return TASKS[name].split_note
    cfg = task.config
    split = cfg.test_split if task.has_test_docs() else cfg.validation_split
    return f"{split} ({cfg.dataset_path}{'/' + cfg.dataset_name if cfg.dataset_name else ''})"


def _target_index(task, sample: dict) -> int:
    """The gold choice index of one logged sample (lm-eval's own rule: a string target is looked up in the choices)."""
    target = sample["target"]
    if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
        choices = task.doc_to_choice(sample["doc"])
        return choices.index(target) if target in choices else -100
    return int(target)


def score_tasks(lm, names: tuple[str, ...], data_dir: Path | None, limit: int | None) -> dict[str, TaskScores]:
    """Score one model on several tasks with ``lm_eval.evaluator.evaluate`` (zero-shot, per-item samples logged).

    Args:
        lm: an lm-eval LM (see :func:`hf_lm`).
        names: task names, as for :func:`load_tasks` (tasks are built afresh for every call).
        data_dir: the evaluation data folder (built-in tasks).
        limit: first ``limit`` items of each task; None or 0 -> all items.

    Returns:
        report task name -> :class:`TaskScores` (a group's tasks appear one by one).

    Raises:
        DataNotFoundError / TaskDataError / TaskNotAvailableError: see :func:`load_tasks`.
    """
    from lm_eval import evaluator

    built = load_tasks(names, data_dir)
    if not built:
        return {}
    is_chat = {name: name in TASKS and TASKS[name].chat for name in built}
    if any(is_chat.values()) and not getattr(getattr(lm, "tokenizer", None), "chat_template", None):
        raise TaskNotAvailableError(
            f"tasks {[n for n, c in is_chat.items() if c]} are asked through the chat template, but the model's "
            "tokenizer has none (tokenizer_config.json / chat_template.jinja); use the plain-text tasks instead")
    lm_log = logging.getLogger("lm_eval")
    old_level = lm_log.level
    lm_log.setLevel(logging.ERROR)  # per-item truncation warnings would flood the console
    res = {"samples": {}}
    try:
        for chat in (False, True):  # lm-eval applies the chat template per evaluate() call, not per task
            tasks = {task.task_name: task for name, task in built.items() if is_chat[name] == chat}
            if tasks:
                r = evaluator.evaluate(lm, {"tasks": tasks}, limit=limit or None, log_samples=True,
                                       bootstrap_iters=0, apply_chat_template=chat)
                res["samples"].update(r["samples"])
    finally:
        lm_log.setLevel(old_level)
    out = {}
    for name, task in built.items():
        samples = sorted(res["samples"][task.task_name], key=lambda s: s["doc_id"])
        lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        has_norm = all("acc_norm" in s for s in samples) and bool(samples)
        out[name] = TaskScores(
            task=name,
            n=len(samples),
            correct=[bool(s["acc"]) for s in samples],
            correct_norm=[bool(s["acc_norm"]) for s in samples] if has_norm else None,
            loglikelihoods=lls,
            predictions=[max(range(len(ll)), key=ll.__getitem__) for ll in lls],
            targets=[_target_index(task, s) for s in samples],
            split=_split_note(name, task),
        )
    return out


def without_progress_bars(lm):
    """``lm`` (an lm-eval LM) with its log-likelihood calls drawing no tqdm bars (they would break the stage
    display); returns the same object."""
    import functools

    lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
    return lm
