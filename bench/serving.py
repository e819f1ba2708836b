"""Serving benchmark: base / merged / unmerged arms on one backend, eval throughput + generation sweep.

A thin vLLM-style script over ``d2serve.bench.bench`` (the same code as ``d2serve bench``):

    python bench/serving.py --base DIR --adapter DIR --merged DIR --out bench/results/serving_hf [--quick]
    python bench/serving.py --backend vllm --base DIR --merged DIR --out bench/results/serving_vllm

Without --base/--adapter/--merged it prepares SmolLM2-135M (from the embedded GGUF), a random
D2-LoRA adapter (r=16, all 7 projections) and its merge in --work, then benchmarks them.
Writes bench.json, bench.md and PNG plots into --out.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    parser.add_argument("--base", type=Path)
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--merged", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/d2serve-serving-bench"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving_hf"))
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm", "onnx"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batches", type=str, default=None, help="e.g. 1,4,8")
    parser.add_argument("--prompt-lens", type=str, default=None, help="e.g. 64,256")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--eval-examples", type=int, default=None)
    parser.add_argument("--eval-data", type=Path, default=None)


def _prepare(work: Path) -> tuple[Path, Path, Path]:
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.base_models import write_smollm2
    from d2serve.merge import merge

    base, adapter, merged = work / "smollm2", work / "d2lora-r16", work / "merged"
    if not (base / "config.json").exists():
        write_smollm2(base, "bfloat16")
    if not (adapter / "adapter_config.json").exists():
        random_adapter(base, adapter, r=16, lora_alpha=32, target_modules=TARGETS, std=0.02, overwrite=True)
    if not (merged / "config.json").exists():
        merge(base=base, adapter=adapter, out=merged, overwrite=True)
    return base, adapter, merged


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; prints the ratio summary."""
    from d2serve.bench import FULL_PLAN, QUICK_PLAN, bench

    base, adapter, merged = args.base, args.adapter, args.merged
    if base is None:
        base, adapter, merged = _prepare(args.work)
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    ints = lambda s: tuple(int(x) for x in s.split(",")) if s else None  # noqa: E731
    over = {"repeats": args.repeats, "batches": ints(args.batches), "prompt_lens": ints(args.prompt_lens),
            "max_new_tokens": args.max_new_tokens, "eval_examples": args.eval_examples}
    plan = replace(plan, **{k: v for k, v in over.items() if v is not None})
    res = bench(base=base, adapter=adapter if args.backend == "hf" else None, merged=merged, report=args.out,
                backend=args.backend, plan=plan, quick=args.quick, threads=args.threads, eval_data=args.eval_data)
    for name, w in res["workloads"].items():
        r = w["ratios"]
        print(f"{name} ({r['metric']}): merged/unmerged {r.get('merged_over_unmerged')}, "
              f"merged/unmerged_cached {r.get('merged_over_unmerged_cached')}, merged/base {r.get('merged_over_base')}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(p)
    sys.exit(main(p.parse_args()))
