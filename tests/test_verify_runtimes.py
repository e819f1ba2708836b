"""The runtimes under test of ``d2serve verify`` are one registry against one protocol (issue 22 item 3): the
CLI's ``--engine`` choices come from it, verify asks the runtime (no branch on its name), and a runtime registered
in a test is verified through with no change to verify.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import d2serve
from d2serve.errors import InputError
from d2serve.runtimes import RUNTIMES, RuntimeEntry, engine_help, engine_names, select_runtime
from d2serve.runtimes.protocol import RuntimeUnderTest


def test_registry_and_cli_engine_choices():
    assert tuple(RUNTIMES) == ("hf", "vllm", "ort-genai") and engine_names() == ("hf", "vllm")
    out = subprocess.run([sys.executable, "-m", "d2serve.cli", "verify", "--help"], capture_output=True, text=True,
                         env={"COLUMNS": "400", "PATH": "", "TERM": "dumb"}, check=True).stdout
    assert engine_help() in " ".join(out.split())
    assert engine_help().startswith("hf | vllm (hf: every check in transformers; vllm: weights, then task accuracy")
    for name, e in RUNTIMES.items():
        cls = e.load()
        assert issubclass(cls, RuntimeUnderTest) and cls.name == name and cls.engine_option == e.engine_option


def test_selection_by_engine_and_by_artifact(tmp_path):
    assert select_runtime("hf", tmp_path).name == "hf" and select_runtime("vllm", tmp_path).name == "vllm"
    (tmp_path / "genai_config.json").write_text("{}")
    ort = select_runtime("hf", tmp_path)
    assert ort.name == "ort-genai" and not ort.checks_weights and not ort.opens_merged_checkpoint
    with pytest.raises(InputError, match=r"--engine vllm verifies a merged HF checkpoint; .* is an ONNX Runtime "
                                         r"GenAI export"):
        select_runtime("vllm", tmp_path)
    with pytest.raises(InputError, match=r"engine 'ort-genai': expected one of hf, vllm"):
        select_runtime("ort-genai", tmp_path)  # chosen by its folder, not by name


def test_verify_names_no_runtime():
    """verify/api.py asks the runtime's capabilities: no string names a runtime or its artifact, and it imports
    no runtime module but the registry."""
    path = Path(d2serve.__file__).parent / "verify" / "api.py"
    tree = ast.parse(path.read_text())
    consts = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not consts & {"vllm", "ort-genai", "onnx", "genai_config.json"}
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in mods if m.startswith("d2serve.runtimes.")}, mods


class HalfwayRuntime(RuntimeUnderTest):
    """A runtime registered by the test: the merged checkpoint in transformers, but its own labels and no weight
    check, so the report shows verify took every answer from the runtime."""

    name = "halfway"
    description = "a test runtime"
    checks_weights = False
    weights_skipped = "skipped: the test runtime says so"
    loaded: list = []

    def compute_label(self, compute_dtype):
        return f"halfway {str(compute_dtype).removeprefix('torch.')}"

    def load_merged(self, merged, merged_ck, dtype, device):
        from d2serve.models import load_hf_model

        HalfwayRuntime.loaded.append(str(merged))
        return load_hf_model(merged_ck, dtype=dtype, device=device)

    def task_lm(self, model, reference, tokenizer, batch_size):
        from d2serve.verify.tasks import hf_lm

        return hf_lm(model, tokenizer, batch_size)


def test_a_runtime_registered_in_a_test_is_verified_through(monkeypatch, tiny_llama_dir, tiny_d2lora_adapter, tmp_path):
    from d2serve.merge import merge
    from d2serve.verify import verify

    merged = merge(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, out=tmp_path / "merged", dtype="float32").out
    monkeypatch.setitem(RUNTIMES, "halfway", RuntimeEntry("halfway", "a test runtime", f"{__name__}:HalfwayRuntime"))
    HalfwayRuntime.loaded.clear()
    rep = verify(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, merged=merged, report_dir=None, engine="halfway",
                 tasks="", wikitext=False, text_file=None, prompts=["Hello there"], max_new_tokens=8,
                 thresholds=["min_content_tokens_per_prompt=0"])
    d = rep.data
    assert HalfwayRuntime.loaded == [str(merged)]
    assert d["weights"] is None and d["settings"]["weights_check"] == "skipped: the test runtime says so"
    assert d["settings"]["merged_compute_dtype"] == "halfway float32"
    assert d["generation"]["n_prompts"] == 1 and d["generation"]["n_identical"] == 1, d["generation"]
    assert rep.passed, rep.failures
