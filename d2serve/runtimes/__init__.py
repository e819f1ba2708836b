"""The runtimes under test of ``d2serve verify``: transformers (``hf``), vLLM (``vllm``), ONNX Runtime GenAI
(``ort-genai``), one module each against one protocol (:mod:`d2serve.runtimes.protocol`), in one registry.

``verify --engine`` offers the runtimes with ``engine_option``; the ORT-GenAI runtime is chosen by its artifact
(an export folder with ``genai_config.json``). A new runtime (SGLang, say) is its module and its entry here.
Listing the registry imports no runtime module (nor torch).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RuntimeEntry:
    """One runtime under test.

    Attributes:
        name: registry name (``--engine`` value for an engine option).
        description: a few words for the CLI help.
        entry: ``"module:Class"`` of its :class:`~d2serve.runtimes.protocol.RuntimeUnderTest` subclass.
        engine_option: offered by ``verify --engine`` (False: chosen by the merged folder it detects).
    """

    name: str
    description: str
    entry: str
    engine_option: bool = True

    def load(self):
        """The runtime class (imports its module)."""
        module, _, cls = self.entry.partition(":")
        return getattr(importlib.import_module(module), cls)


RUNTIMES: dict[str, RuntimeEntry] = {
    "hf": RuntimeEntry("hf", "every check in transformers", "d2serve.runtimes.hf:TransformersRuntime"),
    "vllm": RuntimeEntry("vllm", "weights, then task accuracy through vLLM: the merged checkpoint vs the adapter "
                         "served unmerged by d2serve's plugin; no logit/generation comparison",
                         "d2serve.runtimes.vllm:VllmRuntime"),
    "ort-genai": RuntimeEntry("ort-genai", "an ONNX Runtime GenAI export folder as --merged (chosen by its "
                              "genai_config.json)", "d2serve.runtimes.ort_genai:OrtGenaiRuntime", engine_option=False),
}


def engine_names() -> tuple[str, ...]:
    """The ``verify --engine`` choices, default first."""
    return tuple(n for n, e in RUNTIMES.items() if e.engine_option)


def engine_help() -> str:
    """The CLI's ``--engine`` help, from the registry."""
    return " | ".join(engine_names()) + " (" + "; ".join(
        f"{e.name}: {e.description}" for e in RUNTIMES.values() if e.engine_option) + ")."


def select_runtime(engine: str, merged: str | Path):
    """The runtime under test for ``verify --engine engine --merged merged``: a runtime that detects ``merged``
    as its own artifact, else the engine asked for.

    Raises:
        InputError: ``engine`` is not an engine option, or it was asked for an artifact of another runtime.
    """
    from d2serve.errors import InputError

    if engine not in engine_names():
        raise InputError(f"engine {engine!r}: expected one of {', '.join(engine_names())}")
    for entry in RUNTIMES.values():
        if not entry.engine_option:
            cls = entry.load()
            if cls.detects(merged):
                if engine != engine_names()[0]:
                    raise InputError(f"--engine {engine} verifies a merged HF checkpoint; {merged} is an "
                                     f"{cls.artifact}")
                return cls()
    return RUNTIMES[engine].load()()
