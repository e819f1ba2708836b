"""The file names of the manifests d2serve writes beside its outputs (the merge's and the exports'), defined once.

Each export target (:mod:`d2serve.export.targets`) writes its report or manifest at the top of its output folder:
:data:`EXPORT_MANIFEST` (``d2serve_export.json``) for the ONNX, vLLM and PEFT exports, :data:`VLLM_LORA_MANIFEST`
(``d2serve_vllm_lora.json``) for the folded LoRA folders vLLM serves unmerged (a PEFT LoRA layout, whose
``adapter_config.json`` points at it). Readers that must tell an export's bookkeeping from model files (the
checkpoint side-file copy, the vLLM static checks, the ONNX reader) name them from here.

Kept free of any d2serve import (layer 0 in tests/test_import_layers.py) so that the checkpoint layer below the
exports can name it too.
"""

from __future__ import annotations

MERGE_MANIFEST = "d2serve_merge.json"
"""File name of a merged checkpoint's manifest (``d2serve merge``; JSON object, UTF-8: inputs' sha256, the method and
its settings, per-layer statistics; read back by :func:`d2serve.fitting.read_manifest`)."""

EXPORT_MANIFEST = "d2serve_export.json"
"""File name of an export's manifest (JSON object, UTF-8, written last and atomically with the folder)."""

VLLM_LORA_MANIFEST = "d2serve_vllm_lora.json"
"""File name of a folded vLLM LoRA folder's manifest (``d2serve export vllm-lora``; JSON object, UTF-8)."""

__all__ = ["EXPORT_MANIFEST", "MERGE_MANIFEST", "VLLM_LORA_MANIFEST"]
