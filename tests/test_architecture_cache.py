"""The on-disk cache of architecture facts (d2serve/architecture.py, d2serve/cache.py; issue 12: merge at I/O speed).

A known config is answered from ``<cache_dir>/architectures/<key>.json`` without importing transformers; the
entry read back equals a fresh build with transformers for every architecture family of the conformance matrix;
bad entries are rebuilt and rewritten; an unwritable cache is skipped silently; build errors are never cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file

import d2serve
import d2serve.architecture as A
from d2serve.architecture import CONV1D, EMBEDDING, LINEAR, architecture_at, architecture_cache_path
from d2serve.cache import cache_dir, write_text_atomic
from d2serve.checkpoint import CheckpointError

from conftest import make_tiny_tokenizer
from peft_oracle import peft_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent / "conformance"))
from archs import ARCHS, _config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# name -> a fact of the freshly built architecture that an entry must carry (so a round trip of an empty or
# default Architecture cannot pass)
FAMILIES = {
    "llama": lambda a: not a.tied and a.layer("model.layers.0.self_attn.q_proj") == A.LayerKind(LINEAR, False, False),
    "gpt2_tied": lambda a: a.tied and a.layer("transformer.h.0.attn.c_attn") == A.LayerKind(CONV1D, True, True)
    and a.expected["transformer.h.0.attn.c_attn.weight"].shape == (64, 192),
    "qwen2_tied": lambda a: a.tied and "lm_head.weight" not in a.expected
    and a.layer("model.embed_tokens") == A.LayerKind(EMBEDDING, True, False),
    "gemma_tied": lambda a: a.tied and a.config_class == "GemmaConfig" and a.tie_default,
    "phi3": lambda a: a.layer("model.layers.1.mlp.gate_up_proj") == A.LayerKind(LINEAR, False, True),
    "qwen2_moe": lambda a: a.expected["model.layers.0.mlp.experts.3.gate_proj.weight"].shape == (32, 64),
}

_CHILD_FACTS = r'''
import dataclasses, json, sys
from d2serve.architecture import architecture_at
arch = architecture_at(sys.argv[1])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "sklearn"))
print(json.dumps({"arch": dataclasses.asdict(arch), "loaded": loaded}))
'''

_CHILD_MERGE = r'''
import json, sys
from d2serve.merge import merge
merge(base=sys.argv[1], adapter=sys.argv[2], out=sys.argv[3])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "sklearn"))))
'''


def _child(code: str, *args) -> str:
    """Run ``code`` in a fresh Python (this checkout's d2serve, the current D2SERVE_CACHE_DIR); its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> a directory holding only the config.json of the conformance matrix's tiny model of that family."""
    tok, root = make_tiny_tokenizer(), tmp_path_factory.mktemp("arch_configs")
    for name in FAMILIES:
        _config(ARCHS[name], tok).save_pretrained(root / name)
    return {name: root / name for name in FAMILIES}


def _config_of(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _fresh(d: Path) -> A.Architecture:
    """Built with transformers now, no cache involved."""
    return A._build(json.dumps(_config_of(d), sort_keys=True), str(d))


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file()) if d.exists() else []


@pytest.mark.parametrize("name", list(FAMILIES))
def test_entry_equals_a_fresh_build_and_a_new_process_reads_it_without_transformers(arch_dirs, cache, name):
    d = arch_dirs[name]
    built = _fresh(d)
    assert FAMILIES[name](built)
    path = architecture_cache_path(_config_of(d))
    assert path is not None and path.parent == cache / "architectures" and not path.exists()
    assert architecture_at(d) == built  # built and written
    assert path.is_file() and A._read_entry(path) == built  # read back from disk
    entry = json.loads(path.read_text())
    assert entry["schema"] == A.CACHE_SCHEMA and entry["key"] == path.stem
    out = json.loads(_child(_CHILD_FACTS, d))
    assert out["loaded"] == []  # neither transformers (nor anything of it) nor sklearn
    assert out["arch"] == json.loads(json.dumps(dataclasses.asdict(built)))


def test_warm_merge_imports_no_transformers_model_machinery(tiny_llama_dir, tmp_path, cache):
    ad = peft_adapter(tiny_llama_dir, tmp_path / "lora", target_modules=["q_proj", "v_proj", "down_proj"])
    cold = json.loads(_child(_CHILD_MERGE, tiny_llama_dir, ad, tmp_path / "cold"))  # empty cache: builds, writes
    assert "transformers.models.auto.modeling_auto" in cold  # the check below can fail
    assert architecture_cache_path(_config_of(tiny_llama_dir)).is_file()
    warm = json.loads(_child(_CHILD_MERGE, tiny_llama_dir, ad, tmp_path / "warm"))
    assert "transformers.models.auto.modeling_auto" not in warm and not [m for m in warm if m.startswith("sklearn")]
    assert warm == []  # today nothing of transformers is imported by a warm merge
    a, b = load_file(tmp_path / "cold" / "model.safetensors"), load_file(tmp_path / "warm" / "model.safetensors")
    base = load_file(tiny_llama_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit-identical outputs
    assert not a["model.layers.0.self_attn.q_proj.weight"].equal(base["model.layers.0.self_attn.q_proj.weight"])


def _truncated(text: str) -> str:
    return text[: len(text) // 2]


def _other_schema(text: str) -> str:
    return json.dumps(json.loads(text) | {"schema": A.CACHE_SCHEMA + 1})


def _other_key(text: str) -> str:
    return json.dumps(json.loads(text) | {"key": "0" * 64})


def _bad_layer(text: str) -> str:
    e = json.loads(text)
    e["layers"][next(iter(e["layers"]))] = ["dense", False, False]
    return json.dumps(e)


def _float_shape(text: str) -> str:
    e = json.loads(text)
    e["expected"][next(iter(e["expected"]))][0] = [64.5, 2]
    return json.dumps(e)


@pytest.mark.parametrize("corrupt", [_truncated, _other_schema, _other_key, _bad_layer, _float_shape,
                                     lambda t: "", lambda t: "[1, 2]", lambda t: b"\x00\xff garbage {",
                                     lambda t: "[" * 100_000],
                         ids=["truncated", "schema", "key", "layer", "shape", "empty", "list", "garbage", "deep"])
def test_a_bad_entry_is_rebuilt_and_rewritten(arch_dirs, cache, corrupt):
    d = arch_dirs["phi3"]
    built = _fresh(d)
    assert architecture_at(d) == built
    path = architecture_cache_path(_config_of(d))
    good = path.read_text()
    bad = corrupt(good)
    path.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
    assert A._read_entry(path) is None
    A._architecture.cache_clear()
    assert architecture_at(d) == built
    assert A._read_entry(path) == built and json.loads(path.read_text()) == json.loads(good)


def test_an_entry_path_that_is_a_directory_is_ignored(arch_dirs, cache):
    d = arch_dirs["llama"]
    path = architecture_cache_path(_config_of(d))
    path.mkdir(parents=True)
    assert architecture_at(d) == _fresh(d)
    assert path.is_dir() and _files(cache) == []  # nothing written, no temp file left


def test_key_covers_config_versions_and_source_not_where(arch_dirs, cache, monkeypatch, tmp_path):
    cfg = _config_of(arch_dirs["llama"])
    path = architecture_cache_path(cfg)
    canonical = json.dumps({"config": cfg, "transformers": importlib.metadata.version("transformers"),
                            "d2serve": d2serve.__version__,
                            "source_sha256": hashlib.sha256(Path(A.__file__).read_bytes()).hexdigest()},
                           sort_keys=True, separators=(",", ":"))
    assert path.name == hashlib.sha256(canonical.encode()).hexdigest() + ".json"
    assert architecture_cache_path(dict(reversed(list(cfg.items())))) == path  # key order does not matter
    assert architecture_cache_path(cfg | {"num_hidden_layers": 3}) != path
    for target, attr, value in [(A, "_transformers_version", lambda: "0.0.1"), (d2serve, "__version__", "99.0"),
                                (A, "_source_sha256", lambda: "0" * 64)]:
        with monkeypatch.context() as m:
            m.setattr(target, attr, value)
            assert architecture_cache_path(cfg) not in (path, None)
    assert architecture_cache_path(cfg) == path
    # ``where`` is not part of the key: the same config in another directory reads the same entry
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(cfg))
    assert architecture_at(arch_dirs["llama"]) == architecture_at(other)
    assert [p.name for p in _files(cache)] == [path.name]


def test_another_transformers_version_does_not_read_the_entry(arch_dirs, cache, monkeypatch):
    d = arch_dirs["gpt2_tied"]
    built = architecture_at(d)
    first = architecture_cache_path(_config_of(d))
    monkeypatch.setattr(A, "_transformers_version", lambda: "0.0.1")
    A._architecture.cache_clear()
    second = architecture_cache_path(_config_of(d))
    first.write_text(_other_schema(first.read_text()))  # if the old entry were read, it would be rejected anyway
    assert architecture_at(d) == built
    assert second.is_file() and {p.name for p in _files(cache)} == {first.name, second.name}


@pytest.mark.parametrize("value", ["off", "OFF"])
def test_cache_off_writes_nothing(arch_dirs, cache, monkeypatch, tmp_path, value):
    monkeypatch.setenv("D2SERVE_CACHE_DIR", value)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() is None and architecture_cache_path(_config_of(arch_dirs["llama"])) is None
    assert architecture_at(arch_dirs["llama"]) == _fresh(arch_dirs["llama"])
    assert list(tmp_path.rglob("*")) == []


# (a chmod 0o500 directory is no test here: CI runs as root, which writes into it anyway; a file where a
# directory must be is unwritable for every user)
@pytest.mark.parametrize("how", ["file_as_parent", "file_as_architectures"])
def test_an_unwritable_cache_is_skipped_silently(arch_dirs, cache, monkeypatch, tmp_path, caplog, how):
    if how == "file_as_parent":
        (tmp_path / "file").write_text("x")
        monkeypatch.setenv("D2SERVE_CACHE_DIR", str(tmp_path / "file" / "cache"))
    else:
        cache.mkdir()
        (cache / "architectures").write_text("x")
    d = arch_dirs["qwen2_tied"]
    caplog.set_level(logging.DEBUG, logger="d2serve.cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert architecture_at(d) == _fresh(d)
    assert [r for r in caplog.records if r.name.startswith("d2serve") and r.levelno > logging.DEBUG] == []
    assert any("not writing" in r.getMessage() for r in caplog.records)
    assert architecture_cache_path(_config_of(d)).is_file() is False
    assert _files(cache) == ([cache / "architectures"] if how == "file_as_architectures" else [])


@pytest.mark.parametrize("change, match", [
    ({"model_type": "no_such_arch"}, "model_type 'no_such_arch' is not an architecture"),
    ({"num_attention_heads": 0}, "transformers cannot build the architecture"),
])
def test_build_errors_are_never_cached(arch_dirs, cache, tmp_path, change, match):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(_config_of(arch_dirs["llama"]) | change))
    for _ in range(2):
        with pytest.raises(CheckpointError, match=f"{d}/config.json: {match}"):
            architecture_at(d)
    assert _files(cache) == []


def test_concurrent_writers_never_leave_a_partial_entry(tmp_path):
    path = tmp_path / "c" / "entry.json"
    texts = [json.dumps({"i": i, "pad": str(i) * 200_000}) for i in range(2)]
    seen, stop = set(), threading.Event()

    def write(text):
        for _ in range(30):
            assert write_text_atomic(path, text)

    def read():
        while not stop.is_set():
            try:
                seen.add(path.read_text())
            except FileNotFoundError:
                pass

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(texts[i % 2],)) for i in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert seen and seen <= set(texts)
    assert [p.name for p in path.parent.iterdir()] == ["entry.json"]  # no temp file left


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    for unset in (None, "", "  "):
        if unset is None:
            monkeypatch.delenv("D2SERVE_CACHE_DIR")
        else:
            monkeypatch.setenv("D2SERVE_CACHE_DIR", unset)
        assert cache_dir() == tmp_path / "home" / ".cache" / "d2serve"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "d2serve"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # not absolute: ignored (XDG spec)
    assert cache_dir() == tmp_path / "home" / ".cache" / "d2serve"
    monkeypatch.setenv("D2SERVE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("D2SERVE_CACHE_DIR", "Off")
    assert cache_dir() is None


def test_the_test_session_uses_a_private_cache():
    # tests/conftest.py points D2SERVE_CACHE_DIR at a fresh temporary directory for the session
    d = Path(os.environ["D2SERVE_CACHE_DIR"])
    assert d.name.startswith("d2serve-test-cache-") and d != Path.home() / ".cache" / "d2serve"
