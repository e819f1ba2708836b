"""Locate the shared evaluation data folder (``../shared/data`` next to the repository).

The data are never copied into the repository: d2serve reads them in place.
Resolution order: an explicit path, the ``D2SERVE_DATA_DIR`` environment
variable, then ``<repo>/../shared/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "D2SERVE_DATA_DIR"
WIKITEXT = Path("text") / "wiki.test.raw"


class DataNotFoundError(FileNotFoundError):
    """The evaluation data folder (or one file in it) is missing."""


def repo_root() -> Path:
    """The repository root: the parent of the ``d2serve`` package directory."""
    return Path(__file__).resolve().parents[2]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The evaluation data folder.

    Args:
        data_dir: explicit folder; None -> ``$D2SERVE_DATA_DIR``, else ``<repo>/../shared/data``.

    Raises:
        DataNotFoundError: the resolved folder does not exist (the message says
            which candidates were tried and how to point at the data).
    """
    if data_dir is not None:
        cand, how = Path(data_dir), "--data"
    elif os.environ.get(ENV_VAR):
        cand, how = Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    else:
        cand, how = repo_root().parent / "shared" / "data", "the default <repo>/../shared/data"
    if not cand.is_dir():
        raise DataNotFoundError(
            f"evaluation data folder {cand} (from {how}) not found; pass --data DIR or set {ENV_VAR} to the folder "
            "holding boolq/, ARC-Easy/, ARC-Challenge/, piqa/, openbookqa/, social_i_qa/ and text/wiki.test.raw"
        )
    return cand.resolve()


def data_file(data_dir: Path, rel: str | Path) -> Path:
    """``data_dir / rel``, checked to exist.

    Raises:
        DataNotFoundError: naming the missing file.
    """
    p = Path(data_dir) / rel
    if not p.is_file():
        raise DataNotFoundError(f"{p}: evaluation data file not found (expected under {data_dir})")
    return p
