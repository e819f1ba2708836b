"""d2serve's on-disk cache: where it lives, and writing one entry atomically.

The cache only ever holds facts that are cheap to recompute and safe to lose
(e.g. :mod:`d2serve.architecture`'s per-config architecture facts, as plain
JSON, never pickle). Every reader ignores an entry it cannot read or trust and
recomputes it; every writer gives up silently (a ``logging.debug`` line) when
the directory is not writable.

Location: ``$D2SERVE_CACHE_DIR``; when unset or empty, ``$XDG_CACHE_HOME/d2serve``
(an absolute ``XDG_CACHE_HOME`` only, as the XDG spec says) or ``~/.cache/d2serve``.
``D2SERVE_CACHE_DIR=off`` disables the cache.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

ENV = "D2SERVE_CACHE_DIR"

_log = logging.getLogger(__name__)


def cache_dir() -> Path | None:
    """The root directory of d2serve's on-disk cache, or None when ``D2SERVE_CACHE_DIR=off`` (case-insensitive).

    Read from the environment on every call (nothing is created here); see the module docstring for the order.
    """
    value = os.environ.get(ENV, "").strip()
    if value.lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "d2serve"


def write_text_atomic(path: Path, text: str) -> bool:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the whole new one, never a part.

    The text goes to a temporary file in ``path``'s directory (created with its parents if needed) that is then
    renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows); concurrent writers of the same
    entry each rename a complete file, the last one wins.

    Returns:
        True when written; False (and a ``logging.debug`` line, nothing raised) when the directory cannot be
        created or written (read-only, a file in the way, disk full).
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        return True
    except OSError as e:
        _log.debug("d2serve cache: not writing %s: %s", path, e)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False
