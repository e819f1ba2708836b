"""The trainer's probe: fixed token ids and the unmerged model's logits, to check a merge against training outputs.

File ``d2serve_probe.safetensors`` in the adapter directory: ``input_ids``
(n, L) int64 and ``logits`` (n, L, vocab) float32 from the trained unmerged
model (teacher-forced, no padding).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from d2serve.checkpoint import CheckpointError, read_safetensors_header
from d2serve.models import on_model_device

PROBE_NAME = "d2serve_probe.safetensors"


def read_probe(adapter_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """The probe of an adapter dir (``input_ids``, ``logits``), or None when the adapter has none.

    Raises:
        CheckpointError: the probe file is not safetensors, truncated, or lacks the two tensors.
    """
    p = Path(adapter_dir) / PROBE_NAME
    if not p.is_file():
        return None
    read_safetensors_header(p)
    probe = load_file(str(p))
    if set(probe) != {"input_ids", "logits"} or probe["logits"].shape[:2] != probe["input_ids"].shape:
        raise CheckpointError(f"{p}: expected tensors input_ids (n, L) and logits (n, L, vocab), got {sorted(probe)}")
    return probe


@torch.inference_mode()
def probe_agreement(model, probe: dict[str, torch.Tensor]) -> dict[str, float]:
    """Compare a model's logits on the probe ids with the stored unmerged logits (the reference).

    Returns:
        ``max_abs_logit_diff``, ``mean_kl`` (KL(probe || model), nats per position,
        float64 log_softmax) and ``top1_agreement`` (fraction of positions with the
        same argmax).
    """
    ref = probe["logits"].double()
    got = model(input_ids=on_model_device(model, probe["input_ids"])).logits.to("cpu", torch.float64)
    lp_ref, lp_got = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1).clamp_min(0)
    return {
        "max_abs_logit_diff": float((ref - got).abs().max()),
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).double().mean()),
        "n_positions": int(kl.numel()),
    }
