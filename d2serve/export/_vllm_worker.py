"""Subprocess entry point: load a checkpoint in vLLM and generate greedily for given prompt token ids.

Run as ``python -m d2serve.export._vllm_worker REQUEST.json RESULT.json``.
vLLM starts worker processes with ``spawn``, so it must run under a
``__main__`` guard, and running it in its own process keeps the caller's memory
and threads clean. The request holds ``model`` (dir), ``dtype``,
``max_model_len``, ``max_tokens`` and ``prompt_token_ids`` (list of lists of
ints). The result JSON holds, per prompt, the generated ``token_ids`` and the
vLLM ``logprobs`` (natural log, float) of those tokens, plus
``startup_s`` (construction of ``vllm.LLM`` = engine ready), ``import_s``,
``generate_s`` and ``vllm_version``; or ``error`` (a traceback) on failure.
"""

from __future__ import annotations

import sys
import time

from d2serve.childproc import json_worker_main


def run(request: dict) -> dict:
    """Start vLLM on ``request["model"]`` and generate greedily (temperature 0, ``ignore_eos``)."""
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    t1 = time.perf_counter()
    llm = LLM(
        model=request["model"],
        dtype=request["dtype"],
        max_model_len=request["max_model_len"],
        enforce_eager=True,
        seed=0,
    )
    t2 = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=1, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids} for ids in request["prompt_token_ids"]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    t3 = time.perf_counter()
    results = []
    for out in outs:
        o = out.outputs[0]
        ids = list(o.token_ids)
        lps = [float(step[tid].logprob) for tid, step in zip(ids, o.logprobs or [])]
        results.append({"token_ids": ids, "logprobs": lps})
    return {
        "vllm_version": vllm.__version__,
        "import_s": t1 - t0,
        "startup_s": t2 - t1,
        "generate_s": t3 - t2,
        "outputs": results,
    }


def main(argv: list[str]) -> int:
    """``REQUEST.json RESULT.json`` -> writes the result (or ``{"error": ...}``); exit 0/1."""
    return json_worker_main(argv, "d2serve.export._vllm_worker", run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
