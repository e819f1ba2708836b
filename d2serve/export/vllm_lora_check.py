"""Parity gate of unmerged vLLM serving: folded LoRA folders on the base vs each merged checkpoint, in vLLM.

For each adapter: the greedy tokens and chosen-token logprobs of the base served with the folder (d2serve's
plugin) must equal those of the merged checkpoint served by vLLM in the same dtype (float32: identical tokens
for every generated token, EOS ignored, logprobs within ``logprob_atol``; bfloat16/float16: the merged export's
rule of docs/vllm.md: logprobs within the dtype's tolerance on the common prefix, the first ``n_exact`` tokens
identical unless the split is a near-tie in the merged engine's own top-5). Base requests through the
LoRA-enabled engine must equal a plain engine's, and one batch mixing the base and every adapter must give
each request what it gets alone (one request per ``generate`` call).

All engines run in one worker process (d2serve.export._vllm_lora_worker), one after another.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from d2serve.childproc import WorkerError, child_env, run_json_worker
from d2serve.export.vllm import (
    LOGPROB_ATOL,
    PROMPTS,
    WORKER_TIMEOUT_S,
    VllmLoadError,
    prompt_token_ids,
)

MIXED_ATOL = 1e-4  # float32: the same request in a mixed batch vs alone (batch shape changes GEMM rounding only)


def cpu_safe_max_loras(n_adapters: int) -> int:
    """``max_loras`` for serving ``n_adapters``: one spare slot that no adapter ever fills.

    vLLM 0.32's CPU LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py, ``bgmv_shrink`` / ``bgmv_expand``) index the
    stacked weights with the token's slot, and a base token's slot is -1, i.e. the LAST slot: when every slot
    holds an adapter, base requests batched with adapter requests get the last adapter's LoRA (measured on the
    tiny model: base tokens changed from the 1st token). d2serve's vLLM plugin removes that root cause
    (d2serve.vllm_plugin.patches._wrap_cpu_lora_shrink), so any ``--max-loras`` is exact with it; the spare slot
    (all zeros) keeps base requests exact also in an engine without the plugin (plain-LoRA folders only).
    """
    return n_adapters + 1


def run_jobs(jobs: list[dict], timeout_s: float = WORKER_TIMEOUT_S, env: dict | None = None) -> dict:
    """Run :mod:`d2serve.export._vllm_lora_worker` on ``jobs`` in a fresh process group tied to this one; its
    result dict.

    Args:
        env: the worker's environment (default :func:`d2serve.childproc.child_env` with a 1 GiB CPU KV cache).

    Raises:
        VllmLoadError: the worker failed, timed out (its group is killed) or wrote no result.
    """
    with tempfile.TemporaryDirectory(prefix="d2serve-vllm-lora-") as td:
        log = Path(td) / "vllm.log"
        t0 = time.perf_counter()
        try:
            result = run_json_worker("d2serve.export._vllm_lora_worker", {"jobs": jobs}, log=log,
                                     env=env or child_env(kv_cache_gib=1), timeout_s=timeout_s)
        except WorkerError as e:
            if e.timed_out:
                raise VllmLoadError(f"vLLM did not finish within {timeout_s:.0f} s; log tail:\n"
                                    f"{e.log_tail()}") from None
            raise VllmLoadError(f"vLLM failed:\n{e.detail}\nlog tail:\n{e.log_tail()}") from None
        result["wall_s"] = time.perf_counter() - t0
        return result


def compare(got: list[dict], ref: list[dict], *, dtype: str, logprob_atol: float, n_exact: int = 8) -> dict:
    """Compare greedy outputs request by request: ``{"passed", "max_abs_logprob_diff", "first_divergences"}``.

    float32: every token identical and every chosen-token logprob within ``logprob_atol``. Other dtypes:
    logprobs within ``logprob_atol`` on each common prefix, and a divergence before ``n_exact`` only where
    the reference rated the other token within ``2 * logprob_atol`` of its own (a near-tie, from its top-5).
    """
    max_diff, firsts, ok = 0.0, [], True
    for g, r in zip(got, ref, strict=True):
        gt, rt = g["token_ids"], r["token_ids"]
        first = next((j for j in range(min(len(gt), len(rt))) if gt[j] != rt[j]), None)
        if first is None and len(gt) != len(rt):
            first = min(len(gt), len(rt))
        common = len(gt) if first is None else first
        d = max((abs(a - b) for a, b in zip(g["logprobs"][:common], r["logprobs"][:common])), default=0.0)
        max_diff = max(max_diff, d)
        firsts.append(first)
        if d > logprob_atol or d != d:
            ok = False
        if first is not None:
            if dtype == "float32":
                ok = False
            elif first < n_exact:
                top = (r.get("top") or [{}] * (first + 1))[first]
                other = top.get(str(gt[first])) if first < len(gt) else None
                if other is None or r["logprobs"][first] - other > 2 * logprob_atol:
                    ok = False
    return {"passed": ok, "max_abs_logprob_diff": max_diff, "first_divergences": firsts}


def parity_check(base: str | Path, adapters: dict[str, tuple[Path, Path]], *, dtype: str, n_prompts: int = 4,
                 max_tokens: int = 32, logprob_atol: float | None = None, max_lora_rank: int,
                 env: dict | None = None) -> dict:
    """Serve ``base`` with every folded folder at once and each merged checkpoint alone; compare (module docstring).

    Args:
        base: the base checkpoint the folders were folded for.
        adapters: name -> (folded vLLM LoRA folder, merged checkpoint of the same adapter in ``dtype``).
        dtype: the serving dtype of every engine.
        n_prompts, max_tokens: prompts of d2serve.export.vllm.PROMPTS (chat template), greedy tokens each.
        logprob_atol: None: 1e-3 nats for float32, else the merged export's tolerance of ``dtype``.
        max_lora_rank: vLLM's ``max_lora_rank`` (>= every folder's rank, an allowed value).

    Returns:
        a JSON-able report with ``passed`` and per adapter / base / mixed comparisons.

    Raises:
        VllmLoadError: an engine failed to start or generate (e.g. vanilla vLLM refusing a folder).
    """
    if logprob_atol is None:
        logprob_atol = 1e-3 if dtype == "float32" else LOGPROB_ATOL.get(dtype, 0.3)
    ids, fmt = prompt_token_ids(base, list(PROMPTS[:n_prompts]))
    max_len = min(max(max(len(x) for x in ids) + max_tokens + 16, 256), 2048)
    names = sorted(adapters)
    common = {"dtype": dtype, "max_model_len": max_len, "max_tokens": max_tokens}

    def reqs(lora):
        return [{"prompt_token_ids": x, "lora": lora} for x in ids]

    mixed = [r for i in range(len(ids)) for lora in [None, *names] for r in [reqs(lora)[i]]]
    runs = [{"name": "mixed", "requests": mixed}]
    runs += [{"name": f"alone:{k}", "requests": [r]} for k, r in enumerate(mixed)]
    jobs = [{"model": str(base), **common, "loras": {n: str(adapters[n][0]) for n in names},
             "max_lora_rank": max_lora_rank, "max_loras": cpu_safe_max_loras(len(names)), "runs": runs},
            {"model": str(base), **common, "runs": [{"name": "ref", "requests": reqs(None)}]}]
    jobs += [{"model": str(adapters[n][1]), **common, "runs": [{"name": "ref", "requests": reqs(None)}]} for n in names]
    res = run_jobs(jobs, env=env)
    unmerged, plain, merged = res["jobs"][0], res["jobs"][1], res["jobs"][2:]
    got_mixed = unmerged["runs"]["mixed"]
    alone = [unmerged["runs"][f"alone:{k}"][0] for k in range(len(mixed))]
    stride = 1 + len(names)
    report = {"dtype": dtype, "prompt_format": fmt, "n_prompts": len(ids), "max_tokens": max_tokens,
              "logprob_atol": logprob_atol, "vllm_version": res["vllm_version"], "worker_wall_s": res["wall_s"],
              "unmerged_startup_s": unmerged["startup_s"], "unmerged_compilation_mode": unmerged["compilation_mode"],
              "merged_compilation_mode": merged[0]["compilation_mode"] if merged else None, "adapters": {}}
    report["base"] = compare(got_mixed[0::stride], plain["runs"]["ref"], dtype=dtype, logprob_atol=logprob_atol)
    for j, n in enumerate(names):
        sel = got_mixed[j + 1::stride]
        report["adapters"][n] = compare(sel, merged[j]["runs"]["ref"], dtype=dtype, logprob_atol=logprob_atol)
        changed = sum(a["token_ids"] != b["token_ids"] for a, b in zip(sel, plain["runs"]["ref"]))
        report["adapters"][n]["n_prompts_differing_from_base"] = changed
    tol = MIXED_ATOL if dtype == "float32" else logprob_atol
    report["mixed_vs_alone"] = compare(got_mixed, alone, dtype="float32", logprob_atol=tol)
    report["passed"] = (report["base"]["passed"] and report["mixed_vs_alone"]["passed"]
                        and all(a["passed"] for a in report["adapters"].values()))
    return report
