"""Describe an adapter: its config, each layer's rank, scale, tau and ||dW||, and whether it fits a base."""

from __future__ import annotations

from pathlib import Path

import torch

from d2serve.adapters.io import AdapterError, load_adapter
from d2serve.adapters.methods import get_method
from d2serve.checkpoint import Checkpoint, CheckpointError
from d2serve.fitting import WrongBaseError, fit


def inspect_adapter(adapter: str | Path, base: str | Path | None = None) -> dict:
    """Summarise an adapter directory.

    Returns:
        ``{"method", "config", "num_layers", "num_parameters", "layers": [{"module",
        "rank", "scale", "tau", "shape" (out, in), "delta_fro" (Frobenius norm of dW,
        float64)}], "fits_base": {"ok", "error", "warning"} (only with ``base``: ``ok`` when every check of
        :func:`d2serve.fitting.fit` passes, else ``error`` is its message; ``warning``: see
        :func:`base_name_warning`), "exported_from": :func:`export_origin` (None unless written by
        ``d2serve export dora`` / ``export lora``)}``.

    Raises:
        AdapterConfigError, AdapterError, CheckpointError: the adapter itself is invalid
        (a base that does not fit is reported, not raised).
    """
    adp = load_adapter(adapter)
    method = get_method(adp.method)
    rows = []
    for module, f in adp.layers.items():
        a, b = (f.tensors[n] for n in method.pairs[0])
        rows.append({"module": module, "rank": f.rank, "scale": f.scale, "tau": f.tau,
                     "shape": [int(b.shape[0]), int(a.shape[1])],
                     "base_fingerprint": f.magnitude is not None,
                     "delta_fro": float(torch.linalg.norm(method.delta(f, torch.float64)))})
    info = {"method": adp.method, "config": adp.config.to_json_dict(), "num_layers": len(rows),
            "num_parameters": adp.num_parameters(), "ignored_fields": list(adp.config.ignored_fields),
            "layers": rows}
    info["exported_from"] = export_origin(adapter)
    if base is not None:
        try:
            fit(Checkpoint(base), adp)
            info["fits_base"] = {"ok": True, "error": None}
        except (AdapterError, CheckpointError, WrongBaseError) as e:
            info["fits_base"] = {"ok": False, "error": str(e)}
        info["fits_base"]["warning"] = base_name_warning(adapter, base)
    return info


def export_origin(adapter: str | Path) -> dict | None:
    """What a folder written by ``d2serve export dora`` / ``export lora`` came from (its adapter_config.json marker
    ``d2serve_export``, d2serve.export.peft), with a one-line ``summary``; None for any other adapter."""
    from d2serve.export.peft import read_export_marker

    m = read_export_marker(adapter)
    if m is None:
        return None
    what = {"dora": "the exact PEFT DoRA form (rank 2r)", "lora_svd": "a truncated-SVD plain LoRA"}.get(
        m.get("kind"), f"an export of kind {m.get('kind')!r}")
    sha = next(iter((m.get("source_sha256") or {}).values()), "")
    budget = ""
    if m.get("kind") == "lora_svd":
        budget = f" (rank {m['rank']})" if m.get("rank") else f" (max rel error {m.get('max_rel_error')})"
    summary = (f"d2serve export: {what}{budget} of the {m.get('source_method')} adapter {m.get('source_adapter')} "
               f"(sha256 {sha[:12]}...), for base {m.get('base')}; d2serve {m.get('d2serve_version')}")
    return {**m, "summary": summary}


def _norm_name(name: str) -> str:
    """``owner/Name-135M`` / ``/path/to/Name_135M/`` -> ``name135m``: last path part, lower case, no separators."""
    last = str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return "".join(ch for ch in last.lower() if ch.isalnum())


def base_name_warning(adapter: str | Path, base: str | Path) -> str | None:
    """A warning when the adapter names a different base model than ``base`` appears to be, else None.

    Compares the adapter config's ``base_model_name_or_path`` (normalised: the
    last ``owner/name`` or path part, case and ``-_ .`` ignored) with the base's
    folder name (in a Hugging Face cache: the repo name of ``models--owner--name``) and
    its config's ``_name_or_path`` / ``_model_name_or_path``.
    A name that is a path to ``base`` itself matches. Shapes can fit although the
    weights belong to another model (a SmolLM adapter on SmolLM2): the merge then
    succeeds and silently produces a model the adapter was never trained for.
    Unreadable files give None (the command's own validation reports them).
    """
    import json

    try:
        named = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(named, str) or not named.strip():
        return None
    base = Path(base)
    try:
        if Path(named).expanduser().resolve() == base.resolve():
            return None
    except (OSError, RuntimeError):
        pass
    candidates = [base.resolve().name]
    candidates += [part.split("--")[-1] for part in base.resolve().parts if part.startswith("models--")]  # HF cache
    try:
        cfg = json.loads((base / "config.json").read_text())
        candidates += [cfg[k] for k in ("_name_or_path", "_model_name_or_path") if isinstance(cfg.get(k), str)]
    except (OSError, ValueError):
        pass
    if _norm_name(named) in {_norm_name(c) for c in candidates if c.strip()}:
        return None
    return (f"adapter {adapter} names base model {named!r} (adapter_config.json base_model_name_or_path), "
            f"but the base {base} is {' / '.join(repr(c) for c in dict.fromkeys(candidates))} "
            "(folder / config name): the shapes may fit although the weights are another model's; "
            "check that this is the base the adapter was trained on")
