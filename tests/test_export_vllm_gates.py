"""vLLM parity gates without starting vLLM: NaN logprobs are named failures; an EOS-only output is not evidence."""

from __future__ import annotations

import pytest

from d2serve.export import vllm as vx
from d2serve.export.vllm import compare_greedy

from conftest import make_eos_only_llama


def test_compare_greedy_nan_logprob_is_named_not_compared():
    v = [{"token_ids": [5, 6, 7], "logprobs": [-0.1, float("nan"), -0.3]}]
    h = [{"token_ids": [5, 6, 7], "logprobs": [-0.1, -0.2, -0.3], "other_logprobs": [-0.1, -0.2, -0.3]}]
    (row,) = compare_greedy(["a"], [[0]], v, h, str, n_exact=2, logprob_atol=0.1)
    assert row.nonfinite["side"] == "vLLM logprobs" and row.nonfinite["index"] == [1]
    assert "vllm parity, prompt 0 ('a'): vLLM logprobs has 1 non-finite value (first nan at new token 1)" \
        == row.nonfinite["message"]
    assert row.max_abs_logprob_diff is None and row.n_content_compared == 0


def test_compare_greedy_counts_content_tokens_up_to_the_divergence():
    v = [{"token_ids": [5, 2, 7, 8], "logprobs": [-0.1] * 4}, {"token_ids": [2, 2, 2, 2], "logprobs": [-0.1] * 4}]
    h = [{"token_ids": [5, 2, 9, 9], "logprobs": [-0.1] * 4, "other_logprobs": [-0.1] * 4},
         {"token_ids": [2, 2, 2, 2], "logprobs": [-0.1] * 4, "other_logprobs": [-0.1] * 4}]
    rows = compare_greedy(["a", "b"], [[0], [0]], v, h, str, n_exact=1, logprob_atol=0.1, special_ids={2})
    assert (rows[0].n_compared, rows[0].n_content_compared) == (3, 2)  # 5, (EOS), 9 at the divergence
    assert (rows[1].n_compared, rows[1].n_content_compared) == (4, 0)  # identical, but only EOS


def _fake_vllm_is_transformers(monkeypatch):
    """Replace the vLLM worker by transformers' own greedy output (vLLM == reference, exactly)."""

    def fake(model_dir, dtype, prompt_ids, max_tokens, max_model_len, timeout_s=0):
        outs, _ = vx.transformers_greedy(model_dir, vx.DTYPE_NAMES[dtype], prompt_ids, max_tokens)
        return {"outputs": [{"token_ids": o["token_ids"], "logprobs": o["logprobs"]} for o in outs],
                "vllm_version": "fake", "import_s": 0.0, "startup_s": 0.0, "generate_s": 0.0, "wall_s": 0.0}

    monkeypatch.setattr(vx, "run_vllm_worker", fake)


@pytest.mark.extras
def test_load_check_of_eos_only_model_fails_on_content_tokens(tiny_llama_dir, tmp_path, monkeypatch):
    model = make_eos_only_llama(tiny_llama_dir, tmp_path / "eos")
    _fake_vllm_is_transformers(monkeypatch)
    rep = vx.load_check(model, n_prompts=3, max_new_tokens=10, n_exact=4)
    assert rep.n_prompts_fully_identical == 3 and rep.max_abs_logprob_diff == 0.0  # identical ...
    assert rep.n_content_tokens_compared == 0  # ... EOS only
    assert not rep.passed
    assert len(rep.failures) == 1 and "only 0 content tokens compared over 3 prompts" in rep.failures[0]


@pytest.mark.extras
def test_load_check_of_ordinary_model_passes_with_content_tokens(tiny_llama_dir, monkeypatch):
    _fake_vllm_is_transformers(monkeypatch)
    rep = vx.load_check(tiny_llama_dir, n_prompts=3, max_new_tokens=10, n_exact=4)
    assert rep.passed, rep.failures
    assert rep.n_content_tokens_compared >= 24


@pytest.mark.extras
def test_load_check_nan_weight_fails_naming_it(tiny_llama_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(tiny_llama_dir, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.0.self_attn.q_proj.weight"][1, 1] = float("nan")
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    _fake_vllm_is_transformers(monkeypatch)
    rep = vx.load_check(bad, n_prompts=2, max_new_tokens=8, n_exact=4)
    assert not rep.passed
    assert all("non-finite value" in f and "new token 0" in f for f in rep.failures[:2]), rep.failures
