"""The streaming merge engine: base shards x adapter method -> merged HF checkpoint + manifest.

The engine reads the base one safetensors shard at a time, replaces each
adapted weight with ``method.merged_weight`` (looked up in the registry; the
engine knows no formula) computed in float64, checks it is finite, casts it
once to the output dtype, and writes the shard under the same name. Peak memory
is about one shard (in and out) plus the adapter, never the whole model.

The output is a complete HF checkpoint written into a temporary directory and
renamed into place at the end: config (no ``quantization_config``, ``dtype``
matching the tensors), the same shard layout and a consistent index, every
side file of the base (tokenizer, chat template, generation_config), and a
manifest ``d2serve_merge.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from d2serve import __version__
from d2serve.adapters.io import Adapter, load_adapter, match_to_base
from d2serve.adapters.methods import MergeMathError, get_method, row_norm
from d2serve.sysinfo import peak_rss_bytes
from d2serve.checkpoint import (
    DTYPE_NAMES,
    INDEX_FILE,
    Checkpoint,
    ShardWriter,
    atomic_output_dir,
    prepare_output_dir,
    set_config_dtype,
    sha256_file,
    write_json,
)

MANIFEST_NAME = "d2serve_merge.json"
MAGNITUDE_RTOL = 2e-3


class WrongBaseError(ValueError):
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
        raise ValueError(f"--dtype {dtype!r} not supported; expected auto, float32, bfloat16 or float16")
    return DTYPE_NAMES[dtype]


def _cast_checked(name: str, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a finite float64/float32 tensor once to ``dtype``; refuse values that overflow it."""
    if not torch.isfinite(w).all():
        raise MergeMathError(f"merged tensor {name} has {int((~torch.isfinite(w)).sum())} NaN/Inf value(s)")
    out = w.to(dtype)
    if not torch.isfinite(out).all():
        big = float(w.abs().max())
        raise MergeMathError(
            f"merged tensor {name} overflows {dtype} (max |value| {big:.4g} > {torch.finfo(dtype).max:.4g}); "
            "choose --dtype bfloat16 or float32"
        )
    return out


class _LayerStats:
    """Per-layer merge statistics accumulated over row blocks (all from float64 values)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = list(shape)
        self.dw_sq = self.w0_sq = 0.0
        self.scale_min, self.scale_max = float("inf"), float("-inf")
        self.n_changed = self.n_lost = 0
        self.max_err = self.max_abs = 0.0

    def add(self, w0: torch.Tensor, merged64: torch.Tensor, out: torch.Tensor, dw: torch.Tensor, scale) -> None:
        """Account one row block: W0 (stored dtype), W_hat (float64), its cast, dW (float64), row scale or None."""
        self.dw_sq += float(dw.pow(2).sum())
        self.w0_sq += float(w0.double().pow(2).sum())
        if scale is not None:
            self.scale_min, self.scale_max = min(self.scale_min, float(scale.min())), max(self.scale_max, float(scale.max()))
        changed = merged64 != w0
        self.n_changed += int(changed.sum())
        self.n_lost += int((changed & (out == w0.to(out.dtype))).sum())
        self.max_err = max(self.max_err, float((out.double() - merged64).abs().max()))
        self.max_abs = max(self.max_abs, float(merged64.abs().max()))

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


def _merge_layer(
    target: str, w: torch.Tensor, f, method, out_dtype: torch.dtype, check_fingerprint=None
) -> tuple[torch.Tensor, dict]:
    """Merge one (out, in) weight in row blocks (every formula is row-wise); return its cast and its stats.

    ``check_fingerprint(W0 rows float64, d2_magnitude rows)`` runs on each block that carries a magnitude.
    """
    out = torch.empty(w.shape, dtype=out_dtype)
    stats = _LayerStats(w.shape)
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        end = min(start + rows, w.shape[0])
        fb = f.row_block(start, end, method.row_factors)
        w64 = w[start:end].double()
        if check_fingerprint is not None and fb.magnitude is not None:
            check_fingerprint(w64, fb.magnitude)
        dw = method.delta(fb, torch.float64)
        merged64 = method.merged_weight(w64, fb, torch.float64, dw=dw)
        cast = _cast_checked(target, merged64, out_dtype)
        stats.add(w64, merged64, cast, dw, method.row_scale(w64, dw, fb) if method.row_scale else None)
        out[start:end] = cast
    return out, stats.to_json()


def _check_fingerprint(module: str, w0: torch.Tensor, magnitude: torch.Tensor, base: Path, rtol: float) -> None:
    """Refuse a base whose rows' norms differ from the adapter's ``d2_magnitude`` (rows of W0 and magnitude alike)."""
    norms = row_norm(w0.double())
    rtol = max(rtol, 2 * torch.finfo(magnitude.dtype).eps)  # a fingerprint stored in bf16 is only that precise
    rel = ((norms - magnitude.double()).abs() / norms.clamp_min(1e-30)).max()
    if float(rel) > rtol:
        raise WrongBaseError(
            f"{module}: the adapter's d2_magnitude (||W0|| per output row of its training base) differs from "
            f"the rows of {base} by up to {float(rel):.3g} relative (tolerance {rtol:g}): the adapter was trained "
            "on a different base model"
        )


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
        progress: show a rich progress bar over the tensors.
        magnitude_rtol: relative tolerance of the ``d2_magnitude`` base fingerprint.

    Returns:
        :class:`MergeResult`.

    Raises:
        CheckpointError: unreadable/truncated base or adapter files.
        AdapterConfigError, AdapterError: invalid adapter or one that does not fit the base.
        WrongBaseError: ``d2_magnitude`` does not match the base.
        MergeMathError: NaN/Inf, a zero-norm row, or an overflow of the output dtype.
        FileExistsError: ``out`` is non-empty and ``overwrite`` is False.
        ValueError: ``out`` overlaps an input, or an unknown dtype.
    """
    t0 = time.perf_counter()
    ckpt = Checkpoint(base)
    adp = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    out = Path(out)
    prepare_output_dir(out, overwrite, inputs=tuple(p for p in (ckpt.path, adp.path) if p is not None))
    out_dtype = resolve_dtype(dtype, ckpt)
    w0_names = match_to_base(adp, ckpt)  # module -> base tensor holding W0
    method = get_method(adp.method)
    untie = ckpt.tied_embeddings and "lm_head" in adp.layers and "lm_head.weight" not in ckpt.tensors

    layer_stats: dict[str, dict] = {}
    weight_map: dict[str, str] = {}
    total_size = 0
    # out tensor name -> (base tensor holding its input, adapted module or None), grouped by shard
    plan: dict[str, dict[str, tuple[str, str | None]]] = {s: {} for s in ckpt.shards}
    for name, info in ckpt.tensors.items():
        plan[info.shard][name] = (name, None)
    for module, src in w0_names.items():
        target = f"{module}.weight"
        plan[ckpt.tensors[src].shard][target] = (src, module)  # untied lm_head: a new tensor beside the embedding
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("merging", total=sum(len(v) for v in plan.values()))
    try:
        with atomic_output_dir(out, overwrite) as tmp:
            for shard, outputs in plan.items():
                specs = []
                for target, (src, _) in outputs.items():
                    info = ckpt.tensors[src]
                    specs.append((target, out_dtype if info.dtype.is_floating_point else info.dtype, info.shape))
                with ShardWriter(tmp / shard, specs, {"format": "pt"}) as writer:
                    for target in writer.order:
                        src, module = outputs[target]
                        w = ckpt.get_tensor(src)
                        if module is not None:
                            t, layer_stats[module] = _merge_layer(
                                target, w, adp.layers[module], method, out_dtype,
                                lambda rows, mag, m=module: _check_fingerprint(m, rows, mag, ckpt.path, magnitude_rtol),
                            )
                        elif target in adp.modules_to_save:
                            t = _cast_checked(target, adp.modules_to_save[target].double(), out_dtype)
                        else:
                            t = w.to(out_dtype) if w.dtype.is_floating_point else w
                        writer.write(target, t)
                        weight_map[target] = shard
                        total_size += t.numel() * t.element_size()
                        del w, t
                        if bar:
                            bar.advance(task)
            if ckpt.sharded:
                index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
                write_json(tmp / INDEX_FILE, index)
            config = dict(ckpt.config)
            config.pop("quantization_config", None)
            set_config_dtype(config, out_dtype)
            if untie:
                config["tie_word_embeddings"] = False
            write_json(tmp / "config.json", config)
            for p in ckpt.side_files():
                shutil.copy2(p, tmp / p.name)
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
                "sha256": {
                    "adapter": {p.name: sha256_file(p) for p in adp.files},
                    "base_shards": {s: sha256_file(ckpt.path / s) for s in ckpt.shards},
                },
                "num_layers_merged": len(layer_stats),
                "layers": layer_stats,
                "merge_seconds": round(seconds, 3),
                "peak_rss_bytes": peak_rss_bytes(),
            }
            write_json(tmp / MANIFEST_NAME, manifest)
    finally:
        if bar:
            bar.stop()
    return MergeResult(out, manifest, time.perf_counter() - t0, peak_rss_bytes())


def read_manifest(merged: str | Path) -> dict:
    """Read ``d2serve_merge.json`` of a merged checkpoint (an empty dict when absent)."""
    p = Path(merged) / MANIFEST_NAME
    return json.loads(p.read_text()) if p.is_file() else {}
