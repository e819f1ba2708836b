"""Model arguments as Hugging Face Hub ids (read from a local HF cache the test writes), and --device validation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from d2serve.cli import app
from d2serve.errors import InputError
from d2serve.models import resolve_device
from d2serve.resolve import looks_like_hub_id, resolve_model_path

SHA_BASE = "0123456789abcdef0123456789abcdef01234567"
SHA_ADAPTER = "fedcba9876543210fedcba9876543210fedcba98"


def _flat(text: str) -> str:
    return " ".join(text.split())


def _cache_repo(cache: Path, repo_id: str, sha: str, src: Path) -> Path:
    """Lay out ``src`` as huggingface_hub's cache does: models--owner--name/{refs/main, snapshots/<sha>/...}."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / sha
    shutil.copytree(src, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    (root / "blobs").mkdir()
    return snap


@pytest.fixture(scope="module")
def hub(tiny_llama_dir, tmp_path_factory):
    """A HF cache holding the tiny Llama as test-org/tiny-llama and a D2-LoRA adapter as test-org/tiny-d2lora."""
    from d2serve.adapters.synthetic import random_adapter

    root = tmp_path_factory.mktemp("hub")
    adapter = random_adapter(tiny_llama_dir, root / "adapter", tau=0.6, seed=11)
    cache = root / "cache"
    snaps = {"base": _cache_repo(cache, "test-org/tiny-llama", SHA_BASE, tiny_llama_dir),
             "adapter": _cache_repo(cache, "test-org/tiny-d2lora", SHA_ADAPTER, adapter)}
    return {"cache": cache, "base": tiny_llama_dir, "adapter": adapter, **{f"snap_{k}": v for k, v in snaps.items()}}


@pytest.fixture
def use_cache(hub, monkeypatch):
    """Point huggingface_hub at the test cache (what HF_HUB_CACHE does at interpreter start)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    return hub


@pytest.mark.parametrize("value, expected", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("a/b", True), ("org_1/model.v2-x", True),
    ("runs/demo", True), ("model", False), ("a/b/c", False), ("/abs/path", False), ("./a/b", False),
    ("../x", False), ("a/..", False), ("a/b-", False), ("-a/b", False), ("a b/c", False),
])
def test_hub_id_shape(value, expected):
    assert looks_like_hub_id(value) is expected


def test_existing_path_wins_over_hub_lookup(tmp_path, monkeypatch, use_cache):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test-org" / "tiny-llama").mkdir(parents=True)  # a local folder with a hub-shaped name
    assert resolve_model_path("test-org/tiny-llama", "base") == Path("test-org/tiny-llama")
    assert resolve_model_path(tmp_path / "nope", "base") == tmp_path / "nope"  # not hub-shaped: left to later checks


def test_hub_id_resolves_to_the_cached_snapshot(use_cache):
    got = resolve_model_path("test-org/tiny-llama", "base")
    assert got == Path(use_cache["cache"]).resolve() / "models--test-org--tiny-llama" / "snapshots" / SHA_BASE
    assert (got / "model.safetensors").read_bytes() == (use_cache["base"] / "model.safetensors").read_bytes()


def test_uncached_hub_id_names_the_id_and_how_to_populate(use_cache):
    with pytest.raises(InputError) as ei:
        resolve_model_path("nobody/absent-model", "adapter")
    msg = str(ei.value)
    assert "adapter 'nobody/absent-model'" in msg and str(use_cache["cache"]) in msg
    assert "hf download nobody/absent-model" in msg and "HF_HUB_CACHE" in msg


def test_merge_from_hub_ids_is_byte_identical_to_folders(use_cache, tmp_path):
    r = CliRunner()
    a = r.invoke(app, ["merge", "--base", str(use_cache["base"]), "--adapter", str(use_cache["adapter"]),
                       "--out", str(tmp_path / "from_dirs")])
    b = r.invoke(app, ["merge", "--base", "test-org/tiny-llama", "--adapter", "test-org/tiny-d2lora",
                       "--out", str(tmp_path / "from_hub")])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    files = sorted(p.name for p in (tmp_path / "from_dirs").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "from_hub").iterdir()) and "model.safetensors" in files
    for name in files:
        x, y = (tmp_path / d / name for d in ("from_dirs", "from_hub"))
        if name == "d2serve_merge.json":  # records the input paths, which differ by construction
            mx, my = json.loads(x.read_text()), json.loads(y.read_text())
            assert mx["layers"] == my["layers"] and mx["num_layers_merged"] == my["num_layers_merged"] > 0
        else:
            assert x.read_bytes() == y.read_bytes(), name
    m = json.loads((tmp_path / "from_hub" / "d2serve_merge.json").read_text())
    assert SHA_BASE in json.dumps(m) and SHA_ADAPTER in json.dumps(m)  # the snapshot actually read is recorded


def test_cli_uncached_hub_id_exits_2(use_cache, tmp_path):
    res = CliRunner().invoke(app, ["merge", "--base", "test-org/tiny-llama", "--adapter", "nobody/absent",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "adapter 'nobody/absent'" in _flat(res.output) and "hf download nobody/absent" in _flat(res.output)
    assert not (tmp_path / "o").exists()


def test_hf_hub_cache_env_var_in_a_fresh_process(hub):
    """The real path a user takes: HF_HUB_CACHE set before d2serve starts (inspect with --base fit check)."""
    env = os.environ | {"HF_HUB_CACHE": str(hub["cache"]), "HF_HUB_OFFLINE": "1"}
    exe = Path(sys.executable).with_name("d2serve")
    p = subprocess.run([str(exe), "inspect", "test-org/tiny-d2lora", "--base", "test-org/tiny-llama"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "method d2lora" in p.stdout and "fits" in p.stdout and SHA_ADAPTER in _flat(p.stdout).replace(" ", "")


# ---- --device ---------------------------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu") == "cpu" and resolve_device(" CPU ") == "cpu"
    assert resolve_device(None) == resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "cuda:", "gpu0", ""):
        with pytest.raises(InputError, match="expected cpu, cuda or cuda:N"):
            resolve_device(bad)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(InputError, match=rf"device 'cuda:{n}' is not available"):
        resolve_device(f"cuda:{n}")  # one past the last device, on any machine
    if n == 0:
        with pytest.raises(InputError, match="device 'cuda' is not available"):
            resolve_device("cuda")
    else:
        assert resolve_device("cuda") == "cuda" and resolve_device("cuda:0") == "cuda:0"


@pytest.mark.parametrize("cmd", ["train", "verify", "bench"])
def test_cli_unavailable_device_exits_2(cmd, hub, tmp_path):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    base, adapter, out = str(hub["base"]), str(hub["adapter"]), tmp_path / "out"
    argv = {
        "train": ["train", "--base", base, "--out", str(out), "--max-steps", "1"],
        "verify": ["verify", "--base", base, "--adapter", adapter, "--merged", base, "--report", str(out)],
        "bench": ["bench", "--base", base, "--report", str(out), "--quick"],
    }[cmd]
    res = CliRunner().invoke(app, [*argv, "--device", f"cuda:{n}"])
    assert res.exit_code == 2, res.output
    assert f"device 'cuda:{n}' is not available" in _flat(res.output)
    assert not out.exists()


def test_train_and_bench_run_on_cpu(hub, tmp_path):
    from dataclasses import replace

    from d2serve.bench import QUICK_PLAN, bench
    from d2serve.train import TrainSettings, train

    s = TrainSettings(max_steps=2, batch_size=2, max_length=32, chat_template=False)  # tiny tokenizer: no template
    res = train(base=hub["base"], out=tmp_path / "a", settings=s, device="cpu")
    log = json.loads((tmp_path / "a" / "d2serve_train.json").read_text())
    assert log["device"] == "cpu" and len(res.losses) == 2 and all(torch.isfinite(torch.tensor(res.losses)))
    plan = replace(QUICK_PLAN, batches=(1,), prompt_lens=(8,), max_new_tokens=3, warmup=0, repeats=1)
    out = bench(base=hub["base"], adapter=tmp_path / "a", report=tmp_path / "b", plan=plan, workloads=("generation",),
                device="cpu", progress=False, threads=1)
    assert {a["device"] for a in out["arms"].values()} == {"cpu"} and set(out["arms"]) == {"base", "unmerged",
                                                                                          "unmerged_cached"}
