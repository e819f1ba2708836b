"""Prompt log-probabilities with LoRA in vLLM (d2serve.vllm_plugin.logits): the upstream CPU bug on a real
``PunicaWrapperCPU`` + ``LogitsProcessorWithLoRA`` (no engine), the plugin's per-row slots against a float64
reference, and (marked vllm, one engine) vLLM's prompt logprobs of a mixed batch against transformers'
log-likelihoods of the merged and the base model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_vllm_tiny_llama

pytestmark = pytest.mark.vllm  # vllm is pinned: a missing vllm fails these tests instead of skipping them

HIDDEN, VOCAB, RANK, SLOTS = 8, 11, 2, 3  # slot 2 stays empty: the spare slot d2serve always keeps (slot -1 bug)


@pytest.fixture(scope="module")
def v():
    import vllm

    from d2serve.vllm_plugin import compat, patches

    assert compat.problems(vllm.__version__) == []
    patches.install()
    return compat.load()


def _punica(v, token_slots: list[int], sampler_slots: list[int]):
    """A real PunicaWrapperCPU holding one step's mapping: a slot per scheduled token and per sampled token."""
    p = v.PunicaWrapperCPU(64, 4, "cpu")
    p._token_lora_indices[: len(token_slots)] = torch.tensor(token_slots)
    p._sampler_indices[: len(sampler_slots)] = torch.tensor(sampler_slots)
    p.indices_len[:] = [len(token_slots), len(sampler_slots), len(sampler_slots), len(token_slots)]
    return p


def _layer(v, punica):
    """A LogitsProcessorWithLoRA without vLLM's constructor (no distributed state): lm_head W and an lm_head LoRA
    in slots 0 and 1 (slot 2 all zeros)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(VOCAB, HIDDEN, generator=g)
    layer = v.LogitsProcessorWithLoRA.__new__(v.LogitsProcessorWithLoRA)
    torch.nn.Module.__init__(layer)
    layer.base_layer = SimpleNamespace(_apply_head=lambda head, h, bias: h @ w.T, _gather_logits=lambda x: x,
                                       vocab_size=VOCAB)
    layer.sharded_to_full_mapping_gpu = None
    layer.lora_a_stacked = torch.zeros(SLOTS, 1, RANK, HIDDEN)
    layer.lora_b_stacked = torch.zeros(SLOTS, 1, VOCAB, RANK)
    layer.lora_a_stacked[:2] = torch.randn(2, 1, RANK, HIDDEN, generator=g)
    layer.lora_b_stacked[:2] = torch.randn(2, 1, VOCAB, RANK, generator=g)
    layer.punica_wrapper = punica
    return layer, w


def _reference(layer, w, h: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """float64: h W^T + (h A_slot^T) B_slot^T per row (slot -1: no LoRA)."""
    h64, out = h.double(), []
    for row, s in zip(h64, slots):
        y = row @ w.double().T
        if s >= 0:
            y = y + (row @ layer.lora_a_stacked[s, 0].double().T) @ layer.lora_b_stacked[s, 0].double().T
        out.append(y)
    return torch.stack(out)


# request A (slot 0): tokens 0-2, request B (slot 1): tokens 3-6, request C (no adapter): tokens 7-9
TOKEN_SLOTS = [0, 0, 0, 1, 1, 1, 1, -1, -1, -1]
SAMPLER_SLOTS = [0, 1, -1]


def test_upstream_cpu_prompt_logits_with_lora_fail_on_a_batch(v):
    """vLLM as shipped (the unwrapped _get_logits): a request's prompt rows are indexed with the batch's
    per-request sampler slots -> bgmv's einsum size mismatch, the crash the bench used to skip the eval arm for."""
    layer, _ = _layer(v, _punica(v, TOKEN_SLOTS, SAMPLER_SLOTS))
    hidden = torch.randn(len(TOKEN_SLOTS), HIDDEN)
    upstream = v.LogitsProcessorWithLoRA._get_logits.__wrapped__
    with pytest.raises(RuntimeError, match="einsum"):
        upstream(layer, hidden[3:7], None)


def test_prompt_rows_get_their_own_requests_slot(v):
    """Inside _get_prompt_logprobs_dict each request's prompt rows get token_lora_indices[offset:offset+n]:
    logits = h W^T + that slot's lm_head LoRA (float64 reference, 1e-5), for an adapter, another adapter and a
    base request; the sampler path (outside the call) and vLLM's punica wrapper stay as they were."""
    from d2serve.vllm_plugin import logits

    punica = _punica(v, TOKEN_SLOTS, SAMPLER_SLOTS)
    layer, w = _layer(v, punica)
    hidden = torch.randn(len(TOKEN_SLOTS), HIDDEN, generator=torch.Generator().manual_seed(3))
    seen = {}

    class Runner:  # _get_prompt_logprobs_dict's first line reads self.num_prompt_logprobs; {} returns at once
        @property
        def num_prompt_logprobs(self):
            seen["hidden"] = logits._step_hidden.get()
            return {}

    assert v.GPUModelRunner._get_prompt_logprobs_dict(Runner(), hidden, {}) == {}
    assert seen["hidden"] is hidden and logits._step_hidden.get() is None  # set for the call only

    token = logits._step_hidden.set(hidden)
    try:
        for lo, hi in ((0, 3), (3, 7), (7, 10), (4, 6)):
            got = v.LogitsProcessorWithLoRA._get_logits(layer, hidden[lo:hi], None)
            ref = _reference(layer, w, hidden[lo:hi], TOKEN_SLOTS[lo:hi])
            assert torch.allclose(got.double(), ref, atol=1e-5, rtol=0), (lo, hi)
        assert layer.punica_wrapper is punica and punica.sampler_indices.tolist() == SAMPLER_SLOTS
        with pytest.raises(RuntimeError, match="not a row slice"):
            v.LogitsProcessorWithLoRA._get_logits(layer, hidden[3:7].clone(), None)
    finally:
        logits._step_hidden.reset(token)
    # the sampler's own call (one row per request, outside prompt logprobs): vLLM's sampler slots, unchanged
    got = v.LogitsProcessorWithLoRA._get_logits(layer, hidden[[2, 6, 9]], None)
    assert torch.allclose(got.double(), _reference(layer, w, hidden[[2, 6, 9]], SAMPLER_SLOTS), atol=1e-5, rtol=0)
    # the adapters really change the logits (the comparison above is not vacuous)
    assert not torch.allclose(_reference(layer, w, hidden[3:7], [1] * 4), _reference(layer, w, hidden[3:7], [-1] * 4),
                              atol=1e-2)


def test_no_lm_head_lora_skips_the_zero_term(v, monkeypatch):
    """Rows whose slots hold no lm_head LoRA (d2serve's folded adapters never adapt lm_head): the logits are the
    base logits bit for bit and vLLM's add_lora_logits is not called; a slot with one still gets it."""
    from d2serve.vllm_plugin import logits

    punica = _punica(v, TOKEN_SLOTS, SAMPLER_SLOTS)
    layer, w = _layer(v, punica)
    layer.lora_b_stacked[1] = 0  # slot 1: A set, B zero -> no lm_head LoRA; slot 0 keeps one
    hidden = torch.randn(len(TOKEN_SLOTS), HIDDEN, generator=torch.Generator().manual_seed(4))
    calls = []
    real = v.PunicaWrapperCPU.add_lora_logits
    monkeypatch.setattr(v.PunicaWrapperCPU, "add_lora_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    token = logits._step_hidden.set(hidden)
    try:
        for lo, hi in ((3, 7), (7, 10)):  # slot 1 (zero B) and base rows (-1 -> the spare, all-zero slot)
            got = v.LogitsProcessorWithLoRA._get_logits(layer, hidden[lo:hi], None)
            assert torch.equal(got, hidden[lo:hi] @ w.T) and not calls
        got = v.LogitsProcessorWithLoRA._get_logits(layer, hidden[0:3], None)
    finally:
        logits._step_hidden.reset(token)
    assert calls and torch.allclose(got.double(), _reference(layer, w, hidden[0:3], [0] * 3), atol=1e-5, rtol=0)


def test_row_offset_refuses_what_is_not_a_row_slice():
    from d2serve.vllm_plugin.logits import row_offset

    full = torch.randn(9, 4)
    assert row_offset(full, full[2:7]) == 2 and row_offset(full[1:], full[3:5]) == 2
    for bad in (full[:, :2], full[1:4].t(), torch.randn(3, 4), full[::2]):
        with pytest.raises(RuntimeError, match="not a row slice"):
            row_offset(full, bad)


# ------------------------------------------------------------------------------------------ one real engine


def _hf_loglikelihoods(model_dir: Path, prompts: list[list[int]]) -> list[list[float]]:
    """transformers float32: log p(token_i | tokens_<i) for i >= 1 of each prompt (float64 log_softmax)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            out.append(lp.gather(1, ids[0, 1:, None])[:, 0].tolist())
    return out


def test_vllm_prompt_logprobs_unmerged_equal_merged_transformers(tmp_path):
    """One LoRA engine (d2serve's plugin), one generate call mixing D2-LoRA requests and base requests of
    different lengths with prompt_logprobs: every prompt position's log-prob equals transformers float32 on the
    merged checkpoint (adapter requests) or the base (base requests) within 1e-3 nats; the adapter changes them."""
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.export.vllm_lora import export_vllm_lora
    from d2serve.export.vllm_lora_check import cpu_safe_max_loras, run_jobs
    from d2serve.merge import merge

    base = make_vllm_tiny_llama(tmp_path / "base")
    adapter = random_adapter(base, tmp_path / "d2", method="d2lora", r=4, lora_alpha=8.0, std=0.1, seed=1,
                             target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"))
    man = export_vllm_lora(base=base, adapter=adapter, out=tmp_path / "d2-vl")
    merge(base=base, adapter=adapter, out=tmp_path / "merged", dtype="float32")
    g = torch.Generator().manual_seed(0)
    lengths = [37, 12, 50, 5, 23, 41]
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in lengths]
    loras = ["d2", None, "d2", "d2", None, "d2"]
    job = {"model": str(base), "dtype": "float32", "max_model_len": 256, "max_tokens": 1,
           "loras": {"d2": str(tmp_path / "d2-vl")}, "max_lora_rank": man["rank"], "max_loras": cpu_safe_max_loras(1),
           "runs": [{"name": "mixed", "prompt_logprobs": True,
                     "requests": [{"prompt_token_ids": p, "lora": lo} for p, lo in zip(prompts, loras)]}]}
    rows = run_jobs([job])["jobs"][0]["runs"]["mixed"]
    got = [r["prompt_logprobs"] for r in rows]
    merged_ref = _hf_loglikelihoods(tmp_path / "merged", prompts)
    base_ref = _hf_loglikelihoods(base, prompts)
    worst, moved = 0.0, 0.0
    for g_row, lo, m_row, b_row in zip(got, loras, merged_ref, base_ref):
        assert g_row[0] is None and len(g_row) == len(m_row) + 1
        ref = m_row if lo else b_row
        assert all(math.isfinite(x) for x in g_row[1:])
        worst = max(worst, max(abs(a - b) for a, b in zip(g_row[1:], ref)))
        if lo:
            moved = max(moved, max(abs(a - b) for a, b in zip(m_row, b_row)))
    print(json.dumps({"max_abs_logprob_diff": worst, "adapter_effect": moved}))
    assert worst <= 1e-3, worst
    assert moved > 0.05, moved  # the adapter changes the log-likelihoods: the comparison is not vacuous
