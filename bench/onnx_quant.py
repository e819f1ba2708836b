"""Every quantization recipe of ``d2serve.export.onnx_quant`` on one merged checkpoint: size, speed, fidelity.

Usage (heavy: run alone, e.g. under ``flock /tmp/d2s-heavy.lock``)::

    python bench/onnx_quant.py --merged MERGED_DIR --out bench/results/onnx_quant [--limit 30] [--threads 2]

Builds the fp32 genai export (the speed baseline) and every recipe in ``RECIPES`` (plus the builder-bug probe
``int4-q8head-default``), gates each against the merged float32 transformers model exactly as
``d2serve export onnx --quant auto`` does, and writes ``results.json`` and ``results.md``. The ``auto`` choice is
recomputed from the table: the fastest measured recipe that passes the gate, and whether it needs >= 2x fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merged", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", default="all")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    from d2serve.export.onnx_quant import RECIPES, Recipe, build_reference, parse_gate, try_recipe

    gate = parse_gate(None)
    t0 = time.perf_counter()
    ref = build_reference(a.merged, limit=a.limit)
    ref_s = time.perf_counter() - t0
    print(f"reference: {ref_s:.0f} s", flush=True)
    extra = [Recipe("fp32", "fp32", (), "fp32 baseline (no quantization)"),
             Recipe("int4-q8head-default", "int4", ("matmul_mixed_precision=last_matmul:int8",),
                    "builder-bug probe: algo 'default' + int8 lm_head + shared embeddings")]
    todo = extra[:1] + [r for r in RECIPES if a.recipes == "all" or r.name in a.recipes.split(",")] + extra[1:]
    work = Path(tempfile.mkdtemp(prefix="d2serve-quant-bench-"))
    rows = []
    try:
        for r in todo:
            t = time.perf_counter()
            try:
                rec = try_recipe(a.merged, work, r, ref, gate, ref.prompt_ids[0])
            except Exception as e:  # noqa: BLE001 - recorded
                rec = {"recipe": r.name, "precision": r.precision, "options": list(r.options), "passed": False,
                       "error": f"{type(e).__name__}: {e}"[:600], "gate_failures": ["export raised"]}
            rec["wall_s"] = time.perf_counter() - t
            rec["uptime"] = os.popen("uptime").read().strip()
            rec.pop("folder", None)
            shutil.rmtree(work / r.name, ignore_errors=True)
            rows.append(rec)
            print(json.dumps({k: rec.get(k) for k in ("recipe", "passed", "error", "gate_failures", "speed")})[:800], flush=True)
            (a.out / "results.json").write_text(json.dumps({"rows": rows, "reference": ref.settings, "reference_s": ref_s,
                                                           "torch_threads": a.threads}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summarize(a.out, rows, ref.settings, ref_s, a.threads, str(a.merged))


def summarize(out: Path, rows: list[dict], ref_settings: dict, ref_s: float, threads: int, merged: str) -> None:
    """Write results.json (rows + the auto choice) and results.md."""
    from d2serve.export.onnx_quant import RECIPES, parse_gate

    gate = parse_gate(None)
    fp32 = next((x for x in rows if x["recipe"] == "fp32" and x.get("speed")), None)
    base = fp32["speed"]["decode_tokens_per_s"] if fp32 else None
    cands = [x for x in rows if x["passed"] and x["recipe"] not in ("fp32",)]
    best = max(cands, key=lambda x: x["speed"]["decode_tokens_per_s"]) if cands else None
    res = {"merged": merged, "gate": gate.to_json(), "reference": ref_settings, "reference_s": ref_s,
           "torch_threads": threads, "fp32_decode_tokens_per_s": base, "rows": rows,
           "fastest_passing": best and best["recipe"],
           "fastest_passing_speedup_vs_fp32": (best["speed"]["decode_tokens_per_s"] / base) if best and base else None,
           "auto_order": [r.name for r in RECIPES],
           "auto_choice": next((r.name for r in RECIPES for x in rows if x["recipe"] == r.name and x["passed"]), None),
           "python": sys.version.split()[0]}
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    head = (f"# ONNX quantization recipes vs the merged float32 model\n\nModel: `{merged}` (SmolLM2-135M-Instruct + a "
            f"trained D2-LoRA, merged to float32). Gate: {json.dumps(gate.to_json())}. Reference: {json.dumps(ref_settings)}. "
            f"ORT-GenAI greedy decode, batch 1, 64 new tokens, median of 3 after a warm-up; torch threads {threads}. "
            f"auto (first passing in RECIPES order): **{res['auto_choice']}**; fastest passing: {res['fastest_passing']} "
            f"at {res['fastest_passing_speedup_vs_fp32'] and round(res['fastest_passing_speedup_vs_fp32'], 2)}x fp32. "
            "Produced by `bench/onnx_quant.py`.\n\n")
    (out / "results.md").write_text(head + table(res))
    print(table(res))


def table(res: dict) -> str:
    """The markdown table of every row."""
    base = res["fp32_decode_tokens_per_s"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    lines = ["| recipe | passed | size MiB | decode tok/s | x fp32 | TTFT ms | mean KL | top-1 | greedy agr. | task acc (merged -> onnx) | gap pp | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in res["rows"]:
        fid, sp = x.get("fidelity") or {}, x.get("speed") or {}
        w, g, t = fid.get("wikitext2") or {}, fid.get("greedy") or {}, fid.get("tasks") or {}
        tps = sp.get("decode_tokens_per_s")
        acc = f"{100 * t['acc_merged']:.1f} -> {100 * t['acc_onnx']:.1f} (n={t['n']})" if t else "-"
        lines.append(
            f"| {x['recipe']} | {'yes' if x['passed'] else ('ERROR' if x.get('error') else 'no')} "
            f"| {f(x.get('size_bytes') and x['size_bytes'] / 2**20, '.1f')} | {f(tps, '.1f')} "
            f"| {f(tps / base if tps and base else None, '.2f')} | {f(sp.get('ttft_ms'), '.0f')} "
            f"| {f(w.get('mean_kl'), '.3g')} | {f(w.get('top1_agreement'), '.4f')} | {f(g.get('agreement'), '.3f')} "
            f"| {acc} | {f(t.get('gap_pp'), '+.2f')} | {f(sp.get('load_average') and sp['load_average'][0], '.2f')} |")
    errs = [f"* {x['recipe']}: {x['error']}" for x in res["rows"] if x.get("error")]
    return "\n".join(lines) + ("\n\nErrors:\n" + "\n".join(errs) if errs else "") + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summarize"]:  # re-summarize a partial results.json (e.g. an interrupted run)
        o = Path(sys.argv[2])
        d = json.loads((o / "results.json").read_text())
        summarize(o, d["rows"], d.get("reference"), d.get("reference_s"), d.get("torch_threads"), sys.argv[3])
    else:
        main()
