"""Merge cost: time and peak RSS of ``d2serve merge`` vs a plain safetensors load+save of the same checkpoint,
PEFT's load -> merge_and_unload -> save_pretrained, and a transformers full-model load+save.

Each measurement runs in a fresh child process (``python -m d2serve.bench.merge_cost JOB.json``) that
reports its own wall time and peak RSS (VmHWM, the kernel's RSS high-water mark), so runs never share memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from d2serve.childproc import child_env
from d2serve.sysinfo import peak_rss_bytes

KINDS = ("d2serve_merge", "plain_load_save", "peft_merge", "full_model_load_save")


def _child(job: dict) -> dict:
    """Run one job in this process; returns its timings (s) and RSS (bytes)."""
    import torch  # imported before the baseline RSS so every kind pays the same import cost

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))

    base, out = Path(job["base"]), Path(job["out"])
    extra: dict = {}
    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    if job["kind"] == "d2serve_merge":
        from d2serve.merge import merge

        m = merge(base=base, adapter=job["adapter"], out=out, overwrite=True, threads=job.get("threads"),
                  kernel=job.get("kernel")).manifest
        extra = {"merge_kernel": m["merge_kernel"], "threads": m["threads"],
                 "sha256_sources": sorted({v for d in m["sha256_sources"].values() for v in d.values()})}
    elif job["kind"] == "plain_load_save":
        from safetensors.torch import load_file, save_file

        out.mkdir(parents=True, exist_ok=True)
        for shard in sorted(base.glob("*.safetensors")):
            save_file(load_file(str(shard)), str(out / shard.name), metadata={"format": "pt"})
    elif job["kind"] == "full_model_load_save":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto", local_files_only=True)
        model.save_pretrained(str(out))
    elif job["kind"] == "peft_merge":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto", local_files_only=True)
        model = PeftModel.from_pretrained(model, job["adapter"]).merge_and_unload()
        model.save_pretrained(str(out))
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}; expected one of {KINDS}")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_bytes": peak_rss_bytes(), "rss_after_imports_bytes": rss_before,
            "torch_threads": torch.get_num_threads(), **extra}


def run_job(
    kind: str, *, base: Path, out: Path, adapter: Path | None = None, threads: int | None = None, timeout: float = 7200,
    env: dict[str, str] | None = None,
) -> dict:
    """Run one measurement in a child process.

    Args:
        threads: torch threads (``torch.set_num_threads``) and OMP_NUM_THREADS for the child (None: the default).
        env: extra environment variables of the child (e.g. ``D2SERVE_CACHE_DIR``).

    Returns:
        ``{"kind", "seconds", "peak_rss_bytes", "rss_after_imports_bytes", "wall_s"}``.

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    job = {"kind": kind, "base": str(base), "out": str(out), "adapter": adapter and str(adapter), "threads": threads}
    env = child_env(base=os.environ | {"TRANSFORMERS_VERBOSITY": "error"} | (env or {}), no_usage_stats=False,
                    keep_user_values=False, threads=threads or None)
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "d2serve.bench.merge_cost", json.dumps(job)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{kind} on {base} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"kind": kind, **res, "wall_s": wall}


def shard_sizes(ckpt: Path) -> list[int]:
    """Byte sizes of the ``*.safetensors`` files of a checkpoint directory."""
    return sorted(p.stat().st_size for p in Path(ckpt).glob("*.safetensors"))


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
