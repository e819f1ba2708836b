"""The streaming merge engine: base shards x adapter method -> merged HF checkpoint + manifest.

The engine reads the base one safetensors shard at a time, replaces each
adapted weight with ``method.merge`` (looked up in the registry; the engine
knows no formula) computed in float64 in row blocks, checks it is finite, casts
it once to the output dtype, and writes the shard under the same name. Peak
memory is about the largest tensor (in and out) plus the adapter, never the
whole model.

Three threads overlap the work: one reads the next source tensors (hashing
each base shard for the manifest in the same pass), the caller's thread merges
(torch ops use every torch thread), one writes finished tensors. The bytes in
flight are capped at the largest single tensor's input + output, so the
pipeline never holds more than the sequential engine did. Untouched tensors
are written as the bytes read (no decode/encode); the statistics of the
manifest come from the same pass as the merge.

The output is a complete HF checkpoint written into a temporary directory and
renamed into place at the end: config (no ``quantization_config``, ``dtype``
matching the tensors), the same shard layout and a consistent index, every
side file of the base (tokenizer, chat template, generation_config), and a
manifest ``d2serve_merge.json``.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from d2serve import __version__
from d2serve.adapters.io import Adapter, load_adapter, match_to_base
from d2serve.adapters.methods import Merged, MergeMathError, get_method, row_norm
from d2serve.architecture import (
    check_base_copies,
    check_layer_kinds,
    require_full_precision_base,
    tie_plan,
)
from d2serve.checkpoint import (
    DTYPE_NAMES,
    INDEX_FILE,
    Checkpoint,
    HashingShardReader,
    ShardWriter,
    atomic_output_dir,
    copy_side_entries,
    prepare_output_dir,
    set_config_dtype,
    sha256_file,
    write_json,
    write_order,
)
from d2serve.errors import InputError
from d2serve.sysinfo import peak_rss_bytes

MANIFEST_NAME = "d2serve_merge.json"
MAGNITUDE_RTOL = 2e-3


class WrongBaseError(InputError):
    """The adapter's ``d2_magnitude`` fingerprint does not match the base weights given."""


@dataclass
class MergeResult:
    """Outcome of :func:`merge`.

    Attributes:
        out: the merged checkpoint directory.
        manifest: the content of ``d2serve_merge.json``.
        seconds: wall time of the merge, in seconds.
        peak_rss_bytes: peak resident set size of this process so far, in bytes
            (VmHWM; run the merge in a fresh process to measure it alone, as ``d2serve merge`` does).
    """

    out: Path
    manifest: dict
    seconds: float
    peak_rss_bytes: int


def resolve_dtype(dtype: str, base: Checkpoint) -> torch.dtype:
    """``auto`` -> the base's weight dtype; else one of float32, bfloat16, float16.

    Raises:
        ValueError: unknown dtype name.
    """
    if dtype == "auto":
        return base.dtype
    if dtype not in DTYPE_NAMES or dtype == "float64":
        raise InputError(f"dtype {dtype!r} not supported; expected auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[dtype]


def _cast_checked(name: str, w: torch.Tensor, dtype: torch.dtype, what: str = "merged tensor") -> torch.Tensor:
    """Cast a floating tensor once to ``dtype``, refusing NaN/Inf and values that overflow ``dtype``.

    Every floating tensor written goes through here (merged, replaced by
    ``modules_to_save`` or copied from the base), so no non-finite value is ever written.

    Raises:
        MergeMathError: naming ``what`` and the tensor.
    """
    big = _check_finite(name, w, what)
    out = w.to(dtype)
    _check_no_overflow(name, big, out, what)
    return out


def _check_finite(name: str, w: torch.Tensor, what: str) -> float:
    """max |w| (0 for an empty tensor), refusing NaN/Inf: one ``aminmax`` pass (NaN and +-Inf propagate
    into min/max), several times cheaper than ``isfinite(w).all()``; the count is taken only on failure."""
    if not w.numel():
        return 0.0
    lo, hi = (float(x) for x in torch.aminmax(w))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise MergeMathError(f"{what} {name} has {int((~torch.isfinite(w)).sum())} NaN/Inf value(s)")
    return max(-lo, hi)


def _check_no_overflow(name: str, big: float, out: torch.Tensor, what: str) -> None:
    """Refuse a cast ``out`` that overflowed its dtype; ``big`` = max |value| before the cast (a value up
    to the dtype's max cannot overflow, so the cast is scanned only when ``big`` exceeds it)."""
    if out.is_floating_point() and big > torch.finfo(out.dtype).max and not torch.isfinite(out).all():
        raise MergeMathError(
            f"{what} {name} overflows {out.dtype} (max |value| {big:.4g} > "
            f"{torch.finfo(out.dtype).max:.4g}); choose the output dtype bfloat16 or float32"
        )


class _LayerStats:
    """Per-layer merge statistics accumulated over row blocks (all from float64 values)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = list(shape)
        self.dw_sq = self.w0_sq = 0.0
        self.scale_min, self.scale_max = float("inf"), float("-inf")
        self.n_changed = self.n_lost = 0
        self.max_err = self.max_abs = 0.0

    @staticmethod
    def block(w0: torch.Tensor, w64: torch.Tensor, norms: torch.Tensor, merged: Merged, max_abs: float,
              out: torch.Tensor, dw: torch.Tensor) -> tuple:
        """The statistics of one row block, from values the merge already has (no second computation of the
        row scale): W0 as stored and in float64, its row norms ||W0|| (out,), the method's :class:`Merged`
        (W_hat float64, row scale or None), max |W_hat|, the cast W_hat, dW (float64). Fold with :meth:`add`."""
        flat = dw.reshape(-1)
        scale = None if merged.scale is None else tuple(float(x) for x in torch.aminmax(merged.scale))
        # W_hat == W0 implies cast(W_hat) == cast(W0), so "changed but equal after the cast" is
        # #(cast equal) - #(unchanged), and #(unchanged) is 0 (not counted) when no cast is equal
        exact = torch.promote_types(w0.dtype, out.dtype) == out.dtype  # W0 converts to out's dtype exactly
        n_same_cast = int(torch.count_nonzero(torch.eq(out, w0 if exact else w0.to(out.dtype))))
        n_same = int(torch.count_nonzero(torch.eq(merged.weight, w64))) if n_same_cast else 0
        err = out.to(torch.float64).sub_(merged.weight)  # (a mixed-dtype sub is several times slower)
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


ROW_BLOCK_ELEMENTS = 1 << 18  # float64 temporaries of ~2 MiB per row block: memory flat, cache friendly
MAX_ROW_WORKERS = 8  # row-block worker threads: torch.get_num_threads(), at most this (temporaries per worker)


def _merge_layer(
    target: str, w: torch.Tensor, f, method, out_dtype: torch.dtype, check_fingerprint=None, transposed: bool = False,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Merge one weight in row blocks of its (out, in) form (every formula is row-wise); return its cast and stats.

    ``w`` is the stored weight: (out, in) for nn.Linear, (in, out) for Conv1D
    (``transposed``), in which case the math runs on its transpose and the result
    is stored back as (in, out). ``check_fingerprint(W0 rows float64,
    d2_magnitude rows, their norms)`` runs on each block that carries a magnitude.
    ``pool``: worker threads that merge row blocks concurrently (each block writes
    its own rows; statistics and errors are taken in block order, so the result
    and the error raised are those of the serial loop).
    """
    stored = torch.empty(w.shape, dtype=out_dtype)
    out = stored.t() if transposed else stored  # a view: writing its rows fills the stored layout
    w = w.t() if transposed else w
    stats = _LayerStats(w.shape)
    b_all, a = method.low_rank(f, torch.float64)  # dW = B' @ A': factors folded and made float64 once per layer
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, w.shape[1]))

    def merge_block(start: int) -> tuple:
        end = min(start + rows, w.shape[0])
        fb = f.row_block(start, end, method.row_factors)
        w0 = w[start:end]
        w64 = w0.to(torch.float64)
        norms = row_norm(w64)
        if check_fingerprint is not None and fb.magnitude is not None:
            check_fingerprint(w64, fb.magnitude, norms)
        dw = torch.mm(b_all[start:end], a)
        merged = method.merge(w64, fb, torch.float64, dw, norms)
        big = _check_finite(target, merged.weight, "merged tensor")
        block = out[start:end]
        block.copy_(merged.weight)  # the one cast
        _check_no_overflow(target, big, block, "merged tensor")
        return _LayerStats.block(w0, w64, norms, merged, big, block, dw)

    starts = range(0, w.shape[0], rows)
    if pool is None or len(starts) == 1:
        for start in starts:
            stats.add(merge_block(start))
    else:
        futures = [pool.submit(merge_block, start) for start in starts]
        try:
            for fu in futures:
                stats.add(fu.result())
        finally:  # on an error: drop the blocks not started, wait for the running ones
            for fu in futures:
                fu.cancel()
            for fu in futures:
                if not fu.cancelled():
                    fu.exception()
    return stored, stats.to_json()


class _Budget:
    """Bytes in flight between the reader, merge and writer threads, capped at ``limit`` (one item may
    always enter an empty pipeline, however big); :meth:`close` wakes and stops every waiter."""

    def __init__(self, limit: int):
        self.limit, self.used, self.closed = limit, 0, False
        self._cond = threading.Condition()

    def acquire(self, n: int) -> bool:
        """Wait until ``n`` bytes fit; False when closed."""
        with self._cond:
            self._cond.wait_for(lambda: self.closed or self.used == 0 or self.used + n <= self.limit)
            if self.closed:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class _Prefetcher:
    """A thread that reads the source tensors in the order the merge consumes them, ``budget`` permitting,
    and computes each base shard's sha256 in the same pass (:class:`HashingShardReader`).

    ``items``: shard -> [(source tensor name, bytes it holds in flight: input + output)], in merge order.
    """

    _DONE = object()

    def __init__(self, ckpt: Checkpoint, items: dict[str, list[tuple[str, int]]], budget: _Budget):
        self.ckpt, self.items, self.budget = ckpt, items, budget
        self.sha256: dict[str, str] = {}
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="d2serve-merge-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for shard, todo in self.items.items():
                reader = HashingShardReader(self.ckpt.path / shard)
                try:
                    for src, cost in todo:
                        if not self.budget.acquire(cost):
                            return
                        self._q.put(reader.read(self.ckpt.tensors[src]))
                except BaseException:
                    reader.close()
                    raise
                self.sha256[shard] = reader.finish()
            self._q.put(self._DONE)
        except BaseException as e:  # handed to the merging thread, which raises it
            self._q.put(e)

    def get(self) -> torch.Tensor:
        """The next source tensor; re-raises an error of the reading thread."""
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def finish(self) -> dict[str, str]:
        """Wait for the thread to end (after every shard was hashed); shard -> hex sha256."""
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        self._thread.join()
        return self.sha256

    def stop(self) -> None:
        """Stop early (on an error of the merge): unblock the thread and wait for it."""
        self.budget.close()
        self._thread.join()


def _in_flight_bytes(info, out_dtype: torch.dtype, new_output: bool) -> int:
    """Bytes one tensor holds in the pipeline: its input, plus its output when that is a new tensor."""
    n = info.end - info.begin
    if new_output:
        n += math.prod(info.shape) * out_dtype.itemsize
    return n


def _write(writer: ShardWriter, target: str, t: torch.Tensor, budget: _Budget, cost: int) -> None:
    """Write one tensor (in the writer thread) and give its bytes back to the pipeline's budget."""
    try:
        writer.write(target, t)
    finally:
        budget.release(cost)


def _check_fingerprint(
    module: str, w0: torch.Tensor, magnitude: torch.Tensor, base: Path, rtol: float, norms: torch.Tensor | None = None
) -> float:
    """Refuse a base whose rows' norms differ from the adapter's ``d2_magnitude`` (rows of W0 and magnitude alike).

    ``norms``: ``row_norm`` of ``w0`` in float64 when the caller already has it.

    Returns:
        the largest relative row difference found (at most the tolerance).
    """
    norms = row_norm(w0.double()) if norms is None else norms
    rtol = max(rtol, 2 * torch.finfo(magnitude.dtype).eps)  # a fingerprint stored in bf16 is only that precise
    rel = ((norms - magnitude.double()).abs() / norms.clamp_min(1e-30)).max()
    if float(rel) > rtol:
        raise WrongBaseError(
            f"{module}: the adapter's d2_magnitude (||W0|| per output row of its training base) differs from "
            f"the rows of {base} by up to {float(rel):.3g} relative (tolerance {rtol:g}): the adapter was trained "
            "on a different base model"
        )
    return float(rel)


class _Fingerprints:
    """The base-fingerprint checks of one merge and their record for the manifest (``base_fingerprint``)."""

    def __init__(self, method, adapter: Adapter, base: Path, rtol: float):
        self.method, self.adapter, self.base, self.rtol = method, adapter, base, rtol
        self.max_rel: dict[str, float] = {}
        self._lock = threading.Lock()

    def checker(self, module: str):
        """``check(W0 rows float64, fingerprint rows, their norms)`` for :func:`_merge_layer`, recording the worst
        difference."""

        def check(rows: torch.Tensor, mag: torch.Tensor, norms: torch.Tensor | None = None) -> None:
            rel = _check_fingerprint(module, rows, mag, self.base, self.rtol, norms)
            with self._lock:  # row blocks may be checked from several worker threads
                self.max_rel[module] = max(self.max_rel.get(module, 0.0), rel)

        return check

    def to_json(self) -> dict:
        """``status``: ``matched`` (every layer carried one and it matched), ``partial`` (some layers carried
        one, all matched), ``absent`` (none; ``supported`` says whether the method's format has one)."""
        carried = [m for m, f in self.adapter.layers.items() if f.magnitude is not None]
        n = len(self.adapter.layers)
        status = "absent" if not carried else "matched" if len(carried) == n else "partial"
        return {"key": self.method.fingerprint_key, "supported": self.method.fingerprint_key is not None,
                "checked": bool(self.max_rel), "status": status, "layers_checked": len(self.max_rel),
                "layers_without": n - len(carried), "max_rel_row_diff": max(self.max_rel.values(), default=None),
                "rtol": self.rtol}


def _check_stacking(base: Path, method, adapter: Adapter) -> dict | None:
    """A base that is itself a d2serve merge output: allowed for methods that do not read the base's row
    norms (plain LoRA adds dW, so the order of merges does not matter); for the others (d2lora, dora)
    only when every layer carries a base fingerprint (checked during the merge), which proves the adapter
    was trained on this merged folder. Returns what the manifest records (``stacked_on``), None for a
    plain base.

    Raises:
        WrongBaseError: a norm-reading method without a fingerprint on every layer.
    """
    prior = read_manifest(base)
    if not prior:
        return None
    missing = [m for m, f in adapter.layers.items() if f.magnitude is None]
    if method.uses_base_norms and missing:
        raise WrongBaseError(
            f"{base} is itself a d2serve merge output ({MANIFEST_NAME}: method {prior.get('method')}, adapter "
            f"{prior.get('adapter')}); method {method.name} takes row norms ||W0|| / ||W0 + dW|| from the base it is "
            f"merged into, and {len(missing)} of {len(adapter.layers)} adapter layers (e.g. {missing[0]}) carry no "
            f"{method.fingerprint_key or 'base fingerprint'} proving the adapter was trained on this merged folder, "
            "so the result would depend on the order of the merges: merge it into the original base instead"
        )
    return {"base": prior.get("base"), "method": prior.get("method"), "adapter": prior.get("adapter"),
            "adapter_sha256": (prior.get("sha256") or {}).get("adapter"),
            "why_allowed": "fingerprint matched on every layer" if method.uses_base_norms else
            f"method {method.name} adds dW without reading the base's norms: merges commute"}


def merge(
    *,
    base: str | Path,
    adapter: str | Path | Adapter,
    out: str | Path,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    magnitude_rtol: float = MAGNITUDE_RTOL,
) -> MergeResult:
    """Merge an adapter into a base checkpoint, streaming one shard at a time.

    Args:
        base: HF safetensors checkpoint directory (never modified).
        adapter: adapter directory or a loaded :class:`Adapter` (never modified).
        out: output directory; must be empty or absent unless ``overwrite``.
        dtype: output dtype: ``auto`` (the base's), ``float32``, ``bfloat16`` or ``float16``.
            All merge math runs in float64; the result is cast once.
        overwrite: replace a non-empty ``out``.
        progress: show a progress bar over the tensors even when :mod:`d2serve.console`
            progress is not enabled (the CLI enables it).
        magnitude_rtol: relative tolerance of the ``d2_magnitude`` base fingerprint.

    Returns:
        :class:`MergeResult`.

    Raises:
        CheckpointError: unreadable/truncated base or adapter files; a quantized base
            (``quantization_config``, integer weights) or one missing tensors of its
            architecture's full list (d2serve.architecture.require_full_precision_base).
        AdapterConfigError, AdapterError: invalid adapter or one that does not fit the base
            (incl. a layer kind its method is not merged on, a saved base-tensor copy that
            differs from the base, ``ensure_weight_tying`` with an adapted tied embedding).
        WrongBaseError: ``d2_magnitude`` does not match the base, or the base is itself a merge
            output (``d2serve_merge.json``) and the method reads its row norms without a fingerprint
            on every layer (the manifest records ``stacked_on`` and ``base_fingerprint``).
        MergeMathError: NaN/Inf, a zero-norm row, or an overflow of the output dtype in any
            tensor written (merged or copied from the base), naming the tensor.
        FileExistsError: ``out`` is non-empty and ``overwrite`` is False.
        ValueError: ``out`` overlaps an input, or an unknown dtype.
    """
    t0 = time.perf_counter()
    ckpt = Checkpoint(base)
    adp = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    out = Path(out)
    prepare_output_dir(out, overwrite, inputs=tuple(p for p in (ckpt.path, adp.path) if p is not None))
    out_dtype = resolve_dtype(dtype, ckpt)
    require_full_precision_base(ckpt)  # nothing for transformers to re-initialise, nothing quantized
    arch = ckpt.architecture
    w0_names = match_to_base(adp, ckpt)  # module -> base tensor holding W0
    check_layer_kinds(ckpt, adp)
    ties = tie_plan(ckpt, adp)
    check_base_copies(ckpt, adp)
    untie = ties.tied_base and not ties.tied_out
    method = get_method(adp.method)
    stacked_on = _check_stacking(ckpt.path, method, adp)  # the base is itself a merge output
    fingerprints = _Fingerprints(method, adp, ckpt.path, magnitude_rtol)

    layer_stats: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    total_size = 0
    # out tensor name -> (base tensor holding its input, adapted module or None), grouped by shard
    plan: dict[str, dict[str, tuple[str, str | None]]] = {s: {} for s in ckpt.shards}
    for name, info in ckpt.tensors.items():
        plan[info.shard][name] = (name, None)
    if untie:  # lm_head becomes a stored tensor beside the embedding: the original embedding (or its merge below)
        plan[ckpt.tensors[ties.lm_head_from].shard][ties.lm_head] = (ties.lm_head_from, None)
    for module, src in w0_names.items():
        target = f"{module}.weight"
        plan[ckpt.tensors[src].shard][target] = (src, module)
    from d2serve.console import stage

    n_out = sum(len(v) for v in plan.values())
    shown = stage(f"merging {len(w0_names)} layers ({n_out} tensors)", total=n_out, show=progress or None)
    bar = shown.__enter__()
    try:
        with atomic_output_dir(out, overwrite) as tmp:
            # per shard: the tensors in write order; a shard's sources are taken in file order, so that
            # (within one output element size) the base shard is read, and hashed, front to back once
            specs: dict[str, list] = {}
            items: dict[str, list[tuple[str, int]]] = {}
            for shard, outputs in plan.items():
                specs[shard] = []
                for target, (src, _) in sorted(outputs.items(), key=lambda kv: ckpt.tensors[kv[1][0]].begin):
                    info = ckpt.tensors[src]
                    specs[shard].append((target, out_dtype if info.dtype.is_floating_point else info.dtype, info.shape))
                new_out = {t: outputs[t][1] is not None or t in adp.modules_to_save or
                           (ckpt.tensors[outputs[t][0]].dtype.is_floating_point and
                            ckpt.tensors[outputs[t][0]].dtype != out_dtype) for t in outputs}
                items[shard] = [(outputs[t][0], _in_flight_bytes(ckpt.tensors[outputs[t][0]], out_dtype, new_out[t]))
                                for t in write_order(specs[shard])]
            budget = _Budget(max((c for todo in items.values() for _, c in todo), default=0))
            # the torch threads become row-block workers, each running torch ops on one thread: no OpenMP
            # barrier per op, so a worker the OS deschedules (a busy machine) never stalls the others
            threads = torch.get_num_threads()
            workers = min(threads, MAX_ROW_WORKERS)
            blocks = ThreadPoolExecutor(workers, thread_name_prefix="d2serve-merge-rows") if workers > 1 else None
            prefetch = _Prefetcher(ckpt, items, budget)
            pool = ThreadPoolExecutor(1, thread_name_prefix="d2serve-merge-write")
            try:
                torch.set_num_threads(1)
                for shard, outputs in plan.items():
                    pending = []
                    with ShardWriter(tmp / shard, specs[shard], {"format": "pt"}) as writer:
                        try:
                            for target, (_, cost) in zip(writer.order, items[shard], strict=True):
                                src, module = outputs[target]
                                w = prefetch.get()
                                if module is not None:
                                    kind = arch.layer(module)
                                    t, layer_stats[module] = _merge_layer(
                                        target, w, adp.layers[module], method, out_dtype,
                                        fingerprints.checker(module),
                                        transposed=kind is not None and kind.transposed, pool=blocks,
                                    )
                                elif target in adp.modules_to_save:
                                    t = _cast_checked(target, adp.modules_to_save[target], out_dtype,
                                                      "modules_to_save tensor")
                                elif w.dtype.is_floating_point:  # same dtype: the bytes read, written as they are
                                    t = _cast_checked(target if target == src else f"{src} (written as {target})", w,
                                                      out_dtype, "base tensor")
                                else:  # integer buffers/extras the architecture keeps as integers: passed through intact
                                    t = w
                                pending.append(pool.submit(_write, writer, target, t, budget, cost))
                                weight_map[target] = shard
                                total_size += t.numel() * t.element_size()
                                del w, t
                                bar.advance()
                        finally:  # never close the file under a pending write
                            for f in pending:
                                f.exception()
                        for f in pending:
                            f.result()
                base_shards_sha256 = prefetch.finish()
            finally:
                prefetch.stop()
                pool.shutdown(wait=True)
                if blocks is not None:
                    blocks.shutdown(wait=True)
                torch.set_num_threads(threads)
            if ckpt.sharded:
                index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
                write_json(tmp / INDEX_FILE, index)
            config = dict(ckpt.config)
            config.pop("quantization_config", None)
            set_config_dtype(config, out_dtype)
            if untie:
                config["tie_word_embeddings"] = False
            write_json(tmp / "config.json", config)
            copy_side_entries(ckpt.side_files(), tmp)
            seconds = time.perf_counter() - t0
            manifest = {
                "d2serve_version": __version__,
                "method": adp.method,
                "base": str(ckpt.path),
                "adapter": str(adp.path) if adp.path else None,
                "adapter_config": adp.config.to_json_dict(),
                "output_dtype": str(out_dtype).removeprefix("torch."),
                "compute_dtype": "float64",
                "untied_embeddings": untie,
                "base_fingerprint": fingerprints.to_json(),
                "stacked_on": stacked_on,
                "ignored_config_fields": list(adp.config.ignored_fields),
                "embeddings": ties.reason,
                "sha256": {
                    "adapter": {p.name: sha256_file(p) for p in adp.files},
                    "base_shards": {s: base_shards_sha256[s] for s in ckpt.shards},  # hashed while read
                },
                "num_layers_merged": len(layer_stats),
                "layers": layer_stats,
                "merge_seconds": round(seconds, 3),
                "peak_rss_bytes": peak_rss_bytes(),
            }
            write_json(tmp / MANIFEST_NAME, manifest)
    except BaseException as e:
        shown.__exit__(type(e), e, e.__traceback__)
        raise
    shown.__exit__(None, None, None)
    return MergeResult(out, manifest, time.perf_counter() - t0, peak_rss_bytes())


def read_manifest(merged: str | Path) -> dict:
    """Read ``d2serve_merge.json`` of a merged checkpoint (an empty dict when absent)."""
    p = Path(merged) / MANIFEST_NAME
    return json.loads(p.read_text()) if p.is_file() else {}
