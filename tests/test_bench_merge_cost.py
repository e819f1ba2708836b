"""Tests of the merge-cost benchmark helpers: the synthetic sharded checkpoint and the child-process runner."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from d2serve.bench.merge_cost import run_job, shard_sizes
from d2serve.bench.synthetic_ckpt import write_synthetic_llama
from d2serve.checkpoint import Checkpoint


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return write_synthetic_llama(tmp_path_factory.mktemp("syn") / "ckpt", hidden=64, intermediate=96, layers=4,
                                 heads=4, kv_heads=2, vocab=128, shards=3)


def test_synthetic_checkpoint_is_a_valid_sharded_llama(synthetic_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    idx = json.loads((synthetic_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in synthetic_dir.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(idx["weight_map"].values()) == set(shards)
    expected = {n for n, _ in LlamaForCausalLM(LlamaConfig(**json.loads((synthetic_dir / "config.json").read_text())))
                .state_dict().items()}
    assert set(idx["weight_map"]) == expected
    assert idx["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(str(synthetic_dir / s)).values())
    ckpt = Checkpoint(synthetic_dir)
    q = ckpt.get_tensor("model.layers.1.self_attn.q_proj.weight")
    assert q.dtype == torch.bfloat16 and q.shape == (64, 64) and 0.01 < q.float().std() < 0.03


def test_synthetic_rejects_bad_shard_count(tmp_path):
    with pytest.raises(ValueError, match="shards must be"):
        write_synthetic_llama(tmp_path / "x", layers=2, shards=5)


def test_run_job_plain_and_merge_in_child(synthetic_dir, tmp_path):
    from d2serve.adapters.synthetic import random_adapter

    adapter = random_adapter(synthetic_dir, tmp_path / "adapter", target_modules=("q_proj", "down_proj"))
    plain = run_job("plain_load_save", base=synthetic_dir, out=tmp_path / "plain")
    assert sorted(shard_sizes(tmp_path / "plain")) == sorted(shard_sizes(synthetic_dir))
    assert plain["peak_rss_bytes"] >= plain["rss_after_imports_bytes"] > 0 and plain["seconds"] > 0
    m = run_job("d2serve_merge", base=synthetic_dir, out=tmp_path / "merged", adapter=adapter)
    assert (tmp_path / "merged" / "config.json").exists() and m["peak_rss_bytes"] > 0
    with pytest.raises(RuntimeError, match="unknown job kind"):
        run_job("nope", base=synthetic_dir, out=tmp_path / "n")
