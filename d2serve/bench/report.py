"""Writing the report: ``bench.json`` (stable keys), ``bench.md`` (tables) and plots (PNG).

Every file is written to a temporary name and renamed into place, so an interrupted run
leaves the last complete version of each file.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA_VERSION = 1


def _atomic_write(path: Path, data: bytes) -> None:
    from d2serve.outdir import write_file_atomic  # no temporary file left on an error; a full disk is one line

    write_file_atomic(path, data)


def write_bench_json(report_dir: Path, results: dict) -> Path:
    """Write ``results`` to ``report_dir/bench.json`` atomically; returns the path."""
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / "bench.json"
    _atomic_write(path, (json.dumps(results, indent=2) + "\n").encode())
    return path


def _fmt(x, nd=2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


PLUGIN_COST = ("plugin cost: time of the D2-LoRA served unmerged through d2serve's plugin (arm unmerged) / time "
               "of the same rank-R LoRA tensors in vanilla vLLM LoRA (arm vanilla_lora, no plugin loaded); "
               "1.00 = free, target <= 1.05")


def _ratio_cell(r: dict | None, key: str) -> str:
    if not r or r.get(key) is None:
        return "-"
    sp = r.get("spread", {}).get(key, {})
    if sp:
        return f"{r[key]:.3f} [{sp['min']:.3f}, {sp['max']:.3f}]"
    return f"{r[key]:.3f}"


def _kv_text(k: dict) -> str:
    text = "in use" if k.get("kv_cache_in_use") else "NOT in use"
    if "decode_step_ms_with_cache" in k:
        text += f" (decode step {k['decode_step_ms_with_cache']:.1f} ms vs full recompute {k['full_recompute_ms']:.1f} ms)"
    elif k.get("note"):
        text += f" ({k['note']})"
    return text


def _p50(arm: dict, metric: str, digits: int) -> str:
    """The p50 of ``metric`` in an arm summary, or "-" when it has no sample (e.g. decode tokens/s when the
    N-token call was not slower than the 1-token call, as can happen for a tiny model: no decode time to divide)."""
    return _fmt(float(arm[metric]["p50"]), digits) if metric in arm else "-"


def render_markdown(results: dict) -> str:
    """The human report: environment, comparability, one table per workload, ratios with spread."""
    env = results.get("environment", {})
    lines = [f"# d2serve bench ({results.get('backend', '?')} backend)", ""]
    if results.get("status") != "complete":
        lines += [f"**Status: {results.get('status')}** (partial results)", ""]
    lines += [
        f"- CPU: {env.get('cpu_model')} ({env.get('logical_cpus')} logical CPUs), torch threads {env.get('torch_threads')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
        f"- date: {env.get('date')}, git: {env.get('git_sha')}",
        f"- system load average (1 min) at start/end: {_fmt(env.get('load_avg_1m_start'))} / "
        f"{_fmt(env.get('load_avg_1m_end'))} (above {env.get('logical_cpus')} means other processes competed "
        "for the CPU; absolute numbers are then pessimistic, pair-wise ratios less affected)",
        f"- arms: {', '.join(results.get('arms', {}))}; warm-up {results['plan']['warmup']}, repeats {results['plan']['repeats']}",
        "",
    ]
    if results.get("comparison_mode"):
        modes = {a: s.get("compile_mode") for a, s in results.get("arms", {}).items()}
        lines += [f"- vLLM comparison mode: {results['comparison_mode']}; compile mode per arm: "
                  + ", ".join(f"{a} {m}" for a, m in modes.items()), ""]
    comp = results.get("comparability", {})
    if comp.get("comparable", True):
        lines += ["Comparability: all arms have identical settings except the adapter mode.", ""]
    else:
        lines += ["**NOT COMPARABLE**: the arms differ in more than the adapter mode:", "", "```"]
        lines += comp.get("diffs", []) + ["```", ""]
    lines += [
        "Ratios are computed pair-wise within each repeat (same run, same settings) and reported as",
        "median [min, max] across repeats; > 1 means the merged model is faster.",
        "",
    ]
    for what, why in results.get("skipped", {}).items():
        lines += [f"Workload `{what}` not run: {why}.", ""]
    wl = results.get("workloads", {})
    ev = wl.get("eval_throughput")
    if ev:
        lines += [f"## Evaluation throughput ({ev['dataset']}, {ev['examples']} examples, batch {ev['batch']})", ""]
        lines += ["| arm | examples/s p50 | min..max over repeats | accuracy |", "|---|---|---|---|"]
        for arm, a in ev["arms"].items():
            s = a["examples_per_s"]
            lines.append(f"| {arm} | {s['p50']:.2f} | {s['min']:.2f}..{s['max']:.2f} | {_fmt(a.get('accuracy'), 3)} |")
        r = ev.get("ratios", {})
        lines += [
            "",
            f"- merged/unmerged examples/s: {_ratio_cell(r, 'merged_over_unmerged')}",
            f"- merged/unmerged (cached scale) examples/s: {_ratio_cell(r, 'merged_over_unmerged_cached')}",
            f"- merged/base examples/s: {_ratio_cell(r, 'merged_over_base')}",
            "",
        ]
        if r.get("vanilla_lora_over_unmerged") is not None:
            lines += [f"- {PLUGIN_COST}, eval time: {_ratio_cell(r, 'vanilla_lora_over_unmerged')}", ""]
    gen = wl.get("generation")
    if gen:
        lines += [f"## Generation ({gen['max_new_tokens']} new tokens, greedy, EOS ignored)", ""]
        kv = gen.get("kv_cache", {})
        if kv:
            lines += ["KV cache: " + "; ".join(f"{arm}: {_kv_text(k)}" for arm, k in kv.items()), ""]
        lines += [
            "| case | arm | TTFT p50/p90/p99 ms | TPOT p50 ms | e2e p50/p90/p99 ms | prefill tokens/s | decode tokens/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, c in gen["cases"].items():
            for arm, a in c["arms"].items():
                t, e = a["ttft_ms"], a["e2e_ms"]
                lines.append(
                    f"| {key} | {arm} | {t['p50']:.1f}/{t['p90']:.1f}/{t['p99']:.1f} | {a['tpot_ms']['p50']:.2f} | "
                    f"{e['p50']:.1f}/{e['p90']:.1f}/{e['p99']:.1f} | {_p50(a, 'prefill_tokens_per_s', 0)} | "
                    f"{_p50(a, 'decode_tokens_per_s', 1)} |"
                )
        lines += ["", "Pair-wise ratios of end-to-end output tokens/s per case (median [min, max]):", ""]
        lines += ["| case | merged/unmerged | merged/unmerged (cached) | merged/base |", "|---|---|---|---|"]
        for key, c in gen["cases"].items():
            r = c.get("ratios", {})
            lines.append(
                f"| {key} | {_ratio_cell(r, 'merged_over_unmerged')} | {_ratio_cell(r, 'merged_over_unmerged_cached')} | "
                f"{_ratio_cell(r, 'merged_over_base')} |"
            )
        r = gen.get("ratios", {})
        lines += [
            "",
            f"Whole workload (median over cases): merged/unmerged {_fmt(r.get('merged_over_unmerged'), 3)}, "
            f"merged/base {_fmt(r.get('merged_over_base'), 3)}",
            "",
        ]
        if any(c.get("ratios", {}).get("vanilla_lora_over_unmerged") is not None for c in gen["cases"].values()):
            lines += [f"{PLUGIN_COST} per case (median [min, max] over repeats):", "",
                      "| case | decode time | TTFT (prefill) time | end-to-end time |", "|---|---|---|---|"]
            for key, c in gen["cases"].items():
                by = c.get("ratios_by_metric", {})
                lines.append(f"| {key} | {_ratio_cell(by.get('decode_tokens_per_s'), 'vanilla_lora_over_unmerged')} | "
                             f"{_ratio_cell(by.get('prefill_tokens_per_s'), 'vanilla_lora_over_unmerged')} | "
                             f"{_ratio_cell(c.get('ratios'), 'vanilla_lora_over_unmerged')} |")
            lines.append("")
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    return "\n".join(lines)


def write_markdown(report_dir: Path, results: dict) -> Path:
    """Write ``bench.md``; returns the path."""
    path = report_dir / "bench.md"
    _atomic_write(path, render_markdown(results).encode())
    return path


def write_plots(report_dir: Path, results: dict) -> list[str]:
    """Write ``throughput_vs_batch.png`` and ``latency_cdf.png`` for the generation workload.

    Returns:
        The file names written (relative to ``report_dir``); empty when there is no generation data.
    """
    gen = results.get("workloads", {}).get("generation")
    if not gen or not gen.get("cases"):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cases = gen["cases"]
    plens = sorted({c["prompt_len"] for c in cases.values()})
    arms = list(next(iter(cases.values()))["arms"])
    fig, axes = plt.subplots(1, len(plens), figsize=(5 * len(plens), 4), squeeze=False)
    for ax, pl in zip(axes[0], plens):
        sel = sorted((c for c in cases.values() if c["prompt_len"] == pl), key=lambda c: c["batch"])
        for arm in arms:
            xs = [c["batch"] for c in sel if arm in c["arms"]]
            ys = [c["arms"][arm]["tokens_per_s"]["p50"] for c in sel if arm in c["arms"]]
            ax.plot(xs, ys, marker="o", label=arm)
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel("output tokens/s (end-to-end, p50)")
        ax.set_title(f"prompt {pl} tokens, {gen['max_new_tokens']} new tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "throughput_vs_batch.png", dpi=110)
    plt.close(fig)
    written.append("throughput_vs_batch.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm in arms:
        ttft = sorted(v for c in cases.values() if arm in c["arms"] for v in c["arms"][arm]["samples"]["ttft_ms"])
        itl = sorted(v for c in cases.values() if arm in c["arms"] for v in c["arms"][arm]["samples"]["itl_ms"])
        for ax, xs in ((axes[0], ttft), (axes[1], itl)):
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=arm)
    axes[0].set_xlabel("TTFT (ms), all cases")
    axes[1].set_xlabel("inter-token latency (ms), all cases")
    if not any(c["arms"][a]["samples"]["itl_ms"] for c in cases.values() for a in c["arms"]):
        axes[1].text(0.5, 0.5, "no per-token timestamps\n(backend times whole calls)", ha="center",
                     transform=axes[1].transAxes)
    for ax in axes:
        ax.set_ylabel("fraction of samples (CDF)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "latency_cdf.png", dpi=110)
    plt.close(fig)
    written.append("latency_cdf.png")
    return written


def write_report(report_dir: Path, results: dict, *, plots: bool = True) -> None:
    """Write bench.json, bench.md and (optionally) the plots into ``report_dir``."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        results["plots"] = write_plots(report_dir, results)
    write_bench_json(report_dir, results)
    write_markdown(report_dir, results)
