"""The online serving report: ``online.json`` (stable keys), ``online.md`` (tables) and three plots.

Plots: ``latency_vs_rate.png`` (TTFT / TPOT / ITL / E2EL p50 and p99 vs offered request rate, SLO lines),
``throughput_vs_concurrency.png`` (output tokens/s and requests/s vs max concurrency, min..max over repeats),
``pareto.png`` (per arm: output tokens/s vs p99 end-to-end latency over every load point, with each arm's
Pareto frontier: down and to the right is better). Files are written atomically (temporary name + rename).
"""

from __future__ import annotations

import json
from pathlib import Path

from .report import _atomic_write

PLOTS = ("latency_vs_rate.png", "throughput_vs_concurrency.png", "pareto.png")
_COLORS = {"base": "tab:blue", "merged": "tab:orange", "unmerged": "tab:green"}
_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}


def _f(x, nd=1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _ratio(r: dict | None, key: str) -> str:
    if not r or r.get(key) is None:
        return "-"
    sp = r.get("spread", {}).get(key, {})
    if sp and len(sp.get("per_repeat", [])) > 1:
        return f"{r[key]:.3f} [{sp['min']:.3f}, {sp['max']:.3f}]"
    return f"{r[key]:.3f}"


def _point_label(p: dict) -> str:
    v = int(p["value"]) if float(p["value"]).is_integer() else p["value"]
    return f"{v} req/s (Poisson)" if p["kind"] == "rate" else f"concurrency {v}"


def render_online_markdown(res: dict) -> str:
    """The human report: setup, fairness, one latency/throughput table per arm and load point, ratios, the
    highest sustainable rate per arm."""
    env, plan = res.get("environment", {}), res["plan"]
    arms = list(res["arms"])
    first = res["arms"][arms[0]] if arms else {}
    lines = ["# d2serve bench serve: online serving, " + " vs ".join(arms), ""]
    if res.get("status") != "complete":
        lines += [f"**Status: {res.get('status')}** (partial results)", ""]
    slo = plan.get("goodput") or {}
    endpoints = res.get("kind") == "online_serving_endpoints"
    lines += [
        f"- load: request rates {plan['request_rates']} req/s (Poisson arrivals), max concurrency "
        f"{plan['concurrencies']} (all requests queued at t=0); {plan['num_prompts']} prompts per point, "
        f"{plan['input_len']} input / {plan['output_len']} output tokens (exact, EOS ignored, greedy), "
        f"{plan['warmups']} warm-up requests per point, {plan['repeats']} repeats ("
        + ("the same running servers" if endpoints else "one server start per arm and repeat")
        + ", arm order rotated)",
        "- SLOs (goodput): " + (", ".join(f"{_NAMES[k]} <= {v:g} ms" for k, v in slo.items()) or "none given")
        + (f"; a rate is sustainable when >= {plan['slo_attainment']:.0%} of requests meet every SLO and none "
           "fails" if slo else ""),
        ("- engine: started elsewhere (see Endpoints)" if endpoints else
         f"- engine (every arm): `{' '.join(first.get('server_args', []))}`, VLLM_CPU_KVCACHE_SPACE="
         f"{first.get('server_env', {}).get('VLLM_CPU_KVCACHE_SPACE')} GiB"),
        f"- load generator: {res.get('load_generator')}",
        f"- CPU: {env.get('cpu_model')} ({env.get('logical_cpus')} logical CPUs); GPU: {env.get('gpu')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
        f"- date: {env.get('date')}, git: {env.get('git_sha')}",
        f"- load average (1/5/15 min) at start {env.get('load_avg_start')}, end {env.get('load_avg_end')} "
        f"(above {env.get('logical_cpus')} means other processes competed for the CPU)",
        "",
    ]
    if res.get("kind") == "online_serving_endpoints":
        fair = res.get("fairness", {})
        lines += ["## Endpoints (already running; not started by d2serve)", "",
                  "| arm | URL | model | max_model_len | vLLM | KV cache (vllm:cache_config_info) |", "|---|---|---|---|---|---|"]
        for a, st in res["arms"].items():
            cc = st.get("cache_config") or {}
            kv = ", ".join(f"{k}={cc[k]}" for k in ("block_size", "cache_dtype", "enable_prefix_caching",
                                                    "gpu_memory_utilization", "num_gpu_blocks") if k in cc) or "-"
            lines.append(f"| {a} | {st.get('url')} | `{st.get('model')}` | {st.get('max_model_len') or '-'} | "
                         f"{st.get('vllm_version') or '-'} | {kv} |")
        lines += ["", "Compared between arms: " + ", ".join(fair.get("compared", [])) + ". Not checked (the "
                  "endpoints do not expose it): " + "; ".join(fair.get("not_checked", [])) + ".", ""]
    if res.get("skipped_arms"):
        lines += [f"Arm `{a}` not run: {why}." for a, why in res["skipped_arms"].items()] + [""]
    comp = res.get("comparability", {})
    if comp.get("comparable", True) and res.get("kind") == "online_serving_endpoints":
        lines += ["Comparability: the endpoints' exposed settings (above) are equal; the same prompts (sha256 `"
                  + str(first.get("prompts_sha256", ""))[:12] + "...`) and generation settings were sent to every "
                  "arm. What the endpoints do not expose is listed above and was not checked.", ""]
    elif comp.get("comparable", True):
        lines += ["Comparability: every arm ran with identical settings (engine options, dtype, KV cache, prompts "
                  "sha256 `" + str(first.get("prompts_sha256", ""))[:12] + "...`, tokenizer, generation settings, "
                  "versions, CPU); only the adapter mode differs.", ""]
    else:
        lines += ["**NOT COMPARABLE**: the arms differ beyond the adapter:", "", "```"] + comp.get("diffs", []) + [
            "```", ""]
    rounds = res.get("rounds", [])
    if rounds:
        lines += ["| repeat | arm | server start s | load avg before | load avg after |", "|---|---|---|---|---|"]
        lines += [f"| {r['repeat'] + 1} | {r['arm']} | {_f(r.get('startup_s'), 0)} | {r.get('load_avg_before')} | "
                  f"{r.get('load_avg_after')} |" for r in rounds]
        lines.append("")

    lines += ["## Latency and throughput per load point", "",
              "Latencies in ms (median over repeats of vLLM's per-run statistic); throughputs median [min..max] "
              "over repeats.", "",
              "| load | arm | TTFT mean/p50/p90/p99 | TPOT mean/p50/p90/p99 | ITL mean/p50/p90/p99 | "
              "E2EL mean/p50/p90/p99 | req/s | output tok/s | total tok/s | goodput req/s | SLO met | failed |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = plan.get("points", [])
    for k in keys:
        for arm in arms:
            p = res["points"].get(arm, {}).get(k)
            if not p or not p.get("summary"):
                continue
            s = p["summary"]
            lat = [("/".join(_f(s["latency_ms"][m].get(st), 1 if m != "tpot" and m != "itl" else 2)
                             for st in ("mean", "median", "p90", "p99"))) for m in ("ttft", "tpot", "itl", "e2el")]
            th = s["throughput"]

            def tp(name, nd=2):
                t = th.get(name)
                return "-" if not t else (f"{t['median']:.{nd}f}" if t["min"] == t["max"] else
                                          f"{t['median']:.{nd}f} [{t['min']:.{nd}f}..{t['max']:.{nd}f}]")

            att = s.get("slo_attainment")
            lines.append(f"| {_point_label(p)} | {arm} | {' | '.join(lat)} | {tp('request_throughput')} | "
                         f"{tp('output_throughput', 1)} | {tp('total_token_throughput', 1)} | "
                         f"{tp('request_goodput')} | {'-' if att is None else f'{att:.0%}'} | {s['failed']} |")
    lines.append("")
    if res.get("ratios"):
        pairs = [("merged_over_base", "merged/base")] + (
            [("merged_over_unmerged", "merged/unmerged")] if "unmerged" in arms else [])
        lines += ["## Ratios per load point", "",
                  "Pair-wise within each repeat (the arms' servers ran back to back in that round), median "
                  "[min, max] over repeats. Throughput ratios > 1 and latency ratios < 1 favour the merged model.",
                  ""]
        cols = (("output_throughput", "output tok/s"), ("request_goodput", "goodput"), ("median_ttft_ms", "p50 TTFT"),
                ("median_tpot_ms", "p50 TPOT"), ("p99_e2el_ms", "p99 E2EL"))
        lines += ["| load | ratio | " + " | ".join(c for _, c in cols) + " |", "|---|---|" + "---|" * len(cols)]
        for k in keys:
            r = res["ratios"].get(k)
            if not r:
                continue
            label = _point_label(next(v[k] for v in res["points"].values() if k in v))
            for key, name in pairs:
                lines.append(f"| {label} | {name} | " + " | ".join(_ratio(r[m], key) for m, _ in cols) + " |")
        lines.append("")
    msr = res.get("max_sustainable_rate", {})
    if msr:
        lines += ["## Highest sustainable request rate under the SLOs", "", "| arm | rate req/s | sustainable rates |",
                  "|---|---|---|"]
        for arm, m in msr.items():
            rate = m.get("rate")
            text = (f"{rate:g}" if rate is not None else
                    (m.get("note") or f"none of {m.get('rates_tried')}"))
            lines.append(f"| {arm} | {text} | {m.get('sustainable_rates', '-')} |")
        lines.append("")
    if res.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in res["plots"]] + [""]
    lines += ["Per-request data (TTFT, ITLs, latencies, token counts, start times) of every arm, load point and "
              "repeat: `raw/<arm>-<load>-r<repeat>.json`, written by vLLM's benchmark itself.", ""]
    return "\n".join(lines)


def _series(res: dict, arm: str, kind: str):
    pts = sorted((p for p in res["points"].get(arm, {}).values() if p["kind"] == kind and p.get("summary")),
                 key=lambda p: p["value"])
    return pts


def write_online_plots(report_dir: Path, res: dict) -> list[str]:
    """Write the three plots (those with data); returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in res["points"] if res["points"][a]]
    if not arms:
        return []
    written = []
    slo = res["plan"].get("goodput") or {}
    if any(_series(res, a, "rate") for a in arms):
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for ax, m in zip(axes.flat, ("ttft", "tpot", "itl", "e2el")):
            for a in arms:
                pts = _series(res, a, "rate")
                xs = [p["value"] for p in pts]
                c = _COLORS.get(a)
                ax.plot(xs, [p["summary"]["latency_ms"][m].get("median") for p in pts], "o-", color=c,
                        label=f"{a} p50")
                ax.plot(xs, [p["summary"]["latency_ms"][m].get("p99") for p in pts], "s--", color=c, alpha=0.7,
                        label=f"{a} p99")
            if m in slo:
                ax.axhline(slo[m], color="red", ls=":", label=f"SLO {slo[m]:g} ms")
            ax.set_xlabel("offered request rate (req/s, Poisson)")
            ax.set_ylabel(f"{_NAMES[m]} (ms)")
            ax.set_title(f"{_NAMES[m]}: p50 (solid) and p99 (dashed)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Latency vs request rate (lower is better)")
        fig.tight_layout()
        fig.savefig(report_dir / PLOTS[0], dpi=100)
        plt.close(fig)
        written.append(PLOTS[0])
    if any(_series(res, a, "concurrency") for a in arms):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, (name, label) in zip(axes, (("output_throughput", "output tokens/s"),
                                            ("request_throughput", "requests/s"))):
            for a in arms:
                pts = _series(res, a, "concurrency")
                t = [p["summary"]["throughput"][name] for p in pts]
                ys = [x["median"] for x in t]
                ax.errorbar([p["value"] for p in pts], ys, yerr=[[y - x["min"] for y, x in zip(ys, t)],
                                                                  [x["max"] - y for y, x in zip(ys, t)]],
                            fmt="o-", capsize=4, color=_COLORS.get(a), label=a)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("max concurrency (requests in flight)")
            ax.set_ylabel(label)
            ax.set_title(f"{label} vs concurrency (bars: min..max over repeats)")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle("Throughput vs concurrency (higher is better)")
        fig.tight_layout()
        fig.savefig(report_dir / PLOTS[1], dpi=100)
        plt.close(fig)
        written.append(PLOTS[1])
    fig, ax = plt.subplots(figsize=(7, 5))
    for a in arms:
        pts = [p for p in res["points"][a].values() if p.get("summary")]
        xy = [(p["summary"]["throughput"]["output_throughput"]["median"],
               p["summary"]["latency_ms"]["e2el"].get("p99"), _point_label(p)) for p in pts]
        c = _COLORS.get(a)
        ax.scatter([x for x, _, _ in xy], [y for _, y, _ in xy], color=c, label=a)
        for x, y, lab in xy:
            ax.annotate(lab, (x, y), fontsize=7, alpha=0.7, xytext=(3, 3), textcoords="offset points")
        front, best = [], float("inf")  # non-dominated: no other point has more throughput and less latency
        for x, y, _ in sorted(xy, key=lambda t: -t[0]):
            if y < best:
                front.append((x, y))
                best = y
        front.sort()
        ax.plot([x for x, _ in front], [y for _, y in front], "-", color=c, alpha=0.6)
    ax.set_xlabel("output tokens/s (server throughput)")
    ax.set_ylabel("p99 end-to-end latency (ms)")
    ax.set_title("Latency / throughput trade-off per arm\n(lines: Pareto frontier; down and right is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(report_dir / PLOTS[2], dpi=100)
    plt.close(fig)
    written.append(PLOTS[2])
    return written


def write_online_report(report_dir: Path, res: dict, *, plots: bool = True) -> None:
    """Write ``online.json``, ``online.md`` and (optionally) the plots into ``report_dir``."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        res["plots"] = write_online_plots(report_dir, res)
    _atomic_write(report_dir / "online.json", (json.dumps(res, indent=2, default=str) + "\n").encode())
    _atomic_write(report_dir / "online.md", render_online_markdown(res).encode())
