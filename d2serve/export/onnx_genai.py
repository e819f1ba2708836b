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

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from d2serve.export.onnx_files import OnnxExportError, check_external_data

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Question: What is the boiling point of water at sea level? Answer:",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
)
MAX_NEW_TOKENS = 32


def build_genai(merged: Path, out_dir: Path, precision: str, tied: bool, log_path: Path) -> dict:
    """Run the ORT-GenAI model builder on ``merged`` into ``out_dir`` (CPU execution provider, offline).

    Args:
        merged: local HF checkpoint directory.
        out_dir: empty output directory (receives model.onnx, model.onnx.data,
            genai_config.json, tokenizer files).
        precision: "fp32" or "int4" (builder's ``-p``).
        tied: the checkpoint ties its embeddings (``tie_word_embeddings``):
            the builder is asked to share one embedding/LM-head matrix.
        log_path: where the builder's stdout+stderr is written.

    Returns:
        ``{"export_s": float, "builder_args": [str]}``.

    Raises:
        OnnxExportError: the builder exited non-zero (message has the log tail).
    """
    extra = ["shared_embeddings=true"] if tied else []
    with tempfile.TemporaryDirectory(prefix="d2serve-genai-cache-") as cache:
        args = ["-i", str(merged.resolve()), "-o", str(out_dir.resolve()), "-p", precision, "-e", "cpu", "-c", cache]
        if extra:
            args += ["--extra_options", *extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            rc = subprocess.run(
                [sys.executable, "-m", "onnxruntime_genai.models.builder", *args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cache, check=False,
            ).returncode
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
    return og.Model(str(folder.resolve()))


def _og_greedy(model, prompt_ids: list[int], max_new: int) -> tuple[list[int], float, float]:
    """Greedy tokens from ORT-GenAI; returns (new tokens, prefill+first token s, decode s of the rest)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=len(prompt_ids) + max_new, min_length=0, do_sample=False, num_beams=1, repetition_penalty=1.0
    )
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
    out: list[int] = []
    t_first = None
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
        if t_first is None:
            t_first = time.perf_counter()
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


def _hf_greedy(model, prompt_ids: list[int], max_new: int, eos) -> tuple[list[int], np.ndarray, float]:
    """transformers greedy new tokens, teacher-forced logits ``(n_new, vocab)`` and generate seconds."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt_ids])
    gc = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new, min_new_tokens=0, repetition_penalty=1.0,
        eos_token_id=eos, pad_token_id=eos[0] if isinstance(eos, list) and eos else eos,
    )
    with torch.no_grad():
        t0 = time.perf_counter()
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        secs = time.perf_counter() - t0
        new = seq[0, len(prompt_ids) :].tolist()
        logits = model(seq).logits[0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(new)].float().numpy()
    return new, logits, secs


def validate_genai(
    folder: Path, hf_model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS
) -> dict:
    """Compare ORT-GenAI (``folder``) with the transformers float32 model on ``prompts``.

    Returns a JSON-ready dict: per prompt ``{"prompt", "prompt_tokens",
    "reference_tokens", "onnx_tokens", "identical", "first_divergence" (index
    into the new tokens, or null), "greedy_agreement" (matched prefix /
    reference length), "max_abs_logit_diff", "top1_agreement"}`` and
    aggregates ``all_identical``, ``greedy_agreement``, ``max_abs_logit_diff``,
    ``top1_agreement`` (teacher-forced, over all positions),
    ``decode_tokens_per_s`` (ORT-GenAI tokens after the first / their seconds),
    ``prefill_first_token_ms`` (mean), ``transformers_tokens_per_s``.

    Raises:
        OnnxExportError: the folder is incomplete (named file).
    """
    model = open_genai_model(folder)
    eos = hf_model.generation_config.eos_token_id
    if eos is None:
        eos = hf_model.config.eos_token_id
    rows = []
    dec_tok = dec_s = hf_tok = hf_s = 0.0
    first_ms = []
    agree = total = matched = ref_total = 0
    worst = 0.0
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        if not ids:
            raise OnnxExportError(f"prompt {p!r} tokenizes to no tokens")
        ref, ref_logits, secs = _hf_greedy(hf_model, ids, max_new_tokens, eos)
        hf_tok += len(ref)
        hf_s += secs
        got, t_first, t_rest = _og_greedy(model, ids, max_new_tokens)
        first_ms.append(t_first * 1e3)
        dec_tok += max(len(got) - 1, 0)
        dec_s += t_rest
        div = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        if div is None and len(ref) != len(got):
            div = min(len(ref), len(got))
        prefix = len(ref) if div is None else div
        og_logits = _og_teacher_forced(model, ids, ref) if ref else np.zeros((0, 1), np.float32)
        diff = float(np.max(np.abs(og_logits.astype(np.float64) - ref_logits))) if ref else 0.0
        same = int(np.sum(og_logits.argmax(-1) == ref_logits.argmax(-1))) if ref else 0
        rows.append(
            {
                "prompt": p,
                "prompt_tokens": len(ids),
                "reference_tokens": ref,
                "onnx_tokens": got,
                "identical": div is None,
                "first_divergence": div,
                "greedy_agreement": prefix / len(ref) if ref else 1.0,
                "max_abs_logit_diff": diff,
                "top1_agreement": same / len(ref) if ref else 1.0,
            }
        )
        worst = max(worst, diff)
        agree += same
        total += len(ref)
        matched += prefix
        ref_total += len(ref)
    return {
        "prompts": rows,
        "max_new_tokens": max_new_tokens,
        "all_identical": all(r["identical"] for r in rows),
        "greedy_agreement": matched / ref_total if ref_total else 1.0,
        "max_abs_logit_diff": worst,
        "top1_agreement": agree / total if total else 1.0,
        "decode_tokens_per_s": dec_tok / dec_s if dec_s > 0 else None,
        "prefill_first_token_ms": float(np.mean(first_ms)) if first_ms else None,
        "transformers_tokens_per_s": hf_tok / hf_s if hf_s > 0 else None,
    }
