"""Progress display and third-party log filtering: the one place that decides what a d2serve run prints.

Library code marks its long steps with :func:`stage` (a no-op unless a front
end called :func:`enable_progress`, so the Python API stays silent). The CLI
enables it: on a terminal each stage is a rich spinner (or a bar with ``done /
total`` where the work is countable) with the elapsed time, and a finished
stage leaves one line ``description: 12.3 s``; when output is not a terminal
(a log file, CI) each stage prints a start line and that finish line, so a
long step is never silent.

:func:`quiet_third_party` sets the log levels and warning filters of the
libraries d2serve drives (transformers, lm-eval, datasets, vLLM, ...) so their
INFO chatter and repeated hints do not drown the stage messages; errors (and
transformers' warnings) stay visible.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

_console: Console | None = None
_progress = None  # the one rich Progress shared by nested stages (rich allows one live display)
_depth = 0

# logger name -> level: INFO chatter and per-item hints off, errors kept
THIRD_PARTY_LEVELS = {
    "lm_eval": logging.ERROR,  # "Custom kwargs can be passed to --metadata" once per task, truncation notes per item
    "lm-eval": logging.ERROR,
    "transformers": logging.WARNING,
    "datasets": logging.WARNING,
    "huggingface_hub": logging.WARNING,
    "vllm": logging.WARNING,
    "torch": logging.WARNING,
    "onnxruntime": logging.WARNING,
    "onnxruntime_genai": logging.WARNING,
    "onnx_ir": logging.WARNING,
    "onnxscript": logging.WARNING,
    "matplotlib": logging.WARNING,
    "httpx": logging.WARNING,
    "urllib3": logging.WARNING,
    "filelock": logging.WARNING,
}
# environment for child processes (vLLM workers, ONNX builders) and libraries that read it at import
THIRD_PARTY_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TRANSFORMERS_VERBOSITY": "warning",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # tqdm bars (transformers' loading bars, lm-eval's request bars) would break rich's display
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_third_party() -> None:
    """Set third-party log levels (:data:`THIRD_PARTY_LEVELS`), environment defaults for child processes
    (:data:`THIRD_PARTY_ENV`, values already set are kept) and warning filters for known repeated notices.

    Idempotent; called once by the CLI before a command runs. Errors stay visible.
    """
    for key, value in THIRD_PARTY_ENV.items():
        os.environ.setdefault(key, value)
    for name, level in THIRD_PARTY_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    for pattern in (r".*TypedStorage is deprecated.*", r".*`torch_dtype` is deprecated.*",
                    r".*pkg_resources is deprecated.*", r".*Custom kwargs can be passed.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|lm_eval|datasets)\..*")
    if "transformers" in sys.modules:  # already imported: it read its environment; switch its own settings too
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
    # else transformers reads TRANSFORMERS_VERBOSITY / HF_HUB_DISABLE_PROGRESS_BARS (set above) when a command
    # imports it: a merge on a cached architecture never imports it (~1 s saved per CLI run)


def enable_progress(console: Console | None = None) -> None:
    """Show :func:`stage` progress on ``console`` (default: a stderr console)."""
    global _console
    _console = console or Console(stderr=True)


def disable_progress() -> None:
    """Make :func:`stage` silent again (the library default)."""
    global _console
    _console = None


def progress_enabled() -> bool:
    """Whether :func:`stage` displays anything."""
    return _console is not None


class StageHandle:
    """What a ``with stage(...) as st`` block gets: ``st.advance(n)`` (countable work), ``st.update(description)``."""

    def __init__(self, description: str, total: int | None):
        self.description = description
        self.total = total
        self.completed = 0
        self.t0 = time.perf_counter()
        self._task = None
        self._last_pct = 0
        self._console: Console | None = None

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units of work done."""
        self.completed += n
        if _progress is not None and self._task is not None:
            _progress.update(self._task, advance=n)
        elif self._console is not None and self.total:  # plain output: a line at every 25 %
            pct = int(100 * self.completed / self.total) // 25 * 25
            if pct > self._last_pct and pct < 100:
                self._last_pct = pct
                self._console.print(f"  {self.description}: {self.completed}/{self.total} "
                               f"({time.perf_counter() - self.t0:.1f} s)", highlight=False)

    def update(self, description: str) -> None:
        """Change the shown description (e.g. the current item)."""
        self.description = description
        if _progress is not None and self._task is not None:
            _progress.update(self._task, description=description)

    @property
    def seconds(self) -> float:
        """Elapsed wall time of the stage so far (s)."""
        return time.perf_counter() - self.t0


def _new_progress(console: Console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    class _IfCountable:  # bar and done/total only for countable work; a spinner alone otherwise
        def __init__(self, column):
            self.column = column

        def __call__(self, task):
            return self.column(task) if task.total is not None else Text("")

        def __getattr__(self, name):
            return getattr(self.column, name)

    return Progress(SpinnerColumn(), TextColumn("{task.description}"), _IfCountable(BarColumn(bar_width=30)),
                    _IfCountable(MofNCompleteColumn()), TimeElapsedColumn(), console=console, transient=True)


@contextmanager
def stage(description: str, total: int | None = None, show: bool | None = None) -> Iterator[StageHandle]:
    """Mark a long step: a spinner with elapsed time (or a bar when ``total`` is given) while it runs,
    then a line ``description: N s``. Silent (the handle still counts) unless :func:`enable_progress` was
    called or ``show`` is True (then on a stderr console); ``show=False`` silences it.

    Nested stages share one live display. A stage that raises prints ``description: failed after N s``.
    """
    global _progress, _depth
    handle = StageHandle(description, total)
    console = _console if show is None else (_console or Console(stderr=True)) if show else None
    if console is None:
        yield handle
        return
    handle._console = console
    live = console.is_terminal
    if live and _progress is None:
        _progress = _new_progress(console)
        _progress.start()
    if live:
        # indeterminate (spinner, no bar) when the work is not countable
        handle._task = _progress.add_task(description, total=total, start=True)
    else:
        console.print(f"{description} ...", highlight=False)
    _depth += 1
    ok = False
    try:
        yield handle
        ok = True
    finally:
        _depth -= 1
        if live and _progress is not None:
            _progress.remove_task(handle._task)
            if _depth == 0:
                _progress.stop()
                _progress = None
        pad = "  " * _depth
        state = "" if ok else "failed after "
        console.print(f"{pad}[dim]{handle.description}: {state}{handle.seconds:.1f} s[/dim]", highlight=False)


_sequences: list[dict] = []


def _end_step(entry: dict, exc: BaseException | None) -> None:
    cm = entry.pop("cm", None)
    if cm is not None:
        if exc is None:
            cm.__exit__(None, None, None)
        else:
            cm.__exit__(type(exc), exc, exc.__traceback__)


@contextmanager
def steps() -> Iterator[None]:
    """A sequence of stages: inside it each :func:`step` ends the previous stage and starts the next;
    the last one ends with the block (as failed if the block raises)."""
    entry: dict = {}
    _sequences.append(entry)
    try:
        yield
    except BaseException as e:
        _end_step(entry, e)
        raise
    else:
        _end_step(entry, None)
    finally:
        _sequences.remove(entry)


def step(description: str, total: int | None = None) -> StageHandle:
    """Start the next stage of the innermost :func:`steps` sequence (ending the previous one).

    Outside a sequence nothing is shown; the returned handle still counts.
    """
    if not _sequences:
        return StageHandle(description, total)
    entry = _sequences[-1]
    _end_step(entry, None)
    cm = stage(description, total)
    handle = cm.__enter__()
    entry["cm"] = cm
    return handle


def in_steps(fn):
    """Decorator: run ``fn`` inside :func:`steps`, so its :func:`step` calls show as a sequence of stages."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with steps():
            return fn(*args, **kwargs)

    return run
