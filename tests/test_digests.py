"""sha256 of input files computed once (d2serve.digests): cache hits read nothing, a touched file is hashed again,
a file changed during the merge is refused, a Hugging Face LFS blob name is used as the digest."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading

import pytest

import d2serve.merge_io as merge_io
from d2serve import digests
from d2serve.adapters.synthetic import random_adapter
from d2serve.checkpoint import CheckpointError
from d2serve.merge import merge


class _Counter:
    """Counts the sha256 objects the merge's hashing thread creates and the bytes it feeds them."""

    def __init__(self, monkeypatch):
        self.files = 0
        self.bytes = 0
        real = hashlib.sha256
        counter = self

        def mine() -> bool:  # the merge's hashing thread (other code hashes small things too)
            return threading.current_thread().name == "d2serve-merge-sha256"

        class Counted:
            def __init__(self, *a, **kw):
                counter.files += mine()
                self._h = real(*a, **kw)

            def update(self, b):
                counter.bytes += len(b) if mine() else 0
                self._h.update(b)

            def hexdigest(self):
                return self._h.hexdigest()

        monkeypatch.setattr(merge_io.hashlib, "sha256", Counted)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D2SERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def base_and_adapter(tiny_llama_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    ad = random_adapter(base, tmp_path / "ad", target_modules=("q_proj", "v_proj"), std=0.2)
    return base, ad


def _files(base, ad):
    return sorted(base.glob("*.safetensors")) + sorted(p for p in ad.iterdir() if p.is_file())


def test_a_warm_merge_reads_no_file_to_hash_it(fresh_cache, base_and_adapter, tmp_path, monkeypatch):
    base, ad = base_and_adapter
    count = _Counter(monkeypatch)
    cold = merge(base=base, adapter=ad, out=tmp_path / "cold")
    n_files = len(cold.manifest["sha256"]["base_shards"]) + len(cold.manifest["sha256"]["adapter"])
    assert count.files == n_files and count.bytes > 0
    assert set(cold.manifest["sha256_sources"]["base_shards"].values()) == {"computed"}
    count.files = count.bytes = 0
    warm = merge(base=base, adapter=ad, out=tmp_path / "warm")
    assert (count.files, count.bytes) == (0, 0)
    assert warm.manifest["sha256"] == cold.manifest["sha256"]
    assert set(warm.manifest["sha256_sources"]["base_shards"].values()) == {"cache"}
    assert set(warm.manifest["sha256_sources"]["adapter"].values()) == {"cache"}
    # the digests are the files' (an independent hashlib over the bytes)
    for name, d in warm.manifest["sha256"]["base_shards"].items():
        assert d == hashlib.sha256((base / name).read_bytes()).hexdigest()


def test_a_touched_file_is_hashed_again(fresh_cache, base_and_adapter, tmp_path, monkeypatch):
    base, ad = base_and_adapter
    merge(base=base, adapter=ad, out=tmp_path / "a")
    shard = base / "model.safetensors"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    count = _Counter(monkeypatch)
    r = merge(base=base, adapter=ad, out=tmp_path / "b")
    assert count.files == 1 and count.bytes == st.st_size
    assert r.manifest["sha256_sources"]["base_shards"] == {"model.safetensors": "computed"}
    assert set(r.manifest["sha256_sources"]["adapter"].values()) == {"cache"}


def test_a_cache_entry_for_another_identity_or_a_corrupt_one_is_not_used(fresh_cache, base_and_adapter, tmp_path):
    base, ad = base_and_adapter
    shard = base / "model.safetensors"
    stamp = merge_io._stamp(shard)
    digests.store(shard, stamp, "0" * 64)
    assert digests.lookup(shard, stamp) == ("0" * 64, "cache")
    other = (stamp[0], stamp[1], stamp[2], stamp[3] + 1)
    assert digests.lookup(shard, other) is None
    entry = next((fresh_cache / "sha256").glob("*.json"))
    entry.write_text("{not json")
    assert digests.lookup(shard, stamp) is None


@pytest.mark.parametrize("warm", [False, True])
def test_a_file_changed_during_the_merge_is_refused(fresh_cache, base_and_adapter, tmp_path, monkeypatch, warm):
    """Changed after the merge read it (cold: while hashing in the background; warm: the digest came from the
    cache): refused, no output."""
    import d2serve.merge as merge_mod

    base, ad = base_and_adapter
    if warm:
        merge(base=base, adapter=ad, out=tmp_path / "first")
    shard = base / "model.safetensors"
    real_close = merge_io.SourceShard.close

    def close_then_touch(self):
        real_close(self)
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000))

    monkeypatch.setattr(merge_mod.SourceShard, "close", close_then_touch)
    with pytest.raises(CheckpointError, match="changed while it was being merged"):
        merge(base=base, adapter=ad, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_hugging_face_lfs_blob_name_is_its_digest(fresh_cache, tiny_llama_dir, tmp_path, monkeypatch):
    """A base inside a hub cache layout (snapshots/<rev>/model.safetensors -> ../../blobs/<sha256>): the blob
    name is used without reading the file, and the manifest says so."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in tiny_llama_dir.iterdir():
        data = p.read_bytes()
        blob = repo / "blobs" / (hashlib.sha256(data).hexdigest() if p.suffix == ".safetensors"
                                 else hashlib.sha1(data).hexdigest())  # git's own blob id for small files
        blob.write_bytes(data)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", target_modules=("q_proj",), std=0.2)
    count = _Counter(monkeypatch)
    r = merge(base=snap, adapter=ad, out=tmp_path / "out")
    assert r.manifest["sha256_sources"]["base_shards"] == {"model.safetensors": "hf_lfs_blob_name"}
    want = hashlib.sha256((tiny_llama_dir / "model.safetensors").read_bytes()).hexdigest()
    assert r.manifest["sha256"]["base_shards"]["model.safetensors"] == want
    assert count.files == len(r.manifest["sha256"]["adapter"])  # only the adapter's files were read
