"""Greedy generation comparison under explicit settings.

Decoding is an explicit loop (argmax of the last logits, KV cache): greedy,
no repetition penalty, no sampling, and nothing is taken from
``generation_config.json``, so both models decode under exactly the same rule.
By default EOS is ignored and exactly ``max_new_tokens`` tokens are compared,
so a model that answers with an immediate EOS (common after task fine-tuning)
still gets a non-vacuous comparison; the decoded text is cut at the first EOS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from d2serve.compare import (
    NonFiniteError,
    check_finite,
    content_token_count,
    special_token_ids,
)
from d2serve.models import on_model_device

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Explain in one sentence why the sky is blue.",
    "Write a Python function that returns the square of a number.",
    "List three common symptoms of the flu.",
    "Once upon a time, in a small village,",
    "Question: What is 12 plus 7?\nAnswer:",
)


@torch.inference_mode()
def greedy_tokens(model, input_ids: torch.Tensor, max_new_tokens: int, eos_ids: set[int], *,
                  where: str = "generation", side: str = "model") -> list[int]:
    """Greedy continuation of ``input_ids`` (int64 (1, T)); returns the new token ids (EOS included if produced).

    Raises:
        NonFiniteError: the logits at some step hold a NaN/inf (the message names ``where``, ``side``, the
            new-token index and the vocabulary index); argmax of such a row would be meaningless.
    """
    out = model(input_ids=on_model_device(model, input_ids), use_cache=True)
    new: list[int] = []
    for step in range(max_new_tokens):
        row = check_finite(out.logits[0, -1], where=where, side=side, dims=(f"new token {step}: vocab",))
        nxt = int(row.argmax())
        new.append(nxt)
        if nxt in eos_ids:
            break
        out = model(input_ids=on_model_device(model, torch.tensor([[nxt]])), past_key_values=out.past_key_values,
                    use_cache=True)
    return new


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """Token ids (1, T) of ``prompt``; with ``chat`` the tokenizer's chat template wraps it as a user turn."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


@dataclass
class GenerationComparison:
    """Greedy outputs of A (unmerged) and B (merged) for one prompt.

    Attributes:
        prompt: the prompt text.
        identical: the two token sequences are equal (and finite logits throughout).
        first_divergence: index (0-based, among new tokens) of the first differing token; None if identical.
        n_tokens_a / n_tokens_b: new tokens produced.
        text_a / text_b: decoded new tokens.
        n_compared: new tokens compared on the same context: all of them when identical, else up to and
            including the first divergence.
        n_content_compared: of those, the reference (A) tokens that are content tokens (not EOS, pad or
            another special token): what the comparison is evidence of. A model that only emits EOS
            gives 0 however many tokens are decoded.
        nonfinite: None, or the :meth:`NonFiniteError.to_json` of a NaN/inf logit (model, new token, vocab index).
    """

    prompt: str
    identical: bool
    first_divergence: int | None
    n_tokens_a: int
    n_tokens_b: int
    text_a: str
    text_b: str
    n_compared: int = 0
    n_content_compared: int = 0
    nonfinite: dict | None = None

    def to_json(self) -> dict:
        """JSON-ready dict (A = unmerged, B = merged)."""
        d = asdict(self)
        return {"prompt": d["prompt"], "identical": d["identical"], "first_divergence": d["first_divergence"],
                "n_tokens_unmerged": d["n_tokens_a"], "n_tokens_merged": d["n_tokens_b"],
                "n_compared": d["n_compared"], "n_content_compared": d["n_content_compared"],
                "nonfinite": d["nonfinite"], "text_unmerged": d["text_a"], "text_merged": d["text_b"]}


def compare_generation(model_a, model_b, tokenizer, prompts, max_new_tokens: int = 32,
                       chat: bool | None = None, ignore_eos: bool = True) -> list[GenerationComparison]:
    """Greedy-decode every prompt with both models and locate the first divergence.

    Args:
        chat: wrap prompts with the chat template; None -> only if the tokenizer has one.
        ignore_eos: decode exactly ``max_new_tokens`` tokens past any EOS (default), else stop at EOS.

    Returns:
        One :class:`GenerationComparison` per prompt, with the number of content tokens compared
        (the gate on it is :func:`d2serve.verify.api.evaluate_thresholds`' ``min_content_tokens_per_prompt``).
        A NaN/inf logit is recorded in ``nonfinite`` (not identical), never raised.
    """
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    stop_ids = set() if ignore_eos else eos_ids
    special = special_token_ids(tokenizer)

    def text(toks: list[int]) -> str:
        cut = next((i for i, t in enumerate(toks) if t in eos_ids), len(toks))
        return tokenizer.decode(toks[:cut], skip_special_tokens=True)

    results = []
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt, chat)
        where = f"generation[prompt {i}: {prompt[:40]!r}]"
        try:
            a = greedy_tokens(model_a, ids, max_new_tokens, stop_ids, where=where, side="unmerged")
            b = greedy_tokens(model_b, ids, max_new_tokens, stop_ids, where=where, side="merged")
        except NonFiniteError as e:
            results.append(GenerationComparison(prompt, False, None, 0, 0, "", "", 0, 0, e.to_json()))
            continue
        div = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if div is None and len(a) != len(b):
            div = min(len(a), len(b))
        n_cmp = len(a) if div is None else min(div + 1, len(a))
        results.append(GenerationComparison(prompt, a == b, div, len(a), len(b), text(a), text(b), n_cmp,
                                            content_token_count(a[:n_cmp], special)))
    return results
