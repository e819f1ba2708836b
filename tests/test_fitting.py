"""The fitting step (d2serve.fitting): one Fit per (base, adapter), every check in it, and the runs that use it open
the base once (verify) and hash each input file once (serving N adapters)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from d2serve import digests
from d2serve.adapters.io import load_adapter
from d2serve.adapters.synthetic import random_adapter
from d2serve.checkpoint import Checkpoint
from d2serve.fitting import MAGNITUDE_RTOL, Fit, WrongBaseError, fit
from d2serve.merge import merge

FAST = dict(tasks="arc_easy", limit=2, windows=1, window_len=32, prompts=["The capital of France is"],
            max_new_tokens=8, base_accuracy=True)


def _count_opens(monkeypatch) -> Counter:
    """Counter of Checkpoint(...) constructions, keyed by the resolved folder."""
    opened: Counter = Counter()
    real = Checkpoint.__init__

    def counting(self, path):
        opened[Path(path).resolve()] += 1
        real(self, path)

    monkeypatch.setattr(Checkpoint, "__init__", counting)
    return opened


def _count_matches(monkeypatch) -> list:
    """Every call of match_to_base (the adapter matched to the base), wherever it is imported."""
    import d2serve.fitting as fitting

    calls = []
    real = fitting.match_to_base

    def counting(adapter, base):
        calls.append(adapter.path)
        return real(adapter, base)

    monkeypatch.setattr(fitting, "match_to_base", counting)
    return calls


def test_fit_holds_every_answer_and_is_frozen(tiny_llama_dir, tiny_d2lora_adapter):
    ckpt, adp = Checkpoint(tiny_llama_dir), load_adapter(tiny_d2lora_adapter)
    f = fit(ckpt, adp)
    assert f.ckpt is ckpt and f.adapter is adp and f.method.name == "d2lora"
    assert f.w0_names == {m: f"{m}.weight" for m in adp.layers} and len(f.w0_names) == 8
    assert not f.ties.tied_base and f.ties.reason == "untied base" and f.stacked_on is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.method = None
    # the fingerprints are checked where W0 is read, and recorded
    assert f.fingerprints.to_json()["checked"] is False and f.fingerprints.to_json()["status"] == "matched"
    m = "model.layers.0.self_attn.q_proj"
    w0 = f.base_weight(m)
    assert w0.dtype == torch.float64 and torch.equal(w0, ckpt.get_tensor(f"{m}.weight").double())
    rec = f.fingerprints.to_json()
    assert rec["checked"] and rec["layers_checked"] == 1 and 0 <= rec["max_rel_row_diff"] < 1e-6
    assert rec["rtol"] == MAGNITUDE_RTOL and rec["key"] == "d2_magnitude"


def test_fit_checks_the_fingerprint_where_w0_is_read(tiny_llama_dir, tiny_d2lora_adapter, tmp_path):
    """Same shapes, other weights: the Fit is built (structure fits), reading W0 refuses it naming the layer."""
    from conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "other", seed=7)
    f = fit(Checkpoint(other), load_adapter(tiny_d2lora_adapter))
    with pytest.raises(WrongBaseError, match=r"model.layers.0.self_attn.q_proj: the adapter's d2_magnitude"):
        f.base_weight("model.layers.0.self_attn.q_proj")
    assert f.fingerprints.to_json()["checked"] is False  # nothing recorded for a refused layer


def test_every_reader_gets_the_whole_union_of_checks(tiny_llama_dir, tiny_d2lora_adapter, tmp_path):
    """A quantized base was refused by the merge only; the fitting step refuses it for inspect and the unmerged
    model too (the same message)."""
    from d2serve.checkpoint import CheckpointError
    from d2serve.inspect import inspect_adapter
    from d2serve.models import load_unmerged_model

    q = tmp_path / "quantized"
    shutil.copytree(tiny_llama_dir, q)
    cfg = json.loads((q / "config.json").read_text())
    (q / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "bitsandbytes"}}))
    info = inspect_adapter(tiny_d2lora_adapter, q)
    assert info["fits_base"]["ok"] is False and "quantization_config" in info["fits_base"]["error"]
    with pytest.raises(CheckpointError, match="has 'quantization_config' \\(quant_method 'bitsandbytes'\\)"):
        load_unmerged_model(q, tiny_d2lora_adapter)
    with pytest.raises(CheckpointError, match="quantization_config"):
        merge(base=q, adapter=tiny_d2lora_adapter, out=tmp_path / "m")


def test_verify_opens_the_base_once_and_fits_once(tiny_llama_dir, tmp_path, monkeypatch):
    from d2serve.verify import verify

    adp = random_adapter(tiny_llama_dir, tmp_path / "adapter", tau=0.7, seed=3)
    merged = merge(base=tiny_llama_dir, adapter=adp, out=tmp_path / "merged", dtype="float32").out
    opened, matched = _count_opens(monkeypatch), _count_matches(monkeypatch)
    rep = verify(base=tiny_llama_dir, adapter=adp, merged=merged, report_dir=None, **FAST)
    assert rep.passed, rep.failures
    assert rep.data["logits"]["sources"] and rep.data["weights"]["n_layers"] == 8  # every base reader ran ...
    assert rep.data["tasks"]["per_task"][0]["acc_base"] is not None  # ... the base model's scoring included
    assert opened[Path(tiny_llama_dir).resolve()] == 1, opened  # fit, weights, unmerged and base models share it
    assert opened[merged.resolve()] == 1, opened
    assert matched == [Path(adp)]


def test_serving_two_adapters_opens_the_base_once_and_hashes_each_file_once(tiny_llama_dir, tmp_path, monkeypatch):
    """lora_serve_args (what `d2serve serve --adapter` runs before vLLM) on a cache miss, with the digest cache off
    (every digest computed): one Checkpoint of the base, each base shard and adapter file read and hashed once."""
    from d2serve.export import vllm_lora

    ads = {n: random_adapter(tiny_llama_dir, tmp_path / n, tau=0.5, seed=s) for n, s in (("a", 1), ("b", 2))}
    monkeypatch.setenv("D2SERVE_CACHE_DIR", "off")
    monkeypatch.setattr(vllm_lora, "plugin_problem", lambda: None)  # the plugin's own checks import vLLM
    hashed: Counter = Counter()
    asked: Counter = Counter()
    real_hasher, real_lookup = digests.ShardHasher, digests.lookup

    def counting_hasher(paths):
        hashed.update(Path(p) for p in paths)
        return real_hasher(paths)

    def counting_lookup(path, stamp):
        asked[Path(path)] += 1
        return real_lookup(path, stamp)

    monkeypatch.setattr(digests, "ShardHasher", counting_hasher)
    monkeypatch.setattr(digests, "lookup", counting_lookup)
    opened, matched = _count_opens(monkeypatch), _count_matches(monkeypatch)
    args = vllm_lora.lora_serve_args(tiny_llama_dir, ads)
    folders = dict(a.split("=", 1) for a in args[args.index("--lora-modules") + 1:args.index("--max-lora-rank")])
    assert set(folders) == {"a", "b"} and all((Path(f) / vllm_lora.MANIFEST_NAME).is_file() for f in folders.values())
    assert opened == {Path(tiny_llama_dir).resolve(): 1}, opened
    assert sorted(matched) == sorted(ads.values())
    files = [Path(tiny_llama_dir) / "model.safetensors"] + [p for a in ads.values() for p in sorted(a.iterdir())]
    assert set(hashed) == set(files) and all(hashed[p] == 1 for p in files), hashed
    assert set(asked) == set(files) and all(asked[p] == 1 for p in files), asked
    man = json.loads((Path(folders["a"]) / vllm_lora.MANIFEST_NAME).read_text())
    assert man["sha256"]["base_shards"]["model.safetensors"] == digests.sha256_files(files[:1])[files[0]]
    shutil.rmtree(Path(folders["a"]).parent)


def test_a_fit_passed_to_serving_is_not_refitted(tiny_llama_dir, tiny_d2lora_adapter, tmp_path, monkeypatch):
    from d2serve.export import vllm_lora

    monkeypatch.setenv("D2SERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(vllm_lora, "plugin_problem", lambda: None)
    ckpt = Checkpoint(tiny_llama_dir)
    f = fit(ckpt, load_adapter(tiny_d2lora_adapter))
    opened, matched = _count_opens(monkeypatch), _count_matches(monkeypatch)
    folders, rank = vllm_lora.prepare_served_adapters(ckpt, {"x": f})
    assert rank == 8 and (folders["x"] / vllm_lora.SCALES_NAME).is_file()  # rank 2r = 8 for r = 4
    assert not opened and not matched
    assert f.fingerprints.to_json()["layers_checked"] == 8  # the fold read every W0 through the Fit
    with pytest.raises(ValueError, match="another Checkpoint"):
        vllm_lora.prepare_served_adapters(Checkpoint(tiny_llama_dir), {"x": f})


def test_fit_is_what_merge_records(tiny_llama_dir, tiny_d2lora_adapter, tmp_path):
    """The manifest's base_fingerprint and stacked_on come from the merge's Fit: a second merge stacked on the first
    output with a fingerprint-free plain LoRA records the first one."""
    from d2serve.fitting import read_manifest

    res = merge(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, out=tmp_path / "m1")
    fp = res.manifest["base_fingerprint"]
    assert fp["status"] == "matched" and fp["layers_checked"] == 8 and fp["max_rel_row_diff"] < 1e-6
    lora = random_adapter(tmp_path / "m1", tmp_path / "lora", method="lora", seed=4)
    f = fit(Checkpoint(tmp_path / "m1"), load_adapter(lora))
    assert isinstance(f, Fit) and f.stacked_on["method"] == "d2lora"
    assert f.stacked_on["adapter_sha256"] == read_manifest(tmp_path / "m1")["sha256"]["adapter"]
    res2 = merge(base=tmp_path / "m1", adapter=lora, out=tmp_path / "m2")
    assert res2.manifest["stacked_on"] == f.stacked_on
