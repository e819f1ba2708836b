"""d2serve's vLLM plugin: serve D2-LoRA and DoRA adapters unmerged, exactly, many on one base.

Registered as the ``vllm.general_plugins`` entry point ``d2serve`` (pyproject.toml); vLLM calls
:func:`register` in every process it starts (API server, engine core, workers), so it is cheap and
idempotent. It imports nothing heavy until vLLM itself has been imported by the caller.

What it adds to vLLM's LoRA (see d2serve.export.vllm_lora for the folder and docs/vllm.md for the math):
every adapted linear layer computes ``s[slot] * (x W0^T) + b + LoRA(x)`` where ``s`` is the per-output-row
scale of the token's adapter (``d2serve_scales.safetensors``), and tokens without an adapter use s = 1.
The patch surface (d2serve.vllm_plugin.patches) is a small, named set of functions. With
``D2SERVE_LORA_RESOLVER_DIR`` set it also registers a LoRA resolver that folds adapters on first use
(d2serve.vllm_plugin.resolver).
"""

from __future__ import annotations

SUPPORTED_VLLM = ("0.32.",)  # version prefixes this plugin was written and tested for

_registered = False


def register() -> None:
    """Install the patches (idempotent). Raises RuntimeError on a vLLM version it was not written for."""
    global _registered
    if _registered:
        return
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"d2serve's vLLM plugin supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}, found {version}: "
            "its patches target that version's LoRA internals. Disable it with VLLM_PLUGINS='' (D2-LoRA/DoRA "
            "folders are then refused) or install a supported vLLM"
        )
    from d2serve.vllm_plugin import patches

    patches.install()
    _register_resolver()
    _registered = True


def _register_resolver() -> None:
    """d2serve's folding LoRA resolver (d2serve.vllm_plugin.resolver), only when D2SERVE_LORA_RESOLVER_DIR is set."""
    import os

    if os.environ.get("D2SERVE_LORA_RESOLVER_DIR"):
        from d2serve.vllm_plugin.resolver import register_resolver

        register_resolver()
