"""A vLLM LoRA resolver that folds D2-LoRA / PEFT DoRA / PEFT LoRA adapters on first use.

vLLM's OpenAI server asks its registered resolvers (``vllm.lora.resolver.LoRAResolverRegistry``) for a request
whose ``model`` is neither the base nor a loaded adapter, when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is on. With
``D2SERVE_LORA_RESOLVER_DIR=ROOT`` set, d2serve's plugin registers :class:`FoldingResolver` (name ``d2serve``):
``model: NAME`` resolves to the adapter folder ``ROOT/NAME`` as trained (D2-LoRA format v1, PEFT DoRA or PEFT
LoRA), folded for the served base by d2serve.export.vllm_lora.prepare_served_adapters (cached, keyed by the
d2serve version and the sha256 of the base shards and adapter files) and loaded from the folded folder. The
folded rank must fit the server's ``--max-lora-rank`` (2r for D2-LoRA).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

ENV_DIR = "D2SERVE_LORA_RESOLVER_DIR"
RESOLVER_NAME = "d2serve"

logger = logging.getLogger("d2serve.vllm_plugin.resolver")


from d2serve.vllm_plugin import compat

_v = compat.load()  # imported only by the plugin's register(), after vLLM itself


class FoldingResolver(_v.LoRAResolver):  # type: ignore[misc]
    """Resolve ``lora_name`` to ``root/lora_name``, folded for ``base_model_name`` (a local checkpoint directory).

    Returns None (vLLM then answers 404) when there is no such adapter folder, the name is not a plain folder name,
    or folding fails (the reason is logged as a warning: wrong base, unsupported layers, ...).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def fold(self, base_model_name: str, lora_name: str) -> Path | None:
        """The folded folder of ``root/lora_name`` for the base (None: no such adapter / it cannot be folded)."""
        from d2serve.errors import InputError
        from d2serve.export.vllm_lora import prepare_served_adapters

        if not lora_name or lora_name in (".", "..") or "/" in lora_name or os.sep in lora_name:
            return None
        adapter = self.root / lora_name
        if not (adapter / "adapter_config.json").is_file() or not Path(base_model_name).is_dir():
            return None
        try:
            folders, _ = prepare_served_adapters(base_model_name, {lora_name: adapter})
        except (InputError, OSError) as e:
            logger.warning("d2serve resolver: %s cannot be served on %s: %s", adapter, base_model_name, e)
            return None
        return folders[lora_name]

    async def resolve_lora(self, base_model_name: str, lora_name: str):
        folder = await asyncio.to_thread(self.fold, base_model_name, lora_name)
        if folder is None:
            return None
        # the id is replaced by vLLM's serving layer (OpenAIServingModels.resolve_lora)
        return _v.LoRARequest(lora_name=lora_name, lora_int_id=abs(hash(lora_name)) % (2**31 - 1) + 1,
                           lora_path=str(folder))


def register_resolver() -> None:
    """Register :class:`FoldingResolver` when ``D2SERVE_LORA_RESOLVER_DIR`` is set (no-op otherwise).

    Raises:
        ValueError: the variable names no directory.
    """
    root = os.environ.get(ENV_DIR)
    if not root:
        return
    if not Path(root).is_dir():
        raise ValueError(f"{ENV_DIR}={root!r} is not a directory (d2serve's LoRA resolver folds adapters found there)")
    _v.LoRAResolverRegistry.register_resolver(RESOLVER_NAME, FoldingResolver(root))
