"""The export target registry (d2serve.export.targets) against what it describes: the CLI's export commands, their
help and options, the run functions and the manifest files (issue 22 item 3). Nothing here runs an export."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import d2serve
from d2serve.cli import app
from d2serve.errors import InputError
from d2serve.export import targets
from d2serve.export.manifest import EXPORT_MANIFEST, VLLM_LORA_MANIFEST
from d2serve.export.targets import BASE_ADAPTER, MERGED, TARGETS, exit_code, get_target, target_names


def _export_group():
    return typer.main.get_command(app).commands["export"]


def test_export_help_lists_exactly_the_registry_targets():
    r = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    panel = r.output.split("Commands", 1)[1]
    listed = re.findall(r"^│ (\S+)\s{2,}", panel, flags=re.M)
    assert listed == list(target_names()) == list(_export_group().commands)
    for t in TARGETS:
        assert f"│ {t.name} " in panel


def test_each_export_command_takes_its_help_and_inputs_from_its_entry():
    cmds = _export_group().commands
    for t in TARGETS:
        cmd = cmds[t.name]
        assert cmd.help == t.description and "\n" not in t.description
        opts = {p.name for p in cmd.params}
        assert ("merged" in opts) == (MERGED in t.inputs), t.name
        assert {"base", "adapter"} <= opts if BASE_ADAPTER in t.inputs else not opts & {"base", "adapter"}, t.name
        assert {"out", "overwrite"} <= opts


def test_every_entry_loads_a_keyword_only_run_function_with_its_inputs():
    for t in TARGETS:
        fn = t.load()
        assert callable(fn) and fn.__doc__ and fn.__module__.startswith("d2serve.export."), t.entry
        params = inspect.signature(fn).parameters
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values()), t.entry
        wanted = {"out", "overwrite"} | ({"merged"} if MERGED in t.inputs else set()) | (
            {"base", "adapter"} if BASE_ADAPTER in t.inputs else set())
        assert wanted <= set(params), (t.entry, wanted - set(params))
        assert set(t.inputs) <= {MERGED, BASE_ADAPTER} and t.inputs


def test_manifest_names_are_the_ones_the_modules_write():
    from d2serve.export import onnx, onnx_quant, peft, vllm, vllm_lora

    written = {"onnx": onnx.MANIFEST, "vllm": vllm.REPORT_NAME, "vllm-lora": vllm_lora.MANIFEST_NAME,
               "dora": peft.MANIFEST_NAME, "lora": peft.MANIFEST_NAME}
    assert set(written) == set(target_names())
    assert {t.name: t.manifest for t in TARGETS} == written
    assert onnx_quant.MANIFEST == EXPORT_MANIFEST and get_target("vllm-lora").manifest == VLLM_LORA_MANIFEST


def _string_literals(path: Path) -> set[str]:
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text(), str(path))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs}


def test_the_export_manifest_name_is_spelled_in_one_module():
    from d2serve.export.manifest import MERGE_MANIFEST

    pkg = Path(d2serve.__file__).parent
    names = (EXPORT_MANIFEST, VLLM_LORA_MANIFEST, MERGE_MANIFEST)
    spelled = {str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
               if any(n in s for s in _string_literals(p) for n in names)}
    assert "export/manifest.py" in spelled
    assert spelled == {"export/manifest.py"}, spelled


def test_onnx_variants_and_precisions_come_from_the_registry():
    from d2serve.export import onnx

    t = get_target("onnx")
    assert onnx.TARGETS == t.variant_names == ("genai", "plain")
    assert onnx.PRECISIONS == t.precisions() == {"genai": ("fp32", "int4", "int8"), "plain": ("fp32",)}
    assert t.variant_help() == "genai (ORT-GenAI decoder, KV cache) | plain (logits graph)."
    assert t.precision_help() == "genai: fp32 | int4 | int8; plain: fp32."
    params = {p.name: p for p in _export_group().commands["onnx"].params}
    assert params["target"].help == t.variant_help() and params["target"].default == "genai"
    assert params["precision"].help == t.precision_help() and params["precision"].default == "fp32"
    assert all(not v.variants for v in TARGETS if v.name != "onnx")


def test_get_target_names_the_registered_ones():
    assert get_target("dora").entry == "d2serve.export.peft:export_dora"
    with pytest.raises(InputError, match="export target 'gguf': expected one of onnx, vllm, vllm-lora, dora, lora"):
        get_target("gguf")


@dataclass
class _Report:
    passed: bool


def test_exit_code_follows_passed():
    assert exit_code(_Report(True)) == targets.EXIT_OK == 0
    assert exit_code(_Report(False)) == targets.EXIT_CHECK_FAILED == 1
    assert exit_code({"passed": False, "failures": ["x"]}) == 1
    assert exit_code({"passed": True}) == 0
    assert exit_code({"num_layers": 3}) == 0  # a target that runs no check (export dora)
    assert targets.EXIT_BAD_INPUT == 2


def test_listing_the_targets_imports_no_target_module():
    code = ("import sys, d2serve.export.targets as t, d2serve.cli; t.target_names(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('d2serve.export.') "
            "and m not in ('d2serve.export.targets', 'd2serve.export.manifest')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(Path(d2serve.__file__).parent.parent), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
