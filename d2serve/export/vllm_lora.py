"""Fold a D2-LoRA, PEFT DoRA or PEFT LoRA adapter into an unmerged vLLM LoRA folder (+ per-row scales).

Every method's adapted layer is written, exactly, as (registry ``Method.fold``,
d2serve.adapters.methods)::

    y = s * (x W0^T) + x (B' A')^T + b        s: (out,), one value per output row

with D2-LoRA s = m / ||W0 + dW|| and B' = diag(s + 1) [scale B+, -tau scale B-],
A' = [A+; A-] (rank 2r); DoRA s = magnitude / ||W0 + dW||, B' = diag(s) scale B;
LoRA s = 1, B' = scale B. s is computed once in float64 from the base weights,
so it is valid only for that base (the manifest records its shard hashes).

The folder (:func:`export_vllm_lora`):

* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (R, in) and
  ``.lora_B.weight`` (out, R), float32, every module padded with zero rank to one R;
* ``adapter_config.json``: PEFT LoRA, ``r = lora_alpha = R`` (vLLM's scaling 1), ``target_modules``,
  and, for methods whose s is not 1 (d2lora, dora), ``use_dora: true`` plus the ``d2serve`` marker:
  vanilla vLLM refuses it ("vLLM does not yet support DoRA"), d2serve's vLLM plugin
  (d2serve.vllm_plugin) accepts it only with the marker and the scales file present;
* ``d2serve_scales.safetensors``: ``base_model.model.<module>.d2_scale`` (out,) float32;
* ``d2serve_vllm_lora.json``: the manifest (method, base and adapter sha256, rank, s statistics).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from d2serve import __version__
from d2serve.adapters.io import PREFIX, WEIGHTS_NAME, AdapterError, load_adapter
from d2serve.checkpoint import Checkpoint, atomic_output_dir, write_json
from d2serve.digests import DigestMemo
from d2serve.errors import InputError
from d2serve.export.manifest import VLLM_LORA_MANIFEST as MANIFEST_NAME
from d2serve.fitting import Fit, fit
from d2serve.outdir import prepare_output_dir

SCALES_NAME = "d2serve_scales.safetensors"
MARKER = "d2serve"  # adapter_config.json field read by d2serve.vllm_plugin
FORMAT_VERSION = 1
SCALE_SUFFIX = "d2_scale"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks (0.32)


@dataclass
class FoldedLayer:
    """One adapted layer for unmerged serving, float64: W_hat = diag(s) W0 + b @ a.

    Attributes:
        s: (out_features,) row scale of the base layer's output (bias excluded).
        a: (R, in_features); b: (out_features, R).
    """

    s: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest value vLLM accepts for ``--max-lora-rank`` that is >= ``rank``.

    Raises:
        InputError: ``rank`` exceeds vLLM's largest allowed rank (512).
    """
    for r in VLLM_MAX_LORA_RANKS:
        if r >= rank:
            return r
    raise InputError(f"folded LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]}")


def fold_adapter(fitted: Fit) -> dict[str, FoldedLayer]:
    """Refuse what vLLM's LoRA cannot serve unmerged, then fold every layer of the fitted adapter (float64, registry
    ``Method.fold``; W0 read through :meth:`d2serve.fitting.Fit.base_weight`, its fingerprint checked).

    Returns:
        module path -> :class:`FoldedLayer`.

    Raises:
        AdapterError: the adapter uses what vLLM's LoRA cannot serve unmerged (``modules_to_save``, adapted
            embeddings / output head, Conv1D layers).
        WrongBaseError: a D2-LoRA ``d2_magnitude`` fingerprint differs from the base.
        MergeMathError: a zero-norm row (s undefined).
    """
    adp, arch = fitted.adapter, fitted.ckpt.architecture
    where = (adp.path or Path("adapter")) / WEIGHTS_NAME
    problems = []
    if adp.modules_to_save:
        problems.append(f"modules_to_save tensors {sorted(adp.modules_to_save)[:3]}: vLLM's LoRA serves only low-rank "
                        "layers unmerged (merge the adapter instead: d2serve export vllm)")
    for m in adp.layers:
        kind = arch.layer(m)
        if kind is None or kind.kind != "linear" or kind.transposed or m == arch.output_module:
            problems.append(f"module {m}: a {'output head' if m == arch.output_module else kind.kind if kind else 'non'}"
                            " layer; unmerged vLLM serving supports adapted nn.Linear layers of the decoder only")
    if problems:
        raise AdapterError(f"{where} cannot be served unmerged by vLLM:\n  - " + "\n  - ".join(problems))
    folded = {}
    for m, f in adp.layers.items():
        s, a, b = fitted.method.fold(fitted.base_weight(m), f, torch.float64)
        folded[m] = FoldedLayer(s, a, b)
    return folded


def export_vllm_lora(*, base: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False,
                     threads: int | None = None) -> dict:
    """Write the unmerged vLLM LoRA folder of ``adapter`` for ``base`` (module docstring), atomically.

    Args:
        base: HF checkpoint directory the adapter is served on (s depends on its weights).
        adapter: D2-LoRA (format v1), PEFT LoRA or PEFT DoRA adapter directory.
        out: output directory (empty/absent unless ``overwrite``).
        threads: torch threads of the fold (None: the cores this process may use, :func:`d2serve.threads.pick`);
            recorded in the manifest (``threads``).

    Returns:
        the manifest written as ``d2serve_vllm_lora.json``.

    Raises:
        CheckpointError, AdapterError, WrongBaseError: the adapter does not fit the base (:func:`d2serve.fitting.fit`)
        or cannot be served unmerged (see :func:`fold_adapter`); OutputExistsError for a non-empty ``out``;
        InputError for ``out`` overlapping an input or a folded rank above 512.
    """
    from d2serve.threads import check_requested

    t0 = time.perf_counter()
    out = Path(out)
    threads = check_requested(threads)
    prepare_output_dir(out, overwrite, inputs=(Path(base), Path(adapter)))
    fitted = fit(Checkpoint(base), load_adapter(adapter))
    return _write_folder(fitted, out, overwrite=overwrite, threads=threads, digests=DigestMemo(), t0=t0)


def _write_folder(fitted: Fit, out: Path, *, overwrite: bool, threads: int | None, digests: DigestMemo,
                  t0: float) -> dict:
    """Fold ``fitted`` and write its folder to ``out`` (checked by the caller: d2serve.outdir.prepare_output_dir),
    with the sha256 of the base shards and adapter files from ``digests``; returns the manifest (see
    :func:`export_vllm_lora`)."""
    from d2serve.threads import pick, record, torch_threads

    n_threads = pick("forward", threads)
    ckpt, adp, method = fitted.ckpt, fitted.adapter, fitted.adapter.method
    with torch_threads(n_threads):
        folded = fold_adapter(fitted)
    rank = max(f.a.shape[0] for f in folded.values())
    vllm_max_lora_rank(rank)
    tensors, scales = {}, {}
    for m, f in folded.items():
        pad = rank - f.a.shape[0]
        a = torch.cat([f.a, f.a.new_zeros(pad, f.a.shape[1])], 0) if pad else f.a
        b = torch.cat([f.b, f.b.new_zeros(f.b.shape[0], pad)], 1) if pad else f.b
        tensors[f"{PREFIX}{m}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = b.float().contiguous()
        scales[f"{PREFIX}{m}.{SCALE_SUFFIX}"] = f.s.float().contiguous()
    for k, t in {**tensors, **scales}.items():
        if not torch.isfinite(t).all():
            raise AdapterError(f"{adp.path}: folded tensor {k} overflows float32")
    all_s = torch.cat([f.s for f in folded.values()])
    needs_scales = bool((all_s != 1).any())
    sums = digests.sha256_files([ckpt.path / s for s in ckpt.shards] + list(adp.files))  # d2serve.digests
    base_sha = {s: sums[ckpt.path / s] for s in ckpt.shards}
    marker = {"format": FORMAT_VERSION, "method": method, "scales": SCALES_NAME, "manifest": MANIFEST_NAME,
              "base_sha256": base_sha}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "use_rslora": False,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in folded}), "bias": "none",
        "modules_to_save": None, "base_model_name_or_path": str(ckpt.path.resolve()),
        # vanilla vLLM refuses use_dora ("vLLM does not yet support DoRA"): without d2serve's plugin a folder whose
        # s is not 1 must never load as a plain LoRA (it would silently serve the wrong model)
        "use_dora": needs_scales,
        MARKER: marker,
    }
    manifest = {
        "d2serve_version": __version__, "format": FORMAT_VERSION, "method": method,
        "base": str(ckpt.path.resolve()), "adapter": str(Path(adp.path).resolve()), "rank": rank, "lora_alpha": rank,
        "vllm_max_lora_rank": vllm_max_lora_rank(rank), "needs_plugin": needs_scales,
        "num_modules": len(folded), "row_scale_min": float(all_s.min()), "row_scale_max": float(all_s.max()),
        "sha256": {"base_shards": base_sha, "adapter": {p.name: sums[p] for p in adp.files}},
        "seconds": 0.0, "threads": record(threads, forward=n_threads),
    }
    with atomic_output_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        save_file(scales, str(tmp / SCALES_NAME), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        manifest["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


def read_vllm_lora_manifest(folder: str | Path) -> dict:
    """The manifest of a folder written by :func:`export_vllm_lora` ({} when absent)."""
    p = Path(folder) / MANIFEST_NAME
    return json.loads(p.read_text()) if p.is_file() else {}


def _cache_root() -> Path:
    """Where :func:`prepare_served_adapters` keeps folded folders: ``<d2serve cache>/vllm-lora``
    (:func:`d2serve.cache.cache_dir`: ``$D2SERVE_CACHE_DIR``, else the XDG cache). With ``D2SERVE_CACHE_DIR=off``,
    a new temporary folder for this run (the served folders must outlive ``serve``'s exec into vLLM, so it is left
    for the user to delete; its path is logged)."""
    import logging
    import tempfile

    from d2serve.cache import cache_dir

    root = cache_dir()
    if root is not None:
        return root / "vllm-lora"
    tmp = Path(tempfile.mkdtemp(prefix="d2serve-vllm-lora-"))
    logging.getLogger(__name__).warning("D2SERVE_CACHE_DIR=off: folded adapters go to %s (not reused; delete it "
                                        "when the server has stopped)", tmp)
    return tmp


def plugin_problem() -> str | None:
    """None when vLLM will load d2serve's plugin and it will be active: entry point installed, not excluded by
    ``VLLM_PLUGINS``, and the installed vLLM one it was checked against (:func:`d2serve.vllm_plugin.compat.problems`;
    imports vLLM)."""
    import os
    from importlib.metadata import entry_points

    if not any(e.name == "d2serve" for e in entry_points(group="vllm.general_plugins")):
        return ("d2serve's vLLM plugin entry point (vllm.general_plugins: d2serve) is not installed; reinstall "
                "d2serve (pip install -e . or pip install .)")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and "d2serve" not in [p.strip() for p in allowed.split(",")]:
        return f"VLLM_PLUGINS={allowed!r} excludes d2serve's vLLM plugin"
    from d2serve.vllm_plugin import compat

    found = compat.problems(compat.installed_version())
    if found:
        return "the plugin steps aside on this vLLM: " + "; ".join(found)
    return None


def prepare_served_adapters(base: str | Path | Checkpoint, adapters: Mapping[str, Path | Fit],
                            digests: DigestMemo | None = None) -> tuple[dict[str, Path], int]:
    """Fold each adapter for ``base`` into a cache folder (reused when base, adapter and d2serve are unchanged).

    The base is opened once (or given opened); each file of the base and of the adapters is hashed at most once
    (``digests``: this run's :class:`d2serve.digests.DigestMemo`, a new one when None); an adapter is loaded and
    fitted (:func:`d2serve.fitting.fit`) only when its folder is not in the cache.

    Args:
        base: the served base checkpoint (directory or opened :class:`Checkpoint`).
        adapters: served name -> adapter directory (D2-LoRA, PEFT LoRA or PEFT DoRA), or the adapter already
            fitted to ``base`` (a :class:`d2serve.fitting.Fit` of this very Checkpoint).

    Returns:
        (served name -> folded folder, vLLM ``max_lora_rank`` covering every folder).

    Raises:
        InputError: a name is empty or reused, an adapter does not fit the base (:func:`d2serve.fitting.fit`) or
            cannot be served unmerged (see :func:`fold_adapter`), or d2serve's vLLM plugin would not be loaded while
            some folder needs it.
        ValueError: a Fit of another Checkpoint object than ``base``.
    """
    import hashlib

    ckpt = base if isinstance(base, Checkpoint) else Checkpoint(base)
    digests = DigestMemo() if digests is None else digests
    shard_sums = digests.sha256_files([ckpt.path / s for s in ckpt.shards])
    base_sha = {s: shard_sums[ckpt.path / s] for s in ckpt.shards}
    folders, ranks, needs_plugin = {}, [], []
    root = _cache_root()
    for name, adapter in adapters.items():
        fitted = adapter if isinstance(adapter, Fit) else None
        if fitted is not None and fitted.ckpt is not ckpt:
            raise ValueError(f"adapter {name!r}: fitted to {fitted.ckpt.path}, another Checkpoint than the base given")
        adapter = Path(fitted.adapter.path) if fitted is not None else Path(adapter)
        files = sorted(p for p in adapter.iterdir() if p.is_file()) if adapter.is_dir() else []
        h = hashlib.sha256(json.dumps([__version__, FORMAT_VERSION, base_sha,
                                       [(p.name, d) for p, d in digests.sha256_files(files).items()]]).encode()
                           ).hexdigest()[:24]
        folder = root / h
        manifest = read_vllm_lora_manifest(folder)
        if not manifest:
            t0 = time.perf_counter()
            overwrite = folder.exists()
            prepare_output_dir(folder, overwrite, inputs=(ckpt.path, adapter))
            if fitted is None:
                fitted = fit(ckpt, load_adapter(adapter))
            manifest = _write_folder(fitted, folder, overwrite=overwrite, threads=None, digests=digests,
                                     t0=t0)
        folders[name] = folder
        ranks.append(manifest["rank"])
        if manifest["needs_plugin"]:
            needs_plugin.append(name)
    problem = plugin_problem() if needs_plugin else None
    if problem:
        raise InputError(f"adapters {needs_plugin} need d2serve's vLLM plugin (row scales): {problem}")
    return folders, vllm_max_lora_rank(max(ranks))


def _last_option_value(args: Sequence[str], name: str) -> str | None:
    """The value of the last ``name VALUE`` / ``name=VALUE`` in ``args`` (argparse's last-wins), else None."""
    value = None
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def lora_serve_args(base: str | Path, adapters: dict[str, Path], user_args: Sequence[str] = ()) -> list[str]:
    """vLLM ``serve`` options that serve ``adapters`` unmerged on ``base`` (folded by :func:`prepare_served_adapters`):
    ``--enable-lora --lora-modules NAME=FOLDER ... --max-lora-rank R --max-loras N+1`` (one spare slot, see
    d2serve.export.vllm_lora_check.cpu_safe_max_loras).

    ``user_args`` are the vLLM options the user passes after them: a ``--max-loras`` there replaces d2serve's N+1
    (fewer slots than adapters: vLLM evicts and re-activates adapters, least recently used first). Base requests stay
    exact with any slot count only through d2serve's vLLM plugin (it keeps slot -1 tokens off the slots' LoRA,
    d2serve.vllm_plugin.patches._wrap_cpu_lora_shrink), so a value below N+1 is refused while the plugin is not loaded.

    Raises:
        InputError: see :func:`prepare_served_adapters`; ``--max-loras`` not a positive integer, or below N+1 while
            d2serve's vLLM plugin would not be loaded.
    """
    from d2serve.export.vllm_lora_check import cpu_safe_max_loras

    folders, rank = prepare_served_adapters(base, adapters)
    args = ["--enable-lora", "--lora-modules", *[f"{n}={f}" for n, f in folders.items()], "--max-lora-rank", str(rank)]
    safe = cpu_safe_max_loras(len(folders))
    given = _last_option_value(user_args, "--max-loras")
    if given is None:
        return [*args, "--max-loras", str(safe)]
    if not given.isdigit() or int(given) < 1:
        raise InputError(f"--max-loras must be a positive integer, got {given!r}")
    problem = plugin_problem()
    if int(given) < safe and problem:
        raise InputError(f"--max-loras {given} leaves no spare LoRA slot for {len(folders)} adapters: vLLM 0.32's CPU "
                         f"LoRA then gives base requests an adapter's LoRA unless d2serve's vLLM plugin is loaded "
                         f"({problem}); drop --max-loras (d2serve uses {safe}) or load the plugin")
    return args


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """``["NAME=DIR", ...]`` -> {NAME: DIR}.

    Raises:
        InputError: a spec without ``=``, an empty name or directory, or a name given twice.
    """
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise InputError(f"adapter {spec!r}: expected NAME=DIR (the served model name, then the adapter directory)")
        if name in out:
            raise InputError(f"adapter name {name!r} is given twice")
        out[name] = Path(path)
    return out


def check_vllm_lora(*, base: str | Path, adapter: str | Path, folder: str | Path, dtype: str = "auto",
                    n_prompts: int = 4, max_tokens: int = 32) -> dict:
    """Parity gate of one folded folder: merge ``adapter`` into ``base`` (``dtype``) in a temporary folder and run
    d2serve.export.vllm_lora_check.parity_check (base + folder vs the merged checkpoint, in vLLM).

    Raises:
        MissingExtraError: vLLM is not installed. InputError: n_prompts outside 1..16, plugin not loadable.
        VllmLoadError: vLLM failed to start or generate.
    """
    import tempfile

    from d2serve.export.vllm import PROMPTS
    from d2serve.export.vllm_lora_check import parity_check
    from d2serve.extras import require
    from d2serve.merge import merge, resolve_dtype

    require("vllm", purpose="the unmerged vLLM parity check")
    if not 1 <= n_prompts <= len(PROMPTS):
        raise InputError(f"n_prompts must be within 1..{len(PROMPTS)}, got {n_prompts}")
    problem = plugin_problem()
    if problem:
        raise InputError(problem)
    ckpt = Checkpoint(base)
    dt = str(resolve_dtype(dtype, ckpt)).removeprefix("torch.")
    man = read_vllm_lora_manifest(folder)
    with tempfile.TemporaryDirectory(prefix="d2serve-merged-") as td:
        merged = Path(td) / "merged"
        merge(base=ckpt, adapter=adapter, out=merged, dtype=dt)
        return parity_check(base, {"adapter": (Path(folder), merged)}, dtype=dt, n_prompts=n_prompts,
                            max_tokens=max_tokens, max_lora_rank=vllm_max_lora_rank(man["rank"]))
