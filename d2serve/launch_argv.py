"""The command lines d2serve runs or prints: vLLM's CLI under this interpreter, and d2serve's own.

Kept below every command that needs them (export, serve, bench): a module that
builds a ``vllm serve`` line does not import the server wrapper
(:mod:`d2serve.serve`, whose ``__main__`` is the fallback CLI entry named here).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

VLLM_CLI_MODULE = "vllm.entrypoints.cli.main"


def vllm_metadata_found() -> bool:
    """Whether ``importlib.metadata`` knows a distribution named ``vllm`` (vLLM's CLI asks for its version)."""
    try:
        importlib.metadata.version("vllm")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def vllm_cli_argv(args: Sequence[str]) -> list[str]:
    """The argv of ``vllm <args>`` run by this interpreter, in a form that works in this environment.

    ``[python, -m, vllm.entrypoints.cli.main, *args]`` when the ``vllm``
    distribution metadata exists, else ``[python, -m, d2serve.serve, *args]``
    (the same ``main()``, see the module docstring).
    """
    module = VLLM_CLI_MODULE if vllm_metadata_found() else "d2serve.serve"
    return [sys.executable, "-m", module, *args]


def d2serve_cli_argv() -> list[str]:
    """How to run ``d2serve`` from where it is printed: ``d2serve`` when that name on PATH is this
    environment's script, else the script's full path, else ``python -m d2serve.cli``."""
    script = Path(sys.executable).with_name("d2serve")
    found = shutil.which("d2serve")
    if script.is_file() and found and Path(found).resolve() == script.resolve():
        return ["d2serve"]
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "d2serve.cli"]
