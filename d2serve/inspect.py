"""Describe an adapter: its config, each layer's rank, scale, tau and ||dW||, and whether it fits a base."""

from __future__ import annotations

from pathlib import Path

import torch

from d2serve.adapters.io import AdapterError, load_adapter, match_to_base
from d2serve.adapters.methods import get_method
from d2serve.checkpoint import Checkpoint, CheckpointError


def inspect_adapter(adapter: str | Path, base: str | Path | None = None) -> dict:
    """Summarise an adapter directory.

    Returns:
        ``{"method", "config", "num_layers", "num_parameters", "layers": [{"module",
        "rank", "scale", "tau", "shape" (out, in), "delta_fro" (Frobenius norm of dW,
        float64)}], "fits_base": {"ok", "error"} (only with ``base``)}``.

    Raises:
        AdapterConfigError, AdapterError, CheckpointError: the adapter itself is invalid
        (a base that does not fit is reported, not raised).
    """
    adp = load_adapter(adapter)
    method = get_method(adp.method)
    rows = []
    for module, f in adp.layers.items():
        a, b = (f.tensors[n] for n in method.factor_names[:2])
        rows.append({"module": module, "rank": f.rank, "scale": f.scale, "tau": f.tau,
                     "shape": [int(b.shape[0]), int(a.shape[1])],
                     "delta_fro": float(torch.linalg.norm(method.delta(f, torch.float64)))})
    info = {"method": adp.method, "config": adp.config.to_json_dict(), "num_layers": len(rows),
            "num_parameters": adp.num_parameters(), "layers": rows}
    if base is not None:
        try:
            match_to_base(adp, Checkpoint(base))
            info["fits_base"] = {"ok": True, "error": None}
        except (AdapterError, CheckpointError) as e:
            info["fits_base"] = {"ok": False, "error": str(e)}
    return info
