"""Row-block merging: one weight at a time, in float64 row blocks, cast once, with its statistics.

Every merge formula is row-wise over output features, so a weight is merged
in blocks of rows: each block is read from the base shard (a positioned read
into the worker's buffer) and made float64, merged by the method (looked up in the registry; this module knows
no formula), checked finite, cast once to the output dtype and handed to
``emit`` (a positioned write into the output file) as soon as it is done.
Blocks run on the merge's row-block worker threads (:func:`d2serve.threads.pick`),
each running its torch ops on one thread with its own preallocated temporaries
(:class:`Workspace`): nothing is allocated per block. After the GEMM a block runs
through the fused kernel (:mod:`d2serve.merge_fused`) when one is loaded, else
through the torch ops; both give the same bytes and statistics. Statistics and errors
are taken in block order, so the bytes, the statistics and the error raised
are those of a serial loop.

:class:`TensorCopy` writes a tensor that is not merged (copied from the base,
cast to the output dtype when needed, or replaced by ``modules_to_save``) in
chunks, with the same finite and overflow checks: no non-finite value is
ever written. :func:`run_in_order` runs both kinds of jobs on the workers.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from d2serve.adapters.methods import Merged, MergeMathError, row_norm

ROW_BLOCK_ELEMENTS = 1 << 18  # float64 temporaries of ~2 MiB per row block: memory flat, cache friendly
COPY_CHUNK_BYTES = 16 << 20  # a copied tensor is checked, cast and written in chunks of at most this many bytes
MAX_ROW_WORKERS = 8  # row-block worker threads: d2serve.threads.pick("merge"), at most this (temporaries per worker)

Emit = Callable[[torch.Tensor, int], None]  # emit(tensor bytes, byte offset inside the output tensor)


def check_finite(name: str, w: torch.Tensor, what: str) -> float:
    """max |w| (0 for an empty tensor), refusing NaN/Inf: one ``aminmax`` pass (NaN and +-Inf propagate
    into min/max), several times cheaper than ``isfinite(w).all()``; the count is taken only on failure.

    With :func:`check_no_overflow` after the cast, every floating tensor written goes through here (merged,
    replaced by ``modules_to_save`` or copied from the base), so no non-finite value is ever written.

    Raises:
        MergeMathError: naming ``what`` and the tensor.
    """
    if not w.numel():
        return 0.0
    lo, hi = (float(x) for x in torch.aminmax(w))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise MergeMathError(f"{what} {name} has {int((~torch.isfinite(w)).sum())} NaN/Inf value(s)")
    return max(-lo, hi)


def check_no_overflow(name: str, big: float, out: torch.Tensor, what: str) -> None:
    """Refuse a cast ``out`` that overflowed its dtype; ``big`` = max |value| before the cast (a value up
    to the dtype's max cannot overflow, so the cast is scanned only when ``big`` exceeds it)."""
    if out.is_floating_point() and big > torch.finfo(out.dtype).max and not torch.isfinite(out).all():
        raise MergeMathError(
            f"{what} {name} overflows {out.dtype} (max |value| {big:.4g} > "
            f"{torch.finfo(out.dtype).max:.4g}); choose the output dtype bfloat16 or float32"
        )


class LayerStats:
    """Per-layer merge statistics accumulated over row blocks (all from float64 values)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = list(shape)
        self.dw_sq = self.w0_sq = 0.0
        self.scale_min, self.scale_max = float("inf"), float("-inf")
        self.n_changed = self.n_lost = 0
        self.max_err = self.max_abs = 0.0

    @staticmethod
    def block(w0: torch.Tensor, w64: torch.Tensor, norms: torch.Tensor, merged: Merged, max_abs: float,
              out: torch.Tensor, dw: torch.Tensor, ws: Workspace) -> tuple:
        """The statistics of one row block, from values the merge already has (no second computation of the
        row scale): W0 as stored and in float64, its row norms ||W0|| (out,), the method's :class:`Merged`
        (W_hat float64, row scale or None), max |W_hat|, the cast W_hat, dW (float64); temporaries live in
        the worker's :class:`Workspace`. Fold with :meth:`add`."""
        flat = dw.reshape(-1)
        scale = None if merged.scale is None else tuple(float(x) for x in torch.aminmax(merged.scale))
        # W_hat == W0 implies cast(W_hat) == cast(W0), so "changed but equal after the cast" is
        # #(cast equal) - #(unchanged), and #(unchanged) is 0 (not counted) when no cast is equal
        exact = torch.promote_types(w0.dtype, out.dtype) == out.dtype  # W0 converts to out's dtype exactly
        w0_cast = w0 if exact else ws.buffer("w0_cast", out.shape, out.dtype).copy_(w0)
        same = ws.buffer("same", out.shape, torch.bool)
        n_same_cast = int(torch.count_nonzero(torch.eq(out, w0_cast, out=same)))
        n_same = int(torch.count_nonzero(torch.eq(merged.weight, w64, out=same))) if n_same_cast else 0
        # (a mixed-dtype sub is several times slower than a cast into float64 and a float64 sub)
        err = ws.buffer("err", out.shape, torch.float64).copy_(out).sub_(merged.weight)
        lo, hi = torch.aminmax(err)
        return (float(torch.dot(flat, flat)), float(torch.dot(norms, norms)), scale, out.numel() - n_same,
                n_same_cast - n_same, max(-float(lo), float(hi)), max_abs)

    def add(self, part: tuple) -> None:
        """Fold one row block's :meth:`block` statistics in (in block order, so sums are reproducible)."""
        dw_sq, w0_sq, scale, n_changed, n_lost, max_err, max_abs = part
        self.dw_sq += dw_sq
        self.w0_sq += w0_sq
        if scale is not None:
            self.scale_min, self.scale_max = min(self.scale_min, scale[0]), max(self.scale_max, scale[1])
        self.n_changed += n_changed
        self.n_lost += n_lost
        self.max_err = max(self.max_err, max_err)
        self.max_abs = max(self.max_abs, max_abs)

    def to_json(self) -> dict:
        """The manifest entry of the layer."""
        return {
            "shape": self.shape,
            "delta_norm_ratio": (self.dw_sq / self.w0_sq) ** 0.5 if self.w0_sq else float("inf"),
            "scale_min": self.scale_min if self.scale_min != float("inf") else None,
            "scale_max": self.scale_max if self.scale_max != float("-inf") else None,
            "frac_unchanged_by_cast": self.n_lost / max(self.n_changed, 1),
            "cast_max_abs_err": self.max_err,
            "cast_max_rel_err": self.max_err / self.max_abs if self.max_abs else 0.0,
        }


class Workspace:
    """One row-block worker's temporaries, allocated once per merge and reused for every block.

    A fresh multi-MiB tensor per op costs an mmap, page faults on first touch and an munmap (glibc serves
    allocations this large from mmap): measured here, that was half of the merge's time. :meth:`buffer`
    returns a view of a named buffer that only grows, so after the first blocks nothing is allocated.
    """

    def __init__(self):
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape``/``dtype`` (its contents are whatever was left)."""
        n = math.prod(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self._bufs[(name, dtype)] = torch.empty(max(n, ROW_BLOCK_ELEMENTS), dtype=dtype)
        return buf[:n].view(shape)


class Workspaces:
    """A free list of :class:`Workspace` objects, one per row-block worker (blocks take one and give it back)."""

    def __init__(self, n: int):
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(max(1, n)):
            self._free.put(Workspace())

    def take(self) -> Workspace:
        return self._free.get()

    def give(self, ws: Workspace) -> None:
        self._free.put(ws)


Task = Callable[[Workspace], object]  # one row block or chunk, run on a worker with its workspace


class LayerMerge:
    """The merge of one weight as row-block tasks (every formula is row-wise) and a :meth:`finish` step.

    Args:
        target: the output tensor name (for error messages).
        w: the stored base weight, any float dtype: a :class:`d2serve.merge_io.SourceTensor` (read row block
            by row block into the worker's buffer) or an in-memory tensor; (out, in) for nn.Linear, (in, out)
            for Conv1D or an nn.Embedding (``transposed``), in which case it is read whole when the first block
            runs, the math runs on its transpose and the result is stored back as (in, out).
        f: the layer's :class:`d2serve.adapters.methods.LayerFactors`; ``method``: its registry entry.
        out_dtype: the output dtype (W_hat is computed in float64 and cast once).
        emit: ``emit(tensor, byte_offset)`` receives the output bytes: each finished row block (C order, at
            its offset in the output tensor) as soon as it is done, from a worker thread; a transposed
            weight is assembled and emitted once, whole, by :meth:`finish`.
        check_fingerprint: ``check(W0 rows float64, d2_magnitude rows, their norms)``, run on each block
            that carries a magnitude.
        kernel: a :class:`d2serve.merge_fused.Handle` or None for the torch path. The kernel is used for a method
            with a ``fused_form``, a non-transposed weight and dtypes it supports (:attr:`fused`), on every block
            that starts once it is loaded; its bytes and statistics are those of the torch path (a block it flags
            is redone on the torch path).

    Each task raises MergeMathError (NaN/Inf, a zero-norm row, an overflow of ``out_dtype``, naming
    ``target``) or the fingerprint check's error.
    """

    def __init__(self, target: str, w, f, method, out_dtype: torch.dtype, emit: Emit,
                 check_fingerprint=None, transposed: bool = False, kernel=None):
        self.target, self.f, self.method, self.out_dtype, self.emit = target, f, method, out_dtype, emit
        self.check_fingerprint, self.transposed = check_fingerprint, transposed
        self.src = w
        rows_all, cols = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        self.shape = (rows_all, cols)  # the (out, in) shape the math runs on
        self.w: torch.Tensor | None = None  # transposed: the whole weight's transpose, read by the first block
        self.stored: torch.Tensor | None = None  # transposed: the whole output, made by the first block
        self.b_all = self.a = None  # dW = B' @ A': folded and made float64 once, by the first block
        self._lock = threading.Lock()
        rows = max(1, ROW_BLOCK_ELEMENTS // max(1, cols))
        self.spans = [(s, min(s + rows, rows_all)) for s in range(0, rows_all, rows)]
        self.row_bytes = cols * out_dtype.itemsize
        from d2serve import merge_fused

        contiguous = not isinstance(w, torch.Tensor) or w.is_contiguous()
        self.kernel = kernel if (kernel is not None and method.fused_form is not None and not transposed
                                 and merge_fused.supports(w.dtype) and merge_fused.supports(out_dtype)
                                 and out_dtype != torch.float64 and contiguous) else None

    @property
    def fused(self) -> bool:
        """Whether the row blocks may run through the fused kernel (those run once it is loaded)."""
        return self.kernel is not None

    def tasks(self) -> list[Task]:
        """One task per row block, in row order."""
        return [lambda ws, s=s, e=e: self._block(ws, s, e) for s, e in self.spans]

    def _prepare(self) -> None:
        """What every block needs, made once when the first block runs (queued layers hold nothing yet)."""
        with self._lock:
            if self.a is None:
                if self.transposed:
                    self.w = _whole(self.src).t()
                    self.stored = torch.empty(self.w.t().shape, dtype=self.out_dtype)
                self.b_all, self.a = self.method.low_rank(self.f, torch.float64)

    def _rows(self, ws: Workspace, start: int, end: int) -> torch.Tensor:
        """W0 rows [start, end) as stored (their dtype): a view of the whole transposed weight, or read into the
        worker's buffer."""
        if self.w is not None:
            return self.w[start:end]
        if isinstance(self.src, torch.Tensor):
            return self.src[start:end]
        return self.src.read(start * self.shape[1], end * self.shape[1],
                             ws.buffer("src", (end - start, self.shape[1]), self.src.dtype))

    def _block(self, ws: Workspace, start: int, end: int) -> tuple:
        if self.kernel is not None:
            kernel = self.kernel.get()
            self.kernel.count(kernel is not None)
            if kernel is not None:
                return self._block_fused(kernel, ws, start, end)
        return self._block_torch(ws, start, end)

    def _block_fused(self, kernel, ws: Workspace, start: int, end: int) -> tuple:
        """One row block through the fused kernel: the same bytes and statistics as :meth:`_block_torch`."""
        from d2serve import merge_fused

        self._prepare()
        fb = self.f.row_block(start, end, self.method.row_factors)
        w0 = self._rows(ws, start, end)
        rows = end - start
        shape = (rows, self.shape[1])
        dw = torch.mm(self.b_all[start:end], self.a, out=ws.buffer("dw", shape, torch.float64))
        out = ws.buffer("out", shape, self.out_dtype)
        norms, scale = ws.buffer("norms", (rows,), torch.float64), ws.buffer("scale", (rows,), torch.float64)
        form = self.method.fused_form
        mag = fb.tensors[self.method.fused_magnitude].to(torch.float64) if form == "rescale" else None
        flag, big, max_err, n_same_cast, n_same = merge_fused.run_rows(kernel, w0, dw, mag, form, out, norms, scale)
        if flag != merge_fused.OK:  # a zero norm, NaN/Inf or an overflow: the torch path raises its own error
            return self._block_torch(ws, start, end)
        if self.check_fingerprint is not None and fb.magnitude is not None:
            self.check_fingerprint(w0, fb.magnitude, norms)
        flat = dw.reshape(-1)
        n_same = n_same if n_same_cast else 0
        part = (float(torch.dot(flat, flat)), float(torch.dot(norms, norms)),
                None if form == "add" else tuple(float(x) for x in torch.aminmax(scale)),
                out.numel() - n_same, n_same_cast - n_same, max_err, big)
        self.emit(out, start * self.row_bytes)
        return part

    def _block_torch(self, ws: Workspace, start: int, end: int) -> tuple:
        self._prepare()
        fb = self.f.row_block(start, end, self.method.row_factors)
        w0 = self._rows(ws, start, end)
        shape = (end - start, self.shape[1])
        w64 = ws.buffer("w0", shape, torch.float64).copy_(w0)
        norms = row_norm(w64)
        if self.check_fingerprint is not None and fb.magnitude is not None:
            self.check_fingerprint(w64, fb.magnitude, norms)
        dw = torch.mm(self.b_all[start:end], self.a, out=ws.buffer("dw", shape, torch.float64))
        merged = self.method.merge(w64, fb, torch.float64, dw, norms, out=ws.buffer("merged", shape, torch.float64))
        big = check_finite(self.target, merged.weight, "merged tensor")
        # the one cast: into the stored layout (transposed) or into a buffer written out at once
        out = self.stored.t()[start:end] if self.transposed else ws.buffer("out", shape, self.out_dtype)
        out.copy_(merged.weight)
        check_no_overflow(self.target, big, out, "merged tensor")
        part = LayerStats.block(w0, w64, norms, merged, big, out, dw, ws)
        if not self.transposed:
            self.emit(out, start * self.row_bytes)
        return part

    def finish(self, parts: list[tuple]) -> dict:
        """Fold the blocks' statistics in row order (emit a transposed weight); the layer's manifest entry."""
        stats = LayerStats(self.shape)
        for part in parts:
            stats.add(part)
        if self.stored is not None:
            self.emit(self.stored, 0)
        self.w = self.stored = self.b_all = self.a = None
        return stats.to_json()


def _whole(t) -> torch.Tensor:
    """An in-memory tensor as it is; a :class:`d2serve.merge_io.SourceTensor` read whole into new memory."""
    return t if isinstance(t, torch.Tensor) else t.load()


class TensorCopy:
    """Writing a tensor that is not merged, as chunk tasks: cast to ``out_dtype`` when it differs (floating
    tensors), every floating value checked finite and within ``out_dtype`` (:func:`check_finite`,
    :func:`check_no_overflow`).

    Args:
        name: tensor name for messages (``what`` says which kind: ``base tensor``, ``modules_to_save tensor``).
        t: a :class:`d2serve.merge_io.SourceTensor` of the base shard (each chunk read into the worker's
            buffer) or an in-memory contiguous tensor (``modules_to_save``).
        out_dtype: the dtype written for a floating tensor; None writes ``t`` as it is (integer tensors).
        emit: ``emit(chunk, byte_offset)`` receives the output bytes.
        what: ``base tensor`` or ``modules_to_save tensor``, for messages.
        kernel: a :class:`d2serve.merge_fused.Handle` whose C kernel, once loaded, takes max |value| and the
            NaN/Inf test in one integer pass (torch's ``aminmax`` is slow on bfloat16); a chunk it finds
            non-finite is checked again by :func:`check_finite` for the message.

    A task raises MergeMathError for a NaN/Inf value (the count is over the whole tensor) or an overflow of
    ``out_dtype``.
    """

    def __init__(self, name: str, t, out_dtype: torch.dtype | None, emit: Emit, what: str, kernel=None):
        self.name, self.src, self.emit, self.what = name, t, emit, what
        self.kernel = kernel  # a merge_fused.Handle: its C kernel checks chunks (same result as check_finite)
        self.floating = t.is_floating_point() and out_dtype is not None
        self.dtype = out_dtype if self.floating else t.dtype
        n = max(1, COPY_CHUNK_BYTES // max(t.element_size(), self.dtype.itemsize))
        self.spans = [(s, min(s + n, t.numel())) for s in range(0, t.numel(), n)]

    def tasks(self) -> list[Task]:
        """One task per chunk, in order."""
        return [lambda ws, s=s, e=e: self._chunk(ws, s, e) for s, e in self.spans]

    def _chunk(self, ws: Workspace, start: int, end: int) -> None:
        if isinstance(self.src, torch.Tensor):
            chunk = self.src.reshape(-1)[start:end]
        else:
            chunk = self.src.read(start, end, ws.buffer("chunk", (end - start,), self.src.dtype))
        out = chunk
        if self.floating:
            kernel = self.kernel.get() if self.kernel is not None else None
            big = kernel.check_finite(chunk) if hasattr(kernel, "check_finite") and chunk.is_contiguous() else None
            try:
                if big is None:  # no kernel, or a NaN/Inf: torch's check (its count and message)
                    big = check_finite(self.name, chunk, self.what)
            except MergeMathError:
                check_finite(self.name, _whole(self.src).reshape(-1), self.what)  # the message counts the whole tensor's NaN/Inf
                raise
            if self.dtype != chunk.dtype:
                out = ws.buffer("copy", chunk.shape, self.dtype).copy_(chunk)
                check_no_overflow(self.name, big, out, self.what)
        self.emit(out, start * self.dtype.itemsize)

    def finish(self, parts: list) -> None:
        """Nothing to fold."""
        return None


def run_in_order(jobs: list, pool: ThreadPoolExecutor | None, workspaces: Workspaces,
                 done: Callable[[], None] | None = None, before: Callable[[], None] | None = None) -> list:
    """Run every task of ``jobs`` (:class:`LayerMerge` / :class:`TensorCopy`) on ``pool``, all queued at once so
    the workers never wait for one tensor to finish before starting the next; then each job's :meth:`finish`
    on its tasks' results, in job order. Serial (``pool`` None): the tasks run here, in order.

    Errors are taken in submission order, so the error raised is the one the serial loop raises first; on an
    error the tasks not started are cancelled and the running ones awaited before it propagates.

    ``done()`` is called after each job's ``finish`` (e.g. to advance a progress bar); ``before()`` before each
    task (e.g. to check that the source file did not shrink; what it raises is the task's error).

    Returns:
        each job's ``finish`` result, in job order.
    """

    def finish(job, parts: list):
        r = job.finish(parts)
        if done is not None:
            done()
        return r

    def run(task: Task):
        if before is not None:
            before()
        ws = workspaces.take()
        try:
            return task(ws)
        finally:
            workspaces.give(ws)

    if pool is None:
        return [finish(job, [run(t) for t in job.tasks()]) for job in jobs]
    futures = [[pool.submit(run, t) for t in job.tasks()] for job in jobs]
    try:
        return [finish(job, [fu.result() for fu in fus]) for job, fus in zip(jobs, futures, strict=True)]
    finally:  # on an error: drop the tasks not started, wait for the running ones
        flat = [fu for fus in futures for fu in fus]
        for fu in flat:
            fu.cancel()
        for fu in flat:
            if not fu.cancelled():
                fu.exception()

