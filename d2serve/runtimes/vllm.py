"""Task accuracy through vLLM for ``d2serve verify --engine vllm``: the merged checkpoint vs the adapter served
unmerged (folded to a LoRA + row scales, d2serve's vLLM plugin), each in its own engine with the same settings.

Each engine runs in a worker process (:mod:`d2serve.runtimes._vllm_tasks_worker`, one after another, each killed
with this process) that scores the tasks with lm-eval's ``VLLM`` model and :func:`d2serve.verify.tasks.score_tasks`
(zero-shot log-likelihood multiple choice, vLLM ``prompt_logprobs``). The paired comparison and its thresholds are
verify's own (:mod:`d2serve.verify.api`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from d2serve.childproc import WorkerError, child_env, run_json_worker
from d2serve.errors import CheckFailedError
from d2serve.fitting import Fit
from d2serve.verify.tasks import TaskScores
from d2serve.runtimes.protocol import RuntimeUnderTest

MAX_MODEL_LEN = 2048  # upper bound on the engines' context (the model's own limit when smaller)


def engine_max_model_len(model_dir: str | Path) -> int:
    """min(config.json ``max_position_embeddings``, :data:`MAX_MODEL_LEN`): the context every engine gets."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return min(MAX_MODEL_LEN, int(cfg.get("max_position_embeddings") or MAX_MODEL_LEN))


def score_tasks_vllm(model_dir: str | Path, names: tuple[str, ...], data_dir: Path | None, limit: int | None, *,
                     dtype: str, max_model_len: int, batch_size: int, lora_dir: Path | None = None,
                     max_lora_rank: int | None = None, max_loras: int | None = None) -> tuple[dict, dict]:
    """Score ``names`` with one vLLM engine on ``model_dir`` (+ the folded adapter ``lora_dir`` on every request).

    Returns:
        (task name -> :class:`TaskScores`, engine facts: ``vllm`` version, ``log`` path).

    Raises:
        CheckFailedError: the engine failed (the worker's traceback and the log tail are in the message).
    """
    fd, log = tempfile.mkstemp(prefix="d2serve-verify-vllm-", suffix=".log")
    os.close(fd)
    request = {"model": str(model_dir), "dtype": dtype, "max_model_len": max_model_len, "batch_size": batch_size,
               "tasks": list(names), "data_dir": str(data_dir) if data_dir else None, "limit": limit,
               "lora": str(lora_dir) if lora_dir else None, "max_lora_rank": max_lora_rank, "max_loras": max_loras}
    try:  # no time limit; an interrupted wait SIGKILLs the worker's group at once (grace_s=0)
        out = run_json_worker("d2serve.runtimes._vllm_tasks_worker", request, log=log, grace_s=0,
                              env=child_env(kv_cache_gib=1, tokenizers_parallelism=False))
    except WorkerError as e:
        raise CheckFailedError(f"vLLM task scoring on {model_dir}{' + ' + str(lora_dir) if lora_dir else ''} "
                               f"failed:\n{e.detail}\nlog {log}, tail:\n{e.log_tail(30)}") from None
    Path(log).unlink(missing_ok=True)
    return {name: TaskScores(**s) for name, s in out["scores"].items()}, {"vllm": out["vllm"]}


def score_merged_and_unmerged(*, fitted: Fit, merged: Path, names: tuple[str, ...], data_dir: Path | None,
                              limit: int | None, dtype: str, batch_size: int, base_accuracy: bool,
                              say=lambda m: None) -> tuple[dict, dict]:
    """The tasks scored through vLLM: ``merged`` (its own engine), ``unmerged`` (the base + the adapter of
    ``fitted`` folded and served by d2serve's plugin; the base is not opened again) and, with ``base_accuracy``,
    ``base`` (a plain engine on the base).

    Every engine: same dtype, max_model_len (:func:`engine_max_model_len` of the base), eager, seed 0.

    Returns:
        ({"unmerged"|"merged"|"base": {task: TaskScores}}, settings to record: engine, vllm, max_model_len,
        lora_max_rank, lora_max_loras, folded adapter folder).
    """
    from d2serve.export.vllm_lora import prepare_served_adapters
    from d2serve.export.vllm_lora_check import cpu_safe_max_loras

    base = fitted.ckpt.path
    max_len = engine_max_model_len(base)
    folders, rank = prepare_served_adapters(fitted.ckpt, {"adapter": fitted})
    common = {"dtype": dtype, "max_model_len": max_len, "batch_size": batch_size}
    scores, facts = {}, {}
    say(f"tasks (vLLM): scoring the adapter served unmerged by d2serve's plugin on {', '.join(names)}")
    scores["unmerged"], facts = score_tasks_vllm(base, names, data_dir, limit, lora_dir=folders["adapter"],
                                                 max_lora_rank=rank, max_loras=cpu_safe_max_loras(1), **common)
    say(f"tasks (vLLM): scoring the merged checkpoint on {', '.join(names)}")
    scores["merged"], _ = score_tasks_vllm(merged, names, data_dir, limit, **common)
    if base_accuracy:
        say("tasks (vLLM): scoring the base model")
        scores["base"], _ = score_tasks_vllm(base, names, data_dir, limit, **common)
    settings = {"engine": "vllm", "vllm": facts["vllm"], "vllm_dtype": dtype, "vllm_max_model_len": max_len,
                "vllm_enforce_eager": True, "lora_max_rank": rank, "lora_max_loras": cpu_safe_max_loras(1),
                "served_adapter_folder": str(folders["adapter"])}
    return scores, settings



class VllmRuntime(RuntimeUnderTest):
    """vLLM as the runtime under test (``verify --engine vllm``): the weight check, then task accuracy in vLLM
    engines only (:func:`score_merged_and_unmerged`): how a 7B-70B model is verified on GPUs."""

    name = "vllm"
    description = ("weights, then task accuracy through vLLM: the merged checkpoint vs the adapter served unmerged "
                   "by d2serve's plugin")
    scores_tasks_itself = True
    not_run = ("logits: the teacher-forced logit comparison (KL, top-1 agreement) runs with --engine hf only",
               "generation: the greedy generation comparison runs with --engine hf only")

    def check(self, *, merged, tasks) -> None:
        """Tasks are what it compares (at least one), and the vllm extra must be installed.

        Raises:
            InputError: no task; MissingExtraError: vLLM is not installed.
        """
        from d2serve.errors import InputError
        from d2serve.extras import require

        if not tasks:
            raise InputError("--engine vllm compares task accuracy through vLLM; give at least one task (--tasks)")
        require("vllm", purpose="verify --engine vllm")

    def compute_label(self, compute_dtype) -> str:
        """The vLLM dtype of every engine (the merged compute dtype)."""
        return str(compute_dtype).removeprefix("torch.")

    def score_tasks(self, *, fitted, merged, names, data_dir, limit, compute_dtype, batch_size, base_accuracy,
                    say) -> tuple[dict, dict]:
        """:func:`score_merged_and_unmerged` in ``compute_dtype``; the settings also say how the unmerged side ran
        and which sections were not run."""
        dtype = str(compute_dtype).removeprefix("torch.")
        scores, settings = score_merged_and_unmerged(fitted=fitted, merged=Path(merged), names=names,
                                                     data_dir=data_dir, limit=limit, dtype=dtype,
                                                     batch_size=batch_size, base_accuracy=base_accuracy, say=say)
        return scores, settings | {"unmerged_dtype": f"{dtype} (vLLM LoRA + d2serve plugin)",
                                   "not_run": list(self.not_run)}
