"""Write a verify report: ``report.json`` (stable keys), ``report.md`` and ``report.html`` (with embedded plots).

The folder is written atomically: a failed write leaves no half-written report.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from d2serve.checkpoint import atomic_output_dir
from d2serve.verify import plots

_KEY_ORDER = ("passed", "failures", "d2serve_version", "inputs", "settings", "thresholds", "weights", "logits",
              "generation", "tasks", "timings_s")


def _clean(obj):
    """Replace NaN/inf by None so the JSON is standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _fmt(v, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(data: dict) -> str:
    """The human-readable report (Markdown)."""
    inp, st = data["inputs"], data["settings"]
    out = [f"# d2serve verify: {'PASS' if data['passed'] else 'FAIL'}", ""]
    if data["failures"]:
        out += ["## Failures", ""] + [f"- {f}" for f in data["failures"]] + [""]
    out += ["## Inputs and settings", "",
            f"- base: `{inp['base']}` ({inp['base_dtype']})",
            f"- adapter: `{inp['adapter']}` (method {inp['method']}, {inp['n_adapted_layers']} layers)",
            f"- merged: `{inp['merged']}` ({inp['merged_dtype']}), run in {st['merged_compute_dtype']}; "
            f"unmerged run in {st['unmerged_dtype']}",
            "- decoding: greedy, no repetition penalty, generation_config ignored",
            f"- thresholds: {', '.join(f'{k}={v:g}' for k, v in data['thresholds'].items())}", ""]
    w = data.get("weights")
    if w:
        out += ["## 1. Weights (merged tensor vs float64 recomputation)", "",
                f"{w['n_layers']} adapted layers, {w['n_layers_failed']} beyond tolerance; max error/tolerance "
                f"{w['max_err_over_tol']:.3g} (<= 1 means: a rounding of the exact merge to {w['merged_dtype']}); "
                f"max abs error {w['max_abs_err']:.3g}; max relative error {w['max_rel_err']:.3g}; "
                f"fraction of updated elements where the cast lost the update: mean {w['mean_frac_update_lost']:.3g}, "
                f"max {w['max_frac_update_lost']:.3g}.", "", "Worst layers:", ""]
        by = {e["module"]: e for e in w["layers"]}
        out.append(_table(["layer", "max err/tol", "max abs err", "rel err", "update ||dW||/||W0||", "update lost"],
                          [[by[m]["module"], by[m]["max_err_over_tol"], by[m]["max_abs_err"], by[m]["rel_err"],
                            by[m]["update_rel_norm"], by[m]["frac_update_lost"]] for m in w["worst_layers"]]))
        if w["untouched_changed"] or w["missing_in_merged"]:
            out += ["", f"Non-adapted tensors changed: {w['untouched_changed']}; missing: {w['missing_in_merged']}"]
        out.append("")
    lg = data.get("logits")
    if lg and lg["sources"]:
        out += ["## 2. Logits (teacher-forced)", "",
                _table(["text", "positions", "max |dlogit|", "mean KL (nats)", "max KL", "top-1 agreement",
                        "ppl unmerged", "ppl merged"],
                       [[s["source"], s["n_positions"], s["max_abs_logit_diff"], s["mean_kl"], s["max_kl"],
                         s["top1_agreement"], s["ppl_unmerged"], s["ppl_merged"]] for s in lg["sources"]]), ""]
        if lg.get("training_probe"):
            out += [f"Trainer's recorded logits vs our unmerged model on the training probe: max |dlogit| "
                    f"{lg['training_probe']['max_abs_logit_diff_trainer_vs_unmerged']:.3g}", ""]
    g = data.get("generation")
    if g:
        out += ["## 3. Greedy generation", "", f"{g['n_identical']} of {g['n_prompts']} outputs identical "
                f"(up to {g['max_new_tokens']} new tokens).", "",
                _table(["prompt", "identical", "first divergence", "unmerged", "merged"],
                       [[p["prompt"].replace("\n", " ")[:40], p["identical"], p["first_divergence"],
                         p["text_unmerged"].replace("\n", " ").replace("|", "/")[:60],
                         p["text_merged"].replace("\n", " ").replace("|", "/")[:60]] for p in g["prompts"]]), ""]
    t = data.get("tasks")
    if t and t["per_task"]:
        out += ["## 4. Task accuracy (lm-eval, zero-shot log-likelihood multiple choice)", "",
                f"Items per task: {'all' if not t['limit'] else 'first ' + str(t['limit'])}. gap = merged - unmerged "
                "(pp); flipped = items whose correctness changed; p = exact McNemar; CI = 95% paired bootstrap. "
                "Reference: the D2-LoRA paper reports 0.03 pp average and 0.7 pp worst merged-unmerged gap.", "",
                _table(["task", "n", "base", "unmerged", "merged", "gap pp", "flipped", "McNemar p", "95% CI pp"],
                       [[x["task"], x["n"], x["acc_base"], x["acc_unmerged"], x["acc_merged"], x["gap_pp"],
                         x["n_flipped"], x["mcnemar_p"],
                         f"[{x['bootstrap_ci_pp'][0]:+.2f}, {x['bootstrap_ci_pp'][1]:+.2f}]"] for x in t["per_task"]])]
        o = t["overall"]
        if o:
            out += ["", f"Pooled over tasks: n={o['n']}, gap {o['gap_pp']:+.3f} pp (mean task gap "
                    f"{o['mean_task_gap_pp']:+.3f} pp, worst |gap| {o['max_abs_task_gap_pp']:.3f} pp), "
                    f"{o['n_flipped']} flipped, McNemar p={o['mcnemar_p']:.3g}, 95% CI "
                    f"[{o['bootstrap_ci_pp'][0]:+.2f}, {o['bootstrap_ci_pp'][1]:+.2f}] pp."]
        out.append("")
    out += ["## Timings", "", ", ".join(f"{k} {v:.1f}" for k, v in data.get("timings_s", {}).items()), ""]
    return "\n".join(out)


def render_html(markdown_text: str, images: dict[str, bytes]) -> str:
    """A self-contained HTML page: the Markdown shown preformatted, then the plots inlined as base64 PNG."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>d2serve verify report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}pre{white-space:pre-wrap;"
             "font-size:13px}</style></head><body>", f"<pre>{html.escape(markdown_text)}</pre>"]
    for title, png in images.items():
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(data: dict, report_dir: Path, overwrite: bool = False) -> Path:
    """Write report.json, report.md, report.html and the PNG plots into ``report_dir`` atomically.

    Raises:
        FileExistsError: ``report_dir`` is non-empty and ``overwrite`` is False.
    """
    data = _clean({k: data[k] for k in _KEY_ORDER if k in data} | {k: v for k, v in data.items() if k not in _KEY_ORDER})
    images: dict[str, bytes] = {}
    if data.get("weights") and data["weights"]["layers"]:
        images["Per-layer merge error"] = plots.layer_error_plot(data["weights"])
    if data.get("logits") and data["logits"]["sources"]:
        images["KL per position"] = plots.kl_plot(data["logits"]["sources"])
    if data.get("tasks") and data["tasks"]["per_task"]:
        images["Accuracy per task"] = plots.accuracy_plot(data["tasks"])
    md = render_markdown(data)
    files = {"Per-layer merge error": "layer_error.png", "KL per position": "kl_per_position.png",
             "Accuracy per task": "accuracy.png"}
    with atomic_output_dir(report_dir, overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        (tmp / "report.md").write_text(md)
        (tmp / "report.html").write_text(render_html(md, images))
        for title, png in images.items():
            (tmp / files[title]).write_bytes(png)
    return Path(report_dir)
