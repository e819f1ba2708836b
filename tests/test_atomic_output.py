"""Output directories: atomic replacement under SIGKILL, stale temp cleanup, inputs resolved file by file, side folders."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2serve.adapters.synthetic import random_adapter
from d2serve.errors import InputError
from d2serve.merge import merge
from d2serve.outdir import STALE_AFTER_S, TMP_TAG, _HOST, clean_stale, prepare_output_dir

ROOT = Path(__file__).resolve().parents[1]
FILES = ("config.json", "model.safetensors", "d2serve_merge.json")

# A writer in its own process: fills the output with FILES all holding `tag`; pauses forever at `stage` of the swap
# (so the test can SIGKILL it exactly there); argv[4] == "1" forces the two-rename fallback (no RENAME_EXCHANGE).
WRITER = r"""
import sys, time
from pathlib import Path
import d2serve.outdir as od
out, tag, stage, fallback = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if fallback:
    od._exchange = lambda a, b: False
def hook(s):
    if s == stage:
        (out.parent / "ready").write_text(s)
        time.sleep(600)
od._swap_hook = hook
with od.atomic_output_dir(out, overwrite=True) as tmp:
    for n in %r:
        (tmp / n).write_text(tag)
""" % (FILES,)


def _write(out: Path, tag: str, stage: str = "none", fallback: bool = False, kill: bool = False) -> None:
    ready = out.parent / "ready"
    ready.unlink(missing_ok=True)
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(out), tag, stage, "1" if fallback else "0"], cwd=ROOT)
    if not kill:
        assert p.wait(timeout=60) == 0
        return
    t0 = time.monotonic()
    while not ready.exists():
        assert p.poll() is None, f"writer exited ({p.returncode}) before reaching {stage}"
        assert time.monotonic() - t0 < 60, f"writer never reached {stage}"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    ready.unlink()


def _state(out: Path) -> str | None:
    """The one tag every output file holds; None when out is missing; AssertionError when incomplete or mixed."""
    if not out.exists():
        return None
    tags = {n: (out / n).read_text() if (out / n).is_file() else "<missing>" for n in FILES}
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES), f"unexpected files {sorted(os.listdir(out))}"
    assert len(set(tags.values())) == 1 and "<missing>" not in tags.values(), f"mixed or incomplete output: {tags}"
    return next(iter(tags.values()))


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.parametrize("stage, expect", [("written", "old"), ("swapped", "new")])
def test_overwrite_killed_mid_swap_leaves_old_or_new_never_missing(tmp_path, stage, expect, caplog):
    out = tmp_path / "out"
    _write(out, "old")
    assert _state(out) == "old" and _leftovers(out) == []
    _write(out, "new", stage=stage, kill=True)
    assert _state(out) == expect  # complete, never missing, never mixed
    left = _leftovers(out)
    assert len(left) == 1 and left[0].startswith(f".out{TMP_TAG}")  # the killed run's temp dir (new or old output)
    with caplog.at_level(logging.WARNING, logger="d2serve"):
        removed = clean_stale(out)  # what the next run on the same out does first
    assert [p.name for p in removed] == left and _leftovers(out) == []
    assert "left by an interrupted run" in caplog.text
    assert _state(out) == expect
    _write(out, "third")  # and the next run works
    assert _state(out) == "third" and _leftovers(out) == []


def test_fallback_two_renames_killed_between_is_recovered_by_the_next_run(tmp_path, caplog):
    out = tmp_path / "out"
    _write(out, "old", fallback=True)
    _write(out, "new", stage="moved_old", fallback=True, kill=True)
    assert _state(out) is None  # the fallback's window: out is missing until the next run ...
    assert any("d2serve-swap-" in n for n in _leftovers(out))
    with caplog.at_level(logging.WARNING, logger="d2serve"):
        prepare_output_dir(out, overwrite=True)  # ... which completes the swap first thing
    assert _state(out) == "new" and _leftovers(out) == []
    assert "completed the interrupted replacement" in caplog.text


def test_fallback_without_kill_replaces_cleanly(tmp_path):
    out = tmp_path / "out"
    _write(out, "old", fallback=True)
    _write(out, "new", fallback=True)
    assert _state(out) == "new" and _leftovers(out) == []


def test_stale_temp_dirs_cleaned_only_when_dead_or_old(tmp_path, caplog):
    out = tmp_path / "out"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        names = {
            "dead": f".out{TMP_TAG}{dead.pid}-{_HOST}-abc",
            "live": f".out{TMP_TAG}{live.pid}-{_HOST}-def",
            "other_host_recent": f".out{TMP_TAG}{dead.pid}-elsewhere-ghi",
            "other_host_old": f".out{TMP_TAG}{dead.pid}-elsewhere-jkl",
            "other_out": f".outer{TMP_TAG}{dead.pid}-{_HOST}-mno",
        }
        for n in names.values():
            (tmp_path / n).mkdir()
            (tmp_path / n / "model.safetensors").write_bytes(b"x" * 10)
        old = time.time() - STALE_AFTER_S - 60
        os.utime(tmp_path / names["other_host_old"], (old, old))
        with caplog.at_level(logging.WARNING, logger="d2serve"):
            with __import__("d2serve.outdir").outdir.atomic_output_dir(out) as tmp:
                (tmp / "f").write_text("x")
        present = {k for k, n in names.items() if (tmp_path / n).exists()}
        assert present == {"live", "other_host_recent", "other_out"}
        assert names["dead"] in caplog.text and names["other_host_old"] in caplog.text
        assert (out / "f").read_text() == "x"
    finally:
        live.kill()
        live.wait()


def test_input_shard_symlinked_into_out_is_refused(tiny_llama_dir, tmp_path):
    adapter = random_adapter(tiny_llama_dir, tmp_path / "ad", method="d2lora", r=4, seed=0)
    out = tmp_path / "out"
    merge(base=tiny_llama_dir, adapter=adapter, out=out)
    base = tmp_path / "base"
    base.mkdir()
    for p in tiny_llama_dir.iterdir():
        (base / p.name).symlink_to(p)
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").symlink_to(out / "model.safetensors")  # the base's shard lives in out
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(InputError, match=r"input .*base/model\.safetensors resolves to .*out/model\.safetensors, "
                                         r"inside the output"):
        merge(base=base, adapter=adapter, out=out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    # a side file symlinked into out is refused the same way
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").symlink_to(tiny_llama_dir / "model.safetensors")
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").symlink_to(out / "tokenizer.json")
    with pytest.raises(InputError, match=r"tokenizer\.json resolves to"):
        merge(base=base, adapter=adapter, out=out, overwrite=True)


def test_side_folders_are_copied_and_named_templates_compare(tmp_path):
    """transformers' additional_chat_templates/ reaches the merged model; the export's tokenizer check compares it."""
    from conftest import make_tiny_llama, make_tiny_tokenizer
    from d2serve.export.checks import check_tokenizer
    from d2serve.export.vllm import export_vllm
    from transformers import AutoTokenizer

    base = make_tiny_llama(tmp_path / "base")
    tok = make_tiny_tokenizer()
    tok.chat_template = {"default": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                         "tool_use": "{{ messages[0]['content'] }} TOOLS"}
    tok.save_pretrained(base)
    assert (base / "additional_chat_templates" / "tool_use.jinja").is_file()
    (base / "original").mkdir()  # a side folder with a weight file inside: the folder is copied, the weight is not
    (base / "original" / "params.json").write_text("{}")
    (base / "original" / "consolidated.00.pth").write_bytes(b"\x80\x02pickle")
    adapter = random_adapter(base, tmp_path / "ad", method="d2lora", r=4, seed=0)
    out = tmp_path / "merged"
    merge(base=base, adapter=adapter, out=out)
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == \
        (base / "additional_chat_templates" / "tool_use.jinja").read_text()
    assert (out / "original" / "params.json").is_file() and not (out / "original" / "consolidated.00.pth").exists()
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    rep = export_vllm(out=tmp_path / "exp", merged=out, base=base, check=False)  # static checks incl. tokenizer
    assert rep.static_checks == "passed"
    assert (tmp_path / "exp" / "additional_chat_templates" / "tool_use.jinja").is_file()
    # a checkpoint that lost the named templates is reported (not a TypeError comparing a str with a dict)
    lost = tmp_path / "lost"
    lost.mkdir()
    for p in base.iterdir():
        if p.is_file():
            (lost / p.name).write_bytes(p.read_bytes())
    problems = check_tokenizer(lost, base)
    assert len(problems) == 1 and "chat template differs" in problems[0] and "named templates" in problems[0], problems
