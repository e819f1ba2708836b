"""Output directories that appear whole or not at all, also under SIGKILL, and that never overlap an input.

Every d2serve command writes its output into a hidden temporary sibling of
``out`` (``.<out>.d2serve-tmp-<pid>-<host>-<random>``) and puts it in place at
the end with one atomic step:

* ``out`` absent: ``rename(tmp, out)``.
* ``out`` present (``overwrite``), Linux: ``renameat2(tmp, out, RENAME_EXCHANGE)``
  swaps the two directories atomically, then the old output (now at the
  temporary name) is deleted. A reader (or a kill at any instant) sees the
  complete old output or the complete new one, never a missing or a mixed one.
* other systems or file systems without ``RENAME_EXCHANGE``: two renames
  (``out`` -> old, ``tmp`` -> ``out``) guarded by a marker file
  ``.<out>.d2serve-swap-<pid>-<host>.json``; a run killed between the renames
  leaves ``out`` missing until the next d2serve run on the same ``out`` finishes
  the swap (:func:`clean_stale`).

Temporary siblings left by killed runs (their pid is dead on this host, or they
are older than :data:`STALE_AFTER_S`) are deleted, with a logged warning, by the
next run that writes the same ``out``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from d2serve.errors import InputError, OutputExistsError

TMP_TAG = ".d2serve-tmp-"
SWAP_TAG = ".d2serve-swap-"
STALE_AFTER_S = 24 * 3600.0  # a temp sibling this old is stale even if its pid is alive (pid reuse, other host)

_log = logging.getLogger("d2serve")
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

#: Test hook: called with a stage name ("written", "swapped", "moved_old") between the steps of the final swap,
#: so a test can SIGKILL the process at exactly that point. None in normal use.
_swap_hook: Callable[[str], None] | None = None


def _hook(stage: str) -> None:
    if _swap_hook is not None:
        _swap_hook(stage)


# ---------------------------------------------------------------------------------------------- input overlap


def _input_entries(inp: Path) -> Iterator[Path]:
    """``inp`` and, for a directory, every file, folder and symlink under it (symlinked folders not descended)."""
    yield inp
    if inp.is_dir():
        for root, dirs, files in os.walk(inp):
            for n in (*dirs, *files):
                yield Path(root) / n


def prepare_output_dir(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Check an output directory before any work; first finish or clean what killed runs left beside it.

    Refuses an ``out`` that is a file, is non-empty without ``overwrite``, is (or
    contains, or lies inside) an input directory, or into which any input entry
    resolves: every file and folder under each input is resolved
    (``Path.resolve``, following symlinks), so a base shard that is a symlink
    into ``out`` is refused by name.

    Raises:
        OutputExistsError: ``out`` is a file, or exists non-empty and ``overwrite`` is False.
        InputError: ``out`` overlaps an input (the input entry and what it resolves to are named),
            or a path cannot be resolved (symlink loop).
    """
    out = Path(out)
    clean_stale(out)
    try:
        out_r = out.resolve()
    except (RuntimeError, OSError) as e:  # symlink loops
        raise InputError(f"cannot resolve the output path {out}: {e}") from e
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file, not a directory; choose another output directory")
    for inp in inputs:
        inp = Path(inp)
        for p in _input_entries(inp):
            try:
                r = p.resolve()
            except (RuntimeError, OSError) as e:
                raise InputError(f"cannot resolve the input path {p}: {e}") from e
            if p == inp and (r == out_r or out_r in r.parents or r in out_r.parents):
                raise InputError(f"output {out} overlaps the input {inp}; inputs are never modified, "
                                 "choose another output directory")
            if r == out_r or out_r in r.parents:
                raise InputError(f"input {p} resolves to {r}, inside the output {out}; writing the output would "
                                 "replace an input, choose another output directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty; it is replaced only with overwrite")


# ---------------------------------------------------------------------------------------------- stale temp dirs


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner(rest: str) -> tuple[int | None, str | None]:
    """(pid, host) from the part of a temp name after the tag: ``<pid>-<host>-...``."""
    m = re.fullmatch(r"(\d+)-([A-Za-z0-9_.]+?)(?:-.*)?", rest)
    return (int(m.group(1)), m.group(2)) if m else (None, None)


def _is_stale(path: Path, rest: str) -> bool:
    pid, host = _owner(rest)
    try:
        age = time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_AFTER_S:
        return True
    if pid is None or host != _HOST:
        return False  # another host's run: only age tells
    return pid != os.getpid() and not _pid_alive(pid)


def _remove(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def clean_stale(out: Path) -> list[Path]:
    """Finish interrupted fallback swaps of ``out`` and delete temp siblings of ``out`` left by dead runs.

    A swap marker of a dead run whose ``out`` is missing is completed (the new
    output was complete when the marker was written; if it is gone the old one
    is put back). Then every ``.<out>.d2serve-tmp-*`` sibling whose pid is dead
    on this host, or older than :data:`STALE_AFTER_S`, is deleted. Each action
    is logged as a warning on the ``d2serve`` logger.

    Returns:
        The paths deleted.
    """
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    swap_prefix, tmp_prefix = f".{out.name}{SWAP_TAG}", f".{out.name}{TMP_TAG}"
    removed, protected = [], set()
    for marker in sorted(p for p in parent.iterdir() if p.name.startswith(swap_prefix) and p.name.endswith(".json")):
        try:
            m = json.loads(marker.read_text())
            new, old = parent / m["new"], parent / m["old"]
        except (OSError, ValueError, KeyError, TypeError):
            new = old = None  # written partly: the renames had not started
        if not _is_stale(marker, marker.name[len(swap_prefix):-len(".json")]):
            protected |= {new, old}  # a live swap: its directories are not stale
            continue
        if new is not None and not out.exists() and not out.is_symlink():
            src = new if new.is_dir() else old if old.is_dir() else None
            if src is not None:
                os.rename(src, out)
                _log.warning("d2serve: completed the interrupted replacement of %s (restored %s from %s)",
                             out, "the new output" if src == new else "the previous output", src.name)
        marker.unlink(missing_ok=True)
    for p in sorted(parent.iterdir()):
        if p.name.startswith(tmp_prefix) and p not in protected and _is_stale(p, p.name[len(tmp_prefix):]):
            _remove(p)
            removed.append(p)
            _log.warning("d2serve: removed %s, left by an interrupted run", p)
    return removed


def temp_sibling(out: Path, suffix: str) -> Path:
    """A path for a temporary file beside ``out`` that :func:`clean_stale` removes if this run is killed."""
    out = Path(out)
    return out.parent / f".{out.name}{TMP_TAG}{os.getpid()}-{_HOST}-{suffix}"


# ---------------------------------------------------------------------------------------------- the swap


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with ``renameat2(RENAME_EXCHANGE)``; False when the OS/file system lacks it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl without it
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _replace_two_renames(tmp: Path, out: Path) -> None:
    """Fallback replacement: out -> old, tmp -> out, guarded by a marker that :func:`clean_stale` recovers."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}{os.getpid()}-{_HOST}-old-", dir=out.parent))
    old.rmdir()  # only the unique name is needed
    marker = out.parent / f".{out.name}{SWAP_TAG}{os.getpid()}-{_HOST}.json"
    marker.write_text(json.dumps({"new": tmp.name, "old": old.name}))
    os.rename(out, old)
    try:
        _hook("moved_old")
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # an exception (not a kill) between the renames: put the old output back
        marker.unlink()
        raise
    marker.unlink()
    _remove(old)


def _put_in_place(tmp: Path, out: Path) -> None:
    """Make the complete ``tmp`` the new ``out`` in one atomic step (see the module docstring)."""
    _hook("written")
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
    elif _exchange(tmp, out):
        _hook("swapped")
        _remove(tmp)  # now the old output
    else:
        _replace_two_renames(tmp, out)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; put it in place atomically on success, delete it on error.

    Raises:
        OutputExistsError: ``out`` is non-empty and ``overwrite`` is False (checked
            before any work and again before the final swap).
    """
    out = Path(out)
    prepare_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}{os.getpid()}-{_HOST}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
            raise OutputExistsError(f"{out} appeared while writing; it is replaced only with overwrite")
        _put_in_place(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
