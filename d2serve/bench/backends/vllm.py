"""The vLLM backend: base, merged and unmerged arms.

The ``unmerged`` arm serves the adapter unmerged through vLLM's LoRA path: the adapter is folded by
:func:`d2serve.export.vllm_lora.prepare_served_adapters` (rank-2r LoRA + per-row scales, applied by
d2serve's vLLM plugin), and every request carries it. The opt-in ``vanilla_lora`` arm is the plugin-cost
control: the same folded ``lora_A``/``lora_B`` tensors as a plain PEFT LoRA (no row scales, no ``use_dora``),
served with ``VLLM_PLUGINS=""`` so vanilla vLLM LoRA runs it with the same ``max_lora_rank`` and
``max_loras``; vanilla vLLM's CPU LoRA cannot score several prompt_logprobs requests in one step (the crash the
plugin fixes), so with the control in the run every arm scores the eval workload one request per call; each worker reports whether d2serve's plugin is active in it, and a control arm with the plugin
active (or an unmerged arm without it) is refused. Each arm is a long-lived worker subprocess
(``_vllm_worker``) with ``VLLM_CPU_KVCACHE_SPACE=1``, the same dtype and max_model_len for every arm.
Compilation: ``compile=False`` (default) runs every arm eager (``enforce_eager=True``): the fair
comparison, one mode for all; ``compile=True`` gives each arm vLLM's default, which on CPU compiles the
base and merged models but not a LoRA-enabled engine (vLLM turns torch.compile off with LoRA on CPU): the
practical comparison. Each arm records its effective ``compile_mode`` (reported by the engine). Timing is done by the worker
around ``LLM.generate`` (as vLLM's own ``benchmarks/latency.py`` does): TTFT = a ``max_tokens=1``
call (prefill + first token), e2e = a ``max_tokens=N, min_tokens=N, ignore_eos`` call; TPOT is derived.
Evaluation throughput uses ``prompt_logprobs`` (one ``generate`` call per repeat; in the unmerged arm every
request carries the adapter): vLLM's CPU LoRA path indexes prompt rows with per-request slots there and fails
(``add_lora_logits``: einsum size mismatch); d2serve's plugin gives each prompt row its own request's slot
(:mod:`d2serve.vllm_plugin.logits`), so the unmerged arm is scored like the others.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from d2serve.childproc import JsonLinesWorker, WorkerError, child_env
from d2serve.compare import finite_scalar

from ..arms import ArmSpec
from ..workloads import GenerationCase, ScoringRequest, prompt_ids
from .protocol import Backend

ARMS_SUPPORTED = ("base", "merged", "unmerged", "vanilla_lora")
MAX_MODEL_LEN = 1024
_WORKER = "d2serve.bench.backends._vllm_worker"


class VLLMBackend(Backend):
    """Runs base, merged and unmerged (LoRA + d2serve plugin) in vLLM workers with identical engine settings."""

    name = "vllm"
    arms_supported = ARMS_SUPPORTED

    @classmethod
    def engine_options(cls, *, prefix_caching: bool, compile: bool, arms: tuple[str, ...]) -> dict:
        """Prefix caching and compilation as asked; with the ``vanilla_lora`` control every arm scores the eval
        workload one request per call (vanilla vLLM's CPU LoRA cannot score several in one step)."""
        return {"prefix_caching": prefix_caching, "compile": compile, "eval_per_request": "vanilla_lora" in arms}

    @classmethod
    def allowed_to_differ(cls, options: dict) -> set[str]:
        """``compile_mode`` when each arm compiles as vLLM defaults (a LoRA engine on CPU runs eager)."""
        return {"compile_mode"} if options.get("compile") else set()

    @classmethod
    def comparison_mode(cls, options: dict) -> str:
        """Practical (each arm's default compilation) or fair (every arm eager)."""
        return ("practical: each arm's default vLLM compilation (compile_mode per arm)" if options.get("compile")
                else "fair: every arm eager (one compilation mode)")

    def __init__(self, *, dtype, device: str, tokenizer_dir, prefix_caching: bool = False, compile: bool = False,
                 eval_per_request: bool = False):
        from transformers import AutoTokenizer

        self.dtype = str(dtype).replace("torch.", "")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.workers: dict[str, JsonLinesWorker] = {}
        cfg = json.loads((Path(tokenizer_dir) / "config.json").read_text())
        self.max_model_len = min(MAX_MODEL_LEN, int(cfg.get("max_position_embeddings", MAX_MODEL_LEN)))
        self.version = None
        self.prefix_caching = bool(prefix_caching)  # off unless asked: repeats must recompute the same prompts
        self.compile = bool(compile)
        self._tmp_dirs: list[Path] = []  # the vanilla_lora control's plain LoRA folders, removed by close()
        # eval scoring: one generate call per request for every arm when the vanilla_lora control runs (vanilla
        # vLLM's CPU LoRA logits path fails on several prompt_logprobs requests in one step, the bug d2serve's plugin
        # fixes; one request per step it is exact), else all requests in one call
        self.eval_per_request = bool(eval_per_request)

    def settings(self) -> dict:
        """Backend settings recorded per arm."""
        import importlib.metadata as md

        return {
            "backend": "vllm",
            "dtype": self.dtype,
            "vllm": md.version("vllm-cpu") if _has("vllm-cpu") else md.version("vllm"),
            "max_model_len": self.max_model_len,
            "enforce_eager": not self.compile,
            "compile_requested": "vllm default" if self.compile else "eager (every arm)",
            "enable_prefix_caching": self.prefix_caching,
            "eval_scoring": "one generate call per request" if self.eval_per_request else "one generate call for all",
            "kv_cache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }

    def load(self, spec: ArmSpec) -> dict:
        """Start the arm's worker and wait until vLLM is ready.

        Raises:
            RuntimeError: the worker exited before it was ready (its log tail in the message), or the arm's
                d2serve plugin state is not the expected one.
        """
        folder = lora = None
        if spec.adapter_dir is not None:  # unmerged: the folded LoRA + row scales (d2serve's vLLM plugin)
            from d2serve.export.vllm_lora import prepare_served_adapters
            from d2serve.export.vllm_lora_check import cpu_safe_max_loras

            folders, rank = prepare_served_adapters(spec.model_dir, {"adapter": spec.adapter_dir})
            folder = folders["adapter"]
            if spec.name == "vanilla_lora":  # the same tensors as a plain LoRA, vanilla vLLM (no plugin at all)
                folder = plain_lora_copy(folder)
                self._tmp_dirs.append(folder.parent)
            lora = [str(folder), str(rank), str(cpu_safe_max_loras(1))]
        env = child_env(keep_user_values=False, kv_cache_gib=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                        vllm_plugins="" if spec.name == "vanilla_lora" and folder is not None else None)
        fd, log = tempfile.mkstemp(prefix=f"d2serve-bench-vllm-{spec.name}-", suffix=".log")
        os.close(fd)
        worker = JsonLinesWorker(
            _WORKER,
            [str(spec.model_dir), self.dtype, str(self.max_model_len), "1" if self.prefix_caching else "0",
             *(lora or ["-", "0", "0"]), "1" if self.compile else "0"],
            log=log, env=env, name=f"{_WORKER} (arm {spec.name!r})")
        try:
            ready = worker.receive()
        except WorkerError as e:
            worker.close()
            tail = Path(log).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"vLLM worker for {spec.model_dir} exited before it was ready (exit "
                               f"{worker.proc.returncode}); log {log}:\n{tail}") from e
        self.workers[spec.name] = worker
        active = ready.get("d2serve_plugin_active")
        want = spec.name != "vanilla_lora"
        if spec.adapter_dir is not None and active is not want:
            self.unload(spec.name)
            expected = "active" if want else "not loaded (VLLM_PLUGINS='')"
            raise RuntimeError(f"arm {spec.name!r}: d2serve's vLLM plugin is {'active' if active else 'not active'} "
                               f"in its vLLM worker, expected {expected}; log {log}")
        facts = {"load_s": ready["startup_s"], "compile_mode": ready.get("compile_mode"),
                 "vllm_plugins": env.get("VLLM_PLUGINS", "<all installed>"), "d2serve_plugin_active": active}
        if spec.adapter_dir is not None:
            facts |= {"lora_max_rank": int(lora[1]), "lora_max_loras": int(lora[2])}
        return facts

    def _ask(self, arm: str, req: dict) -> dict:
        """One request to the arm's worker.

        Raises:
            WorkerError: the worker failed on it (its traceback in the message).
            RuntimeError: the worker died without an answer.
        """
        try:
            return self.workers[arm].ask(req)
        except WorkerError as e:
            if e.traceback is None:
                raise RuntimeError(f"vLLM worker of arm {arm!r} died (exit {e.returncode})") from e
            raise

    def unload(self, arm: str) -> None:
        """Stop an arm's worker (quit; its process group killed when it does not exit within 60 s)."""
        worker = self.workers.pop(arm, None)
        if worker is not None:
            worker.close(timeout_s=60)

    def close(self) -> None:
        """Stop every worker and remove the control arm's temporary folders."""
        import shutil

        for arm in list(self.workers):
            self.unload(arm)
        for d in self._tmp_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._tmp_dirs.clear()

    def prompts(self, case: GenerationCase) -> list[list[int]]:
        """The token ids every arm receives for ``case``."""
        return prompt_ids(self.tokenizer, case.prompt_len, case.batch)

    def generate_once(self, arm: str, case: GenerationCase) -> dict:
        """TTFT from a 1-token call, e2e from an N-token call (same prompts)."""
        ps = self.prompts(case)
        first = self._ask(arm, {"op": "generate", "prompts": ps, "max_tokens": 1})
        full = self._ask(arm, {"op": "generate", "prompts": ps, "max_tokens": case.max_new_tokens})
        return {"ttft_s": first["seconds"], "e2e_s": full["seconds"], "itl_s": [],
                "new_tokens": min(full["new_tokens"])}

    def eval_once(self, arm: str, requests: list[ScoringRequest], batch: int) -> dict:
        """Score every request with ``prompt_logprobs`` in one ``generate`` call (vLLM batches internally), or one
        call per request when ``eval_per_request`` (the plugin-cost control runs)."""
        res = self._ask(arm, {"op": "score", "prompts": [list(r.tokens) for r in requests],
                              "per_request": self.eval_per_request})
        best: dict[int, tuple[float, int]] = {}
        for i, (r, lps) in enumerate(zip(requests, res["prompt_logprobs"])):
            cont = [float(x) for x in lps[-r.n_cont:]]
            sc = finite_scalar(sum(cont), where=f"bench eval, arm {arm!r}, example {r.example} choice {r.choice}",
                               side="vLLM continuation log-likelihood")
            if r.example not in best or sc > best[r.example][0]:
                best[r.example] = (sc, r.choice)
        n_ex = max(r.example for r in requests) + 1
        return {"seconds": res["seconds"], "examples": n_ex, "pred": [best[i][1] for i in range(n_ex)]}

    def kv_cache_check(self, arm: str, case: GenerationCase) -> dict:
        """vLLM always decodes with its paged KV cache."""
        return {"past_key_values_returned": True, "kv_cache_in_use": True, "note": "vLLM paged KV cache"}


def plain_lora_copy(folded: Path) -> Path:
    """A plain PEFT LoRA folder with the same tensors as a folded one (the ``vanilla_lora`` control).

    Args:
        folded: a folder written by :func:`d2serve.export.vllm_lora.export_vllm_lora`:
            ``adapter_model.safetensors`` (``lora_A`` (R, in), ``lora_B`` (out, R), float32) and
            ``adapter_config.json`` (r = lora_alpha = R).

    Returns:
        ``<new temp dir>/plain-lora``: ``adapter_model.safetensors`` (the same file, hard-linked or copied) and
        ``adapter_config.json`` without ``use_dora`` and d2serve's marker, so vanilla vLLM serves it as an
        ordinary LoRA of rank R on the same ``target_modules``; the row scales (``d2serve_scales.safetensors``)
        and the manifest are left out. The caller removes the temp dir.

    Raises:
        InputError: ``folded`` lacks either file.
    """
    import shutil

    from d2serve.adapters.io import WEIGHTS_NAME
    from d2serve.errors import InputError
    from d2serve.export.vllm_lora import MARKER

    folded = Path(folded)
    cfg_path, weights = folded / "adapter_config.json", folded / WEIGHTS_NAME
    for f in (cfg_path, weights):
        if not f.is_file():
            raise InputError(f"{f}: missing; expected a folded LoRA folder (d2serve export vllm-lora)")
    cfg = json.loads(cfg_path.read_text())
    cfg.pop(MARKER, None)
    cfg["use_dora"] = False
    out = Path(tempfile.mkdtemp(prefix="d2serve-bench-plain-lora-")) / "plain-lora"
    out.mkdir()
    try:
        os.link(weights, out / WEIGHTS_NAME)
    except OSError:  # another file system
        shutil.copyfile(weights, out / WEIGHTS_NAME)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _has(dist: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False
