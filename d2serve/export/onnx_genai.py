"""The ``genai`` ONNX target: a KV-cache decoder for ONNX Runtime GenAI, built by its model builder.

One job: run ``onnxruntime_genai.models.builder`` (not reimplemented here)
offline on the local HF directory, then compare ORT-GenAI's greedy decoding
with transformers' greedy ``generate`` on a fixed prompt set and measure
ORT-GenAI decode tokens/s.

Both sides get the *same* prompt token ids (from the checkpoint's
transformers tokenizer), so tokenizer differences cannot hide or fake a
decoder mismatch. Two comparisons per prompt:

* free-running greedy tokens: first divergence index and the fraction of the
  reference tokens matched before it;
* teacher-forced logits along the transformers greedy path (ORT-GenAI fed the
  reference tokens one at a time through its KV cache): max abs logit diff and
  top-1 agreement.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from d2serve.childproc import child_env, run_tied_to_parent
from d2serve.compare import (
    NonFiniteError,
    check_finite,
    content_token_count,
    max_abs_diff,
    special_token_ids,
    top1_agreement,
)
from d2serve.export.onnx_files import OnnxExportError, check_external_data

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Question: What is the boiling point of water at sea level? Answer:",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
)
MAX_NEW_TOKENS = 32
# The parity check must compare at least this many content tokens (not EOS/pad/special) per prompt on average.
MIN_CONTENT_TOKENS_PER_PROMPT = 8


# ONNX Runtime's CPU GroupQueryAttention kernel (the attention op the genai builder emits) needs head_size % 8 == 0
GQA_HEAD_SIZE_MULTIPLE = 8


def check_genai_limits(config: dict, where: str | Path) -> None:
    """Refuse, before any build, a checkpoint whose decoder the genai builder writes but ONNX Runtime cannot run.

    The builder's attention head size is ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``
    (``onnxruntime_genai.models.builders.base.Model.__init__``); ORT's ``GroupQueryAttention`` kernel raises
    "head_size must be a multiple of 8" when the session first runs it, after minutes of building.

    Args:
        config: the checkpoint's parsed ``config.json``.
        where: the checkpoint directory, for the message.

    Raises:
        OnnxExportError: naming the architecture, its head_dim and the requirement.
    """
    head_dim = config.get("head_dim")
    if head_dim is None and config.get("hidden_size") and config.get("num_attention_heads"):
        head_dim = config["hidden_size"] // config["num_attention_heads"]
    if isinstance(head_dim, int) and head_dim % GQA_HEAD_SIZE_MULTIPLE:
        arch = (config.get("architectures") or [config.get("model_type", "this architecture")])[0]
        raise OnnxExportError(
            f"{where}: {arch} has head_dim {head_dim}; ONNX Runtime's GroupQueryAttention (the attention of the "
            f"genai decoder) needs head_dim to be a multiple of {GQA_HEAD_SIZE_MULTIPLE}, so the genai target cannot "
            "run this model (the plain target has no such limit); nothing was written"
        )


def build_genai(merged: Path, out_dir: Path, precision: str, tied: bool, log_path: Path,
                options: list[str] | None = None) -> dict:
    """Run the ORT-GenAI model builder on ``merged`` into ``out_dir`` (CPU execution provider, offline).

    Args:
        merged: local HF checkpoint directory.
        out_dir: empty output directory (receives model.onnx, model.onnx.data,
            genai_config.json, tokenizer files).
        precision: "fp32", "int4" or "int8" (builder's ``-p``).
        tied: the checkpoint ties its embeddings (``tie_word_embeddings``):
            the builder is asked to share one embedding/LM-head matrix.
        log_path: where the builder's stdout+stderr is written.
        options: further ``key=value`` builder ``--extra_options`` (quantization recipe settings).

    Returns:
        ``{"export_s": float, "builder_args": [str]}``.

    The builder runs as a child in its own process group that is killed with
    this process (:func:`d2serve.childproc.run_tied_to_parent`): a killed or
    interrupted export leaves no builder running.

    Raises:
        OnnxExportError: the builder exited non-zero (message has the log tail).
    """
    extra = (["shared_embeddings=true"] if tied else []) + list(options or [])
    with tempfile.TemporaryDirectory(prefix="d2serve-genai-cache-") as cache:
        args = ["-i", str(merged.resolve()), "-o", str(out_dir.resolve()), "-p", precision, "-e", "cpu", "-c", cache]
        if extra:
            args += ["--extra_options", *extra]
        env = child_env(datasets_offline=True, no_usage_stats=False, keep_user_values=False)
        t0 = time.perf_counter()
        with open(log_path, "w") as log:  # own process group, dies with this process (even on SIGKILL)
            rc = run_tied_to_parent(
                [sys.executable, "-m", "onnxruntime_genai.models.builder", *args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cache,
            )
        seconds = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise OnnxExportError(f"onnxruntime-genai model builder failed on {merged} (exit {rc}):\n{tail}")
    shown = ["-i", "<merged>", "-o", "<out>", *args[4 : args.index("-c")], "-c", "<tmp cache>", *args[args.index(cache) + 1 :]]
    return {"export_s": seconds, "builder_args": shown}


def open_genai_model(folder: Path):
    """``og.Model(folder)`` after checking ``genai_config.json`` and the decoder's external data.

    Raises:
        OnnxExportError: missing ``genai_config.json``, decoder file or external data file (named).
    """
    import json

    import onnxruntime_genai as og

    cfg_path = folder / "genai_config.json"
    if not cfg_path.is_file():
        raise OnnxExportError(f"{folder}: no genai_config.json; not an ONNX Runtime GenAI model folder")
    try:
        fname = json.loads(cfg_path.read_text())["model"]["decoder"]["filename"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise OnnxExportError(f"{cfg_path}: expected model.decoder.filename: {e}") from e
    check_external_data(folder / fname)
    try:
        return og.Model(str(folder.resolve()))
    except RuntimeError as e:  # ORT session creation (e.g. a kernel's unsupported attribute), one line, named
        raise OnnxExportError(f"{folder}: ONNX Runtime GenAI cannot load the decoder {fname}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e


def _og_greedy(model, prompt_ids: list[int], max_new: int, where: str) -> tuple[list[int], float, float]:
    """Greedy tokens from ORT-GenAI, EOS ignored: exactly ``max_new`` tokens.

    Each step takes the argmax of ``Generator.get_logits()`` (checked finite) and appends it with
    ``append_tokens``, so no search option (EOS stop, ``min_length`` suppressing EOS) changes the choice:
    the same rule as :func:`_hf_greedy`. Returns (new tokens, prefill+first token s, decode s of the rest).

    Raises:
        NonFiniteError: a step's logits hold a NaN/inf (``where``, new-token and vocabulary index named).
    """
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new + 1, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
    out: list[int] = []
    t_first = None
    for step in range(max_new):
        row = check_finite(np.asarray(gen.get_logits()).reshape(-1), where=where, side="onnxruntime-genai",
                           dims=(f"new token {step}: vocab",))
        out.append(int(row.argmax()))
        if t_first is None:
            t_first = time.perf_counter()
        if step + 1 < max_new:
            gen.append_tokens(np.asarray([[out[-1]]], dtype=np.int32))
    t_end = time.perf_counter()
    return out, (t_first or t_end) - t0, t_end - (t_first or t_end)


def _og_teacher_forced(model, prompt_ids: list[int], ref_new: list[int]) -> np.ndarray:
    """ORT-GenAI last-position logits after the prompt and after each reference token but the last.

    Returns float32 ``(len(ref_new), vocab)``.
    """
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + len(ref_new) + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
    rows = [np.asarray(gen.get_logits()).reshape(-1)]
    for tok in ref_new[:-1]:
        gen.append_tokens(np.asarray([[tok]], dtype=np.int32))
        rows.append(np.asarray(gen.get_logits()).reshape(-1))
    return np.stack(rows).astype(np.float32)


@torch.inference_mode()
def _hf_greedy(model, prompt_ids: list[int], max_new: int, where: str) -> tuple[list[int], np.ndarray, float]:
    """transformers greedy new tokens (argmax of the raw logits, KV cache, EOS ignored: exactly ``max_new``),
    their logits ``(max_new, vocab)`` float32 and the seconds taken.

    Not ``generate``: its logits processors (EOS stop, ``min_new_tokens`` suppressing EOS) would change
    the choice; this is the rule :func:`_og_greedy` applies too.

    Raises:
        NonFiniteError: the reference logits hold a NaN/inf (``where``, new-token and vocabulary index named).
    """
    t0 = time.perf_counter()
    out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
    toks, rows = [], []
    for step in range(max_new):
        row = out.logits[0, -1].float()
        check_finite(row, where=where, side="transformers", dims=(f"new token {step}: vocab",))
        toks.append(int(row.argmax()))
        rows.append(row.numpy())
        if step + 1 < max_new:
            out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return toks, np.stack(rows), time.perf_counter() - t0


def validate_genai(
    folder: Path, hf_model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
    min_content_tokens_per_prompt: float = MIN_CONTENT_TOKENS_PER_PROMPT,
) -> dict:
    """Compare ORT-GenAI (``folder``) with the transformers float32 model on ``prompts``.

    Both sides decode exactly ``max_new_tokens`` greedy tokens per prompt, EOS ignored (a model that
    answers with EOS would otherwise give a comparison of 1-2 tokens). Comparisons use
    :mod:`d2serve.compare` (float64; NaN/inf is a named failure, never "no difference").

    Returns a JSON-ready dict: per prompt ``{"prompt", "prompt_tokens", "reference_tokens", "onnx_tokens",
    "identical", "first_divergence" (index into the new tokens, or null), "greedy_agreement" (matched prefix /
    reference length), "max_abs_logit_diff", "top1_agreement", "n_compared" (teacher-forced positions),
    "n_content_compared" (of those, positions whose reference token is a content token: not EOS, pad or
    another special token), "nonfinite"}`` and aggregates ``all_identical``, ``greedy_agreement``,
    ``max_abs_logit_diff``, ``top1_agreement`` (teacher-forced, over all positions; None when a NaN/inf was
    met), ``n_content_tokens_compared``, ``mean_content_tokens_per_prompt``, ``content_token_failure`` (a
    message when the mean is below ``min_content_tokens_per_prompt``: the comparison is not evidence),
    ``nonfinite`` (list), ``decode_tokens_per_s`` (ORT-GenAI tokens after the first / their seconds),
    ``prefill_first_token_ms`` (mean), ``transformers_tokens_per_s``.

    Raises:
        OnnxExportError: the folder is incomplete (named file).
    """
    model = open_genai_model(folder)
    eos = hf_model.generation_config.eos_token_id
    if eos is None:
        eos = hf_model.config.eos_token_id
    special = special_token_ids(tokenizer, extra=[eos] if eos is not None else [])
    rows = []
    dec_tok = dec_s = hf_tok = hf_s = 0.0
    first_ms = []
    agree = total = matched = ref_total = content = 0
    worst = 0.0
    nonfinite: list[dict] = []
    for i, p in enumerate(prompts):
        ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        if not ids:
            raise OnnxExportError(f"prompt {p!r} tokenizes to no tokens")
        where = f"genai parity, prompt {i} ({p[:40]!r})"
        row = {"prompt": p, "prompt_tokens": len(ids), "reference_tokens": [], "onnx_tokens": [], "identical": False,
               "first_divergence": None, "greedy_agreement": None, "max_abs_logit_diff": None,
               "top1_agreement": None, "n_compared": 0, "n_content_compared": 0, "nonfinite": None}
        rows.append(row)
        try:
            ref, ref_logits, secs = _hf_greedy(hf_model, ids, max_new_tokens, where)
            got, t_first, t_rest = _og_greedy(model, ids, max_new_tokens, where)
            og_logits = _og_teacher_forced(model, ids, ref)
            names, dims = ("transformers", "onnxruntime-genai"), ("new token", "vocab")
            diff = max_abs_diff(ref_logits, og_logits, where=where + " teacher-forced", names=names, dims=dims)
            same = top1_agreement(ref_logits, og_logits, where=where + " teacher-forced", names=names, dims=dims)[0]
        except NonFiniteError as e:
            row["nonfinite"] = e.to_json()
            nonfinite.append(e.to_json())
            continue
        hf_tok += len(ref)
        hf_s += secs
        first_ms.append(t_first * 1e3)
        dec_tok += max(len(got) - 1, 0)
        dec_s += t_rest
        div = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        prefix = len(ref) if div is None else div
        n_content = content_token_count(ref, special)
        row.update({"reference_tokens": ref, "onnx_tokens": got, "identical": div is None, "first_divergence": div,
                    "greedy_agreement": prefix / len(ref), "max_abs_logit_diff": diff,
                    "top1_agreement": same / len(ref), "n_compared": len(ref), "n_content_compared": n_content})
        worst = max(worst, diff)
        agree += same
        total += len(ref)
        matched += prefix
        ref_total += len(ref)
        content += n_content
    mean_content = content / len(prompts) if prompts else 0.0
    content_failure = None
    if mean_content < min_content_tokens_per_prompt:
        content_failure = (
            f"only {content} content tokens compared over {len(prompts)} prompts (mean {mean_content:.1f} per prompt; "
            f"per prompt: {', '.join(str(r['n_content_compared']) for r in rows)}) < min_content_tokens_per_prompt "
            f"{min_content_tokens_per_prompt:g}: the reference output is EOS/special tokens, so the parity check is "
            "not evidence")
    ok = not nonfinite and total > 0
    return {
        "prompts": rows,
        "max_new_tokens": max_new_tokens,
        "all_identical": ok and all(r["identical"] for r in rows),
        "greedy_agreement": matched / ref_total if ok else None,
        "max_abs_logit_diff": worst if ok else None,
        "top1_agreement": agree / total if ok else None,
        "n_content_tokens_compared": content,
        "mean_content_tokens_per_prompt": mean_content,
        "min_content_tokens_per_prompt": min_content_tokens_per_prompt,
        "content_token_failure": content_failure,
        "nonfinite": nonfinite,
        "decode_tokens_per_s": dec_tok / dec_s if dec_s > 0 else None,
        "prefill_first_token_ms": float(np.mean(first_ms)) if first_ms else None,
        "transformers_tokens_per_s": hf_tok / hf_s if hf_s > 0 else None,
    }
