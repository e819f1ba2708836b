"""Locate the evaluation data folder: the samples bundled with d2serve, or a folder the user names.

Resolution order: an explicit folder (``data_dir``; CLI ``--data DIR`` of ``verify`` and
``bench``), then the ``D2SERVE_DATA_DIR`` environment variable, then the samples shipped
inside the package (``d2serve/data/eval``: the first 200 items of each of the six
multiple-choice tasks and ~128 KB of the WikiText-2 test text; sources and licenses in
``d2serve/data/README.md``). Every folder has the same layout, that of the upstream files::

    boolq/val.jsonl
    ARC-Easy/ARC-Easy-Test.jsonl
    ARC-Challenge/ARC-Challenge-Test.jsonl
    piqa/valid.jsonl, piqa/valid-labels.lst
    openbookqa/test.tsv
    social_i_qa/dev.jsonl, social_i_qa/dev-labels.lst
    text/wiki.test.raw

Nothing outside the package and the named folder is read.
"""

from __future__ import annotations

import os
from pathlib import Path

from d2serve.errors import InputError

ENV_VAR = "D2SERVE_DATA_DIR"
WIKITEXT = Path("text") / "wiki.test.raw"
BUNDLED_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "eval"
BUNDLED_ITEMS_PER_TASK = 200
OPTION = "data_dir (CLI: --data DIR)"
LAYOUT = ("boolq/val.jsonl, ARC-Easy/ARC-Easy-Test.jsonl, ARC-Challenge/ARC-Challenge-Test.jsonl, "
          "piqa/valid.jsonl + valid-labels.lst, openbookqa/test.tsv, social_i_qa/dev.jsonl + dev-labels.lst, "
          "text/wiki.test.raw")


class DataNotFoundError(InputError, FileNotFoundError):
    """The evaluation data folder (or one file in it) is missing."""


def bundled_data_dir() -> Path:
    """The evaluation samples shipped inside the package (``d2serve/data/eval``)."""
    return BUNDLED_DATA_DIR


def is_bundled(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` is the bundled sample folder (reports note that only a sample was scored)."""
    return Path(data_dir).resolve() == BUNDLED_DATA_DIR


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The evaluation data folder (absolute).

    Args:
        data_dir: explicit folder; None -> ``$D2SERVE_DATA_DIR`` if set, else the bundled samples.

    Raises:
        DataNotFoundError: the resolved folder does not exist (the message names where the path
            came from and the layout expected).
    """
    if data_dir is not None:
        cand, how = Path(data_dir), OPTION
    elif os.environ.get(ENV_VAR):
        cand, how = Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    else:
        cand, how = BUNDLED_DATA_DIR, "the samples bundled with d2serve (is the package installed completely?)"
    if not cand.is_dir():
        raise DataNotFoundError(
            f"evaluation data folder {cand} (from {how}) not found; {OPTION} or ${ENV_VAR} must name a folder "
            f"holding {LAYOUT}"
        )
    return cand.resolve()


def data_file(data_dir: Path, rel: str | Path) -> Path:
    """``data_dir / rel``, checked to exist.

    Raises:
        DataNotFoundError: naming the missing file and the expected layout.
    """
    p = Path(data_dir) / rel
    if not p.is_file():
        raise DataNotFoundError(
            f"{p}: evaluation data file not found; the folder {data_dir} (from {OPTION} or ${ENV_VAR}) "
            f"must hold {rel} (layout: {LAYOUT})"
        )
    return p
