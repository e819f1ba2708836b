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

A write the environment refuses (disk full, quota, file too large, a name too
long for the file system, read-only file system, permission; :data:`WRITE_ERRNOS`)
inside :func:`atomic_output_dir` removes the temporary directory and becomes an
:class:`OutputWriteError` (exit 2 at the CLI) naming the path and what to do,
never an ``OSError`` traceback. An ``out`` whose name, with the temporary
sibling's suffix, would not fit the file system's name limit is refused before
any work (:func:`prepare_output_dir`).
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

from d2serve.errors import D2ServeError, InputError, OutputExistsError

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


# ---------------------------------------------------------------------------------------------- refused writes

#: errno values of a write the environment refuses: reported as one line naming the path (exit 2)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG, errno.EROFS, errno.EACCES,
                          errno.EPERM})
_HINTS = {
    errno.ENOSPC: "free space on that file system or choose an --out on another one",
    errno.EDQUOT: "free space within the quota or choose an --out on another file system",
    errno.EFBIG: "the file system's largest file is smaller than this output: choose an --out on another one",
    errno.ENAMETOOLONG: "choose a shorter --out (each name at most 255 bytes on most file systems, fewer here: "
                        "d2serve's temporary sibling adds its own suffix)",
    errno.EROFS: "choose an --out on a writable file system",
}
# the suffix a temporary sibling adds to ``.<name>``: TMP_TAG, pid, host, "-", and up to 32 bytes of its own
# ("old-" + 8 random characters from mkdtemp, "builder-<ns>.log" of the ONNX export, ...)
_SIBLING_SUFFIX_MAX = 32


class OutputWriteError(InputError, OSError):
    """Writing an output failed for a reason of the environment (disk full, name too long, read-only, ...).

    ``errno`` and ``filename`` are those of the underlying :class:`OSError`; the message names the path, the
    reason and what to do, and says that nothing was written.
    """

    def __str__(self) -> str:  # the message as given (OSError's own form would be "[Errno 28] None: None")
        return str(self.args[0]) if self.args else super().__str__()


def is_refused_write(e: BaseException) -> bool:
    """``e`` is an :class:`OSError` (not already a d2serve error) whose errno is in :data:`WRITE_ERRNOS`."""
    return isinstance(e, OSError) and not isinstance(e, D2ServeError) and e.errno in WRITE_ERRNOS


def refused_write(e: OSError, out: str | Path | None) -> OutputWriteError:
    """The :class:`OutputWriteError` of OSError ``e`` raised while writing output ``out`` (whose temporary files
    were removed); ``out`` None: the output is not known (the message then names only the path of ``e``)."""
    where = os.fsdecode(e.filename) if e.filename is not None else str(out or "output")
    reason = (e.strerror or os.strerror(e.errno)) if e.errno else str(e)
    hint = _HINTS.get(e.errno)
    writing = out is not None and str(out) != where and (
        e.filename is None or Path(os.fsdecode(e.filename)).absolute().is_relative_to(Path(out).absolute().parent))
    msg = f"{where}: {reason}" + (f" (writing {out})" if writing else "")  # else: an input that could not be read
    err = OutputWriteError(msg + (f"; {hint}" if hint else "") + ("; nothing was written" if out is not None else ""))
    err.errno, err.filename = e.errno, e.filename
    return err


def _name_max(parent: Path) -> int:
    """The file system's longest name in bytes (``NAME_MAX``) at ``parent`` or its nearest existing ancestor."""
    p = Path(parent).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(os.pathconf(p, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def check_output_name(out: str | Path) -> None:
    """Refuse an ``out`` whose last component, or the temporary sibling made beside it, exceeds the file
    system's name limit (every name here is written with a suffix: ``.<name>.d2serve-tmp-<pid>-<host>-...``).

    Raises:
        OutputWriteError: naming the length, the limit and the longest name that fits (errno ENAMETOOLONG).
    """
    out = Path(out)
    limit = _name_max(out.parent)
    extra = len(os.fsencode(f".{TMP_TAG}{os.getpid()}-{_HOST}-")) + _SIBLING_SUFFIX_MAX
    n = len(os.fsencode(out.name))
    if n + extra > limit:
        err = OutputWriteError(
            f"{out}: the output name is {n} bytes; with the suffix of d2serve's temporary sibling ({extra} bytes) it "
            f"exceeds this file system's limit of {limit} bytes per name: choose a name of at most {limit - extra} "
            "bytes; nothing was written")
        err.errno, err.filename = errno.ENAMETOOLONG, str(out)
        raise err


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
        OutputWriteError: ``out``'s name is too long for the file system (:func:`check_output_name`).
        InputError: ``out`` overlaps an input (the input entry and what it resolves to are named),
            or a path cannot be resolved (symlink loop).
    """
    out = Path(out)
    check_output_name(out)
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
        OutputWriteError: a write refused by the environment (:data:`WRITE_ERRNOS`: disk full, name too long,
            read-only, ...), here or in the caller's block; the temporary directory is removed first.
    """
    out = Path(out)
    prepare_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}{os.getpid()}-{_HOST}-", dir=out.parent))
        tmp.chmod(0o755)
    except OSError as e:
        if is_refused_write(e):
            raise refused_write(e, out) from e
        raise
    try:
        yield tmp
        if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
            raise OutputExistsError(f"{out} appeared while writing; it is replaced only with overwrite")
        _put_in_place(tmp, out)
    except BaseException as e:
        _remove(tmp)
        if is_refused_write(e):
            raise refused_write(e, out) from e
        raise


def write_file_atomic(path: str | Path, data: bytes | str) -> None:
    """Write one file so that readers see the old one or the whole new one (a temporary sibling renamed over
    ``path``); on any error the temporary file is removed.

    Raises:
        OutputWriteError: a write refused by the environment (disk full, name too long, read-only, ...).
    """
    path = Path(path)
    tmp = temp_sibling(path, "file")
    try:
        check_output_name(path)
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if is_refused_write(e):
            raise refused_write(e, path) from e
        raise
