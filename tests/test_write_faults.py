"""Faults of the environment end in one line and exit 2 with nothing left behind, and a cache entry edited by hand
is rebuilt (issue 20, item 4): disk full (ENOSPC, injected at the write), names too long for the file system
(ENAMETOOLONG, real), a base shard truncated while the merge has it mapped (was SIGBUS), an architecture cache
entry whose ``transposed`` flag was edited (was a wrong c_proj with exit 0)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

import d2serve.architecture as A
import d2serve.merge as merge_mod
from d2serve.architecture import architecture_at, architecture_cache_path
from d2serve.cli import _error_boundary, app
from d2serve.merge_io import SourceShard
from d2serve.outdir import OutputWriteError, write_file_atomic

from peft_oracle import assert_merge_equals_peft, make_tiny_gpt2, peft_adapter
from test_bad_inputs import tree_hash

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lora(tiny_llama_dir, tmp_path_factory) -> Path:
    return peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("wf") / "lora", target_modules=["q_proj", "down_proj"])


def _left(out: Path) -> list[str]:
    """``out`` and every sibling d2serve made for it (temporary directories, swap markers, temp files)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # rich shortens long paths to the terminal's width otherwise


def _cli(args: list[str]):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res, res.output  # stdout and stderr together


def _assert_one_line_error(res, text: str, *needles: str) -> None:
    assert res.exit_code == 2, text
    assert "Traceback" not in text and not isinstance(res.exception, OSError | AssertionError), text
    err = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert err, text
    joined = " ".join(text.split())  # rich wraps long lines
    for n in needles:
        assert n in joined, (n, text)


# ------------------------------------------------------------------------------------------------ disk full


def _enospc_after(limit: int):
    """An ``os.pwrite`` that writes ``limit`` bytes in all, then raises ENOSPC (as a full disk does)."""
    real, done = os.pwrite, [0]

    def pwrite(fd, data, offset):
        n = len(memoryview(data).cast("B"))
        if done[0] + n > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done[0] += n
        return real(fd, data, offset)

    return pwrite


@pytest.mark.parametrize("limit", [0, 40_000], ids=["header", "mid_tensor"])
def test_disk_full_at_the_tensor_write_is_one_line_exit_2_nothing_left(tiny_llama_dir, lora, tmp_path, monkeypatch,
                                                                      limit):
    before = tree_hash(tiny_llama_dir), tree_hash(lora)
    monkeypatch.setattr(os, "pwrite", _enospc_after(limit))
    out = tmp_path / "merged"
    res, text = _cli(["merge", "--base", tiny_llama_dir, "--adapter", lora, "--out", out])
    _assert_one_line_error(res, text, f"{out}: No space left on device", "nothing was written")
    assert _left(out) == []
    assert (tree_hash(tiny_llama_dir), tree_hash(lora)) == before


def _enospc_in_write_text(monkeypatch, name: str):
    """``Path.write_text`` of a file called ``name`` writes half of it, then raises ENOSPC."""
    real = Path.write_text

    def write_text(self, data, *a, **kw):
        if self.name == name:
            real(self, data[: len(data) // 2], *a, **kw)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data, *a, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("command, file", [
    (["merge"], "config.json"),  # a JSON file after the shards (write_json)
    (["export", "vllm-lora"], "adapter_config.json"),  # another command, another writer
])
def test_disk_full_in_any_command_writing_a_folder(tiny_llama_dir, lora, tmp_path, monkeypatch, command, file):
    _enospc_in_write_text(monkeypatch, file)
    out = tmp_path / "o"
    res, text = _cli([*command, "--base", tiny_llama_dir, "--adapter", lora, "--out", out])
    # (an ENOSPC from a file's write() carries no file name: the output folder is named)
    _assert_one_line_error(res, text, f"{out}: No space left on device", "nothing was written")
    assert _left(out) == []


def test_disk_full_in_a_single_file_write_leaves_no_temp_file(tmp_path, monkeypatch):
    real = Path.write_bytes

    def write_bytes(self, data):
        real(self, data[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    (tmp_path / "report.json").write_text("old")
    with pytest.raises(OutputWriteError, match="No space left on device"):
        write_file_atomic(tmp_path / "report.json", "new content")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert (tmp_path / "report.json").read_text() == "old"  # the previous file is intact


def test_cli_boundary_turns_a_raw_refused_write_into_one_line(tmp_path, capsys):
    def command():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "bench.json"))

    with pytest.raises(typer.Exit) as ex:
        _error_boundary(command)()
    assert ex.value.exit_code == 2

    def bug():
        raise OSError(errno.EBADF, "a bug")  # not an environment refusal: keeps its traceback

    with pytest.raises(OSError, match="a bug"):
        _error_boundary(bug)()


# ------------------------------------------------------------------------------------------------ long names


def test_a_300_character_output_name_is_one_line_exit_2(tiny_llama_dir, lora, tmp_path):
    out = tmp_path / ("n" * 300)
    res, text = _cli(["merge", "--base", tiny_llama_dir, "--adapter", lora, "--out", out])
    _assert_one_line_error(res, text, "the output name is 300 bytes", "limit of 255 bytes per name")
    assert list(tmp_path.iterdir()) == []


def test_a_name_that_fits_but_not_with_the_temp_suffix_is_refused_before_work(tiny_llama_dir, lora, tmp_path):
    out = tmp_path / ("n" * 240)  # a legal name (< 255): the temporary sibling .<name>.d2serve-tmp-... is not
    res, text = _cli(["export", "vllm-lora", "--base", tiny_llama_dir, "--adapter", lora, "--out", out])
    _assert_one_line_error(res, text, "the output name is 240 bytes", "choose a name of at most")
    assert list(tmp_path.iterdir()) == []


def test_a_300_character_directory_in_the_output_path_is_the_kernels_enametoolong(tiny_llama_dir, lora, tmp_path):
    out = tmp_path / ("d" * 300) / "merged"
    res, text = _cli(["merge", "--base", tiny_llama_dir, "--adapter", lora, "--out", out])
    _assert_one_line_error(res, text, "File name too long")
    assert list(tmp_path.iterdir()) == []


def test_a_300_character_report_file_is_one_line(tmp_path):
    with pytest.raises(OutputWriteError, match="the output name is 300 bytes"):
        write_file_atomic(tmp_path / ("r" * 300), "{}")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ truncated shard


def test_a_shard_truncated_after_opening_is_exit_2_naming_it(tiny_llama_dir, lora, tmp_path, monkeypatch):
    base = shutil.copytree(tiny_llama_dir, tmp_path / "base")
    shard = base / "model.safetensors"
    size = shard.stat().st_size

    class TruncatedAfterOpening(SourceShard):
        def __init__(self, path):
            super().__init__(path)
            os.truncate(path, size // 2)  # after the header was validated and the file opened, before any read

    monkeypatch.setattr(merge_mod, "SourceShard", TruncatedAfterOpening)
    out = tmp_path / "m"
    res, text = _cli(["merge", "--base", base, "--adapter", lora, "--out", out])
    _assert_one_line_error(res, text, str(shard), f"the file shrank to {size // 2} bytes", f"it had {size}")
    assert _left(out) == []


_CHILD_TRUNCATE_MID_MERGE = r'''
import os, sys, torch
torch.set_num_threads(1)  # serial row blocks: the truncation lands between two blocks
import d2serve.merge as M
from d2serve.cli import main
shard, real, state = sys.argv[1], M.ShardOut.write, {"n": 0}
def write(self, name, t, offset=0):
    real(self, name, t, offset)
    state["n"] += 1
    if state["n"] == 2:  # the merge has read and written some of the shard: cut it to a quarter
        os.truncate(shard, os.path.getsize(shard) // 4)
M.ShardOut.write = write
sys.argv = ["d2serve", *sys.argv[2:]]
main()
'''


def test_a_shard_truncated_during_the_merge_is_exit_2_not_sigbus(tiny_llama_dir, lora, tmp_path):
    base = shutil.copytree(tiny_llama_dir, tmp_path / "base")
    shard, out = base / "model.safetensors", tmp_path / "m"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _CHILD_TRUNCATE_MID_MERGE, str(shard), "merge", "--base", str(base),
                        "--adapter", str(lora), "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])  # SIGBUS would be -7
    joined = " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr and "the file shrank to" in joined, r.stderr[-3000:]
    assert "model.safetensors" in joined and "nothing was written" in joined
    assert _left(out) == []


# ------------------------------------------------------------------------------------------------ cache checksum


def test_a_hand_edited_transposed_flag_is_detected_rebuilt_and_merges_right(cache, tmp_path, caplog):
    gpt2 = make_tiny_gpt2(tmp_path / "gpt2", drop_tie_key=True)
    built = architecture_at(gpt2)
    module = "transformer.h.0.attn.c_proj"
    assert built.layer(module).transposed
    path = architecture_cache_path(json.loads((gpt2 / "config.json").read_text()))
    good = json.loads(path.read_text())
    assert good["sha256"] == A._payload_sha256(good)
    edited = json.loads(path.read_text())
    edited["layers"][module][1] = False  # the hand edit of the last adversarial run
    path.write_text(json.dumps(edited))
    # the edit is what would be trusted without the checksum: with its sha256 recomputed it is read as is
    resealed = edited | {"sha256": A._payload_sha256(edited)}
    assert not A._from_entry(resealed, path.stem).layer(module).transposed
    A._architecture.cache_clear()
    caplog.set_level(logging.WARNING, logger="d2serve")
    ad = peft_adapter(gpt2, tmp_path / "ad", target_modules=["attn.c_proj"])
    assert_merge_equals_peft(gpt2, ad, tmp_path / "m")  # the merged c_proj equals PEFT's unmerged model
    assert any("rebuilding" in r.getMessage() and "sha256" in r.getMessage() and str(path) in r.getMessage()
               for r in caplog.records)
    assert json.loads(path.read_text()) == good  # rewritten as built
    assert A._read_entry(path) == built
    m = load_file(tmp_path / "m" / "model.safetensors")
    assert m[f"{module}.weight"].shape == built.expected[f"{module}.weight"].shape
