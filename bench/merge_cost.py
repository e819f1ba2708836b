"""Merge cost benchmark: `d2serve merge` time and peak RSS vs a plain safetensors load+save.

Checkpoints: the real SmolLM2-135M (written from the embedded GGUF unless --smollm2 DIR is given)
and a synthetic sharded Llama of several GB (random bf16 weights, many shards; generated here into
--work, never committed). Each checkpoint gets a random D2-LoRA adapter (all 7 projections).
Every measurement runs in a fresh child process that reports its own peak RSS.

    python bench/merge_cost.py --out bench/results/merge_cost [--work /tmp/d2serve-merge-cost]

Writes merge_cost.json, merge_cost.md and merge_cost.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    parser.add_argument("--out", type=Path, default=Path("bench/results/merge_cost"), help="results directory")
    parser.add_argument("--work", type=Path, default=Path("/tmp/d2serve-merge-cost"), help="scratch directory")
    parser.add_argument("--smollm2", type=Path, default=None, help="existing SmolLM2 checkpoint dir")
    parser.add_argument("--skip-synthetic", action="store_true", help="only SmolLM2")
    parser.add_argument("--layers", type=int, default=24, help="synthetic Llama layers (24 -> ~2.7 GB bf16)")
    parser.add_argument("--shards", type=int, default=12, help="synthetic Llama shard count")
    parser.add_argument("--repeats", type=int, default=1, help="runs per kind (the median is reported)")
    parser.add_argument("--full-model", action="store_true", help="also time a transformers full-model load+save")
    parser.add_argument("--keep", action="store_true", help="keep the scratch checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads in every child (recorded)")


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def _measure(name: str, base: Path, adapter: Path, work: Path, kinds, repeats: int, threads: int | None) -> dict:
    from d2serve.bench.merge_cost import run_job, shard_sizes

    sizes = shard_sizes(base)
    row = {"checkpoint": name, "shards": len(sizes), "total_bytes": sum(sizes), "largest_shard_bytes": max(sizes),
           "runs": {}}
    for kind in kinds:
        runs = []
        for _ in range(repeats):
            out = work / f"{name}-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_job(kind, base=base, out=out, adapter=adapter, threads=threads))
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {name} {kind}: {runs[-1]['seconds']:.2f} s, peak RSS {runs[-1]['peak_rss_bytes'] / 2**20:.0f} MiB",
                  flush=True)
        row["runs"][kind] = {
            "seconds": _median([r["seconds"] for r in runs]),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "rss_after_imports_bytes": min(r["rss_after_imports_bytes"] for r in runs),
            "samples": runs,
        }
    m, p = row["runs"]["d2serve_merge"], row["runs"]["plain_load_save"]
    row["merge_over_plain_time"] = m["seconds"] / p["seconds"]
    row["merge_peak_rss_over_largest_shard"] = m["peak_rss_bytes"] / row["largest_shard_bytes"]
    row["merge_peak_rss_over_total"] = m["peak_rss_bytes"] / row["total_bytes"]
    return row


def _markdown(res: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    lines = ["# Merge cost: `d2serve merge` vs plain safetensors load+save", "",
             f"- CPU: {res['environment']['cpu_model']}, {res['environment']['logical_cpus']} logical CPUs; "
             f"date {res['environment']['date']}; git {res['environment']['git_sha']}",
             "- each run is a fresh child process; peak RSS = VmHWM (kernel RSS high-water mark) of that process "
             "(includes ~the Python+torch import baseline shown in the last column)",
             "- plain baseline: `safetensors.torch.load_file` + `save_file` per shard (no merge math)",
             f"- adapter: random D2-LoRA r=16 on {', '.join(res['adapter']['target_modules'])}; "
             f"child threads: {res['child_threads'] or 'default'}", "",
             "| checkpoint | shards | total MiB | largest shard MiB | kind | time s | peak RSS MiB | RSS after imports MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for row in res["checkpoints"]:
        for kind, r in row["runs"].items():
            lines.append(f"| {row['checkpoint']} | {row['shards']} | {mib(row['total_bytes'])} | "
                         f"{mib(row['largest_shard_bytes'])} | {kind} | {r['seconds']:.2f} | {mib(r['peak_rss_bytes'])} | "
                         f"{mib(r['rss_after_imports_bytes'])} |")
    lines += ["", "| checkpoint | merge time / plain load+save time | merge peak RSS / largest shard | "
              "merge peak RSS / checkpoint size |", "|---|---|---|---|"]
    for row in res["checkpoints"]:
        lines.append(f"| {row['checkpoint']} | {row['merge_over_plain_time']:.2f}x | "
                     f"{row['merge_peak_rss_over_largest_shard']:.2f}x | {row['merge_peak_rss_over_total']:.2f}x |")
    lines += ["", "![merge cost](merge_cost.png)", ""]
    return "\n".join(lines)


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = res["checkpoints"]
    xs = [r["total_bytes"] / 2**30 for r in rows]
    for kind, mk in (("d2serve_merge", "o"), ("plain_load_save", "s"), ("full_model_load_save", "^")):
        pts = [(x, r["runs"][kind]["peak_rss_bytes"] / 2**30) for x, r in zip(xs, rows) if kind in r["runs"]]
        if pts:
            ax.plot(*zip(*pts), marker=mk, label=f"{kind} peak RSS")
    ax.plot(xs, [r["largest_shard_bytes"] / 2**30 for r in rows], "k--", label="largest shard")
    ax.plot(xs, xs, ":", color="gray", label="checkpoint size")
    ax.set_xlabel("checkpoint size (GiB)")
    ax.set_ylabel("GiB")
    ax.set_title("merge peak memory vs checkpoint size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and write merge_cost.{json,md,png} into ``args.out``."""
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.bench.environment import environment
    from d2serve.bench.report import _atomic_write
    from d2serve.bench.synthetic_ckpt import write_synthetic_llama

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    kinds = ["d2serve_merge", "plain_load_save"] + (["full_model_load_save"] if args.full_model else [])
    res = {"environment": environment(args.threads), "kinds": kinds, "child_threads": args.threads,
           "adapter": {"method": "d2lora", "r": 16, "lora_alpha": 32, "target_modules": list(TARGETS)},
           "checkpoints": []}
    smol = args.smollm2
    if smol is None:
        from d2serve.base_models import write_smollm2

        smol = work / "smollm2"
        if not (smol / "config.json").exists():
            write_smollm2(smol, "bfloat16")
    plans = [("SmolLM2-135M", smol)]
    if not args.skip_synthetic:
        syn = work / f"synthetic-llama-{args.layers}L-{args.shards}s"
        if not (syn / "config.json").exists():
            print(f"writing synthetic checkpoint {syn} ...", flush=True)
            write_synthetic_llama(syn, layers=args.layers, shards=args.shards)
        plans.append((f"synthetic-Llama-{args.layers}L", syn))
    try:
        for name, base in plans:
            adapter = work / f"{name}-adapter"
            if not (adapter / "adapter_config.json").exists():
                random_adapter(base, adapter, r=16, lora_alpha=32, target_modules=TARGETS, std=0.02, overwrite=True)
            print(f"{name}:", flush=True)
            res["checkpoints"].append(_measure(name, base, adapter, work, kinds, args.repeats, args.threads))
            _atomic_write(args.out / "merge_cost.json", (json.dumps(res, indent=2) + "\n").encode())
    finally:
        if res["checkpoints"]:
            _atomic_write(args.out / "merge_cost.json", (json.dumps(res, indent=2) + "\n").encode())
            _plot(res, args.out / "merge_cost.png")
            _atomic_write(args.out / "merge_cost.md", _markdown(res).encode())
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(p)
    sys.exit(main(p.parse_args()))
