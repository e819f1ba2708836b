"""Matplotlib figures of a verify report (PNG bytes, headless Agg backend)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _short_layer_name(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.self_attn.q_proj`` (plot labels)."""
    return module.removeprefix("model.").removeprefix("layers.")


def layer_error_plot(weights: dict) -> bytes:
    """Per-layer max error / tolerance (log scale, 1 = rounding bound) and fraction of the update lost to the cast.

    Horizontal bars, one labelled row per adapted layer (adapter order, top to bottom).
    """
    lay = weights["layers"]
    n = len(lay)
    y = list(range(n))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, max(3.0, 0.17 * n + 1.4)), sharey=True)
    ratios = [max(e["max_err_over_tol"], 1e-6) for e in lay]
    a1.barh(y, ratios, color=["tab:red" if not e["passed"] else "tab:blue" for e in lay])
    a1.axvline(1.0, color="k", ls="--", lw=1, label="tolerance (rounding bound)")
    a1.set_xscale("log")
    a1.set_xlabel("max |merged - ref64| / tol")
    a1.legend(loc="lower right", fontsize=8)
    a1.set_yticks(y, [_short_layer_name(e["module"]) for e in lay], fontsize=7 if n > 40 else 8)
    a1.invert_yaxis()
    a1.set_title(f"Merge error per layer ({weights['merged_dtype']} vs float64)", fontsize=10)
    lost = [e["frac_update_lost"] for e in lay]
    a2.barh(y, lost, color="tab:orange")
    a2.set_xlim(0, max(max(lost, default=0.0), 1e-3) * 1.1)  # 0 stays at the left edge when nothing was lost
    a2.set_xlabel("fraction of update lost to the cast")
    return _png(fig)


def kl_plot(sources: list[dict]) -> bytes:
    """Mean KL(unmerged || merged) per token position, one line per text."""
    fig, ax = plt.subplots(figsize=(10, 3.5))
    for s in sources:
        ax.plot(range(len(s["kl_per_position"])), [max(v, 1e-12) for v in s["kl_per_position"]],
                label=f"{s['source']} (mean {s['mean_kl']:.2e})")
    ax.set_yscale("log")
    ax.set_xlabel("token position in window")
    ax.set_ylabel("KL (nats)")
    ax.set_title("KL(unmerged || merged) per position, teacher-forced")
    ax.legend()
    return _png(fig)


def accuracy_plot(tasks: dict) -> bytes:
    """Accuracy bars per task for base, unmerged and merged."""
    per = tasks["per_task"]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.27
    for k, (key, label) in enumerate((("acc_base", "base"), ("acc_unmerged", "unmerged"), ("acc_merged", "merged"))):
        vals = [(t[key] if t[key] is not None else 0.0) * 100 for t in per]
        ax.bar([i + (k - 1) * width for i in range(len(per))], vals, width, label=label)
    ax.set_xticks(range(len(per)), [f"{t['task']}\n(n={t['n']}, gap {t['gap_pp']:+.1f}pp)" for t in per], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Task accuracy (log-likelihood multiple choice, lm-eval)")
    ax.legend()
    return _png(fig)
