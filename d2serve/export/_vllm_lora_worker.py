"""Subprocess entry point: several vLLM engines one after another, each with optional LoRA adapters.

Run as ``python -m d2serve.export._vllm_lora_worker REQUEST.json RESULT.json`` (a ``__main__`` guard
because vLLM spawns processes; one process pays vLLM's import once for every engine). The request holds
``jobs``: each ``{"model", "dtype", "max_model_len", "max_tokens", "loras": {name: folder},
"max_lora_rank", "max_loras", "runs": [{"name", "requests": [{"prompt_token_ids", "lora"}]}]}``; every
run is one ``LLM.generate`` call over its requests (a mixed batch when they name different adapters,
``lora`` None for the base). The result holds per job ``startup_s``, ``compilation_mode`` and per run the
greedy ``token_ids``, chosen-token ``logprobs`` (nats) and ``top`` (the top-5 logprobs by token id) of each
request; or ``error`` (a traceback). A run with ``"prompt_logprobs": true`` scores its prompts instead (one
new token, ``prompt_logprobs``): each request gives ``prompt_logprobs``, the log-prob (nats) of every prompt
token given the ones before it (``None`` for the first).
"""

from __future__ import annotations

import gc
import sys
import time

from d2serve.childproc import json_worker_main


def _run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    loras = job.get("loras") or {}
    kwargs = {}
    if loras:
        kwargs = {"enable_lora": True, "max_lora_rank": job["max_lora_rank"], "max_loras": job["max_loras"]}
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=job["max_model_len"], enforce_eager=True,
              seed=0, **kwargs)
    startup = time.perf_counter() - t0
    requests = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(sorted(loras.items()))}
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=5, ignore_eos=True)
    runs = {}
    try:
        mode = str(llm.llm_engine.vllm_config.compilation_config.mode)
    except Exception:  # informational only
        mode = "unknown"
    for run in job["runs"]:
        prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in run["requests"]]
        lreq = [requests[r["lora"]] if r.get("lora") else None for r in run["requests"]]
        if run.get("prompt_logprobs"):
            score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
            outs = llm.generate(prompts, score, lora_request=lreq if loras else None, use_tqdm=False)
            runs[run["name"]] = [{"prompt_logprobs": [None] + [float(d[t].logprob) for t, d in
                                                               zip(r["prompt_token_ids"][1:], out.prompt_logprobs[1:])]}
                                 for r, out in zip(run["requests"], outs)]
            continue
        outs = llm.generate(prompts, params, lora_request=lreq if loras else None, use_tqdm=False)
        rows = []
        for out in outs:
            o = out.outputs[0]
            ids = list(o.token_ids)
            steps = list(zip(ids, o.logprobs or []))
            rows.append({"token_ids": ids, "logprobs": [float(st[t].logprob) for t, st in steps],
                         "top": [{str(k): float(v.logprob) for k, v in st.items()} for _, st in steps]})
        runs[run["name"]] = rows
    del llm
    gc.collect()
    return {"startup_s": startup, "compilation_mode": mode, "runs": runs}


def _run(request: dict) -> dict:
    import vllm

    return {"vllm_version": vllm.__version__, "jobs": [_run_job(j) for j in request["jobs"]]}


def main(argv: list[str]) -> int:
    """``REQUEST.json RESULT.json`` -> writes the result (or ``{"error": ...}``); exit 0/1."""
    return json_worker_main(argv, "d2serve.export._vllm_lora_worker", _run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
