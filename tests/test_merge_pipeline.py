"""The pipelined merge engine: hashing while reading, the methods' Merged API, statistics from one pass, errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2serve.adapters.io import load_adapter
from d2serve.adapters.methods import MergeMathError, get_method
from d2serve.adapters.synthetic import random_adapter
from d2serve.checkpoint import CheckpointError, tensor_infos
from d2serve.merge_io import ShardHasher, ShardOut, SourceShard
from d2serve.merge import merge

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _mixed_tensors() -> dict[str, torch.Tensor]:
    return {"a": torch.randn(7, 3), "b": torch.arange(10, dtype=torch.int64), "c": torch.randn(5).bfloat16(),
            "d": torch.zeros(0, 4), "e": torch.randn(3, 5, dtype=torch.float64)}


def test_hasher_gives_every_file_sha256_and_stops_early(tmp_path):
    files = []
    for i, n in enumerate((0, 1, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 17)):  # chunk boundaries and empty
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes(range(256)) * (n // 256) + bytes(n % 256))
    got = ShardHasher(files).result()
    assert got == {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    with pytest.raises(FileNotFoundError):
        ShardHasher([tmp_path / "missing"]).result()
    h = ShardHasher(files * 50)
    h.stop()  # abandons the rest and joins
    assert not h._thread.is_alive()


def test_source_shard_reads_equal_the_tensors_whole_and_in_pieces(tmp_path):
    tensors = _mixed_tensors()
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    infos = tensor_infos(path)
    shard = SourceShard(path)
    for n, info in infos.items():
        src = shard.tensor(info)
        assert src.shape == tuple(tensors[n].shape) and src.dtype == tensors[n].dtype, n
        whole = src.load()
        assert whole.dtype == tensors[n].dtype and torch.equal(whole, tensors[n]), n
        flat, k = tensors[n].reshape(-1), src.numel()
        for lo, hi in ((0, k // 3), (k // 3, k), (k, k)):  # pieces into a reused buffer, and an empty read
            got = src.read(lo, hi, torch.empty(hi - lo, dtype=src.dtype))
            assert torch.equal(got, flat[lo:hi]), (n, lo, hi)
    with pytest.raises(ValueError, match="needs a contiguous torch.float32 buffer of 4 elements"):
        shard.tensor(infos["a"]).read(0, 4, torch.empty(4, dtype=torch.float64))
    shard.close()
    shard.close()  # idempotent
    assert load_file(str(path)).keys() == tensors.keys()  # the file is untouched


def test_shard_out_writes_what_safetensors_reads_from_any_order_of_blocks(tmp_path):
    tensors = _mixed_tensors()
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    out = ShardOut(tmp_path / "y.safetensors", specs, {"format": "pt"})
    for n in reversed(list(tensors)):  # any order; "a" in two row blocks, the second first
        t = tensors[n]
        if n == "a":
            out.write(n, t[4:], 4 * 3 * 4)
            out.write(n, t[:4], 0)
        else:
            out.write(n, t)
    out.close()
    got = load_file(str(tmp_path / "y.safetensors"))
    assert got.keys() == tensors.keys() and all(torch.equal(got[n], tensors[n]) for n in tensors)
    # the same bytes as safetensors' own writer
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "y.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_shard_out_refuses_incomplete_overlapping_and_misfit_writes(tmp_path):
    specs = [("a", torch.float32, (4, 2)), ("b", torch.int64, (3,))]
    out = ShardOut(tmp_path / "z.safetensors", specs, {})
    with pytest.raises(CheckpointError, match="declared torch.float32, written as torch.float64"):
        out.write("a", torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(CheckpointError, match="do not fit tensor a"):
        out.write("a", torch.zeros(3, 2), 16)
    out.write("a", torch.zeros(4, 2))
    with pytest.raises(CheckpointError, match="tensor a written more than once"):
        out.write("a", torch.zeros(1, 2))
    with pytest.raises(CheckpointError, match=r"2 declared tensor\(s\) not completely written \(first: b\)"):
        out.close()
    with pytest.raises(FileExistsError):  # never overwrites a file
        ShardOut(tmp_path / "z.safetensors", specs, {})


@pytest.mark.parametrize("method", ["d2lora", "dora", "lora"])
def test_method_merge_returns_the_weight_and_the_row_scale_it_applied(tiny_llama_dir, tmp_path, method):
    ad = load_adapter(random_adapter(tiny_llama_dir, tmp_path / "ad", method=method, std=0.2, seed=2))
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    m = get_method(method)
    for module, f in ad.layers.items():
        w0 = base[f"{module}.weight"].double()
        t = {k: v.double() for k, v in f.tensors.items()}
        if method == "d2lora":
            dw = f.scale * (t["lora_B_plus"] @ t["lora_A_plus"] - f.tau * t["lora_B_minus"] @ t["lora_A_minus"])
            s = w0.pow(2).sum(1).sqrt() / (w0 + dw).pow(2).sum(1).sqrt()
            ref = s[:, None] * (w0 + dw) + dw
        else:
            dw = f.scale * t["lora_B"] @ t["lora_A"]
            s = t["lora_magnitude_vector"] / (w0 + dw).pow(2).sum(1).sqrt() if method == "dora" else None
            ref = w0 + dw if s is None else s[:, None] * (w0 + dw)
        got = m.merge(w0, f, torch.float64)
        assert torch.allclose(got.weight, ref, rtol=1e-12, atol=1e-15), module
        assert torch.equal(m.merged_weight(w0, f), got.weight)
        assert torch.allclose(m.delta(f), dw, rtol=1e-12, atol=1e-15)
        if s is None:
            assert got.scale is None
        else:
            assert torch.allclose(got.scale, s, rtol=1e-12), module


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_manifest_statistics_equal_an_independent_recomputation(tiny_llama_dir, tmp_path, dtype):
    ad_dir = random_adapter(tiny_llama_dir, tmp_path / "ad", r=4, lora_alpha=6.0, tau=0.7, target_modules=ALL_LINEAR,
                            std=0.2, seed=5)
    res = merge(base=tiny_llama_dir, adapter=ad_dir, out=tmp_path / "m", dtype=dtype)
    base = load_file(str(tiny_llama_dir / "model.safetensors"))
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    ad = load_adapter(ad_dir)
    saw_lost = False
    for module, f in ad.layers.items():
        w0 = base[f"{module}.weight"].double()
        t = {k: v.double() for k, v in f.tensors.items()}
        dw = f.scale * (t["lora_B_plus"] @ t["lora_A_plus"] - f.tau * t["lora_B_minus"] @ t["lora_A_minus"])
        s = w0.pow(2).sum(1).sqrt() / (w0 + dw).pow(2).sum(1).sqrt()
        ref = s[:, None] * (w0 + dw) + dw
        out = merged[f"{module}.weight"]
        changed = ref != w0
        lost = changed & (out == base[f"{module}.weight"].to(out.dtype))
        saw_lost |= bool(lost.any())
        err = (out.double() - ref).abs().max().item()
        st = res.manifest["layers"][module]
        assert st["shape"] == list(w0.shape)
        assert st["delta_norm_ratio"] == pytest.approx((dw.pow(2).sum() / w0.pow(2).sum()).sqrt().item(), rel=1e-12)
        assert st["scale_min"] == pytest.approx(s.min().item(), rel=1e-12)
        assert st["scale_max"] == pytest.approx(s.max().item(), rel=1e-12)
        assert st["frac_unchanged_by_cast"] == lost.sum().item() / max(changed.sum().item(), 1), module
        assert st["cast_max_abs_err"] == pytest.approx(err, rel=1e-6, abs=1e-300)
        assert st["cast_max_rel_err"] == pytest.approx(err / ref.abs().max().item(), rel=1e-6, abs=1e-300)
    assert saw_lost == (dtype == "bfloat16")  # bf16 rounds some small changes away; fp32 keeps them all
    assert res.manifest["sha256"]["base_shards"]["model.safetensors"] == hashlib.sha256(
        (tiny_llama_dir / "model.safetensors").read_bytes()).hexdigest()


def test_an_error_in_a_later_tensor_leaves_no_output_and_no_thread(tiny_llama_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    t = load_file(str(base / "model.safetensors"))
    t["model.layers.1.mlp.down_proj.weight"][3, 4] = float("inf")
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    ad = random_adapter(base, tmp_path / "ad", target_modules=("q_proj",), std=0.2, with_magnitude=False)
    before = {th.ident for th in threading.enumerate()}
    with pytest.raises(MergeMathError, match=r"base tensor model\.layers\.1\.mlp\.down_proj\.weight has 1 NaN/Inf"):
        merge(base=base, adapter=ad, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    new = [th.name for th in threading.enumerate() if th.ident not in before and th.name.startswith("d2serve")]
    # the merge's own threads (row workers, the sha256 thread) are gone; the fused kernel's loader is the
    # process's (a first compilation may outlive a merge that failed fast), and there is at most one
    assert [n for n in new if n != "d2serve-merge-kernel-load"] == [] and new.count("d2serve-merge-kernel-load") <= 1


def test_row_block_workers_give_the_serial_bytes_and_statistics(tiny_llama_dir, tmp_path, monkeypatch):
    import d2serve.merge_blocks as merge_mod

    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", target_modules=ALL_LINEAR, std=0.2, seed=4)
    monkeypatch.setattr(merge_mod, "ROW_BLOCK_ELEMENTS", 150)  # 1-2 rows per block: many blocks per layer
    threads = torch.get_num_threads()
    serial = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "serial", dtype="bfloat16", threads=1)  # serial loop
    pooled = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "pooled", dtype="bfloat16", threads=3)  # 3 workers
    assert torch.get_num_threads() == threads  # restored after the merge
    assert (serial.manifest["threads"]["row_workers"], pooled.manifest["threads"]["row_workers"]) == (1, 3)
    assert (tmp_path / "serial" / "model.safetensors").read_bytes() == (tmp_path / "pooled" / "model.safetensors").read_bytes()
    assert serial.manifest["layers"] == pooled.manifest["layers"]
    assert serial.manifest["base_fingerprint"] == pooled.manifest["base_fingerprint"]


def test_source_shard_reads_a_tensor_at_an_offset_its_dtype_cannot_view(tmp_path):
    """A hand-made file (safetensors itself sorts by element size) with a float32 tensor 2 bytes past an
    alignment boundary: read into an aligned buffer, values exact."""
    import json
    import struct

    a, b = torch.randn(3).bfloat16(), torch.randn(2, 2)
    header = {"a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
              "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [6, 22]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + a.view(torch.uint8).numpy().tobytes()
                     + b.reshape(-1).view(torch.uint8).numpy().tobytes())
    infos = tensor_infos(path)
    assert infos["b"].begin % 4 == 2  # misaligned for float32
    shard = SourceShard(path)
    assert torch.equal(shard.tensor(infos["a"]).load(), a) and torch.equal(shard.tensor(infos["b"]).load(), b)
    shard.close()


def test_the_merge_never_maps_a_base_and_works_where_mmap_is_refused(tiny_llama_dir, tmp_path, monkeypatch):
    """A file system without mmap support (FUSE, some network mounts) merges the same bytes: the engine reads by
    positioned reads only (a mapped base truncated by another writer would kill the merge with SIGBUS)."""
    import mmap

    import d2serve.merge_io as merge_io

    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", target_modules=ALL_LINEAR, std=0.2, seed=6)
    first = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "first", dtype="bfloat16")
    calls = []

    def no_mmap(*a, **k):
        calls.append(a)
        raise OSError(19, "No such device")  # what a file system without mmap support answers

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    assert not hasattr(merge_io, "mmap")
    again = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "again", dtype="bfloat16")
    assert calls == []
    assert (tmp_path / "first" / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    assert first.manifest["layers"] == again.manifest["layers"] and first.manifest["sha256"] == again.manifest["sha256"]


def test_a_read_after_the_shard_was_truncated_is_the_shrink_error_not_sigbus(tmp_path):
    """Truncated after the tensor was opened, before a piece of it is read (another writer, mid-merge): the read
    is refused naming the file and both sizes; a mapped read here would have been SIGBUS."""
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}, str(path), metadata={"format": "pt"})
    shard = SourceShard(path)
    src = shard.tensor(tensor_infos(path)["a"])
    size = path.stat().st_size
    assert torch.equal(src.read(0, 64, torch.empty(1, 64)), torch.arange(64, dtype=torch.float32).reshape(1, 64))
    os.truncate(path, size // 2)
    with pytest.raises(CheckpointError, match=rf"{path}: the file shrank to {size // 2} bytes while being merged "
                                              rf"\(it had {size};"):
        src.read(4000, 4096, torch.empty(96))
    assert torch.equal(src.read(0, 64, torch.empty(64)), torch.arange(64, dtype=torch.float32))  # before the cut: as is
    shard.close()


@pytest.mark.parametrize("which", ["base/model.safetensors", "ad/adapter_model.safetensors", "ad/adapter_config.json"])
def test_an_input_file_changed_during_the_merge_is_refused_and_nothing_written(tiny_llama_dir, tmp_path, monkeypatch,
                                                                              which):
    """The manifest's sha256 must be of the bytes merged: a base shard or adapter file touched between the start
    and the end of the merge is refused by name."""
    import os
    import re

    import d2serve.merge_io as merge_io
    from d2serve.errors import InputError

    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    ad = random_adapter(base, tmp_path / "ad", target_modules=("q_proj",), std=0.2, seed=7)
    real_result = merge_io.ShardHasher.result
    path = tmp_path / which

    def touched_then_result(self):
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # another writer's touch
        return real_result(self)

    monkeypatch.setattr(merge_io.ShardHasher, "result", touched_then_result)
    with pytest.raises(InputError, match=re.escape(f"{path}: the file changed while it was being merged")):
        merge(base=base, adapter=ad, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_shard_shorter_than_its_validated_header_is_refused_by_name(tmp_path):
    """Truncated after the header was read (another writer): a clear error, not a torch ValueError or SIGBUS."""
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(8)}, str(path), metadata={"format": "pt"})
    infos = tensor_infos(path)
    last = max(infos.values(), key=lambda i: i.end)
    with open(path, "r+b") as f:
        f.truncate(last.begin + 4)
    shard = SourceShard(path)
    with pytest.raises(CheckpointError, match=rf"{path}: the file ends at byte {last.begin + 4}, before tensor data"):
        shard.tensor(last)
    shard.close()


def test_trailing_bytes_after_the_data_are_refused_as_safetensors_does(tmp_path):
    from safetensors import SafetensorError

    from d2serve.checkpoint import read_safetensors_header

    path = tmp_path / "y.safetensors"
    save_file({"a": torch.randn(3)}, str(path), metadata={"format": "pt"})
    read_safetensors_header(path)  # exact size: accepted
    with open(path, "ab") as f:
        f.write(b"junk")
    with pytest.raises(SafetensorError):  # what safetensors itself says of such a file
        load_file(str(path))
    with pytest.raises(CheckpointError, match=r"y\.safetensors: 4 bytes after the last tensor's data"):
        read_safetensors_header(path)
