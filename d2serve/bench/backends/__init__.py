"""Benchmark backends: transformers (``hf``), vLLM (``vllm``), ONNX Runtime GenAI (``onnx``).

Each backend exposes ``ARMS_SUPPORTED`` and a class with ``settings()``, ``load(spec)``,
``eval_once(arm, requests)`` and ``generate_once(arm, case)``; heavy engines are imported lazily.
"""

BACKENDS = ("hf", "vllm", "onnx")


def get_backend(name: str):
    """Return the backend class for ``name``.

    Raises:
        ValueError: unknown backend name.
        MissingExtraError: the vllm / onnx backend without its ``d2serve[vllm]`` / ``d2serve[onnx]`` extra.
    """
    from d2serve.errors import InputError
    from d2serve.extras import require

    if name == "hf":
        from .hf import HFBackend

        return HFBackend
    if name == "vllm":
        require("vllm", purpose="the vllm bench backend")
        from .vllm import VLLMBackend

        return VLLMBackend
    if name == "onnx":
        require("onnx", "onnx", "onnxruntime", "onnxruntime_genai", purpose="the onnx bench backend")
        from .onnx import OnnxGenAIBackend

        return OnnxGenAIBackend
    raise InputError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
