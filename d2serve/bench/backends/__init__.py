"""Benchmark backends: transformers (``hf``), vLLM (``vllm``), ONNX Runtime GenAI (``onnx``).

Each backend exposes ``ARMS_SUPPORTED`` and a class with ``settings()``, ``load(spec)``,
``eval_once(arm, requests)`` and ``generate_once(arm, case)``; heavy engines are imported lazily.
"""

BACKENDS = ("hf", "vllm", "onnx")


def get_backend(name: str):
    """Return the backend class for ``name``.

    Raises:
        ValueError: unknown backend name.
    """
    if name == "hf":
        from .hf import HFBackend

        return HFBackend
    if name == "vllm":
        from .vllm import VLLMBackend

        return VLLMBackend
    if name == "onnx":
        from .onnx import OnnxGenAIBackend

        return OnnxGenAIBackend
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
