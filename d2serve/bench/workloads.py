"""Benchmark workloads, backend-agnostic: what is run, not how it is timed.

* Evaluation throughput: score a labelled multiple-choice set by log-likelihood with the
  lm-eval definition (context ``"Question: {q}\\nAnswer:"``, continuation ``" {choice}"``,
  continuation tokens = tokens(context + continuation)[len(tokens(context)):], prediction
  = argmax of the summed continuation log-probabilities). Metric: examples/s.
* Generation: fixed-length prompts (exact token counts) x batch sizes, a fixed number of
  new tokens (EOS ignored, greedy). Metrics: TTFT, TPOT, prefill/decode tokens/s, end-to-end.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from d2serve.errors import InputError

# Relative to the evaluation data folder (d2serve.verify.data: data_dir / $D2SERVE_DATA_DIR / the bundled samples,
# whose 200 ARC-Easy test items cover FULL_PLAN.eval_examples).
DEFAULT_EVAL_DATA = Path("ARC-Easy/ARC-Easy-Test.jsonl")

# Neutral filler for generation prompts; content does not matter with fixed output lengths.
_PROMPT_TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to "
    "exchange grain, salt and cloth. Over the centuries the market grew into a town with walls, "
    "a cathedral and a university, and scholars came from distant countries to study law, "
    "medicine and astronomy. Today the old quarter keeps its narrow streets and stone bridges, "
    "while new districts spread along the valley with parks, factories and railway stations. "
)


class WorkloadError(InputError):
    """A workload's input data is missing or malformed (the message names the file and line)."""


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice example: ``context``, candidate ``continuations`` and the gold index."""

    context: str
    continuations: tuple[str, ...]
    gold: int


def load_mc_items(path: Path, limit: int | None = None) -> list[MCItem]:
    """Read a multiple-choice set: ARC jsonl (``question.stem``/``choices``/``answerKey``) or BoolQ jsonl.

    Raises:
        WorkloadError: missing file, bad JSON, or a row with neither format (file:line named).
    """
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(
            f"evaluation set {path} does not exist; the eval workload reads {DEFAULT_EVAL_DATA} of the evaluation "
            "data folder (data_dir, CLI: --data DIR) or an eval_data file (ARC or BoolQ jsonl)"
        )
    items: list[MCItem] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if "question" in row and isinstance(row["question"], dict):  # ARC
                    q = row["question"]
                    labels = [c["label"] for c in q["choices"]]
                    items.append(
                        MCItem(
                            f"Question: {q['stem']}\nAnswer:",
                            tuple(f" {c['text']}" for c in q["choices"]),
                            labels.index(row["answerKey"]),
                        )
                    )
                elif "passage" in row:  # BoolQ (SuperGLUE), lm-eval's prompt
                    gold = str(row.get("label", row.get("answer"))).lower() == "true"
                    items.append(
                        MCItem(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", (" no", " yes"), int(gold))
                    )
                else:
                    raise KeyError("expected ARC keys (question.stem, question.choices, answerKey) or BoolQ keys")
            except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
                raise WorkloadError(f"{path}:{lineno}: not a multiple-choice row: {e}") from e
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise WorkloadError(f"{path}: no examples")
    return items


@dataclass(frozen=True)
class ScoringRequest:
    """One (context, continuation) pair as token ids: ``tokens`` = context + continuation, the last ``n_cont`` scored."""

    example: int
    choice: int
    tokens: tuple[int, ...]
    n_cont: int


def tokenize_mc(items: list[MCItem], tokenizer, max_len: int = 512) -> list[ScoringRequest]:
    """Turn items into scoring requests the lm-eval way (left-truncated to ``max_len`` tokens).

    Raises:
        WorkloadError: a continuation tokenizes to zero tokens.
    """
    reqs = []
    for i, it in enumerate(items):
        ctx = tokenizer(it.context, add_special_tokens=False)["input_ids"]
        for j, cont in enumerate(it.continuations):
            whole = tokenizer(it.context + cont, add_special_tokens=False)["input_ids"]
            n_cont = len(whole) - len(ctx)
            if n_cont <= 0:
                raise WorkloadError(f"example {i} choice {j}: continuation {cont!r} has no tokens")
            reqs.append(ScoringRequest(i, j, tuple(whole[-max_len:]), min(n_cont, max_len - 1)))
    return reqs


def prompt_ids(tokenizer, prompt_len: int, batch: int) -> list[list[int]]:
    """``batch`` prompts of exactly ``prompt_len`` token ids (rows start at different offsets of a fixed text).

    Raises:
        ValueError: ``prompt_len < 1`` or ``batch < 1``.
    """
    if prompt_len < 1 or batch < 1:
        raise InputError(f"need prompt_len >= 1 and batch >= 1, got {prompt_len}, {batch}")
    base = tokenizer(_PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    need = prompt_len + batch * 7
    stream = (base * (need // len(base) + 1))[:need]
    return [stream[7 * b : 7 * b + prompt_len] for b in range(batch)]


def token_hash(rows) -> str:
    """sha256 (first 16 hex digits) of nested token-id lists: the prompt hash recorded per arm."""
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GenerationCase:
    """One point of the generation sweep."""

    batch: int
    prompt_len: int
    max_new_tokens: int

    @property
    def key(self) -> str:
        """Stable id, e.g. ``"b4_p128_n32"``."""
        return f"b{self.batch}_p{self.prompt_len}_n{self.max_new_tokens}"


@dataclass(frozen=True)
class BenchPlan:
    """The full sweep: eval set size/batch, generation cases, warm-up and repeats."""

    eval_examples: int = 100
    eval_batch: int = 16
    batches: tuple[int, ...] = (1, 4, 8)
    prompt_lens: tuple[int, ...] = (64, 256)
    max_new_tokens: int = 32
    warmup: int = 1
    repeats: int = 5
    extra: dict = field(default_factory=dict)

    def generation_cases(self) -> list[GenerationCase]:
        """The batch x prompt-length grid."""
        return [GenerationCase(b, p, self.max_new_tokens) for p in self.prompt_lens for b in self.batches]


QUICK_PLAN = BenchPlan(
    eval_examples=8, eval_batch=16, batches=(1, 4), prompt_lens=(32,), max_new_tokens=16, warmup=1, repeats=3
)
FULL_PLAN = BenchPlan()
