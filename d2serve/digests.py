"""sha256 of input files, computed once per file version: a cache in d2serve's cache directory.

A merge records the sha256 of every base shard and adapter file; hashing a 1.7 GB checkpoint costs
~1.3 CPU-seconds (SHA-NI), as much as the whole I/O floor of the merge. The digest of a file is therefore
kept in ``$D2SERVE_CACHE_DIR/sha256/`` (:mod:`d2serve.cache`), one small JSON entry keyed by the file's
identity (device, inode, size, modification time in ns). An entry is trusted only for that exact identity:
a file rewritten, touched or replaced gets a new key and is hashed again. The identity of every file is taken
when the merge starts and checked again when it ends (a file that changed in between is refused, whatever
the source of its digest).

A file of a Hugging Face hub cache (``.../models--ORG--NAME/blobs/<sha256>``, reached through its
``snapshots/`` symlink) whose blob name is 64 hex digits is stored by git LFS under its sha256: that name
is used without reading the file, and the manifest says so (source ``hf_lfs_blob_name``).

One run that reads the same files several times (``serve --adapter`` with N adapters: the key of each folded
folder and its manifest) asks one :class:`DigestMemo`: each file version is looked up or hashed once per run,
also with the cache off.

Sources recorded in the manifest (``sha256_sources``): ``computed`` (read and hashed by this merge, in the
background thread of :class:`d2serve.merge_io.ShardHasher`), ``cache`` (a cache entry of the same file
identity), ``hf_lfs_blob_name``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from d2serve import cache
from d2serve.checkpoint import CheckpointError
from d2serve.merge_io import ShardHasher, _stamp

_log = logging.getLogger(__name__)
_HEX64 = re.compile(r"[0-9a-f]{64}")
COMPUTED, CACHED, HF_BLOB = "computed", "cache", "hf_lfs_blob_name"


def _entry(stamp: tuple[int, int, int, int]) -> Path | None:
    root = cache.cache_dir()
    return None if root is None else root / "sha256" / ("-".join(str(x) for x in stamp) + ".json")


def hf_blob_sha256(path: Path) -> str | None:
    """The sha256 a Hugging Face hub cache names ``path`` by (its resolved file is ``models--*/blobs/<64 hex>``;
    git LFS stores a file under its sha256), else None."""
    try:
        real = Path(path).resolve(strict=True)
    except OSError:
        return None
    if real.parent.name == "blobs" and _HEX64.fullmatch(real.name) and real.parent.parent.name.startswith(
            ("models--", "datasets--")):
        return real.name
    return None


def lookup(path: Path, stamp: tuple[int, int, int, int]) -> tuple[str, str] | None:
    """(sha256, source) of ``path`` at identity ``stamp`` without reading it (HF blob name or a cache entry);
    None when it has to be hashed. An unreadable or inconsistent entry counts as absent."""
    blob = hf_blob_sha256(path)
    if blob is not None:
        return blob, HF_BLOB
    entry = _entry(stamp)
    if entry is None:
        return None
    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
        digest = data["sha256"]
        if list(data["stamp"]) == list(stamp) and isinstance(digest, str) and _HEX64.fullmatch(digest):
            return digest, CACHED
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def store(path: Path, stamp: tuple[int, int, int, int], digest: str) -> None:
    """Keep ``digest`` for the file identity ``stamp`` (silently nothing when the cache is off or read-only)."""
    entry = _entry(stamp)
    if entry is not None:
        cache.write_text_atomic(entry, json.dumps({"sha256": digest, "stamp": list(stamp), "path": str(path)}))


class CachedHasher:
    """The sha256 of ``paths`` for a merge: known digests looked up (:func:`lookup`), the others hashed in the
    background by a :class:`ShardHasher` (started here) and stored in the cache once the merge ends with the
    files unchanged.

    Attributes:
        sources: path -> ``computed`` | ``cache`` | ``hf_lfs_blob_name``.
        hashed: the paths this merge reads to hash them.
        stamps: path -> its identity (device, inode, size, mtime_ns) when the hasher was made.
    """

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self.stamps = {p: _stamp(p) for p in self.paths}
        self._known: dict[Path, str] = {}
        self.sources: dict[Path, str] = {}
        for p in self.paths:
            hit = lookup(p, self.stamps[p])
            if hit is not None:
                self._known[p], self.sources[p] = hit
            else:
                self.sources[p] = COMPUTED
        self.hashed = [p for p in self.paths if p not in self._known]
        self._inner = ShardHasher(self.hashed)

    def result(self) -> dict[Path, str]:
        """Path -> hex sha256 of every file (waits for the hashing).

        Raises:
            OSError: a file could not be read.
            CheckpointError: a file changed (or was replaced) since the hasher was made.
        """
        digests = self._inner.result()
        for p, before in self.stamps.items():
            if _stamp(p) != before:
                raise CheckpointError(f"{p}: the file changed while it was being merged (size, modification time or "
                                      "inode differ from the start); nothing was written: run again on a stable base")
        for p in self.hashed:
            store(p, self.stamps[p], digests[p])
        return {p: digests.get(p, self._known.get(p)) for p in self.paths}

    def stop(self) -> None:
        """Abandon the remaining hashing and wait for its thread to end."""
        self._inner.stop()


def sha256_files(paths: list[Path]) -> dict[Path, str]:
    """Path -> hex sha256 of each file, from the cache when known (:func:`lookup`), else read and hashed (and the
    digest kept); what every reader of input digests uses (merge manifest checks, exports, bench provenance).

    Raises:
        OSError: a file could not be read.
        CheckpointError: a file changed while it was being hashed.
    """
    return CachedHasher(list(paths)).result()


class DigestMemo:
    """The sha256 of files for one run: each file is looked up or hashed at most once, however often it is asked
    for (while its identity, device, inode, size and mtime, is unchanged; a changed file is hashed again)."""

    def __init__(self):
        self._known: dict[Path, tuple[tuple[int, int, int, int], str]] = {}

    def sha256_files(self, paths: list[Path]) -> dict[Path, str]:
        """Path -> hex sha256 of each file, as :func:`sha256_files` for the files not asked for before.

        Raises:
            OSError: a file could not be read.
            CheckpointError: a file changed while it was being hashed.
        """
        paths = [Path(p) for p in paths]
        todo = [p for p in dict.fromkeys(paths) if p not in self._known or self._known[p][0] != _stamp(p)]
        if todo:
            hasher = CachedHasher(todo)
            sums = hasher.result()
            self._known |= {p: (hasher.stamps[p], sums[p]) for p in todo}
        return {p: self._known[p][1] for p in paths}
