"""The streaming merge engine: base shards x adapter method -> merged HF checkpoint + manifest.

The adapter is checked against the base once, before anything is written (:func:`d2serve.fitting.fit`); the
``d2_magnitude`` fingerprint of each layer is checked on its row blocks as W0 streams through.
The engine reads one base safetensors shard at a time (:mod:`d2serve.merge_io`:
positioned reads into reused buffers, never a memory map),
merges each adapted weight in float64 row blocks on the torch threads
(:mod:`d2serve.merge_blocks`: ``method.merge`` from the registry, the engine
knows no formula), checks every value finite, casts it once to the output
dtype and writes each finished block straight to its place in the output
shard. Untouched tensors are checked and written in chunks read from the
shard (cast only when the output dtype differs). A background thread
computes every base shard's sha256 for the manifest, started before the
architecture checks; a file hashed by an earlier merge (same device, inode,
size and mtime) or named by its LFS sha256 in a Hugging Face cache is not read
again (:mod:`d2serve.digests`). After the float64 GEMM of each row block, the
fused kernel (:mod:`d2serve.merge_fused`) does the rest of the block in one pass
per row, with the bytes and statistics of the torch ops it replaces. Nothing holds a whole tensor (but a
transposed Conv1D / embedding weight, merged whole): peak memory is the row
blocks' temporaries plus the adapter; no page of a base shard becomes resident
in the merge process. A base shard truncated by another writer during the
merge is an error naming it (exit 2), never a SIGBUS.

The output is a complete HF checkpoint written into a temporary directory and
renamed into place at the end: config (no ``quantization_config``, ``dtype``
matching the tensors), the same shard layout and a consistent index, every
side file of the base (tokenizer, chat template, generation_config), and a
manifest ``d2serve_merge.json``.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from d2serve import __version__
from d2serve.adapters.io import Adapter, load_adapter
from d2serve.checkpoint import (
    DTYPE_NAMES,
    INDEX_FILE,
    Checkpoint,
    atomic_output_dir,
    copy_side_entries,
    prepare_output_dir,
    set_config_dtype,
    write_json,
)
from d2serve.errors import InputError
from d2serve.merge_blocks import MAX_ROW_WORKERS, LayerMerge, TensorCopy, Workspaces, run_in_order
from d2serve.digests import CachedHasher
from d2serve.fitting import MAGNITUDE_RTOL, MANIFEST_NAME, WrongBaseError, fit, read_manifest
from d2serve.merge_io import ShardOut, SourceShard
from d2serve.sysinfo import current_rss_bytes, peak_rss_bytes

# the merge manifest, the fingerprint tolerance and the wrong-base error live with the fitting step
# (d2serve.fitting); re-exported here, where callers of the merge look for them
__all__ = ["MAGNITUDE_RTOL", "MANIFEST_NAME", "MergeResult", "WrongBaseError", "merge", "read_manifest",
           "resolve_dtype"]

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


def merge(
    *,
    base: str | Path | Checkpoint,
    adapter: str | Path | Adapter,
    out: str | Path,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    magnitude_rtol: float = MAGNITUDE_RTOL,
    threads: int | None = None,
    kernel: str | None = None,
) -> MergeResult:
    """Merge an adapter into a base checkpoint, streaming one shard at a time.

    Args:
        base: HF safetensors checkpoint directory, or its opened :class:`Checkpoint` (never modified).
        adapter: adapter directory or a loaded :class:`Adapter` (never modified).
        out: output directory; must be empty or absent unless ``overwrite``.
        dtype: output dtype: ``auto`` (the base's), ``float32``, ``bfloat16`` or ``float16``.
            All merge math runs in float64; the result is cast once.
        overwrite: replace a non-empty ``out``.
        progress: show a progress bar over the tensors even when :mod:`d2serve.console`
            progress is not enabled (the CLI enables it).
        magnitude_rtol: relative tolerance of the ``d2_magnitude`` base fingerprint.
        threads: row-block worker threads (each runs torch on one thread); None: the cores this process may
            use (:func:`d2serve.threads.pick`, step ``merge``). Recorded in the manifest (``threads``).
        kernel: ``auto`` | ``fused`` | ``c`` | ``numba`` | ``torch`` (None: ``$D2SERVE_MERGE_KERNEL``, else
            ``auto``): the fused kernel after the GEMM (:mod:`d2serve.merge_fused`: C, else numba) or the torch
            ops; all write the same bytes and statistics. ``auto`` uses the kernel from the first block after it is
            loaded; the others wait for it; without a working kernel the torch path runs (logged, recorded). The
            manifest records which ran (``merge_kernel``).

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
    from d2serve import merge_fused
    from d2serve.threads import check_requested

    threads = check_requested(threads)
    kernel = merge_fused.choice() if kernel is None else kernel
    if kernel not in merge_fused.CHOICES:
        raise InputError(f"kernel {kernel!r}: expected one of {', '.join(merge_fused.CHOICES)}")
    if kernel != "torch":  # a first compilation of the kernel overlaps the parsing and checks below
        merge_fused.prefetch(kernel if kernel in merge_fused.IMPLS else None)
    ckpt = base if isinstance(base, Checkpoint) else Checkpoint(base)
    adp = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    # the sha256 of every base shard and adapter file (for the manifest), in its own thread from now on: it
    # overlaps the checks; it refuses a file that changes before the merge ends
    # (digests of files already hashed by an earlier merge come from d2serve's cache: d2serve.digests)
    hasher = CachedHasher([ckpt.path / s for s in ckpt.shards] + list(adp.files))
    try:
        return _merge(ckpt, adp, Path(out), dtype, overwrite, progress, magnitude_rtol, hasher, t0, threads, kernel)
    finally:
        hasher.stop()


def _kernel_for(choice: str):
    """The fused kernel's :class:`d2serve.merge_fused.Handle` for this merge, or None (the torch path)."""
    from d2serve import merge_fused

    if choice == "torch":
        return None
    return merge_fused.Handle(wait=choice != "auto", impl=choice if choice in merge_fused.IMPLS else None)


def _kernel_record(choice: str, handle, n_fused: int, n_torch: int) -> dict:
    """The manifest's ``merge_kernel``: asked, used (``fused`` | ``torch`` | ``both``: blocks before the kernel
    was loaded ran on torch), why not fused, block and layer counts; a fallback is logged."""
    import logging

    if handle is None:
        rec = {"requested": choice, "used": "torch", "reason": "the torch path was asked for", "blocks_fused": 0,
               "blocks_torch": None}
    else:
        rec = handle.record(choice)
        if rec["reason"]:
            log = logging.getLogger(__name__)
            (log.warning if choice == "fused" else log.info)("merge: torch path used: %s", rec["reason"])
    return rec | {"layers_fusable": n_fused, "layers_torch_only": n_torch}


def _merge(ckpt: Checkpoint, adp: Adapter, out: Path, dtype: str, overwrite: bool, progress: bool,
           magnitude_rtol: float, hasher: CachedHasher, t0: float, threads_requested: int | None,
           kernel_choice: str) -> MergeResult:
    """:func:`merge` after the inputs were parsed and their hashing started: validate, merge, write, record."""
    prepare_output_dir(out, overwrite, inputs=tuple(p for p in (ckpt.path, adp.path) if p is not None))
    out_dtype = resolve_dtype(dtype, ckpt)
    fitted = fit(ckpt, adp, magnitude_rtol=magnitude_rtol)  # every check of the pair (d2serve.fitting)
    arch = ckpt.architecture
    w0_names, ties, method, stacked_on = fitted.w0_names, fitted.ties, fitted.method, fitted.stacked_on
    untie = ties.tied_base and not ties.tied_out
    kernel = _kernel_for(kernel_choice)
    n_fused = n_torch = 0

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
    rss_before_streaming = current_rss_bytes()  # imports, architecture and adapter are in; the tensors are next
    try:
        with atomic_output_dir(out, overwrite) as tmp:
            # the torch threads become row-block workers, each running torch ops on one thread: no OpenMP
            # barrier per op, so a worker the OS deschedules (a busy machine) never stalls the others
            from d2serve.threads import pick, record

            threads = torch.get_num_threads()
            workers = min(pick("merge", threads_requested), MAX_ROW_WORKERS)
            # torch.set_num_threads is per thread for OpenMP and MKL: a worker left at the default runs each op (and
            # MKL's dot of the statistics, whose last bit then depends on how MKL split it) on several threads
            blocks = ThreadPoolExecutor(workers, thread_name_prefix="d2serve-merge-rows", initializer=torch.set_num_threads,
                                        initargs=(1,)) if workers > 1 else None
            workspaces = Workspaces(workers)
            try:
                torch.set_num_threads(1)
                for shard, outputs in plan.items():
                    # sources in file order: the shard is read front to back
                    order = sorted(outputs, key=lambda t: ckpt.tensors[outputs[t][0]].begin)
                    out_dtypes = {t: out_dtype if ckpt.tensors[outputs[t][0]].dtype.is_floating_point
                                  else ckpt.tensors[outputs[t][0]].dtype for t in order}
                    # written under the base's own key names (model names -> stored: e.g. a GPT-2 without
                    # the transformer. prefix keeps its layout)
                    specs = [(ckpt.stored_name(t), out_dtypes[t], ckpt.tensors[outputs[t][0]].shape) for t in order]
                    src_file = SourceShard(ckpt.path / shard)
                    try:
                        with ShardOut(tmp / shard, specs, {"format": "pt"}) as dst:
                            jobs = []
                            for target in order:
                                src, module = outputs[target]
                                info = ckpt.tensors[src]
                                w = src_file.tensor(info)

                                def emit(t: torch.Tensor, offset: int, target: str = ckpt.stored_name(target)) -> None:
                                    dst.write(target, t, offset)

                                if module is not None:
                                    kind = arch.layer(module)
                                    job = LayerMerge(target, w, adp.layers[module], method, out_dtype, emit,
                                                     fitted.fingerprint_checker(module),
                                                     transposed=kind is not None and kind.transposed,
                                                     kernel=kernel)
                                    n_fused, n_torch = n_fused + job.fused, n_torch + (not job.fused)
                                    jobs.append(job)
                                elif target in adp.modules_to_save:
                                    jobs.append(TensorCopy(target, adp.modules_to_save[target].contiguous(), out_dtype,
                                                           emit, "modules_to_save tensor"))
                                else:  # floating: checked (and cast if the dtype differs); integer: as is
                                    name = target if target == src else f"{src} (written as {target})"
                                    jobs.append(TensorCopy(name, w, out_dtype if w.is_floating_point() else None,
                                                           emit, "base tensor", kernel=kernel))
                                weight_map[ckpt.stored_name(target)] = shard
                                total_size += math.prod(info.shape) * out_dtypes[target].itemsize
                                del w
                            # every block and chunk of the shard queued at once: the workers never idle at a
                            # tensor's end; statistics folded and errors raised in file order
                            results = run_in_order(jobs, blocks, workspaces, bar.advance, src_file.check_intact)
                            layer_stats |= {job.f.module: r for job, r in zip(jobs, results, strict=True)
                                            if isinstance(job, LayerMerge)}
                            del jobs, results
                    finally:
                        src_file.close()
                digests = hasher.result()
            finally:
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
                "merge_kernel": _kernel_record(kernel_choice, kernel, n_fused, n_torch),
                "threads": record(threads_requested, row_workers=workers),
                "untied_embeddings": untie,
                "base_fingerprint": fitted.fingerprints.to_json(),
                "stacked_on": stacked_on,
                "ignored_config_fields": list(adp.config.ignored_fields),
                "embeddings": ties.reason,
                "sha256": {
                    "adapter": {p.name: digests[p] for p in adp.files},
                    "base_shards": {s: digests[ckpt.path / s] for s in ckpt.shards},
                },
                "sha256_sources": {  # computed | cache | hf_lfs_blob_name (d2serve.digests)
                    "adapter": {p.name: hasher.sources[p] for p in adp.files},
                    "base_shards": {s: hasher.sources[ckpt.path / s] for s in ckpt.shards},
                },
                "num_layers_merged": len(layer_stats),
                "layers": layer_stats,
                "merge_seconds": round(seconds, 3),
                "peak_rss_bytes": peak_rss_bytes(),
                "rss_before_streaming_bytes": rss_before_streaming,
            }
            write_json(tmp / MANIFEST_NAME, manifest)
    except BaseException as e:
        shown.__exit__(type(e), e, e.__traceback__)
        raise
    shown.__exit__(None, None, None)
    return MergeResult(out, manifest, time.perf_counter() - t0, peak_rss_bytes())
