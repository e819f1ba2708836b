"""The CLI's one error boundary: InputError -> exit 2 (one line), CheckFailedError -> exit 1, anything else a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import d2serve.merge
from d2serve.cli import app
from d2serve.errors import CheckFailedError, InputError, InputNotFoundError

ROOT = Path(__file__).resolve().parents[1]


def _merge_args(tmp_path: Path) -> list[str]:
    return ["merge", "--base", str(tmp_path / "b"), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "o")]


@pytest.mark.parametrize("exc", [ZeroDivisionError("boom"), ValueError("boom"), KeyError("boom"), OSError("boom")])
def test_a_genuine_bug_is_not_reported_as_bad_input(monkeypatch, tmp_path, exc):
    """Builtin exceptions from a bug propagate (traceback, exit 1), never the exit 2 of bad input."""

    def broken(**kw):
        raise exc

    monkeypatch.setattr(d2serve.merge, "merge", broken)
    res = CliRunner().invoke(app, _merge_args(tmp_path))
    assert res.exit_code == 1 and res.exception is exc, (res.exit_code, res.output)
    assert "error:" not in res.output


def test_a_genuine_bug_shows_a_traceback_in_a_real_process(tmp_path):
    script = (
        "import sys, d2serve.merge, d2serve.cli\n"
        "def broken(**kw):\n    return 1 / 0\n"
        "d2serve.merge.merge = broken\n"
        "sys.argv = ['d2serve', *sys.argv[1:]]\n"
        "d2serve.cli.main()\n"
    )
    r = subprocess.run([sys.executable, "-c", script, *_merge_args(tmp_path)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("exc, code, label", [
    (InputError("adapter_config.json: field 'r' [must be > 0]"), 2, "error:"),
    (InputNotFoundError("/x/y: adapter directory not found"), 2, "error:"),
    (CheckFailedError("layer q_proj beyond tolerance [max err 3.1]"), 1, "failed:"),
])
def test_boundary_maps_d2serve_errors_to_exit_codes(monkeypatch, tmp_path, exc, code, label):
    def refusing(**kw):
        raise exc

    monkeypatch.setattr(d2serve.merge, "merge", refusing)
    res = CliRunner().invoke(app, _merge_args(tmp_path))
    assert res.exit_code == code, res.output
    assert f"{label} {exc}" in res.output.replace("\n", " ")  # markup-escaped: the [brackets] are printed verbatim
    assert "Traceback" not in res.output


def test_bad_dtype_exits_2_naming_the_parameter(tiny_llama_dir, tiny_d2lora_adapter, tmp_path):
    res = CliRunner().invoke(app, ["merge", "--base", str(tiny_llama_dir), "--adapter", str(tiny_d2lora_adapter),
                                   "--out", str(tmp_path / "o"), "--dtype", "int8"])
    assert res.exit_code == 2 and "dtype 'int8' not supported" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_missing_prompts_file_exits_2_naming_it(tiny_llama_dir, tmp_path):
    missing = tmp_path / "prompts.txt"
    res = CliRunner().invoke(app, ["export", "onnx", "--merged", str(tiny_llama_dir), "--out", str(tmp_path / "o"),
                                   "--prompts", str(missing)])
    assert res.exit_code == 2 and f"{missing}: prompts file not found" in res.output.replace("\n", ""), res.output


def test_training_divergence_is_a_failed_check():
    from d2serve.train import TrainingDivergedError

    assert issubclass(TrainingDivergedError, CheckFailedError) and issubclass(TrainingDivergedError, FloatingPointError)
