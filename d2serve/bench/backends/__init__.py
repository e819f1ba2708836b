"""Benchmark backends: transformers (``hf``), vLLM (``vllm``), ONNX Runtime GenAI (``onnx``), in one registry.

Each backend is a subclass of :class:`d2serve.bench.backends.protocol.Backend` (the written protocol: what
d2serve.bench.api calls and what it returns) in its own module, and one :class:`BackendEntry` in
:data:`BACKENDS`; heavy engines are imported only when a backend is used. The CLI's ``--backend`` choices and
help come from :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendEntry:
    """One bench backend.

    Attributes:
        name: the ``--backend`` value.
        description: a few words for the CLI help (which arms, through what).
        entry: ``"module:Class"`` of its :class:`~d2serve.bench.backends.protocol.Backend` subclass (imported by
            :meth:`load`, never at registry import).
        extras: the arguments of :func:`d2serve.extras.require` checked before the class is imported: the extra's
            name, then the import names it must provide (all of the extra's when none are given), e.g. ``("vllm",)``;
            () for none.
        torch_device: it runs torch models on a ``--device`` (cpu / cuda); the others pick their own device.
        cuda_dtype: the default compute dtype when it runs on CUDA (None: float32 everywhere).
    """

    name: str
    description: str
    entry: str
    extras: tuple[str, ...] = ()
    torch_device: bool = False
    cuda_dtype: str | None = None

    def load(self) -> type:
        """The backend class.

        Raises:
            MissingExtraError: its extra is not installed (the message names ``d2serve[<extra>]``).
        """
        if self.extras:
            from d2serve.extras import require

            require(*self.extras, purpose=f"the {self.name} bench backend")
        module, _, cls = self.entry.partition(":")
        return getattr(importlib.import_module(module), cls)

    def default_dtype(self, device: str | None) -> str:
        """The compute dtype when ``--dtype`` is not given: :attr:`cuda_dtype` on a CUDA device, else float32."""
        return self.cuda_dtype if self.cuda_dtype and (device or "").startswith("cuda") else "float32"


BACKENDS: dict[str, BackendEntry] = {
    "hf": BackendEntry("hf", "all arms in transformers", "d2serve.bench.backends.hf:HFBackend", torch_device=True,
                       cuda_dtype="bfloat16"),
    "vllm": BackendEntry("vllm", "base, merged and unmerged through d2serve's vLLM plugin",
                         "d2serve.bench.backends.vllm:VLLMBackend", extras=("vllm",)),
    "onnx": BackendEntry("onnx", "base and merged", "d2serve.bench.backends.onnx:OnnxGenAIBackend",
                         extras=("onnx", "onnx", "onnxruntime", "onnxruntime_genai")),
}


def backend_names() -> tuple[str, ...]:
    """The registered backend names, in registry order."""
    return tuple(BACKENDS)


def backend_entry(name: str) -> BackendEntry:
    """The registry entry of ``name``.

    Raises:
        InputError: unknown backend name (the message lists the known ones).
    """
    from d2serve.errors import InputError

    try:
        return BACKENDS[name]
    except KeyError:
        raise InputError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}") from None


def get_backend(name: str):
    """Return the backend class for ``name``.

    Raises:
        InputError: unknown backend name.
        MissingExtraError: the vllm / onnx backend without its ``d2serve[vllm]`` / ``d2serve[onnx]`` extra.
    """
    return backend_entry(name).load()


def backend_help() -> str:
    """The CLI's ``--backend`` help: ``"hf | vllm | onnx (hf: ...; vllm: ...; onnx: ...)."``."""
    return (" | ".join(BACKENDS) + " ("
            + "; ".join(f"{e.name}: {e.description}" for e in BACKENDS.values()) + ").")
