"""Prompts for the online serving benchmark: fixed-length windows of the bundled WikiText text.

The load generator (vLLM's ``bench serve``, ``--dataset-name custom``) reads a JSONL file of
``{"prompt": text}`` rows and sends each text unchanged to ``/v1/completions`` (no chat template).
Every prompt is a window of the evaluation text (``text/wiki.test.raw`` in the evaluation data
folder, see :mod:`d2serve.verify.data`) that the arm's tokenizer encodes to exactly ``input_len``
tokens (checked by re-encoding the decoded text the way the server will), so every request carries
the same amount of prefill work on every arm.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from d2serve.errors import InputError
from d2serve.verify.data import WIKITEXT, resolve_data_dir


def build_prompts(tokenizer, *, input_len: int, num_prompts: int, data_dir: str | Path | None = None,
                  stride: int | None = None) -> list[str]:
    """``num_prompts`` distinct texts that ``tokenizer`` encodes to exactly ``input_len`` tokens.

    Windows of ``input_len`` token ids are cut from the evaluation text at offsets ``0, stride, 2*stride, ...``
    (default stride ``input_len``: non-overlapping, so prefix caching could not share them), decoded, and kept
    when ``tokenizer(text).input_ids`` (special tokens as the server adds them) has exactly ``input_len`` ids.

    Raises:
        InputError: ``input_len``/``num_prompts`` < 1, or the text holds too few such windows (named file).
    """
    if input_len < 1 or num_prompts < 1:
        raise InputError(f"input_len and num_prompts must be >= 1, got {input_len} and {num_prompts}")
    path = resolve_data_dir(data_dir) / WIKITEXT
    if not path.is_file():
        raise InputError(f"{path}: missing; the online benchmark builds its prompts from this text")
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    stride = stride or input_len
    prompts: list[str] = []
    for start in range(0, max(len(ids) - input_len, 0) + 1, stride):
        text = tokenizer.decode(ids[start:start + input_len])
        if text.strip() and len(tokenizer(text)["input_ids"]) == input_len:
            prompts.append(text)
            if len(prompts) == num_prompts:
                return prompts
    raise InputError(f"{path}: only {len(prompts)} windows of exactly {input_len} tokens found, "
                     f"{num_prompts} needed (lower num_prompts or input_len)")


def write_prompts(path: Path, prompts: list[str]) -> str:
    """Write the vLLM ``custom`` dataset file (one ``{"prompt": ...}`` per line); returns its sha256."""
    data = "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def tokenizer_sha256(model_dir: Path) -> str | None:
    """sha256 over the tokenizer files of a checkpoint (name + bytes, sorted), or None when there are none.

    Two arms whose tokenizers differ would turn the same prompt text into different prefill work.
    """
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "tokenizer.model", "chat_template.jinja")
    h = hashlib.sha256()
    found = False
    for n in names:
        p = Path(model_dir) / n
        if p.is_file():
            found = True
            h.update(n.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest() if found else None
