"""`d2serve serve` builds the vLLM command once: the argv it prints is the argv it execs (issue 22).

os.execve is replaced by a recorder, so nothing is started; build_serve_command and lora_serve_args are wrapped
to count their calls (the real ones run: vLLM must be importable for build_serve_command's require()).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import d2serve.serve as serve_mod
from d2serve.cli import app


def _printed(result) -> str:
    """What the command printed (stdout and stderr: the command line goes to stderr)."""
    try:
        return result.stdout + result.stderr
    except ValueError:  # a runner that mixes stderr into stdout
        return result.output


@pytest.fixture
def recorded(monkeypatch):
    """Counts of build_serve_command / lora_serve_args calls, the built argvs and the exec'd ones."""
    from d2serve.export import vllm_lora

    rec = {"built": [], "exec": [], "lora_calls": 0}
    real_build = serve_mod.build_serve_command

    def build(*a, **kw):
        cmd = real_build(*a, **kw)
        rec["built"].append(cmd)
        return cmd

    def lora_args(base, adapters, user_args=()):
        rec["lora_calls"] += 1
        rec["lora_in"] = (base, dict(adapters), list(user_args))
        return ["--enable-lora", "--lora-modules", *[f"{n}=/folded/{n}" for n in adapters], "--max-lora-rank", "8",
                "--max-loras", str(len(adapters) + 1)]

    monkeypatch.setattr(serve_mod, "build_serve_command", build)
    monkeypatch.setattr(vllm_lora, "lora_serve_args", lora_args)
    monkeypatch.setattr(serve_mod.os, "execve", lambda path, argv, env: rec["exec"].append((path, argv, env)))
    return rec


@pytest.mark.extras
def test_serve_with_adapters_builds_the_command_once_and_execs_the_printed_one(recorded, tiny_llama_dir, tmp_path):
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_llama_dir), "--port", "8123",
                                 "--adapter", f"a={tmp_path / 'a'}", "--adapter", f"b={tmp_path / 'b'}",
                                 "--max-model-len", "512"])
    assert r.exit_code == 0, r.output
    assert recorded["lora_calls"] == 1 and len(recorded["built"]) == 1 and len(recorded["exec"]) == 1
    built = recorded["built"][0]
    path, argv, env = recorded["exec"][0]
    assert argv is built and path == built[0]  # the very list that was printed
    assert " ".join(built) in _printed(r)  # and printed whole, once
    assert _printed(r).count("--enable-lora") == 1
    assert built[built.index("--lora-modules") + 1:built.index("--lora-modules") + 3] == ["a=/folded/a", "b=/folded/b"]
    assert built[-2:] == ["--max-model-len", "512"]  # the user's vLLM options after d2serve's, unchanged
    assert recorded["lora_in"][2] == ["--max-model-len", "512"]
    assert env == serve_mod.server_env()


@pytest.mark.extras
def test_serve_without_adapters_execs_the_built_command(recorded, tiny_llama_dir):
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_llama_dir)])
    assert r.exit_code == 0, r.output
    assert recorded["lora_calls"] == 0 and len(recorded["built"]) == 1
    assert recorded["exec"][0][1] is recorded["built"][0]
    assert "--enable-lora" not in recorded["built"][0]


def test_serve_api_execs_what_build_serve_command_returns(monkeypatch):
    """serve() (the public API) = build_serve_command + exec_server, one build."""
    seen = {}
    monkeypatch.setattr(serve_mod, "build_serve_command", lambda model, **kw: seen.setdefault("cmd", ["/bin/x", str(model)]))
    monkeypatch.setattr(serve_mod.os, "execve", lambda path, argv, env: seen.setdefault("exec", (path, argv)))
    serve_mod.serve("m")
    assert seen["exec"][1] is seen["cmd"] and seen["exec"][0] == "/bin/x"
