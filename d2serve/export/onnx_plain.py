"""The ``plain`` ONNX target: the logits graph of a causal LM for generic ONNX Runtime use.

One job: export ``logits = f(input_ids, attention_mask, position_ids)`` with
``torch.onnx.export(dynamo=True)`` (no KV cache, ``use_cache=False``), dynamic
batch and sequence axes, external data, and validate it with ONNX Runtime
against the PyTorch float32 model at several shapes and with left padding.

Graph contract (all inputs int64, shape ``(batch, seq)``):
``input_ids``, ``attention_mask`` (1 = token, 0 = padding), ``position_ids``
(for left padding: ``clip(cumsum(mask) - 1, 0)``); output ``logits`` float32
``(batch, seq, vocab)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d2serve.compare import NonFiniteError, max_abs_diff, top1_agreement
from d2serve.export.onnx_files import OnnxExportError, dedupe_initializers, ort_session

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
# Shapes (batch, seq) checked against PyTorch; tracing uses TRACE_SHAPE (>= 2 on every dynamic axis).
VALIDATION_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (1, 17), (3, 5), (2, 64))
TRACE_SHAPE = (2, 8)
LEFT_PAD_LENGTHS = (11, 6)  # two rows, right-aligned, padded on the left to 11


class LogitsOnly(torch.nn.Module):
    """Wrap a causal LM so ``forward(input_ids, attention_mask, position_ids)`` returns only logits.

    Shapes: inputs int64 ``(batch, seq)``; output float32 ``(batch, seq, vocab)``.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """``clip(cumsum(mask, -1) - 1, 0)``: positions 0.. for real tokens, 0 on left padding. int64 ``(b, s)``."""
    return np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)


def export_plain(model: torch.nn.Module, out_dir: Path) -> dict:
    """Export ``model`` (float32, eval) to ``out_dir/model.onnx`` + ``model.onnx.data``.

    Node metadata (stack traces with local paths) is stripped; byte-identical
    initializers are merged (see :func:`dedupe_initializers`). The external
    data location is the bare file name, so the folder opens from any cwd.

    Returns:
        ``{"export_s": float, "deduplicated_initializers": int}``.

    Raises:
        OnnxExportError: ``torch.onnx.export`` failed (see :func:`export_failure`); nothing was written.
    """
    t0 = time.perf_counter()
    b, s = TRACE_SHAPE
    g = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.int64)
    pos = torch.arange(s).expand(b, s).contiguous()
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=int(getattr(model.config, "max_position_embeddings", 8192) or 8192))
    dyn = {k: {0: batch, 1: seq} for k in ("input_ids", "attention_mask", "position_ids")}
    try:
        with torch.no_grad():
            prog = torch.onnx.export(
                LogitsOnly(model).eval(),
                (ids, mask, pos),
                dynamic_shapes=dyn,
                input_names=["input_ids", "attention_mask", "position_ids"],
                output_names=["logits"],
                dynamo=True,
                external_data=True,
                optimize=True,
                verbose=False,
            )
    except torch.onnx.OnnxExporterError as e:  # torch.export could not trace it, or no ONNX translation
        raise export_failure(model, e) from e
    for node in prog.model.graph.all_nodes():
        node.metadata_props.clear()
    removed = dedupe_initializers(prog.model)
    prog.save(str(out_dir / MODEL_FILE), external_data=True)
    return {"export_s": time.perf_counter() - t0, "deduplicated_initializers": removed}


# torch.onnx's exporter error classes (their module is private; matched by name) -> the step that failed.
_EXPORT_STEPS = {
    "TorchExportError": "torch.export (capturing the model graph)",
    "DispatchError": "the ONNX translation (no ONNX function for an operator)",
    "GraphConstructionError": "the ONNX graph construction",
    "ConversionError": "the ONNX translation",
}


def export_failure(model: torch.nn.Module, e: BaseException) -> OnnxExportError:
    """A one-paragraph :class:`OnnxExportError` for a failed ``torch.onnx.export``.

    Names the architecture (``config.architectures``), the step that failed
    (torch.export capture or ONNX translation, from the exporter's error class)
    and the first line of the underlying error (the innermost ``__cause__``).
    """
    cfg = getattr(model, "config", None)
    arch = ", ".join(getattr(cfg, "architectures", None) or [type(model).__name__])
    step = next((_EXPORT_STEPS[c.__name__] for c in type(e).__mro__ if c.__name__ in _EXPORT_STEPS), "torch.onnx.export")
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    first = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), "")
    if len(first) > 300:
        first = first[:300] + "..."
    return OnnxExportError(
        f"{arch}: the plain ONNX export failed in {step}: {type(root).__name__}: {first} "
        "(this architecture or configuration cannot be exported by torch.onnx.export(dynamo=True) with dynamic "
        "batch and sequence axes; nothing was written)"
    )


@dataclass
class _Case:
    name: str
    ids: np.ndarray
    mask: np.ndarray
    pos: np.ndarray


def _cases(vocab: int, seed: int = 0) -> list[_Case]:
    """The fixed validation inputs: VALIDATION_SHAPES (no padding) and one left-padded batch."""
    rng = np.random.default_rng(seed)
    out = []
    for b, s in VALIDATION_SHAPES:
        ids = rng.integers(0, vocab, (b, s), dtype=np.int64)
        mask = np.ones((b, s), np.int64)
        out.append(_Case(f"{b}x{s}", ids, mask, position_ids_from_mask(mask)))
    s = max(LEFT_PAD_LENGTHS)
    mask = np.zeros((len(LEFT_PAD_LENGTHS), s), np.int64)
    for i, n in enumerate(LEFT_PAD_LENGTHS):
        mask[i, s - n :] = 1
    ids = rng.integers(0, vocab, mask.shape, dtype=np.int64) * mask  # pad id 0 (any id works under the mask)
    out.append(_Case(f"left_pad_{'_'.join(map(str, LEFT_PAD_LENGTHS))}", ids, mask, position_ids_from_mask(mask)))
    return out


def validate_plain(model: torch.nn.Module, model_path: Path) -> dict:
    """Compare ONNX Runtime logits with the PyTorch model on the fixed cases.

    Only non-pad positions (mask == 1) are compared, with :mod:`d2serve.compare` (float64). Returns JSON-ready
    dict: ``{"cases": [{"name", "shape", "max_abs_logit_diff", "top1_agreement", "compared_positions",
    "max_abs_reference_logit", "nonfinite"}], "max_abs_logit_diff", "top1_agreement", "nonfinite", "ort_load_s"}``
    (agreement is a fraction in [0, 1], over all positions). A NaN/inf logit on either side makes that case's
    numbers None and its ``nonfinite`` (also listed in the top-level ``nonfinite``) name the side
    (``transformers``/``onnxruntime``), case, position and vocabulary index; the overall numbers are then None,
    so the parity check fails instead of reading NaN as "no difference".

    Raises:
        OnnxExportError: an external-data file is missing (named).
    """
    t0 = time.perf_counter()
    sess = ort_session(model_path)
    load_s = time.perf_counter() - t0
    cases = []
    worst, agree, total = 0.0, 0, 0
    nonfinite: list[dict] = []
    for c in _cases(int(model.config.vocab_size)):
        (ort_logits,) = sess.run(["logits"], {"input_ids": c.ids, "attention_mask": c.mask, "position_ids": c.pos})
        with torch.no_grad():
            ref = LogitsOnly(model)(torch.from_numpy(c.ids), torch.from_numpy(c.mask), torch.from_numpy(c.pos)).numpy()
        if ort_logits.shape != ref.shape:
            raise OnnxExportError(f"ONNX logits shape {ort_logits.shape} != PyTorch {ref.shape} for case {c.name}")
        keep = c.mask.astype(bool)
        r, a = ref[keep], ort_logits[keep]  # (non-pad positions, vocab)
        where, names, dims = f"plain parity, case {c.name}", ("transformers", "onnxruntime"), ("position", "vocab")
        n_pos = int(keep.sum())
        try:
            diff = max_abs_diff(r, a, where=where, names=names, dims=dims)
            same = top1_agreement(r, a, where=where, names=names, dims=dims)[0]
        except NonFiniteError as e:
            nonfinite.append(e.to_json())
            cases.append({"name": c.name, "shape": list(c.ids.shape), "max_abs_logit_diff": None,
                          "top1_agreement": None, "compared_positions": n_pos, "max_abs_reference_logit": None,
                          "nonfinite": e.to_json()})
            continue
        cases.append(
            {
                "name": c.name,
                "shape": list(c.ids.shape),
                "max_abs_logit_diff": diff,
                "top1_agreement": same / n_pos,
                "compared_positions": n_pos,
                "max_abs_reference_logit": float(np.max(np.abs(r.astype(np.float64)))),
                "nonfinite": None,
            }
        )
        worst = max(worst, diff)
        agree += same
        total += n_pos
    if nonfinite or not total:
        return {"cases": cases, "max_abs_logit_diff": None, "top1_agreement": None, "nonfinite": nonfinite,
                "ort_load_s": load_s}
    return {"cases": cases, "max_abs_logit_diff": worst, "top1_agreement": agree / total, "nonfinite": [],
            "ort_load_s": load_s}
