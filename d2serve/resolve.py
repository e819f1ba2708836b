"""Turn a model argument (a local folder or a Hugging Face Hub id) into a local folder.

``--base`` / ``--adapter`` / ``--merged`` accept either a directory or a Hub id
``owner/name``. A Hub id is looked up in huggingface_hub's local cache only
(``snapshot_download(..., local_files_only=True)``, revision ``main``): d2serve
never downloads. Populate the cache beforehand on a machine with network
access (``hf download owner/name``, or ``huggingface_hub.snapshot_download``)
and point ``HF_HUB_CACHE`` (or ``HF_HOME``) at it.
"""

from __future__ import annotations

import re
from pathlib import Path

from d2serve.errors import InputError

# owner/name as the Hub spells repo ids: letters, digits, '-', '_', '.'; neither part starts or ends with '-'/'.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")


def looks_like_hub_id(value: str) -> bool:
    """True when ``value`` has the shape of a Hub repo id ``owner/name`` (no scheme, no '..', one slash)."""
    return bool(_HUB_ID.match(value)) and ".." not in value


def hub_cache_dir() -> Path:
    """The huggingface_hub cache folder in force (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_model_path(value: str | Path, kind: str) -> Path:
    """The local folder for a model argument: an existing path stays as given; ``owner/name`` is read from the Hub cache.

    Args:
        value: a filesystem path, or a Hub repo id ``owner/name`` (model repo, revision ``main``).
        kind: what the value is, for messages (e.g. "base", "adapter").

    Returns:
        ``Path(value)`` when it exists (or is not shaped like a Hub id: later checks name the missing path),
        else the cached snapshot folder ``<cache>/models--owner--name/snapshots/<commit>``.

    Raises:
        InputError: ``value`` is not an existing path, is shaped like a Hub id, and that repo is not (completely)
            in the local Hub cache; the message names the id, the cache folder and how to populate it.
    """
    p = Path(value)
    text = str(value)
    if p.exists() or not looks_like_hub_id(text):
        return p
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(text, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, HFValidationError) as e:
        raise InputError(
            f"{kind} {text!r}: no such folder, and the Hugging Face Hub model {text!r} is not in the local cache "
            f"{cache} ({type(e).__name__}); d2serve never downloads: populate the cache first "
            f"(`hf download {text}` on a machine with network access, then copy the cache and set HF_HUB_CACHE), "
            "or pass a local folder"
        ) from e
