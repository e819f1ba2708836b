"""Shard I/O of the merge engine: mapped source shards, a background sha256, positioned output writes.

Why not read and write whole tensors: a merge that copies every tensor into
fresh memory, and assembles every output tensor before writing it, spends
most of its time in page faults and copies (measured: half a million minor
faults and ~3.6 s of system time for a 1.7 GB float32 checkpoint, where a
plain safetensors load+save takes 0.8 s). Here:

* :class:`MappedShard` maps a source shard read-only (copy-on-write, so no
  write can reach the file) and hands out zero-copy tensor views; the pages of
  a tensor are dropped from this process's resident set once it is consumed
  (``madvise(MADV_DONTNEED)``; they stay in the page cache), so peak RSS stays
  near one row block, not one shard.
* :class:`ShardHasher` computes the sha256 of every base shard in its own
  thread with its own sequential reads (``hashlib`` releases the GIL), started
  before the architecture checks so that on a cold start it overlaps them.
* :class:`ShardOut` writes a safetensors file by positioned writes
  (``os.pwrite``, no GIL held): the header first, then every tensor's bytes at
  its offset, from any thread and in any order (row blocks of a merged weight
  as they finish); :meth:`ShardOut.close` refuses a file with a byte range left
  unwritten. The layout is what ``safetensors`` writes: an 8-byte little-endian
  header length, a JSON header padded with spaces to a multiple of 8, the data
  with tensors ordered by element size (largest first) so every tensor starts
  aligned.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from pathlib import Path

import torch

from d2serve.checkpoint import SAFETENSORS_DTYPES, CheckpointError, TensorInfo, read_tensor

_ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}  # torch dtype -> safetensors dtype name
_PAGE = mmap.PAGESIZE


class MappedShard:
    """A read-only (copy-on-write) memory map of one safetensors file.

    Args:
        path: the shard; its header was validated (:func:`d2serve.checkpoint.tensor_infos`), so every
            :class:`TensorInfo` lies inside the file.

    Tensors from :meth:`tensor` are views of the mapping (no copy): valid until :meth:`close`. On a file
    system that cannot map the file (``mmap`` raises OSError) each tensor is read instead (a positioned read).

    A file truncated in place while mapped would kill the process with SIGBUS at the first touch of a page past
    its new end. So the file stays open and its size is checked (``fstat``, microseconds) by :meth:`tensor` and
    by :meth:`check_intact`, which the merge calls before every row block or chunk it reads: a shard that
    shrank is a :class:`CheckpointError` naming it. What no check can cover is a truncation during the read of
    one block (milliseconds); docs/adapter-format.md ("A base changed during a merge") gives the recovery.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._mm = None
        self._file = open(self.path, "rb")  # noqa: SIM115 -- kept open for the size checks, closed by close()
        try:
            self._size = os.fstat(self._file.fileno()).st_size
            if self._size:
                try:
                    self._mm = mmap.mmap(self._file.fileno(), self._size, access=mmap.ACCESS_COPY)
                except OSError:  # e.g. a FUSE file system without mmap: read tensors instead
                    self._mm = None
        except BaseException:
            self._file.close()
            raise

    def check_intact(self, need: int | None = None) -> None:
        """Refuse a shard that is now shorter than when it was mapped (or than byte ``need``): reading a mapped
        page past the end of a file kills the process (SIGBUS).

        Raises:
            CheckpointError: naming the file, its size now and before.
        """
        if self._file.closed:
            return
        size = os.fstat(self._file.fileno()).st_size
        need = self._size if need is None else need
        if size < need:
            raise CheckpointError(f"{self.path}: the file shrank to {size} bytes while being merged (it had "
                                  f"{self._size}; was it truncated or rewritten in place?); nothing was written: "
                                  "run again on a stable base")

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        """The tensor at ``info`` (dtype, shape, absolute byte range): a view of the mapping, or a copy when its
        offset is not a multiple of its element size (a file safetensors itself would not write) or the file
        could not be mapped."""
        n = info.end - info.begin
        if not n:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._mm is None or info.begin % info.dtype.itemsize:  # not mapped, or not viewable: read it
            return read_tensor(self.path, info)
        if info.end > len(self._mm):
            raise CheckpointError(f"{self.path}: the file ends at byte {len(self._mm)}, before tensor data that its "
                                  f"header places at bytes [{info.begin}, {info.end}) (was it changed while being merged?)")
        self.check_intact(info.end)  # shrunk since it was mapped
        return torch.frombuffer(self._mm, dtype=info.dtype, count=n // info.dtype.itemsize,
                                offset=info.begin).reshape(info.shape)

    def release(self, begin: int, end: int) -> None:
        """Drop the whole pages inside bytes [begin, end) from this process's resident set (they are re-read
        from the page cache if touched again; the mapping is never written, so nothing is lost)."""
        lo, hi = -(-begin // _PAGE) * _PAGE, end // _PAGE * _PAGE
        if self._mm is not None and hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        """Unmap (views handed out must be gone; if one is still alive the mapping is freed with it) and close
        the file."""
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view still references it (e.g. held by an exception traceback)
                pass
            self._mm = None
        self._file.close()


class ShardHasher:
    """sha256 of files, computed in a background thread with sequential reads in 1 MiB chunks.

    Args:
        paths: the files, hashed in this order.

    The files' identity (device, inode, size, modification time) is taken at construction and checked again
    by :meth:`result`: a digest is only returned for a file left unchanged from the start of the work to the
    end (the merge reads the shards through their own mapping, so this is what ties the digest to the bytes
    merged). Use :meth:`stop` to abandon the work (on an error elsewhere).
    """

    CHUNK = 1 << 20  # fits in L2: the hash reads what the kernel just copied

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self._stamps = {p: _stamp(p) for p in self.paths}
        self._digests: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="d2serve-merge-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(self.CHUNK)
        view = memoryview(buf)
        try:
            for p in self.paths:
                h = hashlib.sha256()
                with open(p, "rb", buffering=0) as f:
                    while not self._stop.is_set():
                        k = f.readinto(buf)
                        if not k:
                            break
                        h.update(view[:k])
                if self._stop.is_set():
                    return
                self._digests[p] = h.hexdigest()
        except BaseException as e:  # handed to the caller of result()
            self._error = e

    def result(self) -> dict[Path, str]:
        """Path -> hex sha256 of every file (waits for the thread).

        Raises:
            OSError: a file could not be read.
            CheckpointError: a file changed (or was replaced) since the hasher was made.
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        for p, before in self._stamps.items():
            if _stamp(p) != before:
                raise CheckpointError(f"{p}: the file changed while it was being merged (size, modification time or "
                                      "inode differ from the start); nothing was written: run again on a stable base")
        return dict(self._digests)

    def stop(self) -> None:
        """Abandon the remaining work and wait for the thread to end."""
        self._stop.set()
        self._thread.join()


def _stamp(path: Path) -> tuple[int, int, int, int]:
    """(device, inode, size, modification time in ns) of ``path``."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class ShardOut:
    """One safetensors file written by positioned writes: header at creation, then tensor bytes at their offsets.

    Args:
        path: file to create (must not exist).
        specs: (name, dtype, shape) of every tensor the file will hold.
        metadata: ``__metadata__`` strings (e.g. ``{"format": "pt"}``).

    :meth:`write` may be called from several threads at once, for disjoint byte ranges of any tensors,
    in any order.

    Raises:
        CheckpointError: a write outside its tensor, with another dtype, or overlapping bytes already
            written (:meth:`write`); :meth:`close` with bytes of a tensor never written.
    """

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = Path(path)
        ordered = sorted(specs, key=lambda s: -s[1].itemsize)  # stable: keeps the given order within a size
        header: dict = {"__metadata__": dict(metadata)}
        offset = 0
        self._spans: dict[str, tuple[torch.dtype, int, int]] = {}  # name -> (dtype, begin, end) relative to data
        for name, dtype, shape in ordered:
            n = dtype.itemsize
            for d in shape:
                n *= d
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._spans[name] = (dtype, offset, offset + n)
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._written: dict[str, int] = dict.fromkeys(self._spans, 0)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _pwrite_all(self._fd, struct.pack("<Q", len(raw)) + raw, 0)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, name: str, tensor: torch.Tensor, byte_offset: int = 0) -> None:
        """Write ``tensor``'s bytes (C-contiguous order) at ``byte_offset`` inside tensor ``name``'s data."""
        dtype, begin, end = self._spans[name]
        if tensor.dtype != dtype:
            raise CheckpointError(f"{self.path}: tensor {name} is declared {dtype}, written as {tensor.dtype}")
        t = tensor.detach().contiguous()
        n = t.numel() * t.element_size()
        if byte_offset < 0 or begin + byte_offset + n > end:
            raise CheckpointError(f"{self.path}: {n} bytes at offset {byte_offset} do not fit tensor {name} "
                                  f"({end - begin} bytes)")
        if n:
            _pwrite_all(self._fd, memoryview(t.reshape(-1).view(torch.uint8).numpy()),
                        self._data_start + begin + byte_offset)
        with self._lock:
            self._written[name] += n
            if self._written[name] > end - begin:
                raise CheckpointError(f"{self.path}: tensor {name} written more than once")

    def close(self) -> None:
        """Close the file; refuse one with tensor bytes never written.

        Raises:
            CheckpointError: naming the first incomplete tensor.
        """
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        short = [n for n, (_, b, e) in self._spans.items() if self._written[n] != e - b]
        if short:
            raise CheckpointError(f"{self.path}: {len(short)} declared tensor(s) not completely written "
                                  f"(first: {short[0]})")

    def abort(self) -> None:
        """Close without the completeness check (the caller discards the file)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ShardOut:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _pwrite_all(fd: int, data, offset: int) -> None:
    """``os.pwrite`` until every byte is written (it may write fewer bytes than given)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        k = os.pwrite(fd, view[done:], offset + done)
        if k <= 0:
            raise OSError(f"pwrite wrote {k} bytes")
        done += k
