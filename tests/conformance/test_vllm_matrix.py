"""vLLM serving parity over the conformance architectures (issue 9), where vLLM 0.32 (CPU) supports them.

Each architecture of tests/conformance/archs.py is rebuilt with hidden 128 (head_dim 32: vLLM's CPU attention
supports head sizes 32, 64, 80, ...; everything else as archs.py builds it), merged to float32 with a random
adapter (D2-LoRA on the architecture's linear projections; GPT-2 has Conv1D layers, so a PEFT LoRA on
``c_attn``/``c_proj``), and served by vLLM. vLLM's greedy tokens (temperature 0, EOS ignored) must equal a
transformers float32 greedy loop on the same merged checkpoint for every generated token, with chosen-token
logprobs within ``LOGPROB_ATOL["float32"]``, the loop and the comparison of d2serve.export.vllm.load_check
(``transformers_greedy``, ``compare_greedy``).

Cost: one vLLM engine start is ~40 s on CPU, so every supported architecture runs through ONE worker process
(d2serve.export._vllm_lora_worker via ``vllm_lora_check.run_jobs``: vLLM imported once, engines one after
another; a failure names the checkpoint in the log tail). Run under ``flock /tmp/d2s-heavy.lock``; docs/compatibility.md ("Export support")
is the user-facing copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from archs import ARCHS, Bases
from safetensors.torch import load_file

from d2serve.export.vllm import (
    LOGPROB_ATOL,
    PROMPTS,
    compare_greedy,
    prompt_token_ids,
    transformers_greedy,
)
from d2serve.export.vllm_lora_check import run_jobs

pytestmark = pytest.mark.vllm

HIDDEN_VLLM = 128  # 4 heads -> head_dim 32, the smallest head size vLLM's CPU attention supports
N_PROMPTS, MAX_TOKENS, MIN_CONTENT = 4, 16, 8
MAX_MODEL_LEN = 128  # the matrix's max_position_embeddings

# every architecture of the matrix but the tied Llama variant (Llama covers the code; tying is covered by
# Qwen2, Gemma and GPT-2); vLLM 0.32 CPU refuses none of them (measured), so there is no refusal test
SUPPORTED = ["llama", "qwen2_tied", "mistral", "gemma_tied", "phi3", "gpt2_tied", "qwen2_moe"]


def _merged(bases: Bases, arch: str, root: Path) -> Path:
    """The float32 merge of a random adapter onto the hidden-128 ``arch``: D2-LoRA, or PEFT LoRA on GPT-2."""
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.merge import merge

    a = ARCHS[arch]
    if a.d2lora_targets is None:  # Conv1D layers: no D2-LoRA adapter can exist; PEFT's own LoRA instead
        from test_merge_matrix import peft_adapter

        ad = peft_adapter(bases, arch, root / f"{arch}-ad", target_modules=list(a.attn))
    else:
        ad = random_adapter(bases.dir(arch), root / f"{arch}-ad", target_modules=a.d2lora_targets, std=0.2)
    out = root / f"{arch}-merged"
    merge(base=bases.dir(arch), adapter=ad, out=out, dtype="float32")
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Merge every supported architecture, serve them all in one vLLM worker; arch -> (base, merged, ids, vLLM out)."""
    root = tmp_path_factory.mktemp("vllm_matrix")
    bases = Bases(root / "bases", hidden=HIDDEN_VLLM)
    merged = {a: _merged(bases, a, root) for a in SUPPORTED}
    prompts = list(PROMPTS[:N_PROMPTS])
    ids = {a: prompt_token_ids(merged[a], prompts)[0] for a in SUPPORTED}
    jobs = [{"model": str(merged[a]), "dtype": "float32", "max_model_len": MAX_MODEL_LEN, "max_tokens": MAX_TOKENS,
             "runs": [{"name": "greedy", "requests": [{"prompt_token_ids": x, "lora": None} for x in ids[a]]}]}
            for a in SUPPORTED]
    res = run_jobs(jobs)
    return {a: (bases.dir(a), merged[a], ids[a], job["runs"]["greedy"]) for a, job in zip(SUPPORTED, res["jobs"])}


@pytest.mark.parametrize("arch", SUPPORTED)
def test_vllm_serves_merged_arch_with_greedy_parity(served, arch):
    base, merged, ids, vout = served[arch]
    # the adapter moved the weights (vLLM serving the base would not pass below)
    m, b = load_file(str(merged / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert set(m) == set(b)
    assert sum(not torch.equal(m[k], b[k]) for k in m) >= 2

    hf, _ = transformers_greedy(merged, torch.float32, ids, MAX_TOKENS, [o["token_ids"] for o in vout])
    base_hf, _ = transformers_greedy(base, torch.float32, ids, MAX_TOKENS)
    assert any(x["token_ids"] != y["token_ids"] for x, y in zip(hf, base_hf)), "the adapter changes no greedy token"

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged), local_files_only=True)
    special = frozenset(tok.all_special_ids)
    rows = compare_greedy(list(PROMPTS[:N_PROMPTS]), ids, vout, hf, tok.decode, n_exact=MAX_TOKENS,
                          logprob_atol=LOGPROB_ATOL["float32"], special_ids=special)
    for r, v in zip(rows, vout, strict=True):
        assert r.nonfinite is None, r.nonfinite
        assert len(v["token_ids"]) == MAX_TOKENS
        assert r.first_divergence is None, (arch, r)  # float32: every greedy token identical
        assert r.n_content_compared >= MIN_CONTENT, (arch, r)
        assert r.max_abs_logprob_diff <= LOGPROB_ATOL["float32"], (arch, r)

