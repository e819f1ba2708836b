"""Shard I/O of the merge engine: positioned source reads, a background sha256, positioned output writes.

Why not read and write whole tensors: a merge that copies every tensor into
fresh memory, and assembles every output tensor before writing it, spends
most of its time in page faults and copies (measured: half a million minor
faults and ~3.6 s of system time for a 1.7 GB float32 checkpoint, where a
plain safetensors load+save takes 0.8 s). Here:

* :class:`SourceShard` reads a source shard by positioned reads
  (``os.preadv``, no GIL held) straight into the row-block workers' reused
  buffers: no page of the shard becomes resident in this process, so peak RSS
  stays near one row block per worker, not one shard. It is never
  memory-mapped: a mapped file truncated by another writer kills the reader
  with SIGBUS, where a short read is a clear error.
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
import math
import os
import struct
import threading
from pathlib import Path

import torch

from d2serve.checkpoint import SAFETENSORS_DTYPES, CheckpointError, TensorInfo

_ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}  # torch dtype -> safetensors dtype name


class SourceShard:
    """One source safetensors file, read by positioned reads (``os.preadv``) into the caller's buffers.

    Args:
        path: the shard; its header was validated (:func:`d2serve.checkpoint.tensor_infos`), so every
            :class:`TensorInfo` lies inside the file as it was then.

    The file is never memory-mapped: a mapped file truncated in place kills the process with SIGBUS at the
    first touch of a page past its new end, from any thread, at any moment (a check before each read cannot
    close that window when row blocks run on several threads). A positioned read of a file that shrank
    returns fewer bytes instead, which :meth:`read_into` reports as a :class:`CheckpointError` naming the file.
    Reads go from the page cache into buffers the caller reuses (a row block's workspace), so nothing of the
    shard stays resident in this process and no page is faulted in.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self._size = os.fstat(self._fd).st_size
        except BaseException:
            os.close(self._fd)
            raise

    def check_intact(self, need: int | None = None) -> None:
        """Refuse a shard that is now shorter than when it was opened (or than byte ``need``).

        Raises:
            CheckpointError: naming the file, its size now and before.
        """
        if self._fd < 0:
            return
        size = os.fstat(self._fd).st_size
        need = self._size if need is None else need
        if size < need:
            raise CheckpointError(f"{self.path}: the file shrank to {size} bytes while being merged (it had "
                                  f"{self._size}; was it truncated or rewritten in place?); nothing was written: "
                                  "run again on a stable base")

    def tensor(self, info: TensorInfo) -> SourceTensor:
        """The tensor at ``info`` (dtype, shape, absolute byte range), read on demand.

        Raises:
            CheckpointError: the file ends before the tensor's data, or shrank since it was opened.
        """
        if info.end > self._size:
            raise CheckpointError(f"{self.path}: the file ends at byte {self._size}, before tensor data that its "
                                  f"header places at bytes [{info.begin}, {info.end}) (was it changed while being merged?)")
        self.check_intact(info.end)
        return SourceTensor(self, info)

    def read_into(self, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous tensor ``out`` with the file's bytes from ``offset`` on; returns ``out``.

        Raises:
            CheckpointError: the file ended first (it shrank while being merged: named, with its sizes).
        """
        n = out.numel() * out.element_size()
        if not n:
            return out
        view, got = memoryview(out.view(-1).view(torch.uint8).numpy()), 0
        while got < n:  # preadv may return short counts for large reads
            k = os.preadv(self._fd, [view[got:]], offset + got)
            if not k:
                self.check_intact()
                raise CheckpointError(f"{self.path}: the file ended at byte {offset + got} while reading "
                                      f"{n} bytes at offset {offset} (was it changed while being merged?)")
            got += k
        return out

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SourceTensor:
    """A tensor of a :class:`SourceShard`, read in pieces into the caller's buffers.

    Attributes:
        shape, dtype: as the header declares them; ``info`` the header entry.
    """

    def __init__(self, shard: SourceShard, info: TensorInfo):
        self.shard, self.info, self.shape, self.dtype = shard, info, tuple(info.shape), info.dtype

    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def element_size(self) -> int:
        """Bytes per element."""
        return self.dtype.itemsize

    def is_floating_point(self) -> bool:
        """Whether the dtype is a floating type."""
        return self.dtype.is_floating_point

    def read(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor (C order) into ``out`` (contiguous, ``dtype``, ``end -
        start`` elements, any shape, e.g. (rows, in) for a row block of a 2-D weight); returns ``out``.

        Raises:
            ValueError: ``out`` has another dtype or size. CheckpointError: the file shrank (see
            :meth:`SourceShard.read_into`).
        """
        if out.dtype != self.dtype or out.numel() != end - start or not out.is_contiguous():
            raise ValueError(f"{self.info}: a read of elements [{start}, {end}) needs a contiguous {self.dtype} "
                             f"buffer of {end - start} elements, got {out.dtype} {tuple(out.shape)}")
        return self.shard.read_into(self.info.begin + start * self.dtype.itemsize, out)

    def load(self) -> torch.Tensor:
        """The whole tensor, in new memory (``shape``, ``dtype``)."""
        return self.read(0, self.numel(), torch.empty(self.shape, dtype=self.dtype))


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
