"""Child processes that never outlive d2serve.

A helper process (the ONNX Runtime GenAI model builder, ...) is started in its
own process group and, on Linux, with ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the
kernel kills it when its parent dies, even by SIGKILL (which runs no Python
cleanup). On an exception or Ctrl-C in the parent (the child's own group does
not receive the terminal's SIGINT) the whole group is killed before the
exception propagates.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that arms PR_SET_PDEATHSIG=SIGKILL (Linux), or None elsewhere.

    ``prctl`` is resolved here, in the parent, so the forked child only makes the
    system call (no dlopen, no locks: safe although torch has started threads).
    The death signal fires when the thread that forked the child exits: call
    :func:`run_tied_to_parent` from the thread that lives as long as the work
    (the main thread for the CLI).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def run_tied_to_parent(cmd: Sequence[str], **popen_kwargs) -> int:
    """Run ``cmd`` to completion in its own process group, killed with this process; returns its exit code.

    Args:
        cmd: the command line.
        popen_kwargs: passed to :class:`subprocess.Popen` (stdout, stderr, env, cwd; not ``start_new_session``
            or ``preexec_fn``).

    Raises:
        Whatever interrupts the wait (KeyboardInterrupt, ...), after SIGKILL to the child's process group.
    """
    proc = subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=_die_with_parent(), **popen_kwargs)
    try:
        return proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def json_worker_main(argv: list[str], module: str, run: Callable[[dict], dict]) -> int:
    """The ``main()`` of a worker module run as ``python -m MODULE REQUEST.json RESULT.json``.

    Reads the request (JSON), writes ``run(request)`` to the result file, or ``{"error": traceback}`` when
    ``run`` raises (the parent re-raises it with the child's traceback). Returns the exit code: 0 done, 1 ``run``
    failed, 2 wrong arguments.
    """
    import json
    import traceback
    from pathlib import Path

    if len(argv) != 2:
        print(f"usage: python -m {module} REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    req_path, res_path = Path(argv[0]), Path(argv[1])
    try:
        result, code = run(json.loads(req_path.read_text())), 0
    except Exception:  # report any failure of the worker's library (vLLM) to the parent as JSON
        result, code = {"error": traceback.format_exc()}, 1
    res_path.write_text(json.dumps(result))
    return code
