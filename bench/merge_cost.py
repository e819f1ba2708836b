"""Merge cost benchmark: `d2serve merge` time and peak RSS against the I/O floor and PEFT, in one run.

Rows per checkpoint (each a fresh child process reporting its own wall time and peak RSS = VmHWM):

- ``plain_load_save``: ``safetensors.torch.load_file`` + ``save_file`` of every shard (the I/O floor);
- ``d2serve_merge_d2lora``: ``d2serve.merge`` of a random D2-LoRA r=16 adapter on all 7 projections;
- ``d2serve_merge_d2lora_cold``: the same with an empty d2serve cache (``D2SERVE_CACHE_DIR`` a fresh
  directory): the architecture is built with transformers (~4-5 s here), every file is hashed and the fused
  kernel is compiled (the merge runs the torch path until it is), as on the first merge of a config on a
  machine; the other d2serve rows use a cache warmed once before the measurements (architecture, compiled
  kernel, sha256 of the base shards and adapters);
- ``d2serve_merge_lora``: ``d2serve.merge`` of a random PEFT LoRA r=16 adapter on q/v/down;
- ``peft_merge``: PEFT ``PeftModel.from_pretrained`` -> ``merge_and_unload`` -> ``save_pretrained``, same LoRA;
- ``full_model_load_save``: transformers ``from_pretrained`` + ``save_pretrained``.

Checkpoints: synthetic sharded Llamas (random weights, generated into --work and deleted afterwards),
given as ``DTYPE:LAYERS`` (float32:7 ~1.8 GB, float32:18 ~3.7 GB, bfloat16:17 ~1.8 GB,
bfloat16:40 ~3.7 GB), plus ``smollm2`` (the embedded SmolLM2-135M, bf16). Every repeat runs every
row back to back, the row order rotating from repeat to repeat; ratios to the floor are taken per
repeat (same conditions) and reported as median [min, max].

    flock /tmp/d2s-heavy.lock python bench/merge_cost.py --out bench/results/merge_cost --threads 2 --repeats 3

Writes merge_cost.json, merge_cost.md and merge_cost.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

D2_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS = ("q_proj", "v_proj", "down_proj")
ROWS = ("plain_load_save", "d2serve_merge_d2lora", "d2serve_merge_d2lora_cold", "d2serve_merge_lora", "peft_merge",
        "full_model_load_save")
DEFAULT_CHECKPOINTS = "float32:7,float32:18,bfloat16:17,bfloat16:40"


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    parser.add_argument("--out", type=Path, default=Path("bench/results/merge_cost"), help="results directory")
    parser.add_argument("--work", type=Path, default=Path("/tmp/d2serve-merge-cost"), help="scratch directory")
    parser.add_argument("--checkpoints", default=DEFAULT_CHECKPOINTS,
                        help="comma list of DTYPE:LAYERS synthetic Llamas and/or 'smollm2'")
    parser.add_argument("--shard-mib", type=int, default=250, help="target synthetic shard size (MiB)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of rows out of {','.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (min/median/max reported)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="discarded rounds of every row per checkpoint before the timed repeats (page cache warm, "
                             "the just-written checkpoint flushed)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch checkpoints")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads in every child (recorded)")


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    n = len(xs)
    med = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
    return {"min": xs[0], "median": med, "max": xs[-1], "n": n}


def _load() -> list[float]:
    return list(os.getloadavg())


def _prepare(spec: str, work: Path, shard_mib: int) -> tuple[str, Path]:
    from d2serve.bench.synthetic_ckpt import write_synthetic_llama

    if spec == "smollm2":
        from d2serve.base_models import write_smollm2

        path = work / "smollm2"
        if not (path / "config.json").exists():
            write_smollm2(path, "bfloat16")
        return "SmolLM2-135M bf16", path
    dtype, layers = spec.split(":")
    layers = int(layers)
    params = 2 * 32000 * 2048 + layers * (2 * 2048 * 2048 + 2 * 512 * 2048 + 3 * 5632 * 2048)
    nbytes = params * (4 if dtype == "float32" else 2)
    shards = max(1, min(layers + 1, round(nbytes / (shard_mib * 2**20))))
    path = work / f"llama-{dtype}-{layers}L"
    if not (path / "config.json").exists():
        print(f"writing synthetic checkpoint {path} ({nbytes / 2**30:.2f} GiB, {shards} shards) ...", flush=True)
        write_synthetic_llama(path, layers=layers, shards=shards, dtype=dtype)
    return f"Llama {layers}L {dtype}", path


def _warm_cache(base: Path, adapters: list[Path], cache: Path) -> None:
    """Warm the d2serve cache ``cache`` once, in a child (as the rows run): the architecture of ``base``, the
    compiled fused kernel and the sha256 of the base shards and adapter files."""
    import subprocess

    code = ("import sys; from pathlib import Path; from d2serve.architecture import architecture_at; "
            "from d2serve import merge_fused; from d2serve.digests import CachedHasher; "
            "architecture_at(sys.argv[1]); k, why = merge_fused.load(); assert k is not None, why; "
            "files = sorted(Path(sys.argv[1]).glob('*.safetensors')) + "
            "[p for a in sys.argv[2:] for p in sorted(Path(a).iterdir()) if p.is_file()]; "
            "CachedHasher(files).result()")
    subprocess.run([sys.executable, "-c", code, str(base), *map(str, adapters)], check=True,
                   env=os.environ | {"D2SERVE_CACHE_DIR": str(cache)})


def _measure(name: str, base: Path, adapters: dict, work: Path, rows: list[str], repeats: int, threads: int,
             warmup: int = 1) -> dict:
    from d2serve.bench.merge_cost import run_job, shard_sizes

    sizes = shard_sizes(base)
    res = {"checkpoint": name, "path": str(base), "shards": len(sizes), "total_bytes": sum(sizes),
           "largest_shard_bytes": max(sizes), "runs": {r: [] for r in rows}, "load_avg": []}
    job = {"plain_load_save": ("plain_load_save", None), "d2serve_merge_d2lora": ("d2serve_merge", adapters["d2"]),
           "d2serve_merge_d2lora_cold": ("d2serve_merge", adapters["d2"]),
           "d2serve_merge_lora": ("d2serve_merge", adapters["lora"]), "peft_merge": ("peft_merge", adapters["lora"]),
           "full_model_load_save": ("full_model_load_save", None)}
    cache = work / "d2serve-cache"  # warm: architecture, kernel and digests made once, before the measurements
    shutil.rmtree(cache, ignore_errors=True)
    _warm_cache(base, [adapters["d2"], adapters["lora"]], cache)
    os.sync()  # the just-written checkpoint's dirty pages are flushed before anything is timed
    res["warmup_rounds"] = warmup
    for rep in range(-warmup, repeats):  # rep < 0: a discarded warm-up round of every row
        order = rows[rep % len(rows):] + rows[:rep % len(rows)]  # rotate so drifts hit every row
        before = _load()
        for row in order:
            kind, adapter = job[row]
            out = work / f"out-{row}"
            shutil.rmtree(out, ignore_errors=True)
            cold = work / f"d2serve-cache-cold-{rep}"  # empty: the first merge of this config on a machine
            shutil.rmtree(cold, ignore_errors=True)
            r = run_job(kind, base=base, out=out, adapter=adapter, threads=threads,
                        env={"D2SERVE_CACHE_DIR": str(cold if row.endswith("_cold") else cache)})
            shutil.rmtree(cold, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            label = f"warm-up {rep + warmup + 1}/{warmup}" if rep < 0 else f"{rep + 1}/{repeats}"
            print(f"  {name} [{label}] {row}: {r['seconds']:.2f} s, peak RSS "
                  f"{r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
            if rep >= 0:
                res["runs"][row].append(r)
        if rep >= 0:
            res["load_avg"].append({"repeat": rep, "before": before, "after": _load()})
    res["summary"] = {}
    floor = res["runs"].get("plain_load_save")
    for row, runs in res["runs"].items():
        s = {"seconds": _stats([r["seconds"] for r in runs]),
             "peak_rss_mib": _stats([r["peak_rss_bytes"] / 2**20 for r in runs]),
             "rss_after_imports_mib": _stats([r["rss_after_imports_bytes"] / 2**20 for r in runs])}
        if floor:
            s["over_floor"] = _stats([r["seconds"] / f["seconds"] for r, f in zip(runs, floor)])
        res["summary"][row] = s
    if "peft_merge" in res["runs"] and "d2serve_merge_lora" in res["runs"]:
        res["summary"]["peft_over_d2serve_lora"] = _stats(
            [p["seconds"] / d["seconds"] for p, d in zip(res["runs"]["peft_merge"], res["runs"]["d2serve_merge_lora"])])
    return res


def _markdown(res: dict) -> str:
    env = res["environment"]
    lines = ["# Merge cost: `d2serve merge` vs the I/O floor, PEFT and a transformers load+save", "",
             f"- CPU: {env['cpu_model']}, {env['logical_cpus']} logical CPUs; torch threads in every child: "
             f"{res['child_threads']}; date {env['date']}; git {env['git_sha']}",
             f"- load average (1/5/15 min) at start {', '.join(f'{x:.2f}' for x in res['load_start'])}, "
             f"at end {', '.join(f'{x:.2f}' for x in res['load_end'])}; per repeat in merge_cost.json",
             "- each run is a fresh child process; peak RSS = VmHWM of that process (includes the ~340 MiB "
             "Python+torch import baseline)",
             "- d2serve rows use a d2serve cache warmed once per checkpoint (architecture facts of the config, the "
             "compiled fused kernel, the sha256 of the base shards and adapters); `d2serve_merge_d2lora_cold` starts "
             "from an empty cache (transformers builds the architecture, every file is hashed, the kernel compiles "
             "while the merge runs the torch path)",
             f"- {res['repeats']} repeats after {res.get('warmup', 0)} discarded warm-up round(s) of every row, rows run back "
             "to back in a rotating order; `x floor` = time / plain "
             "load+save time of the same repeat, median [min, max]",
             "- plain load+save: `safetensors.torch.load_file` + `save_file` per shard (the I/O floor); d2serve "
             "merges are the default exact mode (float64 math, one cast, every manifest statistic)",
             f"- adapters: random D2-LoRA r=16 on {', '.join(D2_TARGETS)}; random PEFT LoRA r=16 on "
             f"{', '.join(LORA_TARGETS)} (the same adapter for d2serve and PEFT)", "",
             "| checkpoint | GiB | shards | row | time s median [min, max] | x floor | peak RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    for c in res["checkpoints"]:
        for row, s in c["summary"].items():
            if row == "peft_over_d2serve_lora":
                continue
            t = s["seconds"]
            x = s.get("over_floor")
            lines.append(f"| {c['checkpoint']} | {c['total_bytes'] / 2**30:.2f} | {c['shards']} | {row} | "
                         f"{t['median']:.2f} [{t['min']:.2f}, {t['max']:.2f}] | "
                         + (f"{x['median']:.2f}x [{x['min']:.2f}, {x['max']:.2f}]" if x else "-")
                         + f" | {s['peak_rss_mib']['max']:,.0f} |")
    lines += ["", "| checkpoint | PEFT merge time / d2serve LoRA merge time, median [min, max] |", "|---|---|"]
    for c in res["checkpoints"]:
        p = c["summary"].get("peft_over_d2serve_lora")
        if p:
            lines.append(f"| {c['checkpoint']} | {p['median']:.2f}x [{p['min']:.2f}, {p['max']:.2f}] |")
    lines += ["", "![merge cost](merge_cost.png)", ""]
    return "\n".join(lines)


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [c["checkpoint"] for c in res["checkpoints"]]
    rows = [r for r in ROWS if any(r in c["summary"] for c in res["checkpoints"])]
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(names))]
        t = [c["summary"].get(row, {}).get("seconds", {}).get("median", 0) for c in res["checkpoints"]]
        m = [c["summary"].get(row, {}).get("peak_rss_mib", {}).get("max", 0) / 1024 for c in res["checkpoints"]]
        ax1.bar(xs, t, width, label=row)
        ax2.bar(xs, m, width, label=row)
    for ax, ylabel in ((ax1, "time (s, median)"), (ax2, "peak RSS (GiB)")):
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(names))], names, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
    ax1.legend(fontsize=7)
    fig.suptitle(f"merge cost ({res['child_threads']} torch threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and write merge_cost.{json,md,png} into ``args.out``."""
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.bench.environment import environment
    from d2serve.bench.report import _atomic_write

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; expected some of {list(ROWS)}")
    res = {"environment": environment(args.threads), "rows": rows, "child_threads": args.threads,
           "repeats": args.repeats, "warmup": args.warmup, "load_start": _load(),
           "adapters": {"d2lora": {"r": 16, "lora_alpha": 32, "target_modules": list(D2_TARGETS)},
                        "lora": {"r": 16, "lora_alpha": 32, "target_modules": list(LORA_TARGETS)}},
           "checkpoints": []}

    def save():
        res["load_end"] = _load()
        _atomic_write(args.out / "merge_cost.json", (json.dumps(res, indent=2) + "\n").encode())
        _plot(res, args.out / "merge_cost.png")
        _atomic_write(args.out / "merge_cost.md", _markdown(res).encode())

    try:
        for spec in args.checkpoints.split(","):
            name, base = _prepare(spec, work, args.shard_mib)
            adapters = {"d2": work / f"{base.name}-d2lora", "lora": work / f"{base.name}-lora"}
            random_adapter(base, adapters["d2"], method="d2lora", r=16, lora_alpha=32, target_modules=D2_TARGETS,
                           std=0.02, overwrite=True)
            random_adapter(base, adapters["lora"], method="lora", r=16, lora_alpha=32, target_modules=LORA_TARGETS,
                           std=0.02, overwrite=True)
            print(f"{name}:", flush=True)
            res["checkpoints"].append(_measure(name, base, adapters, work, rows, args.repeats, args.threads,
                                                    args.warmup))
            save()
            if not args.keep:  # free the disk before the next checkpoint
                for p in (base, *adapters.values()):
                    shutil.rmtree(p, ignore_errors=True)
    finally:
        if res["checkpoints"]:
            save()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(p)
    sys.exit(main(p.parse_args()))
