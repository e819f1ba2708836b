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


# A report is a list of blocks, rendered to Markdown and to HTML by the two functions below (one source of truth):
#   ("h1" | "h2", text), ("p", text), ("ul", [text, ...]), ("table", header, rows), ("img", title).
# Text may hold `code` spans (backticks); table cells are plain values.


def _table(header: list[str], rows: list[list]) -> tuple:
    """A table block; every row must have the header's column count."""
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"report table row has {len(r)} cells, header {header} has {len(header)}")
    return ("table", list(header), [[_fmt(c) for c in r] for r in rows])


def _md_cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def adapter_effect_lines(t: dict | None) -> list[str]:
    """Plain statements of how the adapter changes task accuracy against the base (unmerged and merged),
    one per task scored on the base; a task where either is below the base starts with "WORSE THAN BASE"."""
    lines = []
    for x in (t or {}).get("per_task", []):
        b = x.get("acc_base")
        if b is None:
            continue
        u, m = x["acc_unmerged"], x["acc_merged"]
        worse = [name for name, v in (("unmerged", u), ("merged", m)) if v < b]
        if worse:
            lines.append(f"WORSE THAN BASE: the adapter lowers {x['task']} accuracy from {b:.3f} to {u:.3f} vs the "
                         f"base (unmerged; merged {m:.3f}, n={x['n']}).")
        elif u > b or m > b:
            lines.append(f"the adapter raises {x['task']} accuracy from {b:.3f} to {u:.3f} vs the base "
                         f"(unmerged; merged {m:.3f}, n={x['n']}).")
        else:
            lines.append(f"the adapter leaves {x['task']} accuracy at {b:.3f} (base = unmerged = merged, n={x['n']}).")
    return lines


def report_blocks(data: dict, images: tuple[str, ...] = ()) -> list[tuple]:
    """The report as blocks (see the comment above); ``images``: plot titles to place after their section."""
    inp, st = data["inputs"], data["settings"]
    out: list[tuple] = [("h1", f"d2serve verify: {'PASS' if data['passed'] else 'FAIL'}")]
    if data["failures"]:
        out += [("h2", "Failures"), ("ul", list(data["failures"]))]
    t = data.get("tasks")
    effect = adapter_effect_lines(t)
    if effect:
        out += [("h2", "Adapter vs base (task accuracy)"), ("ul", effect)]
    out += [("h2", "Inputs and settings"),
            ("ul", [f"base: `{inp['base']}` ({inp['base_dtype']})",
                    f"adapter: `{inp['adapter']}` (method {inp['method']}, {inp['n_adapted_layers']} layers)",
                    f"merged: `{inp['merged']}` ({inp['merged_dtype']}), run in {st['merged_compute_dtype']}; "
                    f"unmerged run in {st['unmerged_dtype']}",
                    "decoding: greedy, no repetition penalty, generation_config ignored",
                    *([f"engine: vLLM {st.get('vllm')} (tasks: the merged checkpoint vs the adapter served unmerged "
                       f"by d2serve's plugin, {st.get('vllm_dtype')}, max_model_len {st.get('vllm_max_model_len')}, "
                       "eager)"] if st.get("engine") == "vllm" else []),
                    *[f"not run: {why}" for why in st.get("not_run", [])],
                    f"thresholds: {', '.join(f'{k}={v:g}' for k, v in data['thresholds'].items())}"])]
    w = data.get("weights")
    if w:
        out += [("h2", "1. Weights (merged tensor vs float64 recomputation)"),
                ("p", f"{w['n_layers']} adapted layers, {w['n_layers_failed']} beyond tolerance; max error/tolerance "
                      f"{w['max_err_over_tol']:.3g} (<= 1 means: a rounding of the exact merge to "
                      f"{w['merged_dtype']}); "
                      f"max abs error {w['max_abs_err']:.3g}; max relative error {w['max_rel_err']:.3g}; fraction of "
                      f"updated elements where the cast lost the update: mean {w['mean_frac_update_lost']:.3g}, "
                      f"max {w['max_frac_update_lost']:.3g}."),
                ("p", "Worst layers:")]
        by = {e["module"]: e for e in w["layers"]}
        out.append(_table(["layer", "max err/tol", "max abs err", "rel err", "update ||dW||/||W0||", "update lost"],
                          [[by[m]["module"], by[m]["max_err_over_tol"], by[m]["max_abs_err"], by[m]["rel_err"],
                            by[m]["update_rel_norm"], by[m]["frac_update_lost"]] for m in w["worst_layers"]]))
        if w["untouched_changed"] or w["missing_in_merged"]:
            out.append(("p", f"Non-adapted tensors changed: {w['untouched_changed']}; "
                             f"missing: {w['missing_in_merged']}"))
        if "Per-layer merge error" in images:
            out.append(("img", "Per-layer merge error"))
    lg = data.get("logits")
    if lg and lg["sources"]:
        out += [("h2", "2. Logits (teacher-forced)"),
                _table(["text", "positions", "max |dlogit|", "mean KL (nats)", "max KL", "top-1 agreement",
                        "ppl unmerged", "ppl merged"],
                       [[s["source"], s["n_positions"], s["max_abs_logit_diff"], s["mean_kl"], s["max_kl"],
                         s["top1_agreement"], s["ppl_unmerged"], s["ppl_merged"]] for s in lg["sources"]])]
        if lg.get("training_probe"):
            out.append(("p", "Trainer's recorded logits vs our unmerged model on the training probe: max |dlogit| "
                             f"{_fmt(lg['training_probe']['max_abs_logit_diff_trainer_vs_unmerged'], '.3g')}"))
        if "KL per position" in images:
            out.append(("img", "KL per position"))
    g = data.get("generation")
    if g:
        out += [("h2", "3. Greedy generation"),
                ("p", f"{g['n_identical']} of {g['n_prompts']} outputs identical (up to {g['max_new_tokens']} new "
                      "tokens)."),
                _table(["prompt", "identical", "first divergence", "unmerged", "merged"],
                       [[p["prompt"][:40], p["identical"], p["first_divergence"], p["text_unmerged"][:60],
                         p["text_merged"][:60]] for p in g["prompts"]])]
    if t and t["per_task"]:
        out += [("h2", "4. Task accuracy (lm-eval, zero-shot log-likelihood multiple choice)"),
                ("p", f"Items per task: {'all' if not t['limit'] else 'first ' + str(t['limit'])}. gap = merged - "
                      "unmerged (pp); flipped = items whose correctness changed; p = exact McNemar; CI = 95% paired "
                      "bootstrap. Reference: the D2-LoRA paper reports 0.03 pp average and 0.7 pp worst "
                      "merged-unmerged gap."),
                _table(["task", "n", "base", "unmerged", "merged", "gap pp", "flipped", "McNemar p", "95% CI pp"],
                       [[x["task"], x["n"], x["acc_base"], x["acc_unmerged"], x["acc_merged"], x["gap_pp"],
                         x["n_flipped"], x["mcnemar_p"],
                         f"[{x['bootstrap_ci_pp'][0]:+.2f}, {x['bootstrap_ci_pp'][1]:+.2f}]"] for x in t["per_task"]])]
        o = t["overall"]
        if o:
            out.append(("p", f"Pooled over tasks: n={o['n']}, gap {o['gap_pp']:+.3f} pp (mean task gap "
                             f"{o['mean_task_gap_pp']:+.3f} pp, worst |gap| {o['max_abs_task_gap_pp']:.3f} pp), "
                             f"{o['n_flipped']} flipped, McNemar p={o['mcnemar_p']:.3g}, 95% CI "
                             f"[{o['bootstrap_ci_pp'][0]:+.2f}, {o['bootstrap_ci_pp'][1]:+.2f}] pp."))
        if "Accuracy per task" in images:
            out.append(("img", "Accuracy per task"))
    out += [("h2", "Timings"), ("p", ", ".join(f"{k} {v:.1f}" for k, v in data.get("timings_s", {}).items()))]
    return out


IMAGE_FILES = {"Per-layer merge error": "layer_error.png", "KL per position": "kl_per_position.png",
               "Accuracy per task": "accuracy.png"}


def blocks_to_markdown(blocks: list[tuple]) -> str:
    """Render report blocks as Markdown (tables with escaped ``|``; images link the PNG files beside report.md)."""
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out += [f"# {b[1]}", ""]
        elif kind == "h2":
            out += [f"## {b[1]}", ""]
        elif kind == "p":
            out += [b[1], ""]
        elif kind == "ul":
            out += [f"- {x}" for x in b[1]] + [""]
        elif kind == "table":
            header, rows = b[1], b[2]
            out.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            out.append("")
        elif kind == "img":
            out += [f"![{b[1]}]({IMAGE_FILES.get(b[1], b[1])})", ""]
    return "\n".join(out)


def _inline_html(text: str) -> str:
    """Escape text for HTML and turn `code` spans into <code> elements."""
    parts = str(text).split("`")
    return "".join(f"<code>{html.escape(x)}</code>" if i % 2 else html.escape(x) for i, x in enumerate(parts))


def blocks_to_html(blocks: list[tuple], images: dict[str, bytes]) -> str:
    """Render report blocks as one self-contained HTML page (tables as <table>, plots as data: URIs, no links)."""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #bbb;padding:2px 8px;"
             "font-size:13px;text-align:left}th{background:#eee}code{background:#f4f4f4}img{max-width:100%}"
             "li.worse{color:#b00;font-weight:bold}")
    parts = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>d2serve verify report</title>",
             f"<style>{style}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{_inline_html(b[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "ul":
            items = "".join(f"<li{' class=worse' if x.startswith('WORSE') else ''}>{_inline_html(x)}</li>"
                            for x in b[1])
            parts.append(f"<ul>{items}</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img" and b[1] in images:
            parts.append(f"<figure><img alt='{html.escape(b[1], quote=True)}' "
                         f"src='data:image/png;base64,{base64.b64encode(images[b[1]]).decode()}'>"
                         f"<figcaption>{html.escape(b[1])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(data: dict, images: tuple[str, ...] = ()) -> str:
    """The human-readable report (Markdown) of ``data`` (report.json layout)."""
    return blocks_to_markdown(report_blocks(data, tuple(images)))


def render_html(data: dict, images: dict[str, bytes]) -> str:
    """The same report as :func:`render_markdown`, as a self-contained HTML page with the plots inlined (base64 PNG)."""
    return blocks_to_html(report_blocks(data, tuple(images)), images)


def write_report(data: dict, report_dir: Path, overwrite: bool = False) -> Path:
    """Write report.json, report.md, report.html and the PNG plots into ``report_dir`` atomically.

    Raises:
        FileExistsError: ``report_dir`` is non-empty and ``overwrite`` is False.
    """
    data = _clean({k: data[k] for k in _KEY_ORDER if k in data} | {k: v for k, v in data.items() if k not in _KEY_ORDER})
    images: dict[str, bytes] = {}
    if data.get("weights") and data["weights"]["layers"]:
        images["Per-layer merge error"] = plots.layer_error_plot(data["weights"])
    finite_sources = [s for s in (data.get("logits") or {}).get("sources", []) if not s.get("nonfinite")]
    if finite_sources:  # a text with NaN/inf logits has no KL curve (named among the failures instead)
        images["KL per position"] = plots.kl_plot(finite_sources)
    if data.get("tasks") and data["tasks"]["per_task"]:
        images["Accuracy per task"] = plots.accuracy_plot(data["tasks"])
    blocks = report_blocks(data, tuple(images))
    with atomic_output_dir(report_dir, overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        (tmp / "report.md").write_text(blocks_to_markdown(blocks))
        (tmp / "report.html").write_text(blocks_to_html(blocks, images))
        for title, png in images.items():
            (tmp / IMAGE_FILES[title]).write_bytes(png)
    return Path(report_dir)
