"""Process facts used in reports: peak and current resident memory."""

from __future__ import annotations

import resource
from pathlib import Path


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (e.g. ``VmHWM``) in bytes; None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak RSS in bytes.

    VmHWM from /proc/self/status (the kernel's RSS high-water mark of the current
    address space, reset at exec), else ``getrusage`` (Linux reports KiB). Unlike
    ``ru_maxrss``, VmHWM is not inherited from a parent that forked this process,
    so a fresh child reports only its own peak.
    """
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's resident set size now (VmRSS from /proc/self/status), in bytes; 0 where unavailable.

    With :func:`peak_rss_bytes` taken later, ``peak - current`` is the memory a piece of work added on top
    of what the process already held (imports, caller's data).
    """
    return _status_bytes("VmRSS") or 0
