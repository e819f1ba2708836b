"""Quantized ORT-GenAI exports that are proven to keep the merged model's behaviour: recipes, a fidelity gate, auto.

One job: build quantized ``genai`` exports with named recipes of the onnxruntime-genai 0.18.0 model
builder, measure each against the merged float32 model (transformers), and keep the first recipe (in
:data:`RECIPES` order: fastest first) that passes the gate.

Fidelity (reference: the merged checkpoint in transformers, float32; ONNX side: ORT-GenAI logits):

* teacher-forced WikiText-2 windows (the evaluation data folder, :mod:`d2serve.verify.data`): mean
  KL(reference || onnx) per position in nats, top-1 agreement, max |logit diff|;
* the greedy prompt probe: both sides decode ``max_new_tokens`` argmax tokens, EOS ignored; greedy
  agreement = matched prefix / reference length, pooled over prompts;
* task accuracy: the verify tasks (:mod:`d2serve.verify.tasks`, zero-shot, first ``limit`` items) scored by
  lm-eval for both models with the same requests; the ONNX side through
  :class:`d2serve.runtimes.ort_genai.OrtGenaiLM` (teacher-forced log-likelihood of each choice from
  ORT-GenAI logits). The gate is on the pooled accuracy gap in percentage points.

Gate defaults (:class:`QuantGate`, overridable with ``key=value``): ``min_top1_agreement`` 0.95,
``max_acc_gap_pp`` 2.0; ``max_mean_kl`` and ``min_greedy_agreement`` are reported, not gated, unless set.
Speed (decode tokens/s, time to first token) is measured on each tried recipe, batch 1, median of
``speed_repeats`` after a warm-up.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from d2serve.compare import NonFiniteError, kl_per_row, max_abs_diff, top1_agreement
from d2serve.errors import InputError
from d2serve.export.manifest import EXPORT_MANIFEST as MANIFEST
from d2serve.verify.thresholds import apply_overrides



@dataclass(frozen=True)
class Recipe:
    """One model-builder quantization recipe.

    Attributes:
        name: d2serve recipe name (``--quant NAME``).
        precision: the builder's ``-p`` (``int4`` or ``int8``).
        options: builder ``--extra_options`` ``key=value`` strings (``shared_embeddings`` is added by the
            export when the checkpoint ties its embeddings).
        summary: what the recipe does, for reports.
    """

    name: str
    precision: str
    options: tuple[str, ...]
    summary: str


# Order = the order `auto` tries them: measured decode speed on SmolLM2-135M + a trained D2-LoRA, merged, fastest
# first (bench/results/onnx_quant: 92, 80, 64, 61, 5.6, 1.9 tokens/s; fp32 26.5). 8-bit MatMulNBits at
# accuracy_level 1 measured 10-30x slower than at 4 on this CPU: those recipes come last.
RECIPES: tuple[Recipe, ...] = (
    Recipe("int4", "int4", (), "builder default: int4 RTN (algo 'default'), block 32, symmetric, accuracy_level 4 "
           "(int8 activations), int4 tied embedding/lm_head"),
    Recipe("int4-kquant-mixed", "int4", ("algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8"),
           "int4 k_quant; int8 lm_head (last MatMul, shared with the embedding) and llama.cpp-style sensitive "
           "layers; accuracy_level 4"),
    Recipe("int8", "int8", (), "int8 RTN block 32 for every MatMul incl. lm_head, accuracy_level 4; fp32 embedding "
           "Gather (GatherBlockQuantized is 4-bit only in the builder)"),
    Recipe("int4-acc1", "int4", ("accuracy_level=1",), "int4 RTN block 32, accuracy_level 1 (fp32 activations)"),
    Recipe("int4-kquant-mixed-acc1", "int4", ("algo_config=k_quant",
           "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8", "accuracy_level=1"),
           "int4-kquant-mixed with accuracy_level 1"),
    Recipe("int8-acc1", "int8", ("accuracy_level=1",), "int8 RTN block 32 every MatMul, accuracy_level 1"),
)
RECIPE_NAMES = tuple(r.name for r in RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``.

    Raises:
        InputError: unknown name (the message lists the known ones).
    """
    for r in RECIPES:
        if r.name == name:
            return r
    raise InputError(f"quant recipe {name!r}: expected auto or one of {', '.join(RECIPE_NAMES)}")


@dataclass(frozen=True)
class QuantGate:
    """Pass/fail thresholds of the quantization fidelity gate (ONNX vs merged float32 transformers).

    Attributes:
        min_top1_agreement: teacher-forced WikiText-2 top-1 agreement (fraction) at least this.
        max_acc_gap_pp: |pooled task accuracy ONNX - merged| at most this many percentage points.
        max_mean_kl: mean KL(merged || onnx) per position, nats (inf = reported only).
        min_greedy_agreement: pooled greedy agreement over the prompts (0 = reported only).
    """

    min_top1_agreement: float = 0.95
    max_acc_gap_pp: float = 2.0
    max_mean_kl: float = math.inf
    min_greedy_agreement: float = 0.0

    def to_json(self) -> dict:
        """The thresholds as a dict (inf written as null: not gated)."""
        return {k: (None if v == math.inf else v) for k, v in asdict(self).items()}


def parse_gate(overrides: dict | list[str] | None) -> QuantGate:
    """:class:`QuantGate` with ``key=value`` strings (or a dict) applied.

    Raises:
        InputError: unknown key (known ones listed), a non-numeric or negative value.
    """
    return apply_overrides(QuantGate(), overrides, label="quant threshold", example="min_top1_agreement=0.9",
                           finite=False)


@dataclass
class Reference:
    """What the merged float32 transformers model produced, computed once and compared with every recipe.

    Attributes:
        windows: int64 ``(n, L)`` WikiText-2 token windows; window_logits: float32 ``(n, L, vocab)``.
        prompts: prompt texts; prompt_ids: their token ids; greedy: reference greedy new tokens per prompt.
        task_scores: task name -> :class:`d2serve.verify.tasks.TaskScores` of the merged model.
        hf_like: the reference lm-eval ``HFLM`` (its tokenization is reused for the ONNX side).
        settings: data folder, limit, tasks, window sizes, max_new_tokens (for the manifest).
    """

    windows: torch.Tensor
    window_logits: np.ndarray
    prompts: list[str]
    prompt_ids: list[list[int]]
    greedy: list[list[int]]
    task_scores: dict
    hf_like: object
    task_names: tuple[str, ...]
    data_dir: Path | None
    limit: int | None
    settings: dict


def build_reference(
    merged: Path, *, data_dir=None, windows: int = 4, window_len: int = 256, prompts=None,
    max_new_tokens: int = 32, tasks="all", limit: int | None = 30, batch_size: int = 8,
) -> Reference:
    """Run the merged checkpoint (transformers, float32, CPU) on the gate's inputs.

    Raises:
        DataNotFoundError / TaskNotAvailableError / TextTooShortError: the evaluation data is missing or bad.
        NonFiniteError: the reference itself produced a NaN/inf logit (named).
    """
    from d2serve.export import onnx_genai
    from d2serve.models import load_hf_model, load_tokenizer
    from d2serve.verify.data import WIKITEXT, data_file, resolve_data_dir
    from d2serve.verify.logits import read_text, text_windows
    from d2serve.verify.tasks import hf_lm, load_tasks, parse_task_names, score_tasks

    specs = parse_task_names(tasks)
    ddir = resolve_data_dir(data_dir)
    names = tuple(load_tasks(specs, ddir))  # data checked before the model is loaded
    text = read_text(data_file(ddir, WIKITEXT))
    tok = load_tokenizer(merged)
    model = load_hf_model(merged, dtype=torch.float32)
    win = text_windows(tok, text, windows, window_len, source="wikitext2")
    with torch.inference_mode():
        wl = np.stack([model(input_ids=w.unsqueeze(0)).logits[0].float().numpy() for w in win])
    plist = list(prompts or onnx_genai.DEFAULT_PROMPTS)
    pids, greedy = [], []
    for i, p in enumerate(plist):
        ids = tok(p, add_special_tokens=True)["input_ids"]
        if not ids:
            raise InputError(f"prompt {p!r} tokenizes to no tokens")
        pids.append(ids)
        greedy.append(onnx_genai._hf_greedy(model, ids, max_new_tokens, f"quant gate, prompt {i}")[0])
    like = hf_lm(model, tok, batch_size)
    scores = {}
    if names:
        from d2serve.verify.tasks import without_progress_bars

        scores = score_tasks(without_progress_bars(like), specs, ddir, limit)
    return Reference(
        windows=win, window_logits=wl, prompts=plist, prompt_ids=pids, greedy=greedy, task_scores=scores,
        hf_like=like, task_names=specs, data_dir=ddir, limit=limit,
        settings={"reference": "merged checkpoint, transformers float32 (CPU)", "data_dir": str(ddir),
                  "windows": int(win.shape[0]), "window_len": int(win.shape[1]), "prompts": plist,
                  "max_new_tokens": max_new_tokens, "tasks": list(names), "limit": limit,
                  "task_scoring": "lm-eval zero-shot log-likelihood of each choice; ONNX side via OrtGenaiLM "
                                  "(ORT-GenAI logits, same token ids as the reference HFLM)"},
    )


def measure_fidelity(folder: Path, ref: Reference) -> dict:
    """Compare the ORT-GenAI export in ``folder`` with ``ref``.

    Returns a JSON-ready dict: ``wikitext2`` (``mean_kl`` nats, ``max_kl``, ``top1_agreement``,
    ``max_abs_logit_diff``, ``n_positions``), ``greedy`` (``agreement`` pooled, per prompt
    ``first_divergence``), ``tasks`` (per task ``acc_merged``, ``acc_onnx``, ``gap_pp``,
    ``n_prediction_changed``; pooled ``acc_merged``, ``acc_onnx``, ``gap_pp``), ``nonfinite``
    (a NaN/inf in the ONNX logits: the metrics involved are then None) and ``seconds``.
    """
    from d2serve.export import onnx_genai
    from d2serve.verify.tasks import without_progress_bars
    from d2serve.runtimes.ort_genai import OrtGenaiLM, OrtGenaiModel
    from d2serve.verify.tasks import score_tasks

    t0 = time.perf_counter()
    m = OrtGenaiModel(folder)
    out: dict = {"nonfinite": None}
    names = ("merged", "onnx")
    try:
        kl_sum, kl_max, agree, n, diff = 0.0, 0.0, 0, 0, 0.0
        for wi, (w, rl) in enumerate(zip(ref.windows, ref.window_logits)):
            ol = m.logits(w)
            dims = (f"window {wi}: position", "vocab")
            kl = kl_per_row(rl, ol, where="quant gate wikitext2", names=names, dims=dims)
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
            a, c = top1_agreement(rl, ol, where="quant gate wikitext2", names=names, dims=dims)
            agree, n = agree + a, n + c
            diff = max(diff, max_abs_diff(rl, ol, where="quant gate wikitext2", names=names, dims=dims))
        out["wikitext2"] = {"mean_kl": kl_sum / n, "max_kl": kl_max, "top1_agreement": agree / n,
                            "max_abs_logit_diff": diff, "n_positions": n}
        rows, matched, total = [], 0, 0
        for i, (ids, rg) in enumerate(zip(ref.prompt_ids, ref.greedy)):
            got = onnx_genai._og_greedy(m.model, ids, len(rg), f"quant gate, prompt {i}")[0]
            div = next((j for j, (x, y) in enumerate(zip(rg, got)) if x != y), None)
            pre = len(rg) if div is None else div
            matched, total = matched + pre, total + len(rg)
            rows.append({"prompt": ref.prompts[i], "first_divergence": div, "agreement": pre / len(rg)})
        out["greedy"] = {"agreement": matched / total, "prompts": rows}
    except NonFiniteError as e:
        out["nonfinite"] = e.to_json()
        out.setdefault("wikitext2", None)
        out.setdefault("greedy", None)
    out["tasks"] = None
    if ref.task_scores and out["nonfinite"] is None:
        sc = score_tasks(without_progress_bars(OrtGenaiLM(m, ref.hf_like)), ref.task_names, ref.data_dir, ref.limit)
        per, cm, co, nn = [], 0, 0, 0
        for name, r in ref.task_scores.items():
            o = sc[name]
            per.append({"task": name, "n": r.n, "acc_merged": r.acc, "acc_onnx": o.acc,
                        "gap_pp": 100.0 * (o.acc - r.acc),
                        "n_prediction_changed": sum(a != b for a, b in zip(r.predictions, o.predictions))})
            cm, co, nn = cm + sum(r.correct), co + sum(o.correct), nn + r.n
        out["tasks"] = {"per_task": per, "n": nn, "acc_merged": cm / nn, "acc_onnx": co / nn,
                        "gap_pp": 100.0 * (co - cm) / nn}
    out["seconds"] = time.perf_counter() - t0
    return out


def gate_failures(fid: dict, gate: QuantGate) -> list[str]:
    """Failure messages for every gate threshold ``fid`` (from :func:`measure_fidelity`) violates."""
    if fid.get("nonfinite"):
        return [f"non-finite ONNX logits: {fid['nonfinite']['message']}"]
    f = []
    w, g, t = fid["wikitext2"], fid["greedy"], fid.get("tasks")
    if not w["top1_agreement"] >= gate.min_top1_agreement:
        f.append(f"wikitext2 top-1 agreement {w['top1_agreement']:.4f} < min_top1_agreement {gate.min_top1_agreement:g}")
    if not w["mean_kl"] <= gate.max_mean_kl:
        f.append(f"wikitext2 mean KL {w['mean_kl']:.4g} nats > max_mean_kl {gate.max_mean_kl:g}")
    if not g["agreement"] >= gate.min_greedy_agreement:
        f.append(f"greedy agreement {g['agreement']:.4f} < min_greedy_agreement {gate.min_greedy_agreement:g}")
    if t is not None and not abs(t["gap_pp"]) <= gate.max_acc_gap_pp:
        f.append(f"pooled task accuracy {100 * t['acc_onnx']:.2f}% vs merged {100 * t['acc_merged']:.2f}%: gap "
                 f"{t['gap_pp']:+.2f} pp exceeds max_acc_gap_pp {gate.max_acc_gap_pp:g} (n={t['n']})")
    return f


def measure_speed(folder: Path, prompt_ids: list[int], new_tokens: int = 64, repeats: int = 3) -> dict:
    """ORT-GenAI greedy decode speed, batch 1: median over ``repeats`` runs after one warm-up.

    Returns ``{"decode_tokens_per_s", "ttft_ms", "prompt_tokens", "new_tokens", "repeats", "load_average",
    "ort_threads"}``; decode = tokens after the first / their seconds; TTFT = prompt + first token.
    """
    import onnxruntime_genai as og

    from d2serve.export.onnx_genai import open_genai_model

    model = open_genai_model(folder)
    total = len(prompt_ids) + new_tokens
    runs = []
    for _ in range(repeats + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        times = []
        while not gen.is_done():
            gen.generate_next_token()
            gen.get_next_tokens()
            times.append(time.perf_counter())
        runs.append((times[0] - t0, (len(times) - 1) / (times[-1] - times[0])))
    runs = runs[1:]
    return {"decode_tokens_per_s": statistics.median(r[1] for r in runs), "ttft_ms": 1e3 * statistics.median(r[0] for r in runs),
            "prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "repeats": repeats,
            "load_average": list(os.getloadavg()), "ort_threads": "onnxruntime default (all cores)",
            "cpu_count": os.cpu_count()}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def try_recipe(merged: Path, work: Path, recipe: Recipe, ref: Reference, gate: QuantGate,
               speed_prompt: list[int], speed_tokens: int = 64, speed_repeats: int = 3) -> dict:
    """Export ``recipe`` into ``work/<name>``, validate it (export parity), gate it, time it.

    Returns the trial record (``recipe``, ``precision``, ``builder_args``, ``export_passed``,
    ``gate_failures``, ``passed``, ``size_bytes``, ``speed``, ``fidelity``, ``folder``). A builder
    failure or a folder ORT-GenAI cannot open is a failed trial (``error``), not an exception.
    """
    from d2serve.export.onnx import export_onnx

    folder = work / recipe.name
    rec: dict = {"recipe": recipe.name, "precision": recipe.precision, "summary": recipe.summary,
                 "options": list(recipe.options), "folder": str(folder), "passed": False, "error": None}
    try:
        rep = export_onnx(merged=merged, out=folder, target="genai", precision=recipe.precision,
                          builder_options=list(recipe.options))
    except Exception as e:  # noqa: BLE001 - builder failure or a model ORT-GenAI cannot load: record, keep trying
        rec["error"] = str(e).splitlines()[0] + " ... " + " | ".join(str(e).splitlines()[-3:])
        rec["gate_failures"] = [f"export failed: {rec['error']}"]
        return rec
    rec.update(builder_args=rep.parity.get("builder_args"), export_passed=rep.passed, export_failures=rep.failures,
               size_bytes=_folder_bytes(folder), export_s=rep.export_s,
               export_parity={k: rep.parity.get(k) for k in ("top1_agreement", "greedy_agreement", "max_abs_logit_diff")})
    try:
        rec["fidelity"] = measure_fidelity(folder, ref)
        rec["speed"] = measure_speed(folder, speed_prompt, speed_tokens, speed_repeats)
    except Exception as e:  # noqa: BLE001 - an export ORT cannot run is a failed recipe, named
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["gate_failures"] = [f"ORT-GenAI could not run the export: {rec['error']}"]
        return rec
    rec["gate_failures"] = gate_failures(rec["fidelity"], gate) + [f"export check: {m}" for m in rep.failures]
    rec["passed"] = not rec["gate_failures"]
    return rec


def export_quantized(
    *, merged: str | Path, out: str | Path, quant: str = "auto", overwrite: bool = False,
    thresholds: dict | list[str] | QuantGate | None = None, data_dir=None, limit: int | None = 30, tasks="all",
    windows: int = 4, window_len: int = 256, prompts=None, max_new_tokens: int = 32,
    speed_tokens: int = 64, speed_repeats: int = 3, log=None,
) -> dict:
    """Quantized ORT-GenAI export of ``merged``, gated on fidelity to the merged float32 model.

    ``quant="auto"`` tries :data:`RECIPES` in order (fastest first) and keeps the first that passes;
    a recipe name (or a comma-separated list of names) tries exactly those, in that order. Every tried
    recipe is recorded with its numbers in the manifest's ``quant.tried``. When none passes, the last
    tried folder (the slowest; in ``auto`` order the most accurate measured) is put in place with ``"passed": false``.

    Args:
        merged: merged HF checkpoint (loaded in float32 as the reference).
        out: output folder (must be empty or absent unless ``overwrite``).
        thresholds: :class:`QuantGate` overrides (``key=value`` strings or a dict).
        data_dir, limit, tasks, windows, window_len, prompts, max_new_tokens: the gate's inputs (see
            :func:`build_reference`).
        speed_tokens, speed_repeats: decode-speed measurement (see :func:`measure_speed`).
        log: optional callable(str) for progress lines.

    Returns:
        The manifest written to ``<out>/d2serve_export.json`` (``passed``, ``failures``, ``quant``).

    Raises:
        InputError: unknown recipe/threshold, bad data, ``out`` not empty, every recipe failed to export.
        MissingExtraError: the ``onnx`` extra is missing.
    """
    from d2serve.console import step
    from d2serve.export.onnx import _check_args
    from d2serve.extras import require
    from d2serve.outdir import atomic_output_dir, prepare_output_dir, temp_sibling

    require("onnx", "onnx", "onnxruntime", "onnxruntime_genai", purpose="the quantized ONNX export")
    merged, out = Path(merged), Path(out)
    names = RECIPE_NAMES if quant == "auto" else tuple(n.strip() for n in quant.split(",") if n.strip())
    recipes = [get_recipe(n) for n in names]
    if not recipes:
        raise InputError("quant: expected auto or at least one recipe name")
    gate = parse_gate(thresholds)
    _check_args(merged, out, "genai", "fp32", overwrite, prompts, max_new_tokens)

    def say(msg: str) -> None:
        step(msg)
        if log:
            log(msg)

    say("quant gate: reference = merged checkpoint in transformers float32 (wikitext-2, prompts, tasks)")
    t0 = time.perf_counter()
    ref = build_reference(merged, data_dir=data_dir, windows=windows, window_len=window_len, prompts=prompts,
                          max_new_tokens=max_new_tokens, tasks=tasks, limit=limit)
    ref_s = time.perf_counter() - t0
    work = temp_sibling(out, "quant-trials")
    work.mkdir(parents=True)
    tried: list[dict] = []
    try:
        chosen = None
        for r in recipes:
            say(f"quant recipe {r.name}: export, fidelity gate, speed")
            rec = try_recipe(merged, work, r, ref, gate, ref.prompt_ids[0], speed_tokens, speed_repeats)
            tried.append(rec)
            if rec["passed"]:
                chosen = rec
                break
        placed = chosen or next((t for t in reversed(tried) if t.get("error") is None), None)
        if placed is None:
            raise InputError("quant: no recipe produced a usable export: "
                             + "; ".join(f"{t['recipe']}: {t['error']}" for t in tried))
        src = Path(placed["folder"])
        man = json.loads((src / MANIFEST).read_text())
        failures = [] if chosen else [f"quant gate: no recipe passed ({', '.join(t['recipe'] for t in tried)}); "
                                      f"kept {placed['recipe']}: " + "; ".join(placed["gate_failures"])]
        man["passed"] = chosen is not None
        man["failures"] = list(man.get("failures") or []) + failures
        for t in tried:
            t.pop("folder", None)
        man["quant"] = {"mode": quant, "recipe": placed["recipe"], "gate": gate.to_json(), "reference": ref.settings,
                        "reference_s": ref_s, "tried": tried,
                        "order": [r.name for r in recipes],
                        "rule": "recipes tried in order (fastest first); the first that passes the gate is kept"}
        prepare_output_dir(out, overwrite, inputs=(merged,))
        with atomic_output_dir(out, overwrite) as tmp:
            for p in src.iterdir():
                shutil.move(str(p), tmp / p.name)
            (tmp / MANIFEST).write_text(json.dumps(man, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return man


__all__ = ["Recipe", "RECIPES", "RECIPE_NAMES", "get_recipe", "QuantGate", "parse_gate", "Reference",
           "build_reference", "measure_fidelity", "gate_failures", "measure_speed", "try_recipe", "export_quantized"]
