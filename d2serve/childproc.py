"""Child processes that never outlive d2serve, their environment, and the JSON protocol of worker modules.

Every helper process d2serve starts (vLLM workers of the export checks, bench and verify, the ``d2serve serve``
server of ``bench serve``, the ONNX Runtime GenAI model builder) goes through this module:

* :func:`start_tied` starts it in its own process group and, on Linux, with
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills it when its parent dies, even by SIGKILL (which runs no
  Python cleanup). Its output goes to a log file (or pipes, for a long-lived worker).
* :func:`stop_group` stops the whole group: SIGTERM, SIGKILL after a grace period. The child's own group does not
  receive the terminal's SIGINT, so the parent stops it on an exception or Ctrl-C (:func:`run_tied_to_parent`,
  :func:`run_json_worker`, :class:`JsonLinesWorker` do).
* :func:`child_env` builds its environment from ``os.environ`` with explicit options (offline hub, no usage
  statistics, vLLM's CPU KV cache, ``VLLM_PLUGINS``, threads).
* One JSON worker protocol, both ways reporting a failure as ``{"error": <the child's traceback>}``, which the
  parent raises as :class:`WorkerError` naming the worker module:

  - one-shot workers: ``python -m MODULE REQUEST.json RESULT.json`` (:func:`json_worker_main` in the child,
    :func:`run_json_worker` in the parent);
  - long-lived workers: one JSON object per line on stdin/stdout, the first line written ``{"ready": true, ...}``,
    ``{"op": "quit"}`` ends it (:func:`json_lines_worker_main` in the child, :class:`JsonLinesWorker` in the
    parent).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from d2serve.errors import D2ServeError

_PR_SET_PDEATHSIG = 1
KILL_WAIT_S = 10.0  # after SIGKILL: how long to wait for the group's leader to be reaped


class WorkerError(D2ServeError, RuntimeError):
    """A worker process failed: it raised (its traceback is in ``traceback``), exited without an answer, or ran
    past its time limit (``timed_out``). The message names the worker module and says which.

    Attributes:
        worker: the worker's module (or command) name.
        traceback: the child's traceback text (``{"error": ...}`` of the protocol), or None when it gave no answer.
        returncode: the child's exit code (None while it was still running when the error was raised).
        log: the file holding the child's stderr (and stdout for one-shot workers), or None.
        timed_out: the child was stopped after running past ``timeout_s``.
        timeout_s: the time limit, seconds (None: none).
    """

    def __init__(self, worker: str, *, traceback: str | None = None, returncode: int | None = None,
                 log: Path | None = None, timed_out: bool = False, timeout_s: float | None = None):
        self.worker, self.traceback, self.returncode = worker, traceback, returncode
        self.log, self.timed_out, self.timeout_s = log, timed_out, timeout_s
        if timed_out:
            msg = f"worker {worker} did not finish within {timeout_s:.0f} s (its process group was stopped)"
        elif traceback is not None:
            msg = f"worker {worker} failed (exit code {returncode}):\n{traceback}"
        else:
            msg = f"worker {worker} exited without an answer (exit code {returncode})"
        super().__init__(msg + (f"\nlog {log}" if log else ""))

    @property
    def detail(self) -> str:
        """The child's traceback, or ``no result (exit code N)`` when it wrote none."""
        return self.traceback if self.traceback is not None else f"no result (exit code {self.returncode})"

    def log_tail(self, n_lines: int = 40) -> str:
        """The last ``n_lines`` lines of the log, or ``(no log)`` when it cannot be read."""
        return log_tail(self.log, n_lines)


def log_tail(path: Path | None, n_lines: int = 40) -> str:
    """The last ``n_lines`` lines of a text log file (undecodable bytes replaced); ``(no log)`` if unreadable."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n_lines:])
    except (OSError, TypeError):
        return "(no log)"


# --- the environment -------------------------------------------------------------------------------------------

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
NO_USAGE_STATS_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def child_env(*, offline: bool = True, datasets_offline: bool = False, no_usage_stats: bool = True,
              kv_cache_gib: int | str | None = None, tokenizers_parallelism: bool | None = None,
              keep_user_values: bool = True, vllm_plugins: str | None = None, threads: int | None = None,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: ``base`` (default ``os.environ``) plus the variables the options name.

    Args:
        offline: ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` (no hub access).
        datasets_offline: ``HF_DATASETS_OFFLINE=1`` as well.
        no_usage_stats: ``VLLM_NO_USAGE_STATS=1`` and ``DO_NOT_TRACK=1``.
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache of vLLM's CPU backend; ignored on GPUs); None:
            not set.
        tokenizers_parallelism: ``TOKENIZERS_PARALLELISM`` (``true``/``false``); None: not set.
        keep_user_values: the variables above are defaults: a value already in ``base`` is kept (True), or they
            replace it (False: what the child runs with is exactly what the caller records).
        vllm_plugins: ``VLLM_PLUGINS`` (always replaced; ``""`` loads no vLLM plugin at all); None: not set.
        threads: ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` (always replaced); None: not set.
        base: the environment to start from (default: this process's).

    Returns:
        A new dict (``base`` is not modified).
    """
    env = dict(os.environ if base is None else base)
    ours: dict[str, str] = {}
    if offline:
        ours |= OFFLINE_ENV
    if datasets_offline:
        ours["HF_DATASETS_OFFLINE"] = "1"
    if no_usage_stats:
        ours |= NO_USAGE_STATS_ENV
    if kv_cache_gib is not None:
        ours["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    if tokenizers_parallelism is not None:
        ours["TOKENIZERS_PARALLELISM"] = "true" if tokenizers_parallelism else "false"
    for key, value in ours.items():
        if keep_user_values:
            env.setdefault(key, value)
        else:
            env[key] = value
    if vllm_plugins is not None:
        env["VLLM_PLUGINS"] = vllm_plugins
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


# --- starting and stopping -------------------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that arms PR_SET_PDEATHSIG=SIGKILL (Linux), or None elsewhere.

    ``prctl`` is resolved here, in the parent, so the forked child only makes the
    system call (no dlopen, no locks: safe although torch has started threads).
    The death signal fires when the thread that forked the child exits: start
    children from the thread that lives as long as the work (the main thread for the CLI).
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


def start_tied(cmd: Sequence[str], *, log: str | Path | None = None, pipes: bool = False,
               env: Mapping[str, str] | None = None, cwd: str | Path | None = None, stdin=None,
               **popen_kwargs) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, killed with this process (PR_SET_PDEATHSIG on Linux).

    Start it from the thread that lives as long as the child should (the death signal fires when the forking
    thread exits); stop it with :func:`stop_group`.

    Args:
        cmd: the command line.
        log: a file (created or truncated) that receives the child's stdout and stderr (only stderr with
            ``pipes``); None: inherited from this process.
        pipes: stdin and stdout are text pipes (a :class:`JsonLinesWorker`'s protocol channel).
        env: the child's environment (see :func:`child_env`); None: this process's.
        cwd: the child's working directory.
        stdin: the child's stdin when not ``pipes`` (e.g. ``subprocess.DEVNULL``); None: inherited.
        popen_kwargs: further :class:`subprocess.Popen` arguments (stdout/stderr when ``log`` is None).

    Returns:
        The :class:`subprocess.Popen` (its ``pid`` is also the process group id).

    Raises:
        OSError: the command or the log file cannot be opened.
    """
    out = open(log, "wb") if log is not None else None  # noqa: SIM115 -- the child holds its own copy
    try:
        kw: dict = {"env": None if env is None else dict(env), "cwd": cwd, **popen_kwargs}
        if pipes:
            kw |= {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
            if out is not None:
                kw["stderr"] = out
        else:
            kw["stdin"] = stdin
            if out is not None:
                kw |= {"stdout": out, "stderr": subprocess.STDOUT}
        return subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=_die_with_parent(), **kw)
    finally:
        if out is not None:
            out.close()


def _killpg(pid: int, sig: int) -> bool:
    """Signal process group ``pid``; False when it no longer exists (or is not ours)."""
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the process group of ``proc`` (started in its own session, e.g. by :func:`start_tied`).

    SIGTERM to the group, then SIGKILL when the leader has not exited within ``grace_s`` seconds (``grace_s``
    <= 0: SIGKILL at once); once the leader has exited, one SIGKILL sweep of the group ends children that
    outlived it. Returns when the leader is reaped (or after :data:`KILL_WAIT_S` more seconds past SIGKILL).
    A group that is already gone is not an error.
    """
    steps = ((signal.SIGTERM, grace_s), (signal.SIGKILL, KILL_WAIT_S)) if grace_s > 0 else (
        (signal.SIGKILL, KILL_WAIT_S),)
    for sig, wait in steps:
        if not _killpg(proc.pid, sig):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KILL_WAIT_S)  # reap a leader that already exited
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        _killpg(proc.pid, signal.SIGKILL)  # children of the group may outlive the leader briefly
        return


def run_tied_to_parent(cmd: Sequence[str], **popen_kwargs) -> int:
    """Run ``cmd`` to completion in its own process group, killed with this process; returns its exit code.

    Args:
        cmd: the command line.
        popen_kwargs: passed to :class:`subprocess.Popen` (stdout, stderr, env, cwd; not ``start_new_session``
            or ``preexec_fn``).

    Raises:
        Whatever interrupts the wait (KeyboardInterrupt, ...), after SIGKILL to the child's process group.
    """
    proc = start_tied(cmd, **popen_kwargs)
    try:
        return proc.wait()
    except BaseException:
        stop_group(proc, grace_s=0)
        raise


# --- one-shot workers: REQUEST.json -> RESULT.json ---------------------------------------------------------------


def run_json_worker(module: str, request: dict, *, log: str | Path, env: Mapping[str, str] | None = None,
                    timeout_s: float | None = None, grace_s: float = 10.0) -> dict:
    """Run ``python -m MODULE REQUEST.json RESULT.json`` (a :func:`json_worker_main` module) and return its result.

    The child runs in its own process group tied to this process (:func:`start_tied`), its stdout and stderr
    go to ``log``. When it runs past ``timeout_s`` or the wait is interrupted (Ctrl-C, ...), its group is stopped
    (:func:`stop_group` with ``grace_s``) before the error propagates.

    Args:
        module: the worker module (run by this interpreter).
        request: the JSON-serialisable request.
        log: the child's log file (created or truncated; the caller keeps or removes it).
        env: the child's environment (:func:`child_env`); None: this process's.
        timeout_s: wall-clock limit in seconds; None: none.

    Returns:
        The result dict the worker wrote.

    Raises:
        WorkerError: the worker raised (``traceback`` holds the child's traceback), wrote no result
            (``traceback`` None, ``returncode``), or ran past ``timeout_s`` (``timed_out``).
    """
    with tempfile.TemporaryDirectory(prefix="d2serve-worker-") as td:
        req, res = Path(td) / "request.json", Path(td) / "result.json"
        req.write_text(json.dumps(request))
        proc = start_tied([sys.executable, "-m", module, str(req), str(res)], log=log, env=env)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc, grace_s)
            raise WorkerError(module, returncode=proc.returncode, log=Path(log), timed_out=True,
                              timeout_s=timeout_s) from None
        finally:
            if proc.poll() is None:
                stop_group(proc, grace_s)
        result = json.loads(res.read_text()) if res.is_file() else None
    if result is None or "error" in result:
        raise WorkerError(module, traceback=None if result is None else result["error"],
                          returncode=proc.returncode, log=Path(log))
    return result


def json_worker_main(argv: list[str], module: str, run: Callable[[dict], dict]) -> int:
    """The ``main()`` of a worker module run as ``python -m MODULE REQUEST.json RESULT.json``.

    Reads the request (JSON), writes ``run(request)`` to the result file, or ``{"error": traceback}`` when
    ``run`` raises (the parent raises it as :class:`WorkerError`). Returns the exit code: 0 done, 1 ``run``
    failed, 2 wrong arguments.
    """
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


# --- long-lived workers: JSON lines on stdin/stdout -------------------------------------------------------------


def json_lines_worker_main(start: Callable[[], tuple[dict, Callable[[dict], dict]]]) -> int:
    """The ``main()`` of a long-lived worker: one JSON request per line on stdin, one JSON answer per line.

    The protocol channel is a private copy of fd 1; fd 1 itself (inherited by processes the worker's library
    spawns, e.g. vLLM's engine) is pointed at stderr, so no log line can land on it. ``start()`` loads the
    library and returns (facts, handle): ``{"ready": true, **facts}`` is the first line written, then each
    request line is answered with ``handle(request)`` until ``{"op": "quit"}`` or EOF. When ``start`` or
    ``handle`` raises, the traceback is printed to stderr and written as ``{"error": traceback}`` (the parent
    raises :class:`WorkerError`), and the worker exits.

    Returns:
        The exit code: 0 after quit/EOF, 1 after an error.
    """
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        facts, handle = start()
        send({"ready": True, **facts})
        for line in sys.stdin:
            req = json.loads(line)
            if req.get("op") == "quit":
                break
            send(handle(req))
    except Exception:  # report any failure of the worker's library to the parent as JSON, then stop
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        send({"error": tb})
        return 1
    return 0


class JsonLinesWorker:
    """The parent's side of a :func:`json_lines_worker_main` module: started tied to this process, stopped by
    :meth:`close` (quit, or the group stopped when it does not answer).

    Args:
        module: the worker module, run as ``python -m MODULE *args`` by this interpreter.
        args: its command-line arguments.
        log: the file receiving the worker's stderr (created or truncated).
        env: the worker's environment (:func:`child_env`); None: this process's.
        name: how errors name the worker (default: ``module``).
    """

    def __init__(self, module: str, args: Sequence[str] = (), *, log: str | Path,
                 env: Mapping[str, str] | None = None, name: str | None = None):
        self.module, self.name, self.log = module, name or module, Path(log)
        self.proc = start_tied([sys.executable, "-m", module, *args], log=log, pipes=True, env=env)
        self._busy = False  # a request was sent and its answer not read (an interrupted ask)

    def receive(self) -> dict:
        """The next protocol line as a dict (stray lines that are not JSON objects are skipped).

        Raises:
            WorkerError: the worker answered ``{"error": traceback}`` or exited (EOF) without an answer.
        """
        while True:
            line = self.proc.stdout.readline()
            if not line or line.lstrip().startswith("{"):
                break
        if not line:
            raise WorkerError(self.name, returncode=self.proc.poll(), log=self.log)
        msg = json.loads(line)
        if "error" in msg:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=KILL_WAIT_S)  # it exits after reporting
            raise WorkerError(self.name, traceback=msg["error"], returncode=self.proc.poll(), log=self.log)
        return msg

    def ask(self, request: dict) -> dict:
        """Send one request and return its answer (raises :class:`WorkerError` as :meth:`receive`)."""
        self._busy = True
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.receive()
        self._busy = False
        return answer

    def close(self, timeout_s: float = 60.0) -> None:
        """Ask the worker to quit and wait ``timeout_s`` seconds; stop its group (SIGKILL) when it does not exit,
        cannot be asked (broken pipe) or is still busy with an interrupted request."""
        if self.proc.poll() is None and not self._busy:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop_group(self.proc, grace_s=0)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                f.close()
