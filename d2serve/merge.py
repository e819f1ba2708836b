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

from d2serve.errors import InputError

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from d2serve import __version__
from d2serve.adapters.io import Adapter, load_adapter, match_to_base
from d2serve.adapters.methods import MergeMathError, get_method, row_norm
from d2serve.architecture import check_base_copies, check_layer_kinds, require_full_precision_base, tie_plan
from d2serve.sysinfo import peak_rss_bytes
from d2serve.checkpoint import (
    DTYPE_NAMES,
    INDEX_FILE,
    Checkpoint,
    ShardWriter,
    atomic_output_dir,
    copy_side_entries,
    prepare_output_dir,
    set_config_dtype,
    sha256_file,
    write_json,
)

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
    if not torch.isfinite(w).all():
        raise MergeMathError(f"{what} {name} has {int((~torch.isfinite(w)).sum())} NaN/Inf value(s)")
    out = w.to(dtype)
    if out.dtype != w.dtype and not torch.isfinite(out).all():
        big = float(w.abs().max())
        raise MergeMathError(
            f"{what} {name} overflows {dtype} (max |value| {big:.4g} > "
            f"{torch.finfo(dtype).max:.4g}); choose the output dtype bfloat16 or float32"
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
    target: str, w: torch.Tensor, f, method, out_dtype: torch.dtype, check_fingerprint=None, transposed: bool = False
) -> tuple[torch.Tensor, dict]:
    """Merge one weight in row blocks of its (out, in) form (every formula is row-wise); return its cast and stats.

    ``w`` is the stored weight: (out, in) for nn.Linear, (in, out) for Conv1D
    (``transposed``), in which case the math runs on its transpose and the result
    is stored back as (in, out). ``check_fingerprint(W0 rows float64,
    d2_magnitude rows)`` runs on each block that carries a magnitude.
    """
    stored = torch.empty(w.shape, dtype=out_dtype)
    out = stored.t() if transposed else stored  # a view: writing its rows fills the stored layout
    w = w.t() if transposed else w
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
    return stored, stats.to_json()


def _check_fingerprint(module: str, w0: torch.Tensor, magnitude: torch.Tensor, base: Path, rtol: float) -> float:
    """Refuse a base whose rows' norms differ from the adapter's ``d2_magnitude`` (rows of W0 and magnitude alike).

    Returns:
        the largest relative row difference found (at most the tolerance).
    """
    norms = row_norm(w0.double())
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

    def checker(self, module: str):
        """``check(W0 rows float64, fingerprint rows)`` for :func:`_merge_layer`, recording the worst difference."""

        def check(rows: torch.Tensor, mag: torch.Tensor) -> None:
            rel = _check_fingerprint(module, rows, mag, self.base, self.rtol)
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
                            kind = arch.layer(module)
                            t, layer_stats[module] = _merge_layer(
                                target, w, adp.layers[module], method, out_dtype,
                                fingerprints.checker(module),
                                transposed=kind is not None and kind.transposed,
                            )
                        elif target in adp.modules_to_save:
                            t = _cast_checked(target, adp.modules_to_save[target], out_dtype, "modules_to_save tensor")
                        elif w.dtype.is_floating_point:
                            t = _cast_checked(target if target == src else f"{src} (written as {target})", w,
                                              out_dtype, "base tensor")
                        else:  # integer buffers/extras the architecture keeps as integers: passed through intact
                            t = w
                        writer.write(target, t)
                        weight_map[target] = shard
                        total_size += t.numel() * t.element_size()
                        del w, t
                        bar.advance()
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
                    "base_shards": {s: sha256_file(ckpt.path / s) for s in ckpt.shards},
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
