"""Torch threads per step from the cores this process may use (d2serve.threads), --threads on the heavy commands."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from d2serve import threads
from d2serve.adapters.synthetic import random_adapter
from d2serve.cli import app
from d2serve.errors import InputError
from d2serve.merge import merge


def test_available_cores_follow_the_affinity_mask_not_the_machine(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert threads.available_cores() == 1
    assert threads.pick("merge") == threads.pick("forward") == threads.pick("generate") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert (threads.pick("merge"), threads.pick("forward"), threads.pick("generate")) == (8, 8, 4)
    assert threads.pick("generate", 3) == 3  # an explicit count wins for every step
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert threads.available_cores() == 64


def test_a_non_positive_thread_count_is_refused():
    with pytest.raises(InputError, match="--threads 0"):
        threads.check_requested(0)
    with pytest.raises(ValueError, match="unknown step"):
        threads.pick("decode")


def test_torch_threads_restores_the_count():
    before = torch.get_num_threads()
    with threads.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_merge_records_its_row_workers_and_the_cores(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", target_modules=("q_proj",), std=0.2)
    auto = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "a")
    assert auto.manifest["threads"] == {"requested": None, "available_cores": 3, "row_workers": 3}
    one = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "b", threads=1)
    assert one.manifest["threads"] == {"requested": 1, "available_cores": 3, "row_workers": 1}
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("argv", [
    ["merge", "--base", "B", "--adapter", "A", "--out", "O"],
    ["verify", "--base", "B", "--adapter", "A", "--merged", "M", "--report", "R"],
    ["train", "--base", "B", "--out", "O"],
    ["bench", "run", "--base", "B", "--report", "R"],
    ["export", "vllm", "--base", "B", "--adapter", "A", "--out", "O"],
    ["export", "vllm-lora", "--base", "B", "--adapter", "A", "--out", "O"],
    ["export", "onnx", "--merged", "M", "--out", "O"],
])
def test_every_heavy_command_takes_threads(argv):
    r = CliRunner().invoke(app, [*argv, "--help"])
    assert r.exit_code == 0 and "--threads" in r.output, r.output


def test_merge_cli_refuses_zero_threads_with_exit_2(tiny_llama_dir, tmp_path):
    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", target_modules=("q_proj",), std=0.2)
    r = CliRunner().invoke(app, ["merge", "--base", str(tiny_llama_dir), "--adapter", str(ad), "--out",
                                 str(tmp_path / "o"), "--threads", "0"])
    assert r.exit_code == 2 and "--threads 0" in r.output
    assert not (tmp_path / "o").exists()
