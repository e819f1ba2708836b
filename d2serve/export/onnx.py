"""Export a merged checkpoint to ONNX, validate it, and write the ``d2serve_export.json`` manifest.

Two targets (see ``docs/onnx.md``):

* ``genai``: a KV-cache decoder for ONNX Runtime GenAI, built by the
  onnxruntime-genai model builder (:mod:`d2serve.export.onnx_genai`);
  precision ``fp32``, ``int4`` or ``int8`` (quantization recipes and their fidelity gate:
  :mod:`d2serve.export.onnx_quant`).
* ``plain``: the logits graph from ``torch.onnx.export(dynamo=True)``
  (:mod:`d2serve.export.onnx_plain`); precision ``fp32``.

Validation is part of export. The output is written atomically; when the
export itself succeeds but a parity check fails, the folder is still put in
place with ``"passed": false`` in its manifest (so the numbers can be read)
and :func:`export_onnx` returns a report whose ``passed`` is False -- the
CLI then exits 1. Consumers must check ``passed`` before serving the folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from d2serve.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_output_dir,
    copy_side_entries,
    prepare_output_dir,
    write_json,
)
from d2serve.console import in_steps, step
from d2serve.export import onnx_genai, onnx_plain
from d2serve.export.manifest import EXPORT_MANIFEST as MANIFEST
from d2serve.export.onnx_files import OnnxExportError, file_records, initializer_stats
from d2serve.export.targets import get_target
from d2serve.outdir import temp_sibling

TARGETS = get_target("onnx").variant_names  # ("genai", "plain"): the registry (d2serve.export.targets) owns them
PRECISIONS = get_target("onnx").precisions()
MAX_INITIALIZER_RATIO = 1.05

# Pass/fail tolerances per (target, precision); written verbatim into the manifest.
#   max_abs_logit_diff: float32 logits, ONNX vs transformers float32 of the same checkpoint (None = report only).
#   min_top1_agreement: fraction of compared positions whose argmax agrees (genai: teacher-forced along the
#       transformers greedy path).
#   require_identical_greedy: every prompt's free-running greedy tokens must be identical.
#   min_content_tokens_per_prompt (genai): mean content tokens (not EOS/pad/special) of the reference greedy output
#       per prompt that the comparison covered (both sides decode max_new_tokens tokens, EOS ignored); fewer fails.
TOLERANCES: dict[tuple[str, str], dict] = {
    ("plain", "fp32"): {"max_abs_logit_diff": 5e-3, "min_top1_agreement": 0.99, "require_identical_greedy": False},
    ("genai", "fp32"): {"max_abs_logit_diff": 1e-2, "min_top1_agreement": 1.0, "require_identical_greedy": True,
                        "min_content_tokens_per_prompt": onnx_genai.MIN_CONTENT_TOKENS_PER_PROMPT},
    # int4: a broken-export detector only (a wrong graph gives ~0), not a quality claim; SmolLM2-135M with the
    # builder's default int4 (RTN, block 32, int4 tied embedding) measured 0.60-0.63 teacher-forced top-1.
    ("genai", "int4"): {"max_abs_logit_diff": None, "min_top1_agreement": 0.4, "require_identical_greedy": False,
                        "min_content_tokens_per_prompt": onnx_genai.MIN_CONTENT_TOKENS_PER_PROMPT},
    # int8: the same broken-export detector; fidelity is gated by d2serve.export.onnx_quant (export --quant).
    ("genai", "int8"): {"max_abs_logit_diff": None, "min_top1_agreement": 0.4, "require_identical_greedy": False,
                        "min_content_tokens_per_prompt": onnx_genai.MIN_CONTENT_TOKENS_PER_PROMPT},
}


@dataclass
class OnnxExportReport:
    """What one ONNX export produced and measured; ``to_json()`` is the manifest (stable keys).

    Attributes:
        target, precision: as requested.
        merged, out: input checkpoint and output folder (absolute paths as strings).
        passed: every check met its tolerance.
        failures: human-readable reasons for ``passed == False`` (empty when passed).
        tied_embeddings: from the checkpoint's ``tie_word_embeddings``.
        tolerances: the thresholds applied (see :data:`TOLERANCES`), plus ``max_initializer_ratio``.
        parity: target-specific numbers (plain: per-shape cases; genai: per-prompt tokens).
        sizes: ``onnx_initializer_bytes``, ``onnx_parameter_initializer_bytes`` (without rotary
            caches), ``torch_parameter_bytes`` (unique float32 parameters), ``initializer_ratio``,
            ``embedding_copies`` (initializers equal to the float32 embedding or its transpose).
        files: ``[{"path", "size_bytes", "sha256"}]`` of every file but the manifest.
        total_size_bytes: sum of ``files`` sizes.
        export_s: seconds spent exporting (builder or torch.onnx.export).
        validation_s: seconds spent validating.
        decode_tokens_per_s: ORT-GenAI greedy decode speed (tokens after the first; genai only, else None).
        versions: library versions used.
    """

    target: str
    precision: str
    merged: str
    out: str
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    tied_embeddings: bool = False
    tolerances: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    files: list[dict] = field(default_factory=list)
    total_size_bytes: int = 0
    export_s: float = 0.0
    validation_s: float = 0.0
    decode_tokens_per_s: float | None = None
    versions: dict = field(default_factory=dict)
    threads: dict = field(default_factory=dict)  # d2serve.threads.record: torch threads of the reference runs

    def to_json(self) -> dict:
        """The manifest dict (``format``/``version`` first, then the fields in declaration order)."""
        return {"format": "d2serve-onnx-export", "version": 1, **asdict(self)}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__}
    import importlib.metadata as md

    try:  # recorded for the manifest only (the plain target does not use it); read without importing it
        out["onnxruntime_genai"] = md.version("onnxruntime-genai")
    except md.PackageNotFoundError:
        out["onnxruntime_genai"] = None
    return out


def _check_args(
    merged: Path, out: Path, target: str, precision: str, overwrite: bool, prompts, max_new_tokens: int
) -> Checkpoint:
    """Validate inputs before any work. Raises OnnxExportError/CheckpointError/FileExistsError/ValueError."""
    if target not in TARGETS:
        raise OnnxExportError(f"target {target!r}: expected one of {', '.join(TARGETS)}")
    if precision not in PRECISIONS[target]:
        raise OnnxExportError(
            f"precision {precision!r} is not supported for target {target!r}: expected {'|'.join(PRECISIONS[target])}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise OnnxExportError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if prompts is not None and (not prompts or not all(isinstance(p, str) and p for p in prompts)):
        raise OnnxExportError("prompts: expected a non-empty list of non-empty strings")
    ckpt = Checkpoint(merged)
    from d2serve.export.checks import require_hf_checkpoint

    require_hf_checkpoint(merged)  # every problem a runtime/builder would trip on, named (CheckpointError)
    prepare_output_dir(out, overwrite, inputs=(merged,))
    return ckpt


def _size_checks(model_path: Path, hf_model, tied: bool, precision: str) -> tuple[dict, list[str]]:
    """Initializer bytes vs PyTorch parameter bytes and embedding copies; returns (sizes, failures)."""
    seen, torch_bytes = set(), 0
    for p in hf_model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            torch_bytes += p.numel() * p.element_size()
    emb = hf_model.get_input_embeddings().weight.detach().float().numpy()
    st = initializer_stats(model_path, reference=emb)
    ratio = st.parameter_bytes / torch_bytes
    sizes = {
        "onnx_initializer_bytes": st.total_bytes,
        "onnx_parameter_initializer_bytes": st.parameter_bytes,
        "torch_parameter_bytes": torch_bytes,
        "initializer_ratio": ratio,
        "embedding_copies": st.copies_of,
    }
    failures = []
    if ratio > MAX_INITIALIZER_RATIO:
        failures.append(
            f"ONNX parameter initializers are {ratio:.3f}x the PyTorch parameter bytes (max {MAX_INITIALIZER_RATIO})"
        )
    if tied and st.copies_of > 1:
        failures.append(f"tied embeddings stored {st.copies_of} times in the ONNX initializers (expected once)")
    if precision == "fp32" and st.copies_of < 1:
        failures.append("the float32 embedding matrix is not found among the ONNX initializers")
    return sizes, failures


def _parity_checks(parity: dict, tol: dict) -> list[str]:
    """Compare parity numbers with tolerances; returns failure messages."""
    failures = [f"non-finite logits: {e['message']}" for e in parity.get("nonfinite") or []]
    if failures or parity["max_abs_logit_diff"] is None or parity["top1_agreement"] is None:
        return failures or ["no logits were compared (nothing to call equal)"]
    if parity.get("content_token_failure"):
        failures.append(parity["content_token_failure"])
    if tol["max_abs_logit_diff"] is not None and not parity["max_abs_logit_diff"] <= tol["max_abs_logit_diff"]:
        failures.append(f"max abs logit diff {parity['max_abs_logit_diff']:.3g} > {tol['max_abs_logit_diff']:.3g}")
    if not parity["top1_agreement"] >= tol["min_top1_agreement"]:
        failures.append(f"top-1 agreement {parity['top1_agreement']:.4f} < {tol['min_top1_agreement']}")
    if tol["require_identical_greedy"] and not parity.get("all_identical", True):
        bad = [f"{r['prompt']!r}@{r['first_divergence']}" for r in parity["prompts"] if not r["identical"]]
        failures.append(f"greedy tokens differ from transformers (prompt@first divergence): {', '.join(bad)}")
    return failures


@in_steps  # long steps shown as stages with elapsed time (d2serve.console; the CLI shows them)
def export_onnx(
    *,
    merged: str | Path,
    out: str | Path,
    target: str = "genai",
    precision: str = "fp32",
    overwrite: bool = False,
    prompts: list[str] | None = None,
    tolerances: dict | None = None,
    max_new_tokens: int = onnx_genai.MAX_NEW_TOKENS,
    builder_options: list[str] | None = None,
    threads: int | None = None,
) -> OnnxExportReport:
    """Export ``merged`` to ONNX (``target`` genai|plain), validate against transformers, write the manifest.

    The checkpoint is loaded in float32 whatever its stored dtype (bf16 is
    upcast) and is the reference for parity. Tied embeddings are read from
    the checkpoint's config (never a flag).

    Args:
        merged: HF safetensors checkpoint directory (e.g. the output of ``d2serve merge``).
        out: output folder; must be empty or absent unless ``overwrite``.
        target: "genai" (ORT-GenAI decoder, KV cache) or "plain" (logits graph).
        precision: genai: "fp32" | "int4" | "int8"; plain: "fp32".
        overwrite: replace a non-empty ``out``.
        prompts: genai prompt set (default :data:`onnx_genai.DEFAULT_PROMPTS`); ignored by plain.
        tolerances: overrides merged into :data:`TOLERANCES` for this run (recorded in the manifest).
        max_new_tokens: genai greedy tokens generated per prompt (default 32).
        builder_options: extra ``key=value`` options for the genai model builder (``--extra_options``), e.g. a
            quantization recipe of :mod:`d2serve.export.onnx_quant`; recorded in ``parity.builder_args``.
        threads: torch threads of the transformers reference (its logits and greedy decoding); None: chosen per
            step from the cores this process may use (:func:`d2serve.threads.pick`). Recorded (``threads``).

    Returns:
        The report (also written as ``<out>/d2serve_export.json``). ``passed``
        is False when a parity or size check failed; the folder is kept then.

    Raises:
        OnnxExportError: bad target/precision/prompts, builder failure, incomplete output.
        CheckpointError: ``merged`` is not a safetensors HF checkpoint, or fails
            :func:`d2serve.export.checks.require_hf_checkpoint` (names, dtype, index, tokenizer).
        FileExistsError: ``out`` is non-empty and ``overwrite`` is False.
        ValueError: ``out`` overlaps ``merged``.
        MissingExtraError: the ``onnx`` extra is not installed (``pip install 'd2serve[onnx]'``).
    """
    from d2serve.extras import require
    from d2serve.models import load_hf_model, load_tokenizer

    needs = ("onnxruntime_genai",) if target == "genai" else ("onnxscript",)
    require("onnx", "onnx", "onnxruntime", *needs, purpose=f"the ONNX export (target {target!r})")

    merged, out = Path(merged), Path(out)
    ckpt = _check_args(merged, out, target, precision, overwrite, prompts, max_new_tokens)
    if target == "genai":
        onnx_genai.check_genai_limits(ckpt.config, merged)
    tol = {**TOLERANCES[(target, precision)], **(tolerances or {})}
    unknown = set(tol) - set(TOLERANCES[(target, precision)])
    if unknown:
        raise OnnxExportError(f"tolerances: unknown keys {sorted(unknown)}; expected {sorted(TOLERANCES[(target, precision)])}")
    floor = tol.get("min_content_tokens_per_prompt")
    if floor is not None and max_new_tokens < floor:
        raise OnnxExportError(f"max_new_tokens {max_new_tokens} < min_content_tokens_per_prompt {floor:g}: the genai "
                              "parity check could never compare enough content tokens")
    tied = ckpt.tied_embeddings
    report = OnnxExportReport(
        target=target, precision=precision, merged=str(merged.resolve()), out=str(out.resolve()),
        tied_embeddings=tied, tolerances={**tol, "max_initializer_ratio": MAX_INITIALIZER_RATIO}, versions=_versions(),
    )
    from d2serve.threads import check_requested, pick, record, torch_threads

    threads = check_requested(threads)
    report.threads = record(threads, forward=pick("forward", threads))
    step(f"loading {merged.name} in float32 (the parity reference)")
    hf_model = load_hf_model(merged, dtype=torch.float32)
    with torch_threads(report.threads["forward"]), atomic_output_dir(out, overwrite) as tmp:
        if target == "plain":
            step("exporting the plain ONNX logits graph (torch.onnx; minutes on CPU)")
            info = onnx_plain.export_plain(hf_model, tmp)
            copy_side_entries([merged / "config.json", *ckpt.side_files()], tmp)
            model_path = tmp / onnx_plain.MODEL_FILE
            step("parity: ONNX Runtime logits vs transformers")
            t0 = time.perf_counter()
            parity = onnx_plain.validate_plain(hf_model, model_path)
            parity["deduplicated_initializers"] = info["deduplicated_initializers"]
        else:
            builder_log = temp_sibling(out, f"builder-{time.time_ns()}.log")
            step(f"building the ORT-GenAI decoder ({precision}; minutes on CPU)")
            try:
                info = onnx_genai.build_genai(merged, tmp, precision, tied, builder_log, options=builder_options)
            finally:
                builder_log.unlink(missing_ok=True)
            model_path = tmp / json.loads((tmp / "genai_config.json").read_text())["model"]["decoder"]["filename"]
            step("parity: ORT-GenAI greedy generation vs transformers")
            t0 = time.perf_counter()
            parity = onnx_genai.validate_genai(
                tmp, hf_model, load_tokenizer(merged), list(prompts or onnx_genai.DEFAULT_PROMPTS), max_new_tokens,
                min_content_tokens_per_prompt=floor,
            )
            parity["builder_args"] = info["builder_args"]
            report.decode_tokens_per_s = parity["decode_tokens_per_s"]
        report.export_s = info["export_s"]
        sizes, size_failures = _size_checks(model_path, hf_model, tied, precision)
        report.validation_s = time.perf_counter() - t0
        report.parity, report.sizes = parity, sizes
        report.failures = _parity_checks(parity, tol) + size_failures
        report.passed = not report.failures
        report.files = file_records(tmp, skip=(MANIFEST,))
        report.total_size_bytes = sum(f["size_bytes"] for f in report.files)
        write_json(tmp / MANIFEST, report.to_json())
    return report


def load_report(folder: str | Path) -> dict:
    """Read ``<folder>/d2serve_export.json``.

    Raises:
        OnnxExportError: the manifest is missing or not JSON.
    """
    p = Path(folder) / MANIFEST
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as e:
        raise OnnxExportError(f"{p}: no export manifest") from e
    except json.JSONDecodeError as e:
        raise OnnxExportError(f"{p}: manifest is not JSON: {e}") from e


__all__ = ["OnnxExportReport", "export_onnx", "load_report", "TOLERANCES", "MANIFEST", "OnnxExportError", "CheckpointError"]
