"""``verify(...)``: compare an adapter's unmerged model with its merged checkpoint and write one report.

Order of work: inputs are validated first (exit 2 on bad input), then
weights -> logits -> greedy generation -> task accuracy, then thresholds turn
the measurements into ``failures`` and the report is written atomically.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from d2serve import __version__
from d2serve.adapters.io import load_adapter, match_to_base
from d2serve.checkpoint import DTYPE_NAMES, Checkpoint
from d2serve.verify.data import WIKITEXT, data_file, resolve_data_dir
from d2serve.verify.generation import DEFAULT_PROMPTS, compare_generation
from d2serve.verify.logits import LogitComparison, compare_logits, read_text, text_windows
from d2serve.verify.stats import compare_paired
from d2serve.verify.tasks import TASKS, hf_lm, parse_task_names, score_tasks
from d2serve.verify.thresholds import Thresholds, parse_thresholds
from d2serve.verify.weights import check_weights

DEFAULT_LIMIT = 40
DEFAULT_WINDOWS = 4
DEFAULT_WINDOW_LEN = 256
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`.

    Attributes:
        passed: every threshold met.
        failures: one human-readable message per failed check (names the layer / text / task).
        data: the full machine-readable report (the content of ``report.json``).
        report_dir: where report.json / report.md / report.html were written (None if not written).
    """

    passed: bool
    failures: list[str]
    data: dict
    report_dir: Path | None = None


def _compute_dtype(name: str, merged: Checkpoint) -> torch.dtype:
    if name == "auto":
        return merged.dtype
    if name not in DTYPE_NAMES:
        raise ValueError(f"merged compute dtype {name!r}: expected auto, float32, bfloat16, float16 or float64")
    return DTYPE_NAMES[name]


def evaluate_thresholds(data: dict, th: Thresholds) -> list[str]:
    """Failure messages for every threshold the measurements in ``data`` (report.json layout) violate."""
    fails = []
    w = data.get("weights")
    if w:
        for lay in sorted(w["layers"], key=lambda x: -x["max_err_over_tol"]):
            if not lay["passed"]:
                fails.append(
                    f"weights: layer {lay['module']}: {lay['n_out_of_tol']} of {lay['shape'][0] * lay['shape'][1]} "
                    f"elements differ from the float64 recomputation of the {data['inputs']['method']} merge by more "
                    f"than rounding to {lay['dtype']} (worst {lay['max_err_over_tol']:.3g}x tolerance at "
                    f"{tuple(lay['worst_index'])}, max abs err {lay['max_abs_err']:.3g}, rel err {lay['rel_err']:.3g}); "
                    "the merged tensor is not this adapter's merge (e.g. projection or extra dW left out, wrong tau)"
                )
        for name in w["untouched_changed"]:
            fails.append(f"weights: tensor {name} is not adapted but differs from the base in the merged checkpoint")
        for name in w["missing_in_merged"]:
            fails.append(f"weights: tensor {name} of the base is missing from the merged checkpoint")
    for src in data.get("logits", {}).get("sources", []):
        if src["mean_kl"] > th.max_mean_kl:
            fails.append(f"logits[{src['source']}]: mean KL(unmerged || merged) {src['mean_kl']:.3g} nats > "
                         f"max_mean_kl {th.max_mean_kl:g}")
        if src["top1_agreement"] < th.min_top1_agreement:
            fails.append(f"logits[{src['source']}]: top-1 agreement {src['top1_agreement']:.4f} < "
                         f"min_top1_agreement {th.min_top1_agreement:g}")
    gen = data.get("generation")
    if gen and gen["n_prompts"]:
        frac = gen["n_identical"] / gen["n_prompts"]
        if frac < th.min_generation_identical:
            fails.append(f"generation: {gen['n_identical']}/{gen['n_prompts']} greedy outputs identical "
                         f"< min_generation_identical {th.min_generation_identical:g}")
    for t in data.get("tasks", {}).get("per_task", []):
        if abs(t["gap_pp"]) > th.max_acc_gap_pp and t["mcnemar_p"] < th.alpha:
            fails.append(f"tasks[{t['task']}]: merged-unmerged accuracy gap {t['gap_pp']:+.2f} pp "
                         f"({t['n_flipped']} of {t['n']} items flipped, McNemar p={t['mcnemar_p']:.3g} < "
                         f"alpha {th.alpha:g}) exceeds max_acc_gap_pp {th.max_acc_gap_pp:g}")
    return fails


def _task_section(scores: dict, names: tuple[str, ...], limit: int | None) -> dict:
    per_task = []
    for name in names:
        u, m = scores["unmerged"][name], scores["merged"][name]
        b = scores.get("base", {}).get(name)
        pc = compare_paired(u.correct, m.correct)
        pb = compare_paired(u.correct, b.correct) if b else None
        pred_flips = sum(x != y for x, y in zip(u.predictions, m.predictions))
        ll_diff = max((abs(x - y) for lu, lm in zip(u.loglikelihoods, m.loglikelihoods) for x, y in zip(lu, lm)),
                      default=0.0)
        per_task.append({
            "task": name, "split": TASKS[name].split_note, "n": u.n,
            "acc_unmerged": u.acc, "acc_merged": m.acc, "acc_base": b.acc if b else None,
            "acc_norm_unmerged": u.acc_norm, "acc_norm_merged": m.acc_norm, "acc_norm_base": b.acc_norm if b else None,
            "gap_pp": pc.gap_pp, "n_flipped": pc.n_flipped, "n_prediction_changed": pred_flips,
            "flipped_to_wrong": pc.only_a_right, "flipped_to_right": pc.only_b_right,
            "mcnemar_p": pc.mcnemar_p, "bootstrap_ci_pp": [pc.ci_low_pp, pc.ci_high_pp],
            "max_abs_loglikelihood_diff": ll_diff,
            "adapter_gain_pp": pb.gap_pp * -1 if pb else None,
        })
    pooled_u = [c for n in names for c in scores["unmerged"][n].correct]
    pooled_m = [c for n in names for c in scores["merged"][n].correct]
    overall = None
    if pooled_u:
        pc = compare_paired(pooled_u, pooled_m)
        overall = {"n": pc.n, "acc_unmerged": pc.acc_a, "acc_merged": pc.acc_b, "gap_pp": pc.gap_pp,
                   "mean_task_gap_pp": sum(t["gap_pp"] for t in per_task) / len(per_task),
                   "max_abs_task_gap_pp": max(abs(t["gap_pp"]) for t in per_task),
                   "n_flipped": pc.n_flipped, "mcnemar_p": pc.mcnemar_p,
                   "bootstrap_ci_pp": [pc.ci_low_pp, pc.ci_high_pp]}
    return {"limit": limit, "tasks": list(names), "per_task": per_task, "overall": overall}


def verify(
    *,
    base: str | Path,
    adapter: str | Path,
    merged: str | Path,
    report_dir: str | Path | None,
    data_dir: str | Path | None = None,
    text_file: str | Path | None = None,
    limit: int | None = DEFAULT_LIMIT,
    tasks: str | list[str] | tuple[str, ...] | None = None,
    thresholds: Thresholds | dict | list[str] | None = None,
    windows: int = DEFAULT_WINDOWS,
    window_len: int = DEFAULT_WINDOW_LEN,
    wikitext: bool = True,
    prompts: list[str] | tuple[str, ...] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    base_accuracy: bool = True,
    merged_compute_dtype: str = "float32",
    batch_size: int = 8,
    overwrite: bool = False,
    log=None,
) -> VerifyReport:
    """Verify that ``merged`` behaves like ``base`` + ``adapter`` (unmerged, float32) and write the report.

    Args:
        base / merged: HF checkpoint directories; adapter: adapter directory.
        report_dir: output folder for report.json / report.md / report.html (written atomically);
            None -> nothing written.
        data_dir: evaluation data folder (default: $D2SERVE_DATA_DIR, else <repo>/../shared/data).
        text_file: extra UTF-8 text for the teacher-forced logit comparison.
        limit: first N items per task; 0 or None -> full sets.
        tasks: task names (comma-separated string or list); None -> all six; "" -> none.
        thresholds: :class:`Thresholds`, a dict or ``key=value`` strings overriding the defaults.
        windows / window_len: teacher-forced token windows per text (tokens per window).
        wikitext: include WikiText-2 (text/wiki.test.raw of the data folder).
        prompts: greedy-generation prompts (default: a built-in set); max_new_tokens: tokens per prompt.
        base_accuracy: also score the base model on the tasks.
        merged_compute_dtype: dtype the merged model runs in ("float32": weights upcast exactly, so
            only the checkpoint's own rounding shows; "auto": the checkpoint dtype).
        batch_size: lm-eval batch size.
        overwrite: replace a non-empty report_dir.
        log: optional callable(str) for progress messages.

    Returns:
        :class:`VerifyReport` (``.passed``, ``.failures``).

    Raises:
        FileNotFoundError / CheckpointError / AdapterError / AdapterConfigError / ValueError: bad input
            (missing directories or data files, adapter not fitting the base, unknown task or threshold).
    """
    from d2serve.models import load_hf_model, load_tokenizer, load_unmerged_model

    say = log or (lambda _m: None)
    th = parse_thresholds(thresholds)
    names = parse_task_names(tasks)
    limit = None if not limit else int(limit)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    base_ck, merged_ck = Checkpoint(base), Checkpoint(merged)
    adp = load_adapter(adapter)
    match_to_base(adp, base_ck)
    compute_dtype = _compute_dtype(merged_compute_dtype, merged_ck)
    ddir = resolve_data_dir(data_dir) if (names or wikitext) else None
    texts: list[tuple[str, str]] = []
    if wikitext:
        texts.append(("wikitext2", read_text(data_file(ddir, WIKITEXT))))
    if text_file is not None:
        texts.append((Path(text_file).name, read_text(text_file)))
    if report_dir is not None:
        from d2serve.checkpoint import prepare_output_dir

        prepare_output_dir(Path(report_dir), overwrite, (Path(base), Path(adapter), Path(merged)))

    timings: dict[str, float] = {}
    data: dict = {
        "d2serve_version": __version__,
        "inputs": {"base": str(base), "adapter": str(adapter), "merged": str(merged), "method": adp.method,
                   "n_adapted_layers": len(adp.layers), "base_dtype": str(base_ck.dtype).removeprefix("torch."),
                   "merged_dtype": str(merged_ck.dtype).removeprefix("torch."),
                   "data_dir": str(ddir) if ddir else None, "text_file": str(text_file) if text_file else None},
        "settings": {"unmerged_dtype": "float32", "merged_compute_dtype": str(compute_dtype).removeprefix("torch."),
                     "limit": limit, "tasks": list(names), "windows": windows, "window_len": window_len,
                     "max_new_tokens": max_new_tokens, "lm_eval_batch_size": batch_size,
                     "decoding": {"greedy": True, "do_sample": False, "repetition_penalty": 1.0,
                                  "generation_config": "ignored", "stop": "tokenizer eos or max_new_tokens"}},
        "thresholds": th.to_json(),
    }

    t = time.perf_counter()
    say("weights: comparing every adapted tensor with a float64 recomputation")
    data["weights"] = check_weights(str(base), adp, str(merged), tol_ulps=th.weight_tol_ulps,
                                    fp32_slack=th.weight_fp32_slack).to_json()
    timings["weights_s"] = time.perf_counter() - t

    t = time.perf_counter()
    say("loading the unmerged (float32) and merged models")
    tok = load_tokenizer(base)
    unmerged_m = load_unmerged_model(base, adp, dtype=torch.float32)
    merged_m = load_hf_model(merged, dtype=compute_dtype)
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sources: list[LogitComparison] = []
    for name, text in texts:
        say(f"logits: teacher-forced comparison on {name}")
        win = text_windows(tok, text, windows, window_len, source=name)
        sources.append(compare_logits(unmerged_m, merged_m, win, name))
    probe_section = None
    try:
        from d2serve.train import read_probe
    except ImportError:  # trainer not installed
        read_probe = None
    probe = read_probe(adapter) if read_probe else None
    if probe is not None:
        say("logits: the adapter's training probe")
        ids = probe["input_ids"].to(torch.long)
        sources.append(compare_logits(unmerged_m, merged_m, ids, "training_probe"))
        with torch.inference_mode():
            ours = unmerged_m(input_ids=ids).logits.float()
        probe_section = {"n_sequences": int(ids.shape[0]), "n_tokens": int(ids.shape[1]),
                         "max_abs_logit_diff_trainer_vs_unmerged": float((ours - probe["logits"].float()).abs().max())}
    data["logits"] = {"sources": [s.to_json() for s in sources], "training_probe": probe_section}
    timings["logits_s"] = time.perf_counter() - t

    t = time.perf_counter()
    plist = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    say(f"generation: greedy, {len(plist)} prompts x {max_new_tokens} tokens")
    gens = compare_generation(unmerged_m, merged_m, tok, plist, max_new_tokens)
    data["generation"] = {"max_new_tokens": max_new_tokens, "n_prompts": len(gens),
                          "n_identical": sum(g.identical for g in gens), "prompts": [g.to_json() for g in gens]}
    timings["generation_s"] = time.perf_counter() - t

    if names:
        scores: dict[str, dict] = {}
        for label, model in (("unmerged", unmerged_m), ("merged", merged_m)):
            t = time.perf_counter()
            say(f"tasks: scoring the {label} model on {', '.join(names)} (limit {limit or 'none'})")
            scores[label] = score_tasks(hf_lm(model, tok, batch_size), names, ddir, limit)
            timings[f"tasks_{label}_s"] = time.perf_counter() - t
        del unmerged_m, merged_m
        gc.collect()
        if base_accuracy:
            t = time.perf_counter()
            say("tasks: scoring the base model")
            base_m = load_hf_model(base, dtype=torch.float32)
            scores["base"] = score_tasks(hf_lm(base_m, tok, batch_size), names, ddir, limit)
            timings["tasks_base_s"] = time.perf_counter() - t
            del base_m
        data["tasks"] = _task_section(scores, names, limit)
    data["timings_s"] = timings
    failures = evaluate_thresholds(data, th)
    data["passed"] = not failures
    data["failures"] = failures
    report = VerifyReport(not failures, failures, data)
    if report_dir is not None:
        from d2serve.verify.report import write_report

        say(f"writing the report to {report_dir}")
        report.report_dir = write_report(data, Path(report_dir), overwrite=overwrite)
    return report
