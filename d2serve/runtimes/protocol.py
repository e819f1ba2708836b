"""The protocol of a runtime under test: what ``d2serve verify`` asks the runtime that runs the merged model.

A runtime is one module under ``d2serve/runtimes/`` with a subclass of :class:`RuntimeUnderTest` and one entry in
:data:`d2serve.runtimes.RUNTIMES`; d2serve.verify.api asks it (its capabilities below) and never branches on its
name. What it is asked, in order: :meth:`RuntimeUnderTest.detects` (is ``merged`` this runtime's artifact?),
:meth:`check` (before any model is loaded: can it verify these inputs?), then for the weight check
:attr:`checks_weights` / :attr:`weights_skipped`, for the report :meth:`merged_dtype_label` and
:meth:`compute_label`; then either (:attr:`scores_tasks_itself` False) :meth:`load_merged` and :meth:`task_lm`,
the merged model answering the teacher-forced logits, the greedy generation and lm-eval's log-likelihoods beside
the unmerged transformers reference, or (True) :meth:`score_tasks`, every engine scored by the runtime itself
(the sections it does not run listed in :attr:`not_run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RuntimeUnderTest:
    """Base class of the runtimes under test (defaults: a transformers-like runtime for a safetensors folder).

    Attributes:
        name: the registry name (the ``--engine`` value when :attr:`engine_option`).
        description: a few words for the CLI help and messages.
        engine_option: chosen with ``verify --engine``; False: chosen by :meth:`detects` on the merged folder.
        opens_merged_checkpoint: the merged model is a safetensors checkpoint (d2serve.checkpoint.Checkpoint).
        checks_weights: the weight check (every adapted tensor vs a float64 recomputation) applies.
        weights_skipped: why not, when it does not (recorded as ``settings.weights_check``).
        scores_tasks_itself: the runtime scores the tasks in its own engines (:meth:`score_tasks`); the
            teacher-forced logits and greedy generation are then not compared (:attr:`not_run` says so).
        not_run: one line per section not run (recorded in report.json ``settings.not_run`` and report.md).
    """

    name: str = ""
    description: str = ""
    engine_option: bool = True
    opens_merged_checkpoint: bool = True
    checks_weights: bool = True
    weights_skipped: str = ""
    scores_tasks_itself: bool = False
    not_run: tuple[str, ...] = ()

    @classmethod
    def detects(cls, merged: str | Path) -> bool:
        """Whether ``merged`` is this runtime's own artifact (a folder only it runs); default False."""
        return False

    def check(self, *, merged: Path, tasks: list) -> None:
        """Refuse (InputError / MissingExtraError) what this runtime cannot verify, before any model is loaded."""
        return None

    def merged_dtype_label(self, merged: Path, merged_ck: Any) -> str:
        """The merged model's dtype for report.json ``inputs.merged_dtype`` (default: the checkpoint's)."""
        return str(merged_ck.dtype).removeprefix("torch.")

    def compute_label(self, compute_dtype: Any) -> str:
        """How the merged model computes, for ``settings.merged_compute_dtype`` (default: the torch dtype)."""
        return str(compute_dtype).removeprefix("torch.")

    def load_merged(self, merged: Path, merged_ck: Any, dtype: Any, device: str) -> Any:
        """The merged model, called like a transformers causal LM (``model(input_ids=...).logits``)."""
        raise NotImplementedError

    def task_lm(self, model: Any, reference: Any, tokenizer: Any, batch_size: int) -> Any:
        """The lm-eval LM scoring ``model`` (``reference``: the unmerged transformers model, whose tokenization
        every model shares)."""
        raise NotImplementedError

    def score_tasks(self, **kwargs) -> tuple[dict, dict]:
        """Score the tasks in the runtime's own engines (``scores_tasks_itself``): ``({"unmerged"|"merged"|"base":
        {task: TaskScores}}, settings to record)``."""
        raise NotImplementedError
