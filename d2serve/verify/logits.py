"""Teacher-forced logit comparison of two models on the same real text.

Both models read the same token windows; per position, logits are turned
into float64 log-probabilities and compared: KL(unmerged || merged) in nats,
top-1 agreement, max |logit difference|, and each model's perplexity on the
next token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from d2serve.compare import NonFiniteError, kl_per_row, max_abs_diff, top1_agreement
from d2serve.errors import InputError, InputNotFoundError
from d2serve.models import on_model_device


class TextTooShortError(InputError):
    """A text file yields fewer tokens than one window."""


def text_windows(tokenizer, text: str, n_windows: int, window_len: int, source: str = "<text>") -> torch.Tensor:
    """Cut the start of ``text`` into consecutive non-overlapping token windows.

    Args:
        tokenizer: HF tokenizer (no special tokens are added).
        text: raw text.
        n_windows: wanted number of windows (fewer if the text is shorter, at least 1).
        window_len: tokens per window (>= 2).

    Returns:
        int64 tensor (n, window_len) with 1 <= n <= n_windows.

    Raises:
        TextTooShortError: fewer than ``window_len`` tokens in the text.
    """
    if window_len < 2 or n_windows < 1:
        raise InputError(f"need window_len >= 2 and n_windows >= 1, got {window_len} and {n_windows}")
    need = n_windows * window_len
    chars = need * 6
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > need or chars >= len(text):
            break
        chars *= 2
    n = min(n_windows, len(ids) // window_len)
    if n < 1:
        raise TextTooShortError(f"{source}: {len(ids)} tokens, fewer than one window of {window_len}")
    return torch.tensor(ids[: n * window_len], dtype=torch.long).view(n, window_len)


@dataclass
class LogitComparison:
    """Teacher-forced comparison of model A (unmerged, reference) and model B (merged) on one text.

    Attributes:
        source: name of the text (e.g. ``wikitext2``).
        n_windows, window_len: the token windows compared.
        n_positions: positions compared (n_windows * window_len).
        max_abs_logit_diff: max |logit_A - logit_B| over positions and vocabulary.
        mean_kl: mean over positions of KL(A || B) in nats (float64 log_softmax).
        max_kl: max over positions of KL(A || B) in nats.
        top1_agreement: fraction of positions where argmax A == argmax B.
        ppl_a, ppl_b: perplexity of each model on the next token (exp of mean NLL over n_windows*(window_len-1) tokens).
        kl_per_position: mean KL(A || B) at each position index, over windows (length window_len).
        nonfinite: None, or (a model produced NaN/inf logits) the :meth:`NonFiniteError.to_json` naming the model,
            window, position and vocabulary index; the metrics are then None (nothing meaningful was compared).
    """

    source: str
    n_windows: int
    window_len: int
    n_positions: int
    max_abs_logit_diff: float | None
    mean_kl: float | None
    max_kl: float | None
    top1_agreement: float | None
    ppl_a: float | None
    ppl_b: float | None
    kl_per_position: list[float]
    nonfinite: dict | None = None

    def to_json(self) -> dict:
        """JSON-ready dict (stable keys; A = unmerged, B = merged)."""
        return {
            "source": self.source, "n_windows": self.n_windows, "window_len": self.window_len,
            "n_positions": self.n_positions, "max_abs_logit_diff": self.max_abs_logit_diff,
            "mean_kl": self.mean_kl, "max_kl": self.max_kl, "top1_agreement": self.top1_agreement,
            "ppl_unmerged": self.ppl_a, "ppl_merged": self.ppl_b, "kl_per_position": self.kl_per_position,
            "nonfinite": self.nonfinite,
        }


@torch.inference_mode()
def compare_logits(model_a, model_b, windows: torch.Tensor, source: str) -> LogitComparison:
    """Run both models on ``windows`` (int64 (n, L)) one window at a time and compare their next-token distributions.

    Uses :mod:`d2serve.compare` (float64, on the CPU: each model's logits are moved there, so the two models may
    run on different devices). A NaN/inf logit of either model is not an error of this
    function: it returns a comparison whose ``nonfinite`` names the model (``unmerged``/``merged``),
    window, position and vocabulary index, and whose metrics are None, so the caller records a failure.
    """
    n, length = windows.shape
    kl_sum = torch.zeros(length, dtype=torch.float64)
    max_kl, max_diff, agree = 0.0, 0.0, 0
    nll_a = nll_b = 0.0
    where = f"logits[{source}]"
    names = ("unmerged", "merged")
    try:
        for wi, w in enumerate(windows):
            ids = w.unsqueeze(0)
            la = model_a(input_ids=on_model_device(model_a, ids)).logits[0].to("cpu", torch.float64)  # (L, V)
            lb = model_b(input_ids=on_model_device(model_b, ids)).logits[0].to("cpu", torch.float64)
            dims = (f"window {wi}: position", "vocab")
            max_diff = max(max_diff, max_abs_diff(la, lb, where=where, names=names, dims=dims))
            kl = kl_per_row(la, lb, where=where, names=names, dims=dims)  # (L,)
            kl_sum += kl
            max_kl = max(max_kl, float(kl.max()))
            agree += top1_agreement(la, lb, where=where, names=names, dims=dims)[0]
            lpa, lpb = torch.log_softmax(la.double(), -1), torch.log_softmax(lb.double(), -1)
            tgt = w[1:].unsqueeze(1)
            nll_a -= float(lpa[:-1].gather(1, tgt).sum())
            nll_b -= float(lpb[:-1].gather(1, tgt).sum())
    except NonFiniteError as e:
        return LogitComparison(source=source, n_windows=n, window_len=length, n_positions=n * length,
                               max_abs_logit_diff=None, mean_kl=None, max_kl=None, top1_agreement=None,
                               ppl_a=None, ppl_b=None, kl_per_position=[], nonfinite=e.to_json())
    n_pred = n * (length - 1)
    return LogitComparison(
        source=source, n_windows=n, window_len=length, n_positions=n * length,
        max_abs_logit_diff=max_diff, mean_kl=float(kl_sum.sum()) / (n * length), max_kl=max_kl,
        top1_agreement=agree / (n * length),
        ppl_a=float(torch.tensor(nll_a / n_pred).exp()), ppl_b=float(torch.tensor(nll_b / n_pred).exp()),
        kl_per_position=(kl_sum / n).tolist(),
    )


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file.

    Raises:
        FileNotFoundError: naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(f"{p}: text file not found")
    return p.read_text(encoding="utf-8", errors="replace")
