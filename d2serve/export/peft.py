"""Export an adapter as a standard PEFT adapter folder that every PEFT-reading tool loads untouched.

Two exports (docs/adapter-format.md, "Leaving d2serve"):

* :func:`export_dora`: a D2-LoRA adapter as the EXACT PEFT DoRA adapter of rank 2r (registry
  ``Method.as_dora``, d2serve.adapters.methods.d2lora_as_dora). The DoRA merged weight equals the D2-LoRA
  merged weight up to float32 storage of the factors (checked per layer in float64 and recorded; a layer
  beyond :data:`MAX_DORA_REL_ERROR` fails the export).
* :func:`export_lora`: any adapter d2serve merges (D2-LoRA, PEFT DoRA, PEFT LoRA) as a plain PEFT LoRA, for
  engines that serve plain LoRA only: per layer, the truncated SVD of the whole update W_hat - W0 in float64
  (DoRA / D2-LoRA magnitudes included, never dropped), rank chosen per layer by ``--rank`` or by the
  relative Frobenius error budget ``--max-rel-error`` of the layer's merged weight. The export is gated on
  the merged-vs-converted model (KL, top-1 agreement; greedy agreement reported): exit 1 and nothing written
  below :class:`ConversionThresholds`.

Both write ``adapter_config.json`` (PEFT's own ``LoraConfig.save_pretrained``, plus the ``d2serve_export``
marker naming the source; PEFT ignores unknown fields with a warning), ``adapter_model.safetensors``
(float32, PEFT's key names) and the manifest ``d2serve_export.json``, atomically (d2serve.outdir).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from d2serve import __version__
from d2serve.adapters.config import CONFIG_NAME, EXPORT_MARKER, parse_config
from d2serve.adapters.io import PREFIX, WEIGHTS_NAME, AdapterError, load_adapter
from d2serve.adapters.methods import LayerFactors, get_method, truncated_svd_lora
from d2serve.checkpoint import Checkpoint, atomic_output_dir, sha256_file, write_json
from d2serve.errors import CheckFailedError, InputError
from d2serve.export.manifest import EXPORT_MANIFEST as MANIFEST_NAME
from d2serve.fitting import fit as fit_adapter
from d2serve.outdir import prepare_output_dir

FORMAT_VERSION = 1
MAX_DORA_REL_ERROR = 1e-5  # float32 factors: ~1e-7 measured; a layer beyond this means the identity failed
DEFAULT_MAX_REL_ERROR = 0.01  # export lora: relative Frobenius error budget of each merged weight


@dataclass(frozen=True)
class ConversionThresholds:
    """Gate of ``d2serve export lora``: the merged source model (reference) vs base + converted LoRA (PEFT).

    Attributes:
        max_mean_kl: mean KL(merged || converted) per position on the bundled WikiText-2 windows, nats.
        min_top1_agreement: fraction of positions with the same argmax token.
        min_generation_identical: fraction of greedy prompts whose outputs must be identical (0: reported only).
    """

    max_mean_kl: float = 0.01
    min_top1_agreement: float = 0.95
    min_generation_identical: float = 0.0

    def to_json(self) -> dict:
        """The thresholds as a dict."""
        return asdict(self)


def _source(base: str | Path, adapter: str | Path):
    """Load ``adapter``, run every base/adapter check (:func:`d2serve.fitting.fit`) and refuse what a PEFT LoRA/DoRA
    layer cannot carry here. Returns the :class:`d2serve.fitting.Fit`."""
    ckpt = Checkpoint(base)
    adp = load_adapter(adapter)
    fit = fit_adapter(ckpt, adp)
    problems = []
    if adp.modules_to_save:
        problems.append(f"modules_to_save tensors {sorted(adp.modules_to_save)[:3]}: not exported (merge the adapter "
                        "instead, or export an adapter without them)")
    for m in adp.layers:
        kind = ckpt.architecture.layer(m)
        if kind is None or kind.kind not in ("linear", "conv1d"):
            problems.append(f"module {m}: a {kind.kind if kind else 'non-'} layer; the exports write nn.Linear / "
                            "Conv1D layers only")
    if problems:
        raise AdapterError(f"{Path(adapter) / WEIGHTS_NAME} cannot be exported:\n  - " + "\n  - ".join(problems))
    return fit


def _provenance(fit, kind: str) -> dict:
    """The ``d2serve_export`` marker: what this folder is and what it came from (sha256 of every input file)."""
    adp, ckpt = fit.adapter, fit.ckpt
    return {"format": FORMAT_VERSION, "kind": kind, "d2serve_version": __version__, "manifest": MANIFEST_NAME,
            "source_method": adp.method, "source_adapter": str(Path(adp.path).resolve()),
            "source_sha256": {p.name: sha256_file(p) for p in adp.files},
            "base": str(ckpt.path.resolve()), "base_sha256": {s: sha256_file(ckpt.path / s) for s in ckpt.shards}}


def _peft_config(peft_config, what: str) -> tuple[dict, object]:
    """(adapter_config.json content exactly as PEFT writes it (``LoraConfig.save_pretrained``), the same file as
    d2serve reads it (:func:`d2serve.adapters.config.parse_config`))."""
    with tempfile.TemporaryDirectory(prefix="d2serve-peft-config-") as td:
        peft_config.save_pretrained(td)
        raw = json.loads((Path(td) / CONFIG_NAME).read_text())
    return raw, parse_config(raw, source=what)


def _write(tmp: Path, config: dict, tensors: dict[str, torch.Tensor], marker: dict) -> None:
    """adapter_config.json (PEFT's, plus the marker) and the safetensors file, refusing a value float32 cannot hold."""
    for k, t in tensors.items():
        if not torch.isfinite(t).all():
            raise AdapterError(f"exported tensor {k} overflows float32")
    save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
    (tmp / CONFIG_NAME).write_text(json.dumps({**config, EXPORT_MARKER: marker}, indent=2, sort_keys=True) + "\n")


def _rel_max(w: torch.Tensor, ref: torch.Tensor) -> float:
    """max |w - ref| / max |ref| (float64): the per-layer relative error recorded in the manifests."""
    return float((w - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def read_export_marker(adapter: str | Path) -> dict | None:
    """The ``d2serve_export`` marker of an adapter folder's adapter_config.json, or None (not a d2serve export,
    or an unreadable config: the loader reports that)."""
    try:
        cfg = json.loads((Path(adapter) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    m = cfg.get(EXPORT_MARKER) if isinstance(cfg, dict) else None
    return m if isinstance(m, dict) else None


# ------------------------------------------------------------------------------------------------ DoRA


def export_dora(*, base: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write the exact PEFT DoRA adapter (rank 2r, ``use_dora: true``) of a D2-LoRA ``adapter`` for ``base``.

    Config: r' = 2r and lora_alpha' = 2 lora_alpha (rsLoRA: sqrt(2) lora_alpha), ``rank_pattern`` /
    ``alpha_pattern`` values transformed the same way, so PEFT's scaling lora_alpha'/r' (or / sqrt(r')) equals
    the source's lora_alpha / r for every module; the selection fields (target_modules, exclude_modules,
    layers_to_transform, layers_pattern) are the source's. Tensors (float32, PEFT's names):
    ``base_model.model.<module>.lora_A.weight`` (2r, in), ``.lora_B.weight`` (out, 2r),
    ``.lora_magnitude_vector`` (out,). The magnitudes depend on the base's weights (s = ||W0|| / ||W0 + dW||):
    the folder is valid for that base only (its shard sha256 are recorded).

    Returns:
        the manifest written as ``d2serve_export.json``: source and base sha256, the exported config, per layer
        the rank and ``max_rel_error`` = max |W_dora - W_hat| / max |W_hat| (float64, W_dora from the stored
        float32 tensors through PEFT's DoRA merge rule, W_hat the D2-LoRA merge).

    Raises:
        InputError: the adapter is not D2-LoRA (PEFT already reads it), does not fit the base (see
            d2serve.fitting.fit), has modules_to_save; ``out`` non-empty or overlapping an input.
        CheckFailedError: a layer's exported merged weight is beyond :data:`MAX_DORA_REL_ERROR` (nothing written).
    """
    from peft import LoraConfig

    t0 = time.perf_counter()
    out = Path(out)
    prepare_output_dir(out, overwrite, inputs=(Path(base), Path(adapter)))
    fit = _source(base, adapter)
    adp, c = fit.adapter, fit.adapter.config
    if fit.method.as_dora is None:
        raise InputError(f"{adapter}: a {adp.method} adapter is already a PEFT adapter (peft_type LORA); export dora "
                         "converts D2-LoRA adapters (use export lora for a plain LoRA)")
    k = math.sqrt(2.0) if c.use_rslora else 2.0  # PEFT scaling alpha'/r' (or /sqrt(r')) == alpha/r at r' = 2r
    peft_cfg = LoraConfig(
        r=2 * c.r, lora_alpha=k * c.lora_alpha, use_rslora=c.use_rslora, use_dora=True, task_type="CAUSAL_LM",
        target_modules=list(c.target_modules) if isinstance(c.target_modules, tuple) else c.target_modules,
        exclude_modules=list(c.exclude_modules) if isinstance(c.exclude_modules, tuple) else c.exclude_modules,
        layers_to_transform=list(c.layers_to_transform) if isinstance(c.layers_to_transform, tuple)
        else c.layers_to_transform,
        layers_pattern=list(c.layers_pattern) if isinstance(c.layers_pattern, tuple) else c.layers_pattern,
        rank_pattern={p: 2 * v for p, v in c.rank_pattern.items()},
        alpha_pattern={p: k * v for p, v in c.alpha_pattern.items()},
        lora_dropout=0.0, bias="none", base_model_name_or_path=str(fit.ckpt.path.resolve()),
    )
    raw_cfg, new = _peft_config(peft_cfg, "exported DoRA config")
    dora = get_method("dora")
    tensors, layers = {}, {}
    for m, f in adp.layers.items():
        if new.rank_for(m) != 2 * f.rank or not new.targets(m):
            raise AssertionError(f"{m}: exported config gives rank {new.rank_for(m)}, expected {2 * f.rank}")
        scaling = new.scale_for(m)
        w0 = fit.base_weight(m)
        x = fit.method.as_dora(w0, f, scaling, torch.float64, torch.float32)
        a32, b32, mag32 = x.lora_A.float().contiguous(), x.lora_B.float().contiguous(), x.magnitude.float().contiguous()
        tensors[f"{PREFIX}{m}.lora_A.weight"] = a32
        tensors[f"{PREFIX}{m}.lora_B.weight"] = b32
        tensors[f"{PREFIX}{m}.lora_magnitude_vector"] = mag32
        got = dora.merge(w0, LayerFactors(m, {"lora_A": a32, "lora_B": b32, "lora_magnitude_vector": mag32},
                                          scaling), torch.float64).weight
        ref = fit.method.merge(w0, f, torch.float64).weight
        layers[m] = {"rank": 2 * f.rank, "scaling": scaling, "max_rel_error": _rel_max(got, ref)}
    worst = max(layers.items(), key=lambda kv: kv[1]["max_rel_error"])
    if worst[1]["max_rel_error"] > MAX_DORA_REL_ERROR:
        raise CheckFailedError(f"{worst[0]}: the exported DoRA layer's merged weight differs from the D2-LoRA merge "
                               f"by {worst[1]['max_rel_error']:.3g} relative (limit {MAX_DORA_REL_ERROR:g}); "
                               "nothing was written")
    marker = _provenance(fit, "dora")
    manifest = {"d2serve_version": __version__, "format": FORMAT_VERSION, "kind": "dora",
                "source": {"method": adp.method, "adapter": marker["source_adapter"],
                           "sha256": marker["source_sha256"], "config": c.to_json_dict()},
                "base": {"path": marker["base"], "sha256": marker["base_sha256"]},
                "identity": "A' = [A+; A-], B' = diag((1+s)/s) [B+, -tau B-], m' = s ||W0 + scaling B'A'||, "
                            "s = ||W0|| / ||W0 + dW|| per output row (float64)",
                "num_layers": len(layers), "max_rel_error": worst[1]["max_rel_error"],
                "max_rel_error_limit": MAX_DORA_REL_ERROR, "layers": layers, "seconds": 0.0}
    with atomic_output_dir(out, overwrite) as tmp:
        _write(tmp, raw_cfg, tensors, marker)
        manifest["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------ plain LoRA


def _fidelity(base: Path, adapter: Path, folder: Path, th: ConversionThresholds, *, windows: int, window_len: int,
              prompts, max_new_tokens: int) -> dict:
    """Merged source (d2serve merge, float32) vs base + converted LoRA (PEFT, unmerged, float32): verify's teacher-
    forced logit comparison on the bundled WikiText-2 and its greedy generation comparison; the gate's failures."""
    from peft import PeftModel

    from d2serve.merge import merge
    from d2serve.models import load_hf_model, load_tokenizer
    from d2serve.verify.data import WIKITEXT, data_file, resolve_data_dir
    from d2serve.verify.generation import DEFAULT_PROMPTS, compare_generation
    from d2serve.verify.logits import compare_logits, read_text, text_windows

    tok = load_tokenizer(base)
    with tempfile.TemporaryDirectory(prefix="d2serve-export-lora-") as td:
        merge(base=base, adapter=adapter, out=Path(td) / "merged", dtype="float32")
        ref = load_hf_model(Path(td) / "merged", torch.float32)
    conv = PeftModel.from_pretrained(load_hf_model(base, torch.float32), str(folder), is_trainable=False).eval()
    win = text_windows(tok, read_text(data_file(resolve_data_dir(None), WIKITEXT)), windows, window_len, "wikitext2")
    logits = compare_logits(ref, conv, win, "wikitext2").to_json()
    gens = compare_generation(ref, conv, tok, list(prompts or DEFAULT_PROMPTS), max_new_tokens)
    n_id = sum(g.identical for g in gens)
    failures = []
    if logits["nonfinite"]:
        failures.append(f"logits: {logits['nonfinite']['message']}")
    else:
        if logits["mean_kl"] > th.max_mean_kl:
            failures.append(f"mean KL(merged || converted) {logits['mean_kl']:.4g} nats > max_mean_kl {th.max_mean_kl:g}")
        if logits["top1_agreement"] < th.min_top1_agreement:
            failures.append(f"top-1 agreement {logits['top1_agreement']:.4f} < min_top1_agreement "
                            f"{th.min_top1_agreement:g}")
    if n_id < th.min_generation_identical * len(gens):
        failures.append(f"greedy outputs identical for {n_id}/{len(gens)} prompts < min_generation_identical "
                        f"{th.min_generation_identical:g}")
    return {"reference": "the source adapter merged into the base (d2serve merge, float32)",
            "candidate": "the base + the converted LoRA, unmerged (PEFT, float32)",
            "logits": {k: logits[k] for k in ("source", "n_windows", "window_len", "n_positions", "mean_kl",
                                               "max_kl", "top1_agreement", "max_abs_logit_diff", "nonfinite")},
            "generation": {"n_prompts": len(gens), "n_identical": n_id, "max_new_tokens": max_new_tokens,
                           "first_divergences": [g.first_divergence for g in gens]},
            "thresholds": th.to_json(), "passed": not failures, "failures": failures}


def export_lora(*, base: str | Path, adapter: str | Path, out: str | Path, rank: int | None = None,
                max_rel_error: float | None = None, thresholds=None, overwrite: bool = False, windows: int = 2,
                window_len: int = 128, prompts=None, max_new_tokens: int = 16) -> dict:
    """Write a plain PEFT LoRA approximating ``adapter`` on ``base``: per layer the truncated SVD of W_hat - W0.

    Per adapted layer (float64): W_hat = the source method's merge (registry ``Method.merge``), U = W_hat - W0,
    and (d2serve.adapters.methods.truncated_svd_lora) B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T with k = ``rank``, or
    the smallest k whose relative Frobenius error ||W_hat - (W0 + B A)|| / ||W_hat|| is <= ``max_rel_error``
    (default :data:`DEFAULT_MAX_REL_ERROR` when neither is given). The folder: PEFT LoRA with scaling 1
    (lora_alpha = r), ``target_modules`` = the full module paths, per-layer ranks in ``rank_pattern`` /
    ``alpha_pattern`` (keys: the escaped full paths), float32 tensors ``lora_A.weight`` (k, in) and
    ``lora_B.weight`` (out, k).

    Then the gate (:class:`ConversionThresholds`, overridable like verify's with ``key=value`` strings or a dict):
    the source merged into the base (float32) vs PEFT's base + the converted LoRA on the bundled WikiText-2
    (``windows`` x ``window_len`` tokens: mean KL, top-1 agreement) and greedy generation (``prompts``,
    ``max_new_tokens``).

    Returns:
        the manifest (``d2serve_export.json``): per layer rank, ``rel_error`` (Frobenius, of the stored float32
        factors), ``max_rel_error`` (max |.| / max |W_hat|), and the ``fidelity`` section.

    Raises:
        InputError: bad options (both or a bad rank / budget), adapter not fitting the base (d2serve.fitting.fit),
            modules_to_save, non-Linear layers; ``out`` non-empty or overlapping an input.
        CheckFailedError: the gate failed: nothing is written, the message gives the numbers.
    """
    from peft import LoraConfig

    from d2serve.verify.thresholds import apply_overrides

    if rank is not None and max_rel_error is not None:
        raise InputError("give --rank or --max-rel-error, not both")
    if rank is not None and rank < 1:
        raise InputError(f"--rank must be >= 1, got {rank}")
    if max_rel_error is None and rank is None:
        max_rel_error = DEFAULT_MAX_REL_ERROR
    if max_rel_error is not None and not (0 <= max_rel_error < 1):
        raise InputError(f"--max-rel-error must be within [0, 1), got {max_rel_error}")
    th = apply_overrides(ConversionThresholds(), thresholds, example="max_mean_kl=0.005")
    t0 = time.perf_counter()
    out = Path(out)
    prepare_output_dir(out, overwrite, inputs=(Path(base), Path(adapter)))
    fit = _source(base, adapter)
    adp = fit.adapter
    tensors, layers = {}, {}
    for m, f in adp.layers.items():
        w0 = fit.base_weight(m)
        w_hat = fit.method.merge(w0, f, torch.float64).weight
        lr = truncated_svd_lora(w_hat - w0, float(torch.linalg.norm(w_hat)), rank=rank, max_rel_error=max_rel_error)
        a32, b32 = lr.lora_A.float().contiguous(), lr.lora_B.float().contiguous()
        tensors[f"{PREFIX}{m}.lora_A.weight"] = a32
        tensors[f"{PREFIX}{m}.lora_B.weight"] = b32
        got = w0 + b32.double() @ a32.double()
        sv = lr.singular_values
        layers[m] = {"rank": lr.rank, "full_rank": int(sv.numel()),
                     "rel_error": float(torch.linalg.norm(got - w_hat) / torch.linalg.norm(w_hat)),
                     "rel_error_svd": lr.rel_error, "max_rel_error": _rel_max(got, w_hat),
                     "sigma_max": float(sv[0]), "sigma_kept_min": float(sv[lr.rank - 1])}
    r_max = max(v["rank"] for v in layers.values())
    pattern = {re.escape(m): v["rank"] for m, v in layers.items() if v["rank"] != r_max}
    peft_cfg = LoraConfig(r=r_max, lora_alpha=r_max, target_modules=sorted(layers), rank_pattern=pattern,
                          alpha_pattern=dict(pattern), use_rslora=False, use_dora=False, lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM", base_model_name_or_path=str(fit.ckpt.path.resolve()))
    raw_cfg, new = _peft_config(peft_cfg, "exported LoRA config")
    for m, v in layers.items():
        if new.rank_for(m) != v["rank"] or new.scale_for(m) != 1.0 or not new.targets(m):
            raise AssertionError(f"{m}: exported config gives rank {new.rank_for(m)} scale {new.scale_for(m)}")
    marker = _provenance(fit, "lora_svd")
    marker["rank"] = rank
    marker["max_rel_error"] = max_rel_error
    manifest = {"d2serve_version": __version__, "format": FORMAT_VERSION, "kind": "lora_svd",
                "source": {"method": adp.method, "adapter": marker["source_adapter"],
                           "sha256": marker["source_sha256"], "config": adp.config.to_json_dict()},
                "base": {"path": marker["base"], "sha256": marker["base_sha256"]},
                "rank_option": rank, "max_rel_error_option": max_rel_error, "r_max": r_max,
                "num_layers": len(layers), "num_parameters": sum(t.numel() for t in tensors.values()),
                "worst_rel_error": max(v["rel_error"] for v in layers.values()), "layers": layers,
                "fidelity": None, "seconds": 0.0}
    with atomic_output_dir(out, overwrite) as tmp:
        _write(tmp, raw_cfg, tensors, marker)
        manifest["fidelity"] = _fidelity(fit.ckpt.path, Path(adp.path), tmp, th, windows=windows,
                                         window_len=window_len, prompts=prompts, max_new_tokens=max_new_tokens)
        if not manifest["fidelity"]["passed"]:
            ranks = sorted(v["rank"] for v in layers.values())
            raise CheckFailedError(
                f"the converted LoRA (ranks {ranks[0]}..{ranks[-1]}, worst layer relative error "
                f"{manifest['worst_rel_error']:.3g}) does not match the merged source model: "
                + "; ".join(manifest["fidelity"]["failures"])
                + f"; nothing was written to {out} (lower --max-rel-error or raise --rank)")
        manifest["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(tmp / MANIFEST_NAME, manifest)
    return manifest
