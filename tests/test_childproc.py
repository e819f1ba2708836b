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
