"""The transformers backend: eager PyTorch on CPU or CUDA, all four arms in one process.

Device: ``device`` ("cpu", "cuda", "cuda:N"; :func:`d2serve.models.resolve_device` validates it). The
dtype is the caller's (``d2serve bench`` defaults to float32 on the CPU, bfloat16 on CUDA), the same
for every arm; CUDA timings synchronise the device.
"""

from __future__ import annotations

import platform

import torch

from d2serve.compare import finite_scalar
from d2serve.models import resolve_device

from ..arms import ARM_NAMES, OPT_IN_ARMS, ArmSpec, load_arm_model
from ..timing import now
from ..workloads import GenerationCase, ScoringRequest, prompt_ids
from .protocol import Backend

ARMS_SUPPORTED = tuple(a for a in ARM_NAMES if a not in OPT_IN_ARMS)


class _StepClock:
    """A transformers streamer that timestamps every ``put``: the first is the prompt, then one per new token."""

    def __init__(self, sync):
        self.times: list[float] = []
        self._sync = sync

    def put(self, value):  # noqa: D401 - streamer protocol
        self._sync()
        self.times.append(now())

    def end(self):
        pass


class HFBackend(Backend):
    """Runs arms as transformers models with identical settings.

    Args:
        dtype: compute dtype of every arm (torch dtype).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; None -> cuda when available, else cpu.
        tokenizer_dir: the directory whose tokenizer every arm shares (the base).

    Raises:
        InputError: ``device`` is unknown or not available on this machine.
    """

    name = "hf"
    arms_supported = ARMS_SUPPORTED

    def __init__(self, *, dtype: torch.dtype, device: str | None, tokenizer_dir):
        from transformers import AutoTokenizer

        self.dtype, self.device = dtype, resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.models: dict[str, torch.nn.Module] = {}

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def settings(self) -> dict:
        """Backend settings recorded per arm (compared across arms)."""
        import transformers

        return {
            "backend": "hf",
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": self.device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "attn_implementation": None,
            "python": platform.python_version(),
        }

    def load(self, spec: ArmSpec) -> dict:
        """Load an arm's model; returns per-arm facts (e.g. the attention implementation)."""
        t0 = now()
        model = load_arm_model(spec, self.dtype, self.device)
        self.models[spec.name] = model
        return {
            "load_s": now() - t0,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        }

    def unload(self, arm: str) -> None:
        """Drop an arm's model."""
        self.models.pop(arm, None)

    @torch.inference_mode()
    def eval_once(self, arm: str, requests: list[ScoringRequest], batch: int) -> dict:
        """Score all requests once; returns ``{"seconds", "examples", "correct_pred": [choice per example]}``.

        Requests are sorted longest-first and left-padded into batches of ``batch`` sequences;
        time covers forward passes and log-prob gathering (tokenization is done before).
        """
        model = self.models[arm]
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
        scores = [0.0] * len(requests)
        self._sync()
        t0 = now()
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            L = max(len(requests[i].tokens) for i in idx)
            keep = max(requests[i].n_cont for i in idx) + 1  # lm_head only where continuation logits are needed
            ids = torch.full((len(idx), L), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), L), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every continuation ends at position L-1
                t = requests[i].tokens
                ids[r, L - len(t) :] = torch.tensor(t)
                mask[r, L - len(t) :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=pos.to(self.device),
                logits_to_keep=keep,
            ).logits  # (rows, keep, vocab): positions L-keep .. L-1
            logp = torch.log_softmax(logits.float(), dim=-1)
            for r, i in enumerate(idx):
                req = requests[i]
                n = req.n_cont
                tgt = torch.tensor(req.tokens[-n:], device=logp.device)
                scores[i] = float(logp[r, keep - n - 1 : keep - 1].gather(-1, tgt[:, None]).sum())
        self._sync()
        seconds = now() - t0
        for req, sc in zip(requests, scores):  # a NaN score would never win an argmax nor fail one
            finite_scalar(sc, where=f"bench eval, arm {arm!r}, example {req.example} choice {req.choice}",
                          side="continuation log-likelihood")
        n_ex = max(r.example for r in requests) + 1
        best: dict[int, tuple[float, int]] = {}
        for req, sc in zip(requests, scores):
            if req.example not in best or sc > best[req.example][0]:
                best[req.example] = (sc, req.choice)
        return {"seconds": seconds, "examples": n_ex, "pred": [best[i][1] for i in range(n_ex)]}

    def prompts(self, case: GenerationCase) -> list[list[int]]:
        """The token ids every arm receives for ``case``."""
        return prompt_ids(self.tokenizer, case.prompt_len, case.batch)

    @torch.inference_mode()
    def generate_once(self, arm: str, case: GenerationCase) -> dict:
        """One greedy generation of exactly ``case.max_new_tokens`` tokens per row (EOS ignored).

        Returns:
            ``{"ttft_s", "e2e_s", "itl_s": [inter-token seconds], "new_tokens"}``; TTFT is the time to
            the first new token (prefill + first step), timed by a streamer inside one ``generate`` call.
        """
        model = self.models[arm]
        ids = torch.tensor(self.prompts(case), dtype=torch.long, device=self.device)
        clock = _StepClock(self._sync)
        n = case.max_new_tokens
        self._sync()
        t0 = now()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            streamer=clock,
            pad_token_id=self.pad_id,
            eos_token_id=None,
        )
        self._sync()
        t1 = now()
        new = out.shape[1] - ids.shape[1]
        tok_times = clock.times[1:]  # first put is the prompt
        return {
            "ttft_s": tok_times[0] - t0,
            "e2e_s": t1 - t0,
            "itl_s": [b - a for a, b in zip(tok_times, tok_times[1:])],
            "new_tokens": new,
        }

    @torch.inference_mode()
    def kv_cache_check(self, arm: str, case: GenerationCase) -> dict:
        """Check the KV cache is used: the forward returns a cache, and a decode step with the cache is
        faster than recomputing the whole sequence (``use_cache=False``) at the same position.

        Returns:
            ``{"past_key_values_returned": bool, "decode_step_ms_with_cache", "full_recompute_ms",
            "kv_cache_in_use": bool}``.
        """
        model = self.models[arm]
        ids = torch.tensor(self.prompts(case), dtype=torch.long, device=self.device)
        out = model(input_ids=ids, use_cache=True)
        pkv = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        reps = 3
        caches = [_copy_cache(pkv) for _ in range(reps)]
        self._sync()
        t0 = now()
        for c in caches:
            model(input_ids=nxt, past_key_values=c, use_cache=True)
        self._sync()
        with_cache = (now() - t0) / reps
        full = torch.cat([ids, nxt], 1)
        t0 = now()
        for _ in range(reps):
            model(input_ids=full, use_cache=False)
        self._sync()
        without = (now() - t0) / reps
        return {
            "past_key_values_returned": pkv is not None,
            "decode_step_ms_with_cache": with_cache * 1e3,
            "full_recompute_ms": without * 1e3,
            "kv_cache_in_use": pkv is not None and with_cache < without,
        }


def _copy_cache(pkv):
    import copy

    return copy.deepcopy(pkv)
