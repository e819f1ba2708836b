"""Prompt log-probabilities with LoRA on vLLM's CPU punica path (vLLM 0.32.x and 0.33.x): one adapter slot per row.

The bug this works around (vLLM 0.32.0 and 0.33.0, same code): ``GPUModelRunner._get_prompt_logprobs_dict``
(inherited by ``CPUModelRunner``) calls ``model.compute_logits(hidden_states[offset : offset + n])`` once per
request that asked for ``prompt_logprobs``, with ``n`` = that request's prompt positions. With LoRA enabled the
logits processor is ``LogitsProcessorWithLoRA``, whose ``_get_logits`` adds the lm_head LoRA through
``PunicaWrapperCPU.add_lora_logits``; that indexes the adapters with ``sampler_indices``, which has one entry per
*sampled* token of the whole batch (``LoRAMapping.prompt_mapping``), not one per prompt position of this request.
``bgmv_shrink``'s ``einsum("bi, boi -> bo")`` then fails ("subscript b has size n for operand 1 which does not
broadcast with previously seen size k") as soon as n != k and k != 1, i.e. whenever several requests are scored in
one step; when k == 1 or n == k by chance it runs, with the wrong request's slot for the lm_head LoRA when the
batch mixes adapters. (The GPU wrapper reads a separate prompt-mapping buffer and does not raise; it is not
patched here.)

The fix: the rows of that call are positions ``offset .. offset + n - 1`` of the step's scheduled tokens, and
``punica_wrapper.token_lora_indices`` already holds every scheduled token's slot (-1: no adapter). So

=====================================================  ==========================================================
vLLM function                                           what the wrapper adds
=====================================================  ==========================================================
``GPUModelRunner._get_prompt_logprobs_dict``            records the step's ``hidden_states`` (tokens, hidden) for
                                                        the duration of the call (a context variable)
``LogitsProcessorWithLoRA._get_logits``                 inside that call only, on the CPU punica wrapper: finds
                                                        the row offset of ``hidden_states`` (a row slice of the
                                                        recorded tensor: same storage, same strides) and runs
                                                        vLLM's ``_get_logits`` with a shallow copy of the punica
                                                        wrapper whose ``sampler_indices`` are
                                                        ``token_lora_indices[offset : offset + n]``; when no
                                                        slot of those rows holds a non-zero lm_head LoRA the
                                                        copy's ``add_lora_logits`` does nothing (its term is
                                                        exactly zero; bgmv would gather a (rows, vocab, rank)
                                                        tensor of zeros per call)
=====================================================  ==========================================================

Outside prompt log-probabilities (the sampler's own ``compute_logits``), and on any other punica wrapper, vLLM's
``_get_logits`` runs unchanged. The lm_head LoRA itself is vLLM's (d2serve's folded adapters never adapt lm_head,
so its term is zero; the fix is exact for adapters that do).
"""

from __future__ import annotations

import contextvars
import copy
import functools

import torch

_step_hidden: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("d2serve_step_hidden",
                                                                                    default=None)
_installed = False


def row_offset(full: torch.Tensor, rows: torch.Tensor) -> int:
    """The index of ``rows``' first row in ``full`` when ``rows`` is ``full[k : k + n]`` (a view), else raises.

    ``full`` (tokens, hidden) and ``rows`` (n, hidden): any dtype; the check is on storage, strides and offsets.

    Raises:
        RuntimeError: ``rows`` is not a contiguous row slice of ``full`` (then the slots of its rows are unknown).
    """
    ok = (full.dim() == 2 and rows.dim() == 2 and rows.shape[1] == full.shape[1] and rows.stride() == full.stride()
          and rows.untyped_storage().data_ptr() == full.untyped_storage().data_ptr())
    delta = rows.storage_offset() - full.storage_offset()
    if ok and full.stride(0) > 0 and delta % full.stride(0) == 0:
        k = delta // full.stride(0)
        if 0 <= k and k + rows.shape[0] <= full.shape[0]:
            return k
    raise RuntimeError(
        "d2serve: prompt logprobs with LoRA: the hidden states given to the logits processor "
        f"{tuple(rows.shape)} are not a row slice of the step's hidden states {tuple(full.shape)}; "
        "cannot tell which adapter each row belongs to")


def row_slots(punica, full: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The adapter slot (-1: none) of each row of ``rows`` (a row slice of the step's ``full`` hidden states).

    Returns: (n,) long, ``punica.token_lora_indices[k : k + n]`` with ``k`` = :func:`row_offset`.

    Raises:
        RuntimeError: not a row slice, or the token mapping is shorter than the step's hidden states.
    """
    k = row_offset(full, rows)
    idx = punica.token_lora_indices
    if idx.shape[0] < k + rows.shape[0]:
        raise RuntimeError(f"d2serve: prompt logprobs with LoRA: vLLM's token LoRA mapping has {idx.shape[0]} "
                           f"entries, rows {k}..{k + rows.shape[0] - 1} were asked for")
    return idx[k: k + rows.shape[0]]


def with_sampler_indices(punica, slots: torch.Tensor):
    """A shallow copy of ``punica`` (a PunicaWrapperCPU) whose ``sampler_indices`` property returns ``slots``.

    ``sampler_indices`` reads ``_sampler_indices[: indices_len[1]]``; the copy gets its own ``_sampler_indices``
    (= ``slots``, (n,) long) and its own ``indices_len`` list, so vLLM's wrapper is never modified.
    """
    p = copy.copy(punica)
    p._sampler_indices = slots.to(torch.long)
    p.indices_len = list(punica.indices_len)
    p.indices_len[1] = int(slots.shape[0])
    return p


def lm_head_lora_used(layer, slots: torch.Tensor) -> bool:
    """Whether any slot in ``slots`` holds a non-zero lm_head LoRA in ``layer`` (a LogitsProcessorWithLoRA).

    ``slots`` (n,) long, -1 = no adapter: checked as the slot torch indexing reads for it (the last one, what
    vLLM 0.32's CPU ops read; 0.33 masks it). The term ``(x A^T) B^T`` is exactly zero when A or B of every slot
    used is zero, so skipping it changes no bit of the logits (for finite x).
    """
    n_slots = layer.lora_a_stacked.shape[0]
    for i in torch.unique(slots).tolist():
        i %= n_slots
        if torch.count_nonzero(layer.lora_a_stacked[i]) and torch.count_nonzero(layer.lora_b_stacked[i]):
            return True
    return False


def _no_lm_head_lora(*args, **kwargs) -> None:
    """Stands in for ``add_lora_logits`` when no row's adapter has an lm_head LoRA (its term is exactly 0)."""
    return None


def install(_v) -> None:
    """Wrap the two vLLM methods (``_v`` = :func:`d2serve.vllm_plugin.compat.load`'s namespace). Idempotent."""
    global _installed
    if _installed:
        return
    GPUModelRunner, LogitsProcessorWithLoRA = _v.GPUModelRunner, _v.LogitsProcessorWithLoRA
    PunicaWrapperCPU = _v.PunicaWrapperCPU

    orig_prompt = GPUModelRunner._get_prompt_logprobs_dict
    orig_logits = LogitsProcessorWithLoRA._get_logits

    @functools.wraps(orig_prompt)
    def _get_prompt_logprobs_dict(self, hidden_states, *args, **kwargs):
        token = _step_hidden.set(hidden_states)
        try:
            return orig_prompt(self, hidden_states, *args, **kwargs)
        finally:
            _step_hidden.reset(token)

    @functools.wraps(orig_logits)
    def _get_logits(self, hidden_states, *args, **kwargs):
        full = _step_hidden.get()
        punica = getattr(self, "punica_wrapper", None)
        if full is None or not isinstance(punica, PunicaWrapperCPU):
            return orig_logits(self, hidden_states, *args, **kwargs)
        slots = row_slots(punica, full, hidden_states)
        local = with_sampler_indices(punica, slots)
        if not lm_head_lora_used(self, slots):
            # bgmv would gather a (rows, vocab, rank) tensor of zeros for every prompt row (SmolLM2: ~6 MiB a
            # row): the cost, not the value, of vLLM's lm_head LoRA for adapters that do not adapt lm_head
            local.add_lora_logits = _no_lm_head_lora
        self.punica_wrapper = local
        try:
            return orig_logits(self, hidden_states, *args, **kwargs)
        finally:
            self.punica_wrapper = punica

    GPUModelRunner._get_prompt_logprobs_dict = _get_prompt_logprobs_dict
    LogitsProcessorWithLoRA._get_logits = _get_logits
    _installed = True
