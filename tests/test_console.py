"""d2serve.console: long steps show stages with elapsed time; third-party noise is filtered, errors are not."""

from __future__ import annotations

import io
import logging
import re

import pytest
from rich.console import Console

from d2serve import console as dc


@pytest.fixture
def out():
    buf = io.StringIO()
    dc.enable_progress(Console(file=buf, force_terminal=False, width=200))
    yield buf
    dc.disable_progress()


def test_stages_print_start_and_elapsed_lines_when_not_a_terminal(out):
    with dc.stage("counting", total=8) as st:
        for _ in range(8):
            st.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "counting ..."
    assert [ln.strip() for ln in lines[1:4]] == [f"counting: {k}/8 (0.0 s)" for k in (2, 4, 6)]
    assert re.fullmatch(r"counting: \d+\.\d s", lines[-1]) and st.completed == 8


def test_steps_sequence_ends_each_stage_and_marks_a_failure(out):
    @dc.in_steps
    def job():
        dc.step("first")
        dc.step("second")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        job()
    lines = out.getvalue().splitlines()
    assert lines[0] == "first ..." and re.fullmatch(r"first: \d+\.\d s", lines[1])
    assert lines[2] == "second ..." and re.fullmatch(r"second: failed after \d+\.\d s", lines[3])


def test_silent_unless_enabled():
    dc.disable_progress()
    with dc.stage("quiet", total=2) as st:
        st.advance(2)
    assert st.completed == 2 and not dc.progress_enabled()


def test_live_display_on_a_terminal_leaves_one_line_per_stage():
    buf = io.StringIO()
    dc.enable_progress(Console(file=buf, force_terminal=True, width=120))
    try:
        with dc.stage("outer"):
            with dc.stage("inner", total=3) as st:
                st.advance(3)
    finally:
        dc.disable_progress()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "inner: " in text and "outer: " in text and dc._progress is None


def test_merge_shows_per_tensor_progress(out, tiny_llama_dir, tiny_d2lora_adapter, tmp_path):
    from d2serve.merge import merge

    merge(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, out=tmp_path / "m", dtype="float32")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("merging 8 layers (") and lines[0].endswith("tensors) ...")
    n = int(re.search(r"\((\d+) tensors\)", lines[0]).group(1))
    counts = [int(m.group(1)) for ln in lines if (m := re.match(rf"\s+merging .*: (\d+)/{n} ", ln))]
    assert len(counts) == 3 and counts == sorted(counts) and n / 4 <= counts[0] and counts[-1] < n
    assert re.fullmatch(r"merging 8 layers \(\d+ tensors\): \d+\.\d s", lines[-1])


def test_third_party_noise_is_filtered_but_errors_stay(monkeypatch):
    for key in dc.THIRD_PARTY_ENV:
        monkeypatch.delenv(key, raising=False)
    saved = {n: logging.getLogger(n).level for n in dc.THIRD_PARTY_LEVELS}
    try:
        dc.quiet_third_party()
        task_log = logging.getLogger("lm_eval.api.task")  # "Custom kwargs can be passed to --metadata" (per task)
        assert not task_log.isEnabledFor(logging.WARNING) and task_log.isEnabledFor(logging.ERROR)
        for name in ("transformers.modeling_utils", "vllm.engine", "datasets.builder"):
            log = logging.getLogger(name)
            assert not log.isEnabledFor(logging.INFO) and log.isEnabledFor(logging.ERROR), name
        import os

        assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"  # vLLM's worker processes inherit it
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
