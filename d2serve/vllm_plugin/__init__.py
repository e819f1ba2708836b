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

import logging

_log = logging.getLogger("d2serve.vllm_plugin")
_registered = False
stepped_aside: str | None = None  # why the plugin installed nothing in this process (None: installed or not run)


def register() -> None:
    """vLLM's plugin hook: install the patches when the installed vLLM is one the plugin was checked against.

    On any other vLLM (:func:`d2serve.vllm_plugin.compat.problems` finds something: an unsupported release, a
    missing name, a patched method whose upstream source changed) it logs one warning, installs nothing and
    returns: vLLM keeps serving as shipped, and d2serve's folded D2-LoRA/DoRA folders are refused by vLLM itself
    (they carry ``use_dora: true``). Idempotent; never raises for a version mismatch.

    Raises:
        RuntimeError: VLLM_LORA_ENABLE_DUAL_STREAM is set on a supported vLLM (a LoRA path the plugin does not
            patch; refusing is the only safe answer once the plugin is active).
    """
    global _registered, stepped_aside
    if _registered:
        return
    _registered = True
    from d2serve.vllm_plugin import compat

    version = compat.installed_version()
    found = compat.problems(version)
    if found:
        stepped_aside = "; ".join(found)
        _log.warning("d2serve's vLLM plugin is not active (vLLM runs unpatched; d2serve's folded D2-LoRA/DoRA "
                     "folders will be refused): %s", stepped_aside)
        return
    from d2serve.vllm_plugin import patches

    patches.install()
    _register_resolver()


def _register_resolver() -> None:
    """d2serve's folding LoRA resolver (d2serve.vllm_plugin.resolver), only when D2SERVE_LORA_RESOLVER_DIR is set."""
    import os

    if os.environ.get("D2SERVE_LORA_RESOLVER_DIR"):
        from d2serve.vllm_plugin.resolver import register_resolver

        register_resolver()
