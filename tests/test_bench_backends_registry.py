"""The bench backends are one registry against one protocol (issue 22 item 3): the CLI's choices come from it,
and a backend registered in a test runs through ``bench()`` with no change anywhere else (what adding SGLang takes).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from d2serve.bench.backends import BACKENDS, BackendEntry, backend_entry, backend_help, backend_names, get_backend
from d2serve.bench.backends.protocol import Backend
from d2serve.errors import InputError


def test_the_registry_lists_the_backends_and_the_cli_offers_exactly_them():
    assert backend_names() == ("hf", "vllm", "onnx")
    out = subprocess.run([sys.executable, "-m", "d2serve.cli", "bench", "run", "--help"], capture_output=True,
                         text=True, env={"COLUMNS": "400", "PATH": "", "TERM": "dumb"}, check=True).stdout
    help_line = " ".join(out.split())
    assert backend_help() == ("hf | vllm | onnx (hf: all arms in transformers; vllm: base, merged and unmerged "
                              "through d2serve's vLLM plugin; onnx: base and merged).")
    assert backend_help() in help_line


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(InputError, match=r"^unknown backend 'sglang'; expected one of hf, vllm, onnx$"):
        get_backend("sglang")


def test_every_backend_follows_the_protocol():
    from d2serve.bench.arms import ARM_NAMES

    import importlib

    for name in backend_names():  # the backend modules import their engines lazily: no extra needed here
        module, _, cls_name = backend_entry(name).entry.partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        assert issubclass(cls, Backend) and cls.name == name, name
        assert set(cls.arms_supported) <= set(ARM_NAMES) and "base" in cls.arms_supported, name
        for method in ("settings", "load", "prompts", "generate_once", "kv_cache_check"):
            assert getattr(cls, method) is not getattr(Backend, method), (name, method)  # implemented, not the stub
    assert get_backend("vllm").comparison_mode({"compile": True}).startswith("practical")
    assert get_backend("vllm").allowed_to_differ({"compile": True}) == {"compile_mode"}
    assert get_backend("hf").engine_options(prefix_caching=True, compile=True, arms=("base",)) == {}
    assert BACKENDS["hf"].default_dtype("cuda:0") == "bfloat16" and BACKENDS["hf"].default_dtype("cpu") == "float32"
    assert BACKENDS["vllm"].default_dtype("cuda") == "float32"


class FakeBackend(Backend):
    """A backend that measures nothing real: fixed timings, so the run's numbers are known."""

    name = "fake"
    arms_supported = ("base", "merged")
    supports_eval = False
    closed: list[bool] = []
    made_with: dict = {}

    @classmethod
    def engine_options(cls, *, prefix_caching, compile, arms):
        return {"knob": 3}

    @classmethod
    def comparison_mode(cls, options):
        return f"fake mode, knob {options['knob']}"

    def __init__(self, *, dtype, device, tokenizer_dir, knob):
        FakeBackend.made_with = {"dtype": str(dtype), "device": device, "knob": knob}
        self.tokenizer = None

    def settings(self):
        return {"engine": "fake", "knob": FakeBackend.made_with["knob"]}

    def load(self, spec):
        return {"loaded": spec.name}

    def prompts(self, case):
        return [[1, 2, 3][: case.prompt_len]] * case.batch

    def generate_once(self, arm, case):
        return {"new_tokens": case.max_new_tokens, "ttft_s": 0.01, "e2e_s": 0.01 + 0.002 * case.max_new_tokens,
                "itl_s": [0.002] * (case.max_new_tokens - 1)}

    def kv_cache_check(self, arm, case):
        return {"passed": True}

    def close(self):
        FakeBackend.closed.append(True)


def test_a_backend_registered_in_a_test_runs_through_bench(monkeypatch, tiny_llama_dir, tmp_path):
    from d2serve.bench import bench
    from d2serve.bench.workloads import BenchPlan

    monkeypatch.setitem(BACKENDS, "fake", BackendEntry("fake", "a test backend", f"{__name__}:FakeBackend"))
    FakeBackend.closed.clear()
    plan = BenchPlan(batches=(1,), prompt_lens=(2,), max_new_tokens=5, eval_examples=2, eval_batch=1, warmup=0,
                     repeats=2)
    res = bench(base=tiny_llama_dir, report=tmp_path / "rep", backend="fake", arms=("base",), plan=plan,
                workloads=("generation", "eval"), progress=False)
    assert res["status"] == "complete" and res["backend"] == "fake"
    assert FakeBackend.made_with == {"dtype": "torch.float32", "device": "cpu", "knob": 3} and FakeBackend.closed
    assert res["comparison_mode"] == "fake mode, knob 3"
    assert res["skipped"] == {"eval": "the fake backend does not run the eval-throughput workload"}
    arm = res["arms"]["base"]
    assert arm["engine"] == "fake" and arm["loaded"] == "base" and arm["knob"] == 3
    case = next(iter(res["workloads"]["generation"]["cases"].values()))
    tps = case["arms"]["base"]["samples"]["tokens_per_s"]
    assert tps == pytest.approx([5 / 0.02] * 2)  # batch 1 x 5 tokens in 0.01 + 5 x 0.002 s
    on_disk = json.loads((tmp_path / "rep" / "bench.json").read_text())
    assert on_disk["backend"] == "fake" and on_disk["comparison_mode"] == "fake mode, knob 3"
