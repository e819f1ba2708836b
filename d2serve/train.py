"""Train a D2-LoRA adapter on a causal LM from prompt/answer JSONL records (loss on the answer tokens).

Writes the adapter in format v1 (with ``d2_magnitude``), a probe file
``d2serve_probe.safetensors`` (fixed token ids and the trained unmerged
model's float32 logits on them, so a merge can later be checked against the
trainer's own outputs) and ``d2serve_train.json`` (settings and loss curve).
"""

from __future__ import annotations

import functools
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from d2serve import __version__
from d2serve.adapters.config import parse_config
from d2serve.adapters.io import write_adapter_files
from d2serve.checkpoint import atomic_output_dir, prepare_output_dir
from d2serve.errors import CheckFailedError, InputError, InputNotFoundError
from d2serve.layers import inject_d2lora
from d2serve.models import load_hf_model, load_tokenizer, resolve_device
from d2serve.probe import PROBE_NAME
from d2serve.threads import check_requested, pick, record, torch_threads

TRAIN_LOG_NAME = "d2serve_train.json"
DEFAULT_DATA = Path(__file__).parent / "data" / "boolq_train.jsonl"


class TrainingDivergedError(CheckFailedError, FloatingPointError):
    """The training loss became NaN/Inf (CLI exit code 1); nothing was written."""


@dataclass
class TrainSettings:
    """Trainer settings (all recorded in ``d2serve_train.json``).

    r, lora_alpha, tau, target_modules: the adapter config. max_steps: optimiser
    steps; batch_size: records per step; max_length: tokens per record (prompt
    truncated from the left, the answer kept); lr: AdamW learning rate;
    seed: RNG seed of data order and initialisation; probe_records /
    probe_tokens: size of the probe. chat_template: format each record with the
    base tokenizer's chat template (user turn = prompt, assistant turn = answer;
    the loss covers the assistant answer and its end-of-turn token), as an
    instruct model is prompted when served; False: raw ``prompt + answer`` text.
    """

    r: int = 8
    lora_alpha: float = 16.0
    tau: float = 0.5
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_steps: int = 24
    batch_size: int = 4
    max_length: int = 192
    lr: float = 2e-4
    weight_decay: float = 0.0
    seed: int = 0
    probe_records: int = 2
    probe_tokens: int = 32
    chat_template: bool = True


@dataclass
class TrainResult:
    """Outcome of :func:`train`: output dir, per-step losses (nats/token), wall time in seconds."""

    out: Path
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def read_records(path: str | Path) -> list[dict]:
    """Read prompt/answer records from JSONL.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not JSON or lacks string fields ``prompt`` and ``answer`` (names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: training data not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from e
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: not valid JSON: {e}") from e
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str)):
            raise InputError(f"{path}:{i}: expected an object with string fields 'prompt' and 'answer'")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no records")
    return rows


def chat_parts(tok, row: dict, where: str = "record", max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Prompt ids and answer ids of one record, formatted with the tokenizer's chat template.

    The user turn is ``row["prompt"]``, the assistant turn ``row["answer"]`` (both
    stripped, as a chat answer is written: "yes", not the " yes" of plain-text records). The prompt ids are the template with ``add_generation_prompt=True``
    (everything up to and including the assistant header); the answer ids are the
    assistant message's content tokens followed by the template's end-of-turn token
    (``tok.eos_token_id``, e.g. SmolLM2's ``<|im_end|>``), so the model learns to
    answer and then stop. Text the template adds after the end-of-turn token (a
    newline) is dropped: nothing after the turn is trained on. With ``max_length``,
    a too long user message loses tokens from its start (the template's header
    and the question at the end are kept).

    Raises:
        ValueError: the tokenizer has no chat template, the template does not
            extend the generation prompt with the answer, or the answer has no
            tokens (messages name ``where``).
    """
    answer = row["answer"].strip()
    if not answer:
        raise InputError(f"{where}: field 'answer' is empty; every record needs answer tokens")
    if not getattr(tok, "chat_template", None):
        raise InputError(f"{where}: the base model's tokenizer has no chat template (tokenizer_config.json / "
                         "chat_template.jinja); chat-format training needs one (setting chat_template=False trains on raw "
                         "prompt + answer text instead)")
    content = row["prompt"].strip()
    for _ in range(4):  # shorten the user message until the whole record fits (re-tokenising may shift by a token)
        user = [{"role": "user", "content": content}]
        prefix = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prefix):
            raise InputError(f"{where}: the chat template's assistant turn does not extend its generation prompt; "
                             "cannot locate the answer tokens")
        prompt_ids = tok(prefix, add_special_tokens=False)["input_ids"]
        completion = tok(full[len(prefix):], add_special_tokens=False)["input_ids"]
        eos = tok.eos_token_id
        if eos is not None and eos in completion:
            completion = completion[: completion.index(eos) + 1]
        elif eos is not None:
            completion = completion + [eos]
        excess = len(prompt_ids) + len(completion) - max_length if max_length else 0
        content_ids = tok(content, add_special_tokens=False)["input_ids"]
        if excess <= 0 or excess >= len(content_ids):
            break
        content = tok.decode(content_ids[excess:])
    return prompt_ids, completion


def encode(tok, row: dict, max_length: int, where: str = "record", chat: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on prompt tokens) of one record; the prompt is cut from the left.

    ``chat=True``: the record goes through the tokenizer's chat template (see
    :func:`chat_parts`); labels cover exactly the assistant answer and its
    end-of-turn token. ``chat=False``: raw ``prompt + answer`` text, then EOS.
    A too long record loses the start of its prompt (with a chat template: the
    start of the user message, keeping the template's header), never the answer.

    Raises:
        ValueError: the answer has no tokens (nothing to learn), or see :func:`chat_parts`; names ``where``.
    """
    if chat:
        prompt, answer = chat_parts(tok, row, where, max_length)
    else:
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(row["answer"], add_special_tokens=False)["input_ids"]
        if not answer:
            raise InputError(f"{where}: field 'answer' is empty after tokenization; every record needs answer tokens")
        if tok.eos_token_id is not None:
            answer = answer + [tok.eos_token_id]
    answer = answer[:max_length]
    prompt = prompt[-(max_length - len(answer)) :] if max_length > len(answer) else []
    return prompt + answer, [-100] * len(prompt) + answer


def _batch(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), n), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):  # right padding
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train(
    *,
    base: str | Path,
    out: str | Path,
    data: str | Path = DEFAULT_DATA,
    settings: TrainSettings | None = None,
    overwrite: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> TrainResult:
    """Train a D2-LoRA adapter on ``base`` (float32, on ``device``) and write it to ``out``.

    At step 0, B+ = B- = 0 so dW = 0 and the model equals the base. Loss: mean
    cross-entropy over answer tokens (shifted, as transformers computes it).

    Args:
        base: HF checkpoint directory of the base model.
        out: adapter directory to write (atomic).
        data: JSONL of {"prompt", "answer"} records.
        settings: :class:`TrainSettings`.
        overwrite: replace a non-empty ``out``.
        progress: show a rich progress bar.
        log: called with a "step k/N: loss ..., s/step" line about every tenth step
            (progress that survives redirected output).
        device: "cpu", "cuda" or "cuda:N"; None -> cuda when available, else cpu (recorded in the log).
            The dtype is float32 on every device (frozen base and trained factors alike), so the probe
            logits are a float32 reference and the factors need no cast when written.
        threads: torch CPU threads; None: every core this process may use (:func:`d2serve.threads.pick`, step
            ``forward``). Recorded in ``d2serve_train.json`` (``threads``).

    Raises:
        FileNotFoundError / ValueError: bad data file or settings.
        FileExistsError: ``out`` is non-empty and ``overwrite`` is False.
        InputError: ``device`` is unknown or not available on this machine.
    """
    s = settings or TrainSettings()
    dev = resolve_device(device)
    config = parse_config(
        {"peft_type": "D2LORA", "r": s.r, "lora_alpha": s.lora_alpha, "tau": s.tau,
         "target_modules": list(s.target_modules), "base_model_name_or_path": str(base)},
        source="train settings",
    )
    if s.max_steps < 1 or s.batch_size < 1 or s.max_length < 8 or not 0 < s.lr < float("inf"):
        raise InputError(f"train settings out of range: max_steps={s.max_steps}, batch_size={s.batch_size}, "
                         f"max_length={s.max_length}, lr={s.lr} (need >=1, >=1, >=8, >0)")
    rows = read_records(data)
    prepare_output_dir(Path(out), overwrite, inputs=(Path(base),))
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    tok = load_tokenizer(base)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    encoded = [encode(tok, r, s.max_length, where=f"{data}: record {i + 1}", chat=s.chat_template)
               for i, r in enumerate(rows)]
    model = load_hf_model(base, torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = inject_d2lora(model, config, seed=s.seed)
    model.to(dev)
    params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    rng = random.Random(s.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("training", total=s.max_steps)
    try:
        for step in range(s.max_steps):
            if len(order) < s.batch_size:
                fresh = list(range(len(rows)))
                rng.shuffle(fresh)
                order += fresh
            idx, order = order[: s.batch_size], order[s.batch_size :]
            batch = {k: v.to(dev) for k, v in _batch([encoded[i] for i in idx], pad_id).items()}
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"training diverged at step {step}: loss {loss.item()} (lr={s.lr}); nothing was written to {out}"
                )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            every = max(1, s.max_steps // 10)
            if log and ((step + 1) % every == 0 or step + 1 == s.max_steps):
                per_step = (time.perf_counter() - t0) / (step + 1)
                log(f"  step {step + 1}/{s.max_steps}: loss {losses[-1]:.4f} ({per_step:.1f} s/step)")
            if bar:
                bar.update(task, advance=1, description=f"training (loss {losses[-1]:.3f})")
    finally:
        if bar:
            bar.stop()
    model.eval()
    probe = _probe(model, encoded, s)
    factors = {name: layer.factors(name) for name, layer in layers.items()}
    seconds = time.perf_counter() - t0
    with atomic_output_dir(out, overwrite) as tmp:
        write_adapter_files(tmp, config, factors)
        save_file(probe, str(tmp / PROBE_NAME), metadata={"format": "pt", "dtype": "float32", "mode": "unmerged"})
        log = {"d2serve_version": __version__, "base": str(base), "data": str(data), "records": len(rows),
               "settings": asdict(s), "device": dev, "losses": losses, "train_seconds": round(seconds, 3),
               "threads": record(threads, forward=pick("forward", threads))}
        (tmp / TRAIN_LOG_NAME).write_text(json.dumps(log, indent=2) + "\n")
    return TrainResult(Path(out), losses, seconds)


@torch.no_grad()
def _probe(model, encoded: list[tuple[list[int], list[int]]], s: TrainSettings) -> dict[str, torch.Tensor]:
    """Fixed token ids (probe_records, L <= probe_tokens) from the end of the first training sequences
    (answer included, as trained), and the unmerged float32 logits on them."""
    seqs = [ids[-s.probe_tokens :] for ids, _ in encoded[: s.probe_records]]
    n = min(len(x) for x in seqs)
    input_ids = torch.tensor([x[-n:] for x in seqs], dtype=torch.long)
    logits = model(input_ids=input_ids.to(model.device)).logits.float().cpu()
    return {"input_ids": input_ids, "logits": logits.contiguous()}


@functools.wraps(_train)
def train(**kwargs) -> TrainResult:
    with torch_threads(pick("forward", check_requested(kwargs.get("threads")))):
        return _train(**kwargs)
