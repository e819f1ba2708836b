"""A long-lived vLLM worker for the bench: loads one model, then answers JSON-line requests on stdin.

Run as ``python -m d2serve.bench.backends._vllm_worker MODEL_DIR DTYPE MAX_MODEL_LEN [PREFIX_CACHING
[LORA_DIR MAX_LORA_RANK MAX_LORAS [COMPILE]]]`` (vLLM spawns processes, hence the ``__main__`` guard).
``PREFIX_CACHING`` is ``0`` (default: off, so a repeated prompt is recomputed every time, as a timing must)
or ``1``. ``LORA_DIR`` (``-`` for none): a folded LoRA folder (``d2serve export vllm-lora``) applied to every
request through vLLM's LoRA path (d2serve's plugin adds the per-row scales). ``COMPILE`` ``1``: vLLM's default
compilation (``enforce_eager=False``; vLLM itself turns torch.compile off on CPU when LoRA is enabled);
default ``0``: eager for every arm. Requests (one JSON object per line):
``{"op": "generate", "prompts": [[ids]], "max_tokens": N}`` -> ``{"seconds", "new_tokens": [n per row]}``
(greedy, ``ignore_eos``, ``min_tokens = max_tokens``);
``{"op": "score", "prompts": [[ids]], "per_request": bool}`` -> ``{"seconds", "prompt_logprobs": [[lp per
position]]}`` (``per_request``: one ``generate`` call per prompt instead of one for all);
``{"op": "quit"}``. The first line written is ``{"ready": true, "vllm": version, "startup_s": s, "compile_mode",
"d2serve_plugin_active": bool}`` (whether d2serve's vLLM plugin installed its patches in this process). A failure
is answered ``{"error": traceback}`` and ends the worker (the JSON-lines protocol of :mod:`d2serve.childproc`).
"""

from __future__ import annotations

import sys
import time

from d2serve.childproc import json_lines_worker_main


def _start(argv: list[str]):
    """Load the engine; returns the ready facts and the request handler (:func:`json_lines_worker_main`)."""
    model, dtype, max_len = argv[0], argv[1], int(argv[2])
    prefix_caching = len(argv) > 3 and argv[3] == "1"
    lora_dir = argv[4] if len(argv) > 4 and argv[4] != "-" else None
    compile_ = len(argv) > 7 and argv[7] == "1"
    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    lora_kwargs, lora_request = {}, None
    if lora_dir is not None:
        from vllm.lora.request import LoRARequest

        lora_kwargs = {"enable_lora": True, "max_lora_rank": int(argv[5]), "max_loras": int(argv[6])}
        lora_request = LoRARequest("adapter", 1, lora_dir)
    llm = LLM(model=model, dtype=dtype, max_model_len=max_len, enforce_eager=not compile_, seed=0,
              enable_prefix_caching=prefix_caching, **lora_kwargs)
    cc = llm.llm_engine.vllm_config.compilation_config
    mode = getattr(cc, "mode", getattr(cc, "level", None))
    patches = sys.modules.get("d2serve.vllm_plugin.patches")
    facts = {"vllm": vllm.__version__, "startup_s": time.perf_counter() - t0,
             "compile_mode": str(getattr(mode, "name", mode)),
             "d2serve_plugin_active": bool(patches is not None and patches._installed)}

    def handle(req: dict) -> dict:
        prompts = [{"prompt_token_ids": p} for p in req["prompts"]]
        if req["op"] == "generate":
            n = req["max_tokens"]
            sp = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
            t = time.perf_counter()
            res = llm.generate(prompts, sp, use_tqdm=False, lora_request=lora_request)
            return {"seconds": time.perf_counter() - t, "new_tokens": [len(r.outputs[0].token_ids) for r in res]}
        sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        t = time.perf_counter()
        if req.get("per_request"):  # one request per engine call (vanilla vLLM CPU LoRA cannot batch them)
            res = [llm.generate([q], sp, use_tqdm=False, lora_request=lora_request)[0] for q in prompts]
        else:
            res = llm.generate(prompts, sp, use_tqdm=False, lora_request=lora_request)
        secs = time.perf_counter() - t
        lps = []
        for p, r in zip(req["prompts"], res):
            row = [None] + [float(d[tok].logprob) for tok, d in zip(p[1:], r.prompt_logprobs[1:])]
            lps.append(row)  # NaN/inf travel as JSON NaN/Infinity; the parent rejects them (finite_scalar)
        return {"seconds": secs, "prompt_logprobs": lps}

    return facts, handle


def main(argv: list[str]) -> int:
    """Serve requests until ``quit`` or EOF (exit 0), or report the first error and exit 1."""
    return json_lines_worker_main(lambda: _start(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
