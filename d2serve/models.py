"""Build in-memory models: a plain HF checkpoint, or a base with an adapter applied on the fly (unmerged).

Everything loads offline from local directories; safetensors only. Models are
read on the CPU and then moved to ``device`` (see :func:`resolve_device`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from d2serve.adapters.io import Adapter, load_adapter
from d2serve.checkpoint import Checkpoint
from d2serve.errors import InputError
from d2serve.fitting import Fit, fit


def resolve_device(device: str | None) -> str:
    """Validate a device name and return it in canonical form.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or None / ``"auto"`` for the default:
            ``"cuda"`` when ``torch.cuda.is_available()``, else ``"cpu"``.

    Returns:
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        InputError: an unknown device name, or a CUDA device this machine does not have (names the device).
    """
    if device is None or str(device).strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = str(device).strip().lower()
    if name == "cpu":
        return name
    head, sep, idx = name.partition(":")
    if head != "cuda" or (sep and not idx.isdigit()):
        raise InputError(f"device {device!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise InputError(f"device {device!r} is not available: torch {torch.__version__} sees no CUDA device "
                         "(use device cpu)")
    n = torch.cuda.device_count()
    if idx and int(idx) >= n:
        raise InputError(f"device {device!r} is not available: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    return name


def load_tokenizer(path: str | Path):
    """The tokenizer of a local HF checkpoint directory (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def on_model_device(model, t: torch.Tensor) -> torch.Tensor:
    """``t`` moved to the device of ``model``'s parameters (``model.device`` as transformers and PEFT models expose
    it; a model without one, e.g. an ONNX Runtime wrapper, takes CPU tensors). Inputs built on the CPU (token ids,
    probe ids) go through here before every forward call, so ``--device cuda`` never mixes devices."""
    return t.to(getattr(model, "device", None) or torch.device("cpu"))


def load_hf_model(path: str | Path | Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a local HF causal-LM checkpoint in ``dtype``, in eval mode, offline, on ``device``.

    ``path``: the checkpoint directory, or its :class:`Checkpoint` when the caller opened it already (it is then
    not opened again).

    Raises:
        CheckpointError: the directory is not a safetensors HF checkpoint.
    """
    from transformers import AutoModelForCausalLM

    path = path.path if isinstance(path, Checkpoint) else Checkpoint(path).path  # clear errors before transformers'
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True, use_safetensors=True)
    return model.to(device).eval()


def load_unmerged_model(
    base: str | Path, adapter: str | Path | Adapter, dtype: torch.dtype = torch.float32, cache_scale: bool = False,
    device: str = "cpu",
):
    """The base model with the adapter applied on the fly (the unmerged forward), eval mode: the adapter is checked
    against the base (:func:`d2serve.fitting.fit`), then :func:`unmerged_model` builds it.

    Args:
        base: HF checkpoint directory.
        adapter: adapter directory or loaded :class:`Adapter`.
        dtype / cache_scale / device: see :func:`unmerged_model`.

    Raises:
        CheckpointError, AdapterError, WrongBaseError: the adapter does not fit the base (see
            :func:`d2serve.fitting.fit`; e.g. a layer of a kind its method is not defined on).
    """
    adp = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    return unmerged_model(fit(Checkpoint(base), adp), dtype=dtype, cache_scale=cache_scale, device=device)


def unmerged_model(fitted: Fit, dtype: torch.dtype = torch.float32, cache_scale: bool = False, device: str = "cpu"):
    """The base model of ``fitted`` with its adapter applied on the fly (the unmerged forward), eval mode.

    D2LORA adapters use :class:`d2serve.layers.D2LoRALinear`; PEFT LORA/DoRA
    adapters are applied by PEFT itself (``PeftModel.from_pretrained``, which
    reads the safetensors file), so PEFT stays the reference for its methods.

    Args:
        fitted: the adapter checked against the base (:func:`d2serve.fitting.fit`); the base is not opened again.
        dtype: dtype of the model and factors (float32 for fidelity checks).
        cache_scale: D2LORA only: compute s = m / ||W0 + dW|| once (inference).
        device: where the model runs ("cpu", "cuda", "cuda:N"); built on the CPU, then moved.

    Raises:
        InputError: a PEFT adapter that was not loaded from a directory.
    """
    from d2serve.layers import d2lora_layers, inject_d2lora

    adp = fitted.adapter
    model = load_hf_model(fitted.ckpt, dtype)
    if adp.method != "d2lora":
        from peft import PeftModel

        if adp.path is None:
            raise InputError("a PEFT adapter must be given as a directory")
        return PeftModel.from_pretrained(model, str(adp.path), is_trainable=False).to(device).eval()
    ties = fitted.ties
    if ties.tied_base and not ties.tied_out:  # as PEFT: only the adapted end of a tied embedding changes
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    inject_d2lora(model, adp.config, adp.layers)
    if adp.modules_to_save:
        sd = model.state_dict()
        with torch.no_grad():
            for name, t in adp.modules_to_save.items():
                sd[name].copy_(t.to(sd[name].dtype))
    model.to(device)
    if cache_scale:
        for layer in d2lora_layers(model).values():
            layer.cache_scale()
    return model.eval()
