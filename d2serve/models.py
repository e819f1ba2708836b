"""Build in-memory models: a plain HF checkpoint, or a base with an adapter applied on the fly (unmerged).

Everything loads offline from local directories; safetensors only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from d2serve.adapters.io import Adapter, load_adapter, match_to_base
from d2serve.checkpoint import Checkpoint


def load_tokenizer(path: str | Path):
    """The tokenizer of a local HF checkpoint directory (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a local HF causal-LM checkpoint in ``dtype``, in eval mode, offline.

    Raises:
        CheckpointError: the directory is not a safetensors HF checkpoint.
    """
    from transformers import AutoModelForCausalLM

    Checkpoint(path)  # clear errors before transformers' own
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True, use_safetensors=True)
    return model.eval()


def load_unmerged_model(
    base: str | Path, adapter: str | Path | Adapter, dtype: torch.dtype = torch.float32, cache_scale: bool = False
):
    """The base model with the adapter applied on the fly (the unmerged forward), eval mode.

    D2LORA adapters use :class:`d2serve.layers.D2LoRALinear`; PEFT LORA/DoRA
    adapters are applied by PEFT itself (``PeftModel.from_pretrained``, which
    reads the safetensors file), so PEFT stays the reference for its methods.

    Args:
        base: HF checkpoint directory.
        adapter: adapter directory or loaded :class:`Adapter`.
        dtype: dtype of the model and factors (float32 for fidelity checks).
        cache_scale: D2LORA only: compute s = m / ||W0 + dW|| once (inference).

    Raises:
        AdapterError: the adapter does not fit the base (see :func:`match_to_base`).
    """
    from d2serve.layers import d2lora_layers, inject_d2lora

    adp = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    match_to_base(adp, Checkpoint(base))
    model = load_hf_model(base, dtype)
    if adp.method != "d2lora":
        from peft import PeftModel

        if adp.path is None:
            raise ValueError("a PEFT adapter must be given as a directory")
        return PeftModel.from_pretrained(model, str(adp.path), is_trainable=False).eval()
    inject_d2lora(model, adp.config, adp.layers)
    if adp.modules_to_save:
        sd = model.state_dict()
        with torch.no_grad():
            for name, t in adp.modules_to_save.items():
                sd[name].copy_(t.to(sd[name].dtype))
    if cache_scale:
        for layer in d2lora_layers(model).values():
            layer.cache_scale()
    return model.eval()
