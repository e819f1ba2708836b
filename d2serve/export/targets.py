"""The registry of export targets: every ``d2serve export <name>``, what it takes, runs, writes and needs.

An export target is one module under ``d2serve/export/`` with one public run function, plus one
:class:`ExportTarget` entry in :data:`TARGETS`. The CLI (:mod:`d2serve.cli`) takes the ``export`` command list,
each command's help, the ``export onnx --target`` choices and help from here; a new target (GGUF, say) is its
module, its entry here and its thin option parser in the CLI (``tests/test_export_targets.py`` fails until the
three agree).

The protocol a target's run function follows (the contract :meth:`ExportTarget.load` hands back):

* keyword-only arguments: the inputs its :attr:`~ExportTarget.inputs` name (``merged=`` a merged HF checkpoint
  directory; ``base=`` and ``adapter=`` a base checkpoint and an adapter directory), ``out=`` the output folder and
  ``overwrite=``, then its own options;
* it validates every input before any work and raises :class:`~d2serve.errors.InputError` (or a subclass:
  ``CheckpointError``, ``AdapterError``, ``MissingExtraError`` when one of :attr:`~ExportTarget.extras` is not
  installed) naming the file, field or option;
* it writes ``out`` atomically (:mod:`d2serve.outdir`) with its manifest :attr:`~ExportTarget.manifest` at the top;
* it returns its report or manifest (an object with a ``passed`` attribute, or a dict, with a ``"passed"`` key when
  the target runs a check); a check that fails after the export was written returns ``passed`` False and, when
  :attr:`~ExportTarget.keeps_failed_output`, leaves the folder in place for inspection; a gate that refuses to
  write anything raises :class:`~d2serve.errors.CheckFailedError`.

Exit codes (the CLI's one boundary, :func:`d2serve.cli._error_boundary`, plus :func:`exit_code`):
:data:`EXIT_OK` (0) when the export is written and every check it ran passed, :data:`EXIT_CHECK_FAILED` (1) for a
returned ``passed`` False or a ``CheckFailedError``, :data:`EXIT_BAD_INPUT` (2) for an ``InputError``.

This module imports no target module: :meth:`ExportTarget.load` imports one when it runs, so listing the targets
(``d2serve export --help``) loads neither torch nor any runtime.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from d2serve.errors import InputError
from d2serve.export.manifest import EXPORT_MANIFEST, VLLM_LORA_MANIFEST

MERGED = "merged"
"""Input kind: a merged HF checkpoint directory (``--merged``)."""
BASE_ADAPTER = "base+adapter"
"""Input kind: a base HF checkpoint and an adapter directory (``--base`` and ``--adapter``)."""

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class Variant:
    """One choice of a target's ``--target`` option (``export onnx --target genai``).

    Attributes:
        name: the option value.
        description: a few words for the help text.
        precisions: the ``--precision`` values it accepts, the default first.
    """

    name: str
    description: str
    precisions: tuple[str, ...]


@dataclass(frozen=True)
class ExportTarget:
    """One export target: a ``d2serve export`` command and the function behind it (see the module docstring).

    Attributes:
        name: the command name (``d2serve export <name>``).
        description: one line: the command's help.
        entry: ``"module:function"`` of the run function (imported by :meth:`load`, never at registry import).
        inputs: the input kinds it takes (:data:`MERGED`, :data:`BASE_ADAPTER`; any one of them per run).
        manifest: file name of the manifest written at the top of the output folder (:mod:`d2serve.export.manifest`).
        manifest_kind: what that JSON holds (its ``format`` / ``kind`` key where it has one).
        extras: ``pip install 'd2serve[<extra>]'`` extras every run needs.
        check_extras: extras only its optional runtime check needs (the check is skipped or refused without them).
        keeps_failed_output: a failed check leaves the written folder in place (``passed`` False in its manifest)
            rather than writing nothing.
        variants: the ``--target`` choices, the default first (empty when the target has none).
    """

    name: str
    description: str
    entry: str
    inputs: tuple[str, ...]
    manifest: str
    manifest_kind: str
    extras: tuple[str, ...] = ()
    check_extras: tuple[str, ...] = ()
    keeps_failed_output: bool = False
    variants: tuple[Variant, ...] = ()

    def load(self) -> Callable:
        """The run function named by :attr:`entry` (imports its module, with torch and whatever else it needs).

        Raises:
            ImportError, AttributeError: the entry names no such module or function (a bug in the registry).
        """
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)

    @property
    def variant_names(self) -> tuple[str, ...]:
        """The ``--target`` choices, the default first."""
        return tuple(v.name for v in self.variants)

    def precisions(self) -> dict[str, tuple[str, ...]]:
        """``{variant name: its --precision values}``, in registry order."""
        return {v.name: v.precisions for v in self.variants}

    def variant_help(self) -> str:
        """Help of the ``--target`` option: ``"genai (ORT-GenAI decoder, KV cache) | plain (logits graph)."``."""
        return " | ".join(f"{v.name} ({v.description})" for v in self.variants) + "."

    def precision_help(self) -> str:
        """Help of the ``--precision`` option: ``"genai: fp32 | int4 | int8; plain: fp32."``."""
        return "; ".join(f"{v.name}: {' | '.join(v.precisions)}" for v in self.variants) + "."


TARGETS: tuple[ExportTarget, ...] = (
    ExportTarget(
        name="onnx",
        description="Export to ONNX and validate parity against transformers (exit 1 on a parity failure, report "
                    "kept).",
        entry="d2serve.export.onnx:export_onnx", inputs=(MERGED,), manifest=EXPORT_MANIFEST,
        manifest_kind="d2serve-onnx-export (parity, sizes, files; with --quant also the recipes tried)",
        extras=("onnx",), keeps_failed_output=True,
        variants=(Variant("genai", "ORT-GenAI decoder, KV cache", ("fp32", "int4", "int8")),
                  Variant("plain", "logits graph", ("fp32",))),
    ),
    ExportTarget(
        name="vllm",
        description="Export a merged checkpoint for vLLM: merge, static checks, and a vLLM load + greedy parity "
                    "check.",
        entry="d2serve.export.vllm:export_vllm", inputs=(BASE_ADAPTER, MERGED), manifest=EXPORT_MANIFEST,
        manifest_kind="VllmExportReport (static checks, load_check, serve commands)",
        check_extras=("vllm",), keeps_failed_output=True,
    ),
    ExportTarget(
        name="vllm-lora",
        description="Fold an adapter into a LoRA folder that vLLM serves unmerged with d2serve's plugin (many on one "
                    "base).",
        entry="d2serve.export.vllm_lora:export_vllm_lora", inputs=(BASE_ADAPTER,), manifest=VLLM_LORA_MANIFEST,
        manifest_kind="d2serve vLLM LoRA fold (method, rank, row-scale range, base sha256)",
        check_extras=("vllm",), keeps_failed_output=True,
    ),
    ExportTarget(
        name="dora",
        description="Write a D2-LoRA adapter as the exact PEFT DoRA adapter that PEFT, lm-eval and other PEFT readers "
                    "load.",
        entry="d2serve.export.peft:export_dora", inputs=(BASE_ADAPTER,), manifest=EXPORT_MANIFEST,
        manifest_kind='kind "dora" (per-layer rel_error vs the D2-LoRA merge, provenance)',
    ),
    ExportTarget(
        name="lora",
        description="Approximate an adapter by a plain PEFT LoRA (truncated SVD of W_hat - W0 per layer), gated on "
                    "the merged model (exit 1 and nothing written when the converted model is too far from it).",
        entry="d2serve.export.peft:export_lora", inputs=(BASE_ADAPTER,), manifest=EXPORT_MANIFEST,
        manifest_kind='kind "lora_svd" (per-layer rank and rel_error, fidelity of the converted model)',
    ),
)


def target_names() -> tuple[str, ...]:
    """Every target's name, in registry order (the ``d2serve export`` commands)."""
    return tuple(t.name for t in TARGETS)


def get_target(name: str) -> ExportTarget:
    """The target called ``name``.

    Raises:
        InputError: no such target (the message lists the registered ones).
    """
    for t in TARGETS:
        if t.name == name:
            return t
    raise InputError(f"export target {name!r}: expected one of {', '.join(target_names())}")


def exit_code(result: object) -> int:
    """The exit code of a run function's return value: :data:`EXIT_OK` unless it says ``passed`` False.

    ``result`` is a report with a ``passed`` attribute, a dict with a ``"passed"`` key, or either without one (a
    target that runs no check: 0). Errors raised instead map at the CLI boundary (module docstring).
    """
    passed = result.get("passed", True) if isinstance(result, dict) else getattr(result, "passed", True)
    return EXIT_OK if passed else EXIT_CHECK_FAILED


__all__ = ["BASE_ADAPTER", "EXIT_BAD_INPUT", "EXIT_CHECK_FAILED", "EXIT_OK", "MERGED", "TARGETS", "ExportTarget",
           "Variant", "exit_code", "get_target", "target_names"]
