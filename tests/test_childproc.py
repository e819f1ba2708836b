"""Helper processes never outlive d2serve: SIGKILL of the parent, or an exception while waiting, kills them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2serve.childproc import run_tied_to_parent

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux-only")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(d.name))
    return out


@linux_only
@pytest.mark.parametrize("tied", [True, False])
def test_child_dies_with_a_sigkilled_parent(tmp_path, tied):
    """The tied child is gone after its parent's SIGKILL; a plain subprocess (the control) survives it."""
    ready = tmp_path / "ready"
    runner = "run_tied_to_parent" if tied else "subprocess.call"
    child_code = f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    code = (
        "import subprocess, sys\nfrom d2serve.childproc import run_tied_to_parent\n"
        f"{runner}([sys.executable, '-c', {child_code!r}])\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    child = None
    try:
        t0 = time.monotonic()
        while not ready.exists():
            assert parent.poll() is None and time.monotonic() - t0 < 60
            time.sleep(0.02)
        (child,) = _children(parent.pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        t1 = time.monotonic()
        while _alive(child) and time.monotonic() - t1 < 5:
            time.sleep(0.05)
        assert _alive(child) is (not tied)
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


@linux_only
def test_interrupted_wait_kills_the_childs_process_group(monkeypatch, tmp_path):
    """Ctrl-C does not reach the child's own process group, so the parent must kill it: child and grandchild."""
    pids = tmp_path / "pids"
    code = ("import os, subprocess, sys, time\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}')\n"
            "time.sleep(60)\n")
    real_wait = subprocess.Popen.wait
    calls = []

    def wait(self, timeout=None):
        if not calls:
            calls.append(1)
            t0 = time.monotonic()
            while not (pids.exists() and len(pids.read_text().split()) == 2):
                assert time.monotonic() - t0 < 60
                time.sleep(0.02)
            raise KeyboardInterrupt
        return real_wait(self, timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", wait)
    with pytest.raises(KeyboardInterrupt):
        run_tied_to_parent([sys.executable, "-c", code])
    child, grandchild = map(int, pids.read_text().split())
    t0 = time.monotonic()
    while (_alive(child) or _alive(grandchild)) and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert not _alive(child) and not _alive(grandchild)


def test_json_worker_main_writes_the_result_or_the_error_with_its_traceback(tmp_path, capsys):
    import json

    from d2serve.childproc import json_worker_main

    req, res = tmp_path / "req.json", tmp_path / "res.json"
    req.write_text(json.dumps({"x": 2}))
    assert json_worker_main([str(req), str(res)], "m", lambda r: {"y": r["x"] * 3}) == 0
    assert json.loads(res.read_text()) == {"y": 6}

    def boom(r):
        raise KeyError("nope")

    assert json_worker_main([str(req), str(res)], "m", boom) == 1
    err = json.loads(res.read_text())["error"]
    assert "KeyError: 'nope'" in err and "in boom" in err
    assert json_worker_main([str(req)], "some.module", boom) == 2
    assert "usage: python -m some.module REQUEST.json RESULT.json" in capsys.readouterr().err


def test_sigterm_stops_a_cli_command_like_ctrl_c_and_leaves_no_partial_output(tmp_path):
    """The CLI's SIGTERM handler raises KeyboardInterrupt in the main thread, so the atomic output directory's
    cleanup runs (a terminated merge leaves neither the output nor its temporary folder)."""
    import signal as sig
    import subprocess
    import sys

    out = tmp_path / "out"
    code = (
        "import signal, sys, time\n"
        "from d2serve import cli\n"
        "from d2serve.outdir import atomic_output_dir\n"
        "signal.signal(signal.SIGTERM, cli._terminated)  # what cli.main() installs\n"
        f"with atomic_output_dir(__import__('pathlib').Path({str(out)!r}), False) as tmp:\n"
        "    (tmp / 'part.safetensors').write_bytes(b'x' * 1000)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    assert [x for x in tmp_path.iterdir()]  # the temporary folder exists while the work runs
    p.send_signal(sig.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "KeyboardInterrupt: terminated by signal 15" in err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder


def test_cli_main_installs_the_sigterm_handler(monkeypatch):
    import signal as sig

    from d2serve import cli

    monkeypatch.setattr(cli, "app", lambda: None)
    before = sig.getsignal(sig.SIGTERM)
    try:
        cli.main()
        assert sig.getsignal(sig.SIGTERM) is cli._terminated
    finally:
        sig.signal(sig.SIGTERM, before)


# --- the seams of d2serve.childproc: environment, group stop, worker protocols -----------------------------------


def test_child_env_sets_defaults_keeps_user_values_and_replaces_on_request():
    from d2serve.childproc import child_env

    base = {"PATH": "/bin", "HF_HUB_OFFLINE": "0", "VLLM_CPU_KVCACHE_SPACE": "8", "VLLM_PLUGINS": "other"}
    keep = child_env(kv_cache_gib=2, base=base)
    assert keep == {"PATH": "/bin", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                    "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "8", "VLLM_PLUGINS": "other"}
    forced = child_env(kv_cache_gib=2, keep_user_values=False, vllm_plugins="", tokenizers_parallelism=False,
                       threads=3, datasets_offline=True, base=base)
    assert forced == {"PATH": "/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                      "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
                      "VLLM_PLUGINS": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "3",
                      "MKL_NUM_THREADS": "3"}
    assert child_env(offline=False, no_usage_stats=False, base={"A": "1"}) == {"A": "1"}
    assert base["HF_HUB_OFFLINE"] == "0" and "TRANSFORMERS_OFFLINE" not in base  # the base is not modified


def test_the_server_and_worker_environments(monkeypatch):
    """``d2serve serve`` keeps the user's KV cache size (default 2 GiB); bench serve replaces it with the one it
    records, and the export/verify workers default to 1 GiB."""
    from d2serve.childproc import child_env
    from d2serve.serve import server_env

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "0")
    env = server_env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1" and env["DO_NOT_TRACK"] == "0"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "5")
    assert server_env()["VLLM_CPU_KVCACHE_SPACE"] == "5"
    assert child_env(kv_cache_gib=3, keep_user_values=False)["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert child_env(kv_cache_gib=1)["VLLM_CPU_KVCACHE_SPACE"] == "5"


def _wait_for(path: Path, n: int, timeout_s: float = 60.0) -> list[int]:
    t0 = time.monotonic()
    while not (path.exists() and len(path.read_text().split()) == n):
        assert time.monotonic() - t0 < timeout_s, f"{path} not written"
        time.sleep(0.02)
    return [int(x) for x in path.read_text().split()]


@linux_only
def test_stop_group_sigkills_a_group_that_ignores_sigterm_after_the_grace_period(tmp_path):
    from d2serve.childproc import start_tied, stop_group

    pids = tmp_path / "pids"
    code = ("import os, signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "g = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
            "print('to the log', flush=True); print('err too', file=sys.stderr, flush=True)\n"
            f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}')\n"
            "time.sleep(60)\n")
    log = tmp_path / "child.log"
    proc = start_tied([sys.executable, "-c", code], log=log)
    child, grandchild = _wait_for(pids, 2)
    assert child == proc.pid and os.getpgid(grandchild) == proc.pid  # its own process group, grandchild included
    time.sleep(0.3)  # the handler is installed before the pids are written; let it settle
    t0 = time.monotonic()
    stop_group(proc, grace_s=1.0)
    took = time.monotonic() - t0
    assert proc.returncode == -signal.SIGKILL  # SIGTERM was ignored: killed after the grace period
    assert 1.0 <= took < 8.0
    t1 = time.monotonic()
    while _alive(grandchild) and time.monotonic() - t1 < 5:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert log.read_text().splitlines() == ["to the log", "err too"]


@linux_only
def test_stop_group_sigterm_suffices_for_a_child_that_honours_it(tmp_path):
    from d2serve.childproc import start_tied, stop_group

    ready = tmp_path / "ready"
    proc = start_tied([sys.executable, "-c", f"import pathlib, time; pathlib.Path({str(ready)!r}).write_text('1 1');"
                                             " time.sleep(60)"])
    _wait_for(ready, 2)
    t0 = time.monotonic()
    stop_group(proc, grace_s=30.0)
    assert proc.returncode == -signal.SIGTERM and time.monotonic() - t0 < 10
    stop_group(proc)  # a group that is gone already: no error


_ONE_SHOT = '''
import os, sys, time
from d2serve.childproc import json_worker_main

def run(req):
    if req["do"] == "boom":
        raise ValueError(f"bad request {req['x']}")
    if req["do"] == "die":
        os._exit(3)
    if req["do"] == "sleep":
        time.sleep(60)
    print("worker log line", flush=True)
    return {"y": req["x"] * 3}

sys.exit(json_worker_main(sys.argv[1:], "fake_worker", run))
'''


def _worker_env(tmp_path, name, source):
    from d2serve.childproc import child_env

    (tmp_path / f"{name}.py").write_text(source)
    return child_env(base=os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})


def test_run_json_worker_returns_the_result_or_raises_the_childs_traceback(tmp_path):
    from d2serve.childproc import WorkerError, run_json_worker

    env, log = _worker_env(tmp_path, "fake_worker", _ONE_SHOT), tmp_path / "w.log"
    assert run_json_worker("fake_worker", {"do": "ok", "x": 7}, log=log, env=env) == {"y": 21}
    assert log.read_text() == "worker log line\n"
    with pytest.raises(WorkerError, match=r"(?s)^worker fake_worker failed \(exit code 1\):\nTraceback.*"
                                          r"ValueError: bad request 7\n\nlog .*w\.log$") as e:
        run_json_worker("fake_worker", {"do": "boom", "x": 7}, log=log, env=env)
    assert e.value.worker == "fake_worker" and e.value.returncode == 1 and not e.value.timed_out
    assert "in run" in e.value.traceback and e.value.detail == e.value.traceback
    with pytest.raises(WorkerError, match=r"^worker fake_worker exited without an answer \(exit code 3\)") as e:
        run_json_worker("fake_worker", {"do": "die", "x": 0}, log=log, env=env)
    assert e.value.traceback is None and e.value.detail == "no result (exit code 3)"
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"^worker fake_worker did not finish within 2 s") as e:
        run_json_worker("fake_worker", {"do": "sleep", "x": 0}, log=log, env=env, timeout_s=2, grace_s=1)
    assert e.value.timed_out and e.value.returncode == -signal.SIGTERM and time.monotonic() - t0 < 15


_LINES = '''
import os, sys
from d2serve.childproc import json_lines_worker_main

def start():
    if os.environ.get("FAIL_AT_START"):
        raise RuntimeError("no engine here")
    print("library chatter on fd 1")  # must not reach the protocol channel
    os.system("echo chatter of a spawned process")

    def handle(req):
        if req["op"] == "boom":
            raise KeyError(req["x"])
        print("more chatter")
        return {"double": 2 * req["x"]}

    return {"pid": os.getpid()}, handle

sys.exit(json_lines_worker_main(start))
'''


def test_json_lines_worker_answers_and_reraises_the_childs_traceback_naming_the_worker(tmp_path):
    from d2serve.childproc import JsonLinesWorker, WorkerError

    env = _worker_env(tmp_path, "fake_lines", _LINES)
    w = JsonLinesWorker("fake_lines", log=tmp_path / "w.log", env=env, name="fake_lines (arm 'x')")
    assert w.receive() == {"ready": True, "pid": w.proc.pid}
    assert w.ask({"op": "double", "x": 21}) == {"double": 42}
    assert w.ask({"op": "double", "x": -1}) == {"double": -2}
    w.close()
    assert w.proc.returncode == 0
    log = (tmp_path / "w.log").read_text()
    assert "library chatter on fd 1" in log and "chatter of a spawned process" in log and "more chatter" in log

    w = JsonLinesWorker("fake_lines", log=tmp_path / "w2.log", env=env)
    w.receive()
    with pytest.raises(WorkerError, match=r"(?s)^worker fake_lines failed \(exit code 1\):\nTraceback.*"
                                          r"KeyError: 'k'") as e:
        w.ask({"op": "boom", "x": "k"})
    assert e.value.returncode == 1 and "in handle" in e.value.traceback
    assert "KeyError: 'k'" in (tmp_path / "w2.log").read_text()  # the traceback is in the log as well
    w.close()

    w = JsonLinesWorker("fake_lines", log=tmp_path / "w3.log", env=env | {"FAIL_AT_START": "1"})
    with pytest.raises(WorkerError, match=r"(?s)RuntimeError: no engine here"):
        w.receive()
    w.close()
    assert w.proc.returncode == 1


def test_no_process_is_started_or_killed_outside_childproc():
    """Every child of d2serve goes through d2serve.childproc: no other module calls ``subprocess.Popen`` or
    ``os.killpg``, or starts its own session / pre-exec hook (``subprocess.run`` of short tools is allowed)."""
    import ast

    pkg = ROOT / "d2serve"
    found = []
    for path in sorted(pkg.rglob("*.py")):
        if path == pkg / "childproc.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.module in ("subprocess", "os"):
                found += [f"{where} imports {a.name}" for a in node.names if a.name in ("Popen", "killpg")]
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in ("Popen", "killpg"):
                found.append(f"{where} calls {name}")
            found += [f"{where} passes {k.arg}" for k in node.keywords if k.arg in ("start_new_session", "preexec_fn")]
    assert found == []
    serve_tree = ast.parse((pkg / "serve.py").read_text())
    serve_imports = {n.module for n in ast.walk(serve_tree) if isinstance(n, ast.ImportFrom)}
    assert "d2serve.export.vllm" not in serve_imports and "d2serve.childproc" in serve_imports
