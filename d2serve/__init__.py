"""d2serve: merge, verify, export and benchmark D2-LoRA (and PEFT LoRA/DoRA) adapters.

The public API is small and keyword-only:

* :func:`load_adapter` -- read and validate an adapter directory (safetensors only).
* :func:`merge` -- stream an adapter into a base checkpoint, exactly (float64 math, one cast).
* :func:`verify` -- prove a merged checkpoint behaves like the unmerged adapter model.
* :func:`export_vllm`, :func:`export_onnx` -- export and prove the result loads in the runtime.
* :func:`bench` -- merged vs unmerged vs base, on this hardware.

Heavy modules are imported lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_adapter": "d2serve.adapters.io",
    "save_adapter": "d2serve.adapters.io",
    "merge": "d2serve.merge",
    "verify": "d2serve.verify",
    "export_vllm": "d2serve.export.vllm",
    "export_onnx": "d2serve.export.onnx",
    "bench": "d2serve.bench",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'd2serve' has no attribute {name!r}")
