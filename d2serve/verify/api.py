"""``verify(...)``: compare an adapter's unmerged model with its merged checkpoint and write one report.

Order of work: inputs are validated first (exit 2 on bad input), then
weights -> logits -> greedy generation -> task accuracy, then thresholds turn
the measurements into ``failures`` and the report is written atomically.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from d2serve import __version__
from d2serve.adapters.io import load_adapter
from d2serve.checkpoint import DTYPE_NAMES, Checkpoint
from d2serve.compare import NonFiniteError, check_finite, max_abs_diff
from d2serve.console import in_steps, step
from d2serve.errors import InputError
from d2serve.fitting import fit
from d2serve.probe import read_probe
from d2serve.verify.data import (
    BUNDLED_ITEMS_PER_TASK,
    WIKITEXT,
    data_file,
    is_bundled,
    resolve_data_dir,
)
from d2serve.verify.generation import DEFAULT_PROMPTS, compare_generation
from d2serve.verify.logits import (
    LogitComparison,
    compare_logits,
    read_text,
    text_windows,
)
from d2serve.verify.stats import compare_paired
from d2serve.runtimes import engine_names, select_runtime
from d2serve.verify.tasks import TASKS, hf_lm, load_tasks, parse_task_names, score_tasks, without_progress_bars
from d2serve.verify.thresholds import Thresholds, parse_thresholds
from d2serve.verify.weights import check_merged_weights

DEFAULT_LIMIT = 40
ENGINES = engine_names()  # the runtimes offered by --engine (d2serve.runtimes)
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
        raise InputError(f"merged compute dtype {name!r}: expected auto, float32, bfloat16, float16 or float64")
    return DTYPE_NAMES[name]


def evaluate_thresholds(data: dict, th: Thresholds) -> list[str]:
    """Failure messages for every threshold the measurements in ``data`` (report.json layout) violate."""
    fails = []
    w = data.get("weights")
    if w:
        for lay in w["layers"]:
            if lay.get("n_nonfinite"):
                fails.append(f"weights: tensor {lay['tensor']} of the merged checkpoint has {lay['n_nonfinite']} "
                             f"non-finite value(s) (NaN/inf; first at {tuple(lay['worst_index'])})")
        for lay in sorted(w["layers"], key=lambda x: -x["max_err_over_tol"]):
            if not lay["passed"] and not lay.get("n_nonfinite"):
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
        if src.get("nonfinite"):
            fails.append(f"{src['nonfinite']['message']}: no logit comparison is possible")
            continue
        if src["mean_kl"] > th.max_mean_kl:
            fails.append(f"logits[{src['source']}]: mean KL(unmerged || merged) {src['mean_kl']:.3g} nats > "
                         f"max_mean_kl {th.max_mean_kl:g}")
        if src["top1_agreement"] < th.min_top1_agreement:
            fails.append(f"logits[{src['source']}]: top-1 agreement {src['top1_agreement']:.4f} < "
                         f"min_top1_agreement {th.min_top1_agreement:g}")
    probe = (data.get("logits") or {}).get("training_probe")
    if probe and probe.get("nonfinite"):
        fails.append(f"{probe['nonfinite']['message']} (the trainer's recorded logits vs our unmerged model)")
    gen = data.get("generation")
    if gen is not None:
        for p in gen["prompts"]:
            if p.get("nonfinite"):
                fails.append(p["nonfinite"]["message"])
        n = gen["n_prompts"]
        if n:
            frac = gen["n_identical"] / n
            if frac < th.min_generation_identical:
                fails.append(f"generation: {gen['n_identical']}/{n} greedy outputs identical "
                             f"< min_generation_identical {th.min_generation_identical:g}")
        mean = gen["n_content_tokens_compared"] / n if n else 0.0
        if mean < th.min_content_tokens_per_prompt:
            per = ", ".join(str(p["n_content_compared"]) for p in gen["prompts"])
            fails.append(f"generation: only {gen['n_content_tokens_compared']} content tokens compared over {n} "
                         f"prompts (mean {mean:.1f} per prompt; per prompt: {per}) < min_content_tokens_per_prompt "
                         f"{th.min_content_tokens_per_prompt:g}: the outputs are EOS/special tokens, so the greedy "
                         "comparison is not evidence that the two models generate alike")
    for t in (data.get("tasks") or {}).get("per_task", []):
        if t.get("nonfinite"):
            fails.append(t["nonfinite"]["message"])
            continue
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
        nonfinite = None
        for label, sc in (("unmerged", u), ("merged", m)):
            for i, lls in enumerate(sc.loglikelihoods):
                try:
                    check_finite(lls, where=f"tasks[{name}] item {i}", side=f"{label} log-likelihood",
                                 dims=("choice",))
                except NonFiniteError as e:
                    nonfinite = nonfinite or e.to_json()
                    break
        pc = compare_paired(u.correct, m.correct)
        pb = compare_paired(u.correct, b.correct) if b else None
        pred_flips = sum(x != y for x, y in zip(u.predictions, m.predictions))
        ll_diff = None if nonfinite else max(
            (max_abs_diff(lu, lm, where=f"tasks[{name}]", names=("unmerged", "merged"))
             for lu, lm in zip(u.loglikelihoods, m.loglikelihoods)), default=0.0)
        per_task.append({
            "task": name, "split": u.split, "n": u.n,
            "acc_unmerged": u.acc, "acc_merged": m.acc, "acc_base": b.acc if b else None,
            "acc_norm_unmerged": u.acc_norm, "acc_norm_merged": m.acc_norm, "acc_norm_base": b.acc_norm if b else None,
            "gap_pp": pc.gap_pp, "n_flipped": pc.n_flipped, "n_prediction_changed": pred_flips,
            "flipped_to_wrong": pc.only_a_right, "flipped_to_right": pc.only_b_right,
            "mcnemar_p": pc.mcnemar_p, "bootstrap_ci_pp": [pc.ci_low_pp, pc.ci_high_pp],
            "max_abs_loglikelihood_diff": ll_diff,
            "adapter_gain_pp": pb.gap_pp * -1 if pb else None, "nonfinite": nonfinite,
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


@dataclass(frozen=True)
class VerifySettings:
    """Every option of one ``verify`` run (what :func:`verify` takes as keyword arguments; see its Args).

    Validated once, by :func:`plan`; the stages after it (:func:`measure_weights`, :func:`measure_by_runtime` or
    :func:`measure_in_process`, :func:`report`) read it and never re-check it.
    """

    base: str | Path
    adapter: str | Path
    merged: str | Path
    report_dir: str | Path | None
    data_dir: str | Path | None = None
    text_file: str | Path | None = None
    limit: int | None = DEFAULT_LIMIT
    tasks: str | list[str] | tuple[str, ...] | None = None
    thresholds: Thresholds | dict | list[str] | None = None
    windows: int = DEFAULT_WINDOWS
    window_len: int = DEFAULT_WINDOW_LEN
    wikitext: bool = True
    prompts: list[str] | tuple[str, ...] | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    base_accuracy: bool = True
    merged_compute_dtype: str = "float32"
    batch_size: int = 8
    overwrite: bool = False
    log: Callable[[str], None] | None = None
    device: str | None = None
    threads: int | None = None
    engine: str = "hf"


@dataclass
class VerifyPlan:
    """A validated run: the runtime under test, the inputs opened once, the data read, and the report being filled.

    Attributes:
        settings: the run's :class:`VerifySettings`.
        runtime: the runtime under test (d2serve.runtimes).
        device: where the models run (``cpu`` / ``cuda[:N]``).
        n_forward / n_generate: torch threads of the batched steps / of the greedy generation.
        thresholds: the parsed :class:`Thresholds`.
        specs: the task names as given (groups unexpanded); names: the tasks scored, groups expanded.
        limit: items per task (None: all).
        base_ck / merged_ck: the checkpoints (merged_ck None when the runtime's artifact is no safetensors folder).
        fitted: the adapter fitted to the base (d2serve.fitting.Fit).
        compute_dtype: the merged model's torch dtype (None for a runtime that computes in its own precision).
        data_dir: the evaluation data folder (None when no section needs it).
        texts: (name, text) of each teacher-forced text; probe: the adapter's training probe or None.
        data: report.json as it is filled; timings: seconds per stage.
    """

    settings: VerifySettings
    runtime: object
    device: str
    n_forward: int
    n_generate: int
    thresholds: Thresholds
    specs: tuple
    names: tuple[str, ...]
    limit: int | None
    base_ck: Checkpoint
    merged_ck: Checkpoint | None
    fitted: object
    compute_dtype: torch.dtype | None
    data_dir: Path | None
    texts: list[tuple[str, str]]
    probe: dict | None
    data: dict
    timings: dict[str, float]

    def say(self, message: str) -> None:
        """A progress message: a stage with its elapsed time (d2serve.console) and the settings' ``log``."""
        step(message)
        if self.settings.log:
            self.settings.log(message)


def plan(s: VerifySettings) -> VerifyPlan:
    """Validate every setting and input and open them once, before any model is loaded (bad input: exit 2).

    Raises:
        the errors listed by :func:`verify`.
    """
    from d2serve.models import resolve_device
    from d2serve.threads import check_requested, pick, record

    runtime = select_runtime(s.engine, s.merged)  # the runtime under test (d2serve.runtimes): asked, never named
    dev = resolve_device(s.device)
    threads = check_requested(s.threads)
    n_forward, n_generate = pick("forward", threads), pick("generate", threads)
    th = parse_thresholds(s.thresholds)
    specs = parse_task_names(s.tasks)
    limit = None if not s.limit else int(s.limit)
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
    base_ck = Checkpoint(s.base)  # opened once: the fit, the weight check and every model built from the base use it
    merged_ck = Checkpoint(s.merged) if runtime.opens_merged_checkpoint else None
    adp = load_adapter(s.adapter)
    fitted = fit(base_ck, adp)  # every check of the adapter against the base, once (d2serve.fitting)
    compute_dtype = _compute_dtype(s.merged_compute_dtype, merged_ck) if merged_ck is not None else None
    runtime.check(merged=Path(s.merged), tasks=specs)
    needs_dir = s.wikitext or any(n in TASKS for n in specs)
    ddir = resolve_data_dir(s.data_dir) if needs_dir else None
    names = tuple(load_tasks(specs, ddir))  # every task's data checked before any model is loaded; groups expanded
    texts: list[tuple[str, str]] = []
    if s.wikitext:
        texts.append(("wikitext2", read_text(data_file(ddir, WIKITEXT))))
    if s.text_file is not None:
        texts.append((Path(s.text_file).name, read_text(s.text_file)))
    probe = read_probe(s.adapter)  # None when the adapter has no d2serve_probe.safetensors; a bad file raises here
    if s.max_new_tokens < th.min_content_tokens_per_prompt:
        raise InputError(f"max_new_tokens {s.max_new_tokens} < min_content_tokens_per_prompt "
                         f"{th.min_content_tokens_per_prompt:g}: the greedy comparison could never compare enough "
                         "content tokens; raise max_new_tokens or lower the threshold")
    if s.report_dir is not None:
        from d2serve.checkpoint import prepare_output_dir

        prepare_output_dir(Path(s.report_dir), s.overwrite, (Path(s.base), Path(s.adapter), Path(s.merged)))

    data: dict = {
        "d2serve_version": __version__,
        "inputs": {"base": str(s.base), "adapter": str(s.adapter), "merged": str(s.merged), "method": adp.method,
                   "n_adapted_layers": len(adp.layers), "base_dtype": str(base_ck.dtype).removeprefix("torch."),
                   "merged_dtype": runtime.merged_dtype_label(Path(s.merged), merged_ck),
                   "data_dir": str(ddir) if ddir else None,
                   "data_source": (f"bundled sample ({BUNDLED_ITEMS_PER_TASK} items per built-in task)"
                                   if ddir and is_bundled(ddir) else ("folder" if ddir else None)),
                   "text_file": str(s.text_file) if s.text_file else None},
        "settings": {"device": dev, "unmerged_dtype": "float32", "merged_compute_dtype": runtime.compute_label(compute_dtype),
                     "limit": limit, "tasks": list(names), "windows": s.windows, "window_len": s.window_len,
                     "max_new_tokens": s.max_new_tokens, "lm_eval_batch_size": s.batch_size,
                     "threads": record(threads, forward=n_forward, generate=n_generate),
                     "decoding": {"greedy": True, "do_sample": False, "repetition_penalty": 1.0,
                                  "generation_config": "ignored", "stop": "tokenizer eos or max_new_tokens"}},
        "thresholds": th.to_json(),
    }
    return VerifyPlan(s, runtime, dev, n_forward, n_generate, th, specs, names, limit, base_ck, merged_ck, fitted,
                      compute_dtype, ddir, texts, probe, data, {})


def measure_weights(p: VerifyPlan) -> None:
    """Every adapted tensor of the merged checkpoint against a float64 recomputation (report ``weights``), unless
    the runtime's artifact has no such tensors (``settings.weights_check`` says why)."""
    t = time.perf_counter()
    if not p.runtime.checks_weights:
        p.data["weights"] = None
        p.data["settings"]["weights_check"] = p.runtime.weights_skipped
    else:
        p.say("weights: comparing every adapted tensor with a float64 recomputation")
        p.data["weights"] = check_merged_weights(p.fitted, p.merged_ck, tol_ulps=p.thresholds.weight_tol_ulps,
                                                 fp32_slack=p.thresholds.weight_fp32_slack).to_json()
    p.timings["weights_s"] = time.perf_counter() - t


def measure_by_runtime(p: VerifyPlan) -> None:
    """Task accuracy scored by the runtime in its own engines (report ``tasks``; no logits or generation)."""
    s = p.settings
    t = time.perf_counter()
    scores, engine_settings = p.runtime.score_tasks(
        fitted=p.fitted, merged=Path(s.merged), names=p.specs, data_dir=p.data_dir, limit=p.limit,
        compute_dtype=p.compute_dtype, batch_size=s.batch_size, base_accuracy=s.base_accuracy, say=p.say)
    p.timings[f"tasks_{p.runtime.name}_s"] = time.perf_counter() - t
    p.data["settings"] |= engine_settings
    p.data["logits"] = {"sources": [], "training_probe": None}
    p.data["generation"] = None
    p.data["tasks"] = _task_section(scores, p.names, p.limit)


def measure_in_process(p: VerifyPlan) -> None:
    """The unmerged float32 reference and the merged model (loaded by the runtime) in this process: teacher-forced
    logits, greedy generation, task accuracy, and the base's accuracy (report ``logits``, ``generation``,
    ``tasks``)."""
    from d2serve.models import load_hf_model, load_tokenizer, unmerged_model
    from d2serve.threads import torch_threads

    s, dev, say = p.settings, p.device, p.say
    t = time.perf_counter()
    say("loading the unmerged (float32) and merged models")
    tok = load_tokenizer(s.base)
    unmerged_m = unmerged_model(p.fitted, dtype=torch.float32, device=dev)
    merged_m = p.runtime.load_merged(Path(s.merged), p.merged_ck, p.compute_dtype, dev)
    p.timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sources: list[LogitComparison] = []
    for name, text in p.texts:
        say(f"logits: teacher-forced comparison on {name}")
        win = text_windows(tok, text, s.windows, s.window_len, source=name)
        sources.append(compare_logits(unmerged_m, merged_m, win, name))
    probe_section = None
    if p.probe is not None:
        say("logits: the adapter's training probe")
        ids = p.probe["input_ids"].to(torch.long)
        sources.append(compare_logits(unmerged_m, merged_m, ids, "training_probe"))
        with torch.inference_mode():
            ours = unmerged_m(input_ids=ids.to(dev)).logits.float().cpu()
        probe_section = {"n_sequences": int(ids.shape[0]), "n_tokens": int(ids.shape[1]),
                         "max_abs_logit_diff_trainer_vs_unmerged": None, "nonfinite": None}
        try:
            probe_section["max_abs_logit_diff_trainer_vs_unmerged"] = max_abs_diff(
                p.probe["logits"], ours, where="logits[training_probe]", names=("trainer", "unmerged"),
                dims=("sequence", "position", "vocab"))
        except NonFiniteError as e:
            probe_section["nonfinite"] = e.to_json()
    p.data["logits"] = {"sources": [x.to_json() for x in sources], "training_probe": probe_section}
    p.timings["logits_s"] = time.perf_counter() - t

    t = time.perf_counter()
    plist = list(s.prompts) if s.prompts is not None else list(DEFAULT_PROMPTS)
    say(f"generation: greedy, {len(plist)} prompts x {s.max_new_tokens} tokens")
    with torch_threads(p.n_generate):  # decoding small steps: fewer threads than cores (d2serve.threads)
        gens = compare_generation(unmerged_m, merged_m, tok, plist, s.max_new_tokens)
    p.data["generation"] = {"max_new_tokens": s.max_new_tokens, "n_prompts": len(gens),
                            "n_identical": sum(g.identical for g in gens),
                            "n_content_tokens_compared": sum(g.n_content_compared for g in gens),
                            "prompts": [g.to_json() for g in gens]}
    p.timings["generation_s"] = time.perf_counter() - t

    if p.names:
        scores: dict[str, dict] = {}
        for label, model in (("unmerged", unmerged_m), ("merged", merged_m)):
            t = time.perf_counter()
            say(f"tasks: scoring the {label} model on {', '.join(p.names)} (limit {p.limit or 'none'})")
            lm = (hf_lm(model, tok, s.batch_size) if model is unmerged_m
                  else p.runtime.task_lm(model, unmerged_m, tok, s.batch_size))
            scores[label] = score_tasks(without_progress_bars(lm), p.specs, p.data_dir, p.limit)
            p.timings[f"tasks_{label}_s"] = time.perf_counter() - t
        del unmerged_m, merged_m
        gc.collect()
        if s.base_accuracy:
            t = time.perf_counter()
            say("tasks: scoring the base model")
            base_m = load_hf_model(p.base_ck, dtype=torch.float32, device=dev)
            scores["base"] = score_tasks(without_progress_bars(hf_lm(base_m, tok, s.batch_size)), p.specs,
                                         p.data_dir, p.limit)
            p.timings["tasks_base_s"] = time.perf_counter() - t
            del base_m
        p.data["tasks"] = _task_section(scores, p.names, p.limit)


def report(p: VerifyPlan) -> VerifyReport:
    """Thresholds -> failures, then report.json / report.md / report.html written atomically (when asked)."""
    data = p.data
    data["timings_s"] = p.timings
    failures = evaluate_thresholds(data, p.thresholds)
    data["passed"] = not failures
    data["failures"] = failures
    rep = VerifyReport(not failures, failures, data)
    if p.settings.report_dir is not None:
        from d2serve.verify.report import write_report

        p.say(f"writing the report to {p.settings.report_dir}")
        rep.report_dir = write_report(data, Path(p.settings.report_dir), overwrite=p.settings.overwrite)
    return rep


@in_steps  # each progress message is a stage with elapsed time (d2serve.console; shown by the CLI)
def _verify(**kwargs) -> VerifyReport:
    """plan -> measure (weights, then the runtime's own engines or this process) -> report."""
    p = plan(VerifySettings(**kwargs))
    measure_weights(p)
    (measure_by_runtime if p.runtime.scores_tasks_itself else measure_in_process)(p)
    return report(p)


def verify(**kwargs) -> VerifyReport:
    """Verify that ``merged`` behaves like ``base`` + ``adapter`` (unmerged, float32) and write the report.

    Args:
        base / merged: HF checkpoint directories; adapter: adapter directory.
        report_dir: output folder for report.json / report.md / report.html (written atomically);
            None -> nothing written.
        data_dir: evaluation data folder for the built-in tasks and WikiText-2 (default: $D2SERVE_DATA_DIR,
            else the samples bundled with d2serve: 200 items per task, ~128 KB of WikiText-2).
        text_file: extra UTF-8 text for the teacher-forced logit comparison.
        limit: first N items per task; 0 or None -> full sets.
        tasks: task names (comma-separated string or list): built-in names, lm-eval task/group names
            (data from the local Hugging Face datasets cache, offline) or task YAML paths;
            None -> the six built-in tasks; "" -> none.
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
        device: where the models run: "cpu", "cuda" or "cuda:N"; None -> cuda when available, else cpu.
            The dtypes are the same on every device: the unmerged reference in float32 (TF32 matmuls stay
            off, torch's default) and the merged model in ``merged_compute_dtype``. The weight check always
            runs on the CPU in float64.
        threads: torch CPU threads for every step; None: chosen per step from the cores this process may use
            (:func:`d2serve.threads.pick`: every core for the batched logits and tasks, half of them for the
            greedy generation). Recorded in the report (``settings.threads``).
        engine: "hf" (default: every section in transformers) or "vllm": the weight check, then task accuracy
            through vLLM only: the merged checkpoint in its own engine vs the base + the adapter folded and
            served unmerged by d2serve's vLLM plugin (and the base, with ``base_accuracy``), every engine in the
            ``merged_compute_dtype`` ("auto": the checkpoint's dtype), same max_model_len, eager; the paired
            comparison and thresholds are the same. The teacher-forced logit and greedy generation comparisons
            are not run (the report says so; run ``engine="hf"`` for them). How a 7B-70B model is verified on GPUs.

    Returns:
        :class:`VerifyReport` (``.passed``, ``.failures``).

    Raises:
        FileNotFoundError / CheckpointError / AdapterError / AdapterConfigError / ValueError: bad input
            (missing directories or data files, adapter not fitting the base, unknown task or threshold).
        TaskNotAvailableError: a task name/YAML that is unknown, whose data is not available offline,
            or that is not multiple-choice with ``acc`` (raised before any model is loaded).
        InputError: ``device`` is unknown or not available on this machine.
    """
    from d2serve.threads import check_requested, pick, torch_threads

    with torch_threads(pick("forward", check_requested(kwargs.get("threads")))):  # generation picks its own
        return _verify(**kwargs)
