"""The comparability check: arms may differ in their adapter mode and nothing else.

Each arm records a flat settings dict (dtype, threads, batch sizes, prompt lengths,
max_new_tokens, backend, library versions, prompt hash, ...). Two arms are comparable
when their dicts are equal on every key except ``adapter_mode`` (and the arm name).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from d2serve.errors import CheckFailedError, InputError

# Keys allowed to differ between arms: what the arm *is*, not how it was measured.
ALLOWED_TO_DIFFER = frozenset({"adapter_mode", "arm", "model_dir", "adapter_dir", "load_s", "export_s",
                               # the vLLM unmerged arm's LoRA slots: part of what that arm is
                               "lora_max_rank", "lora_max_loras",
                               # which vLLM plugins the arm's engine loads (the vanilla_lora control runs none)
                               "vllm_plugins", "d2serve_plugin_active"})


class NotComparableError(CheckFailedError, ValueError):
    """Arms differ in a setting other than the adapter mode; the message prints the settings diff."""


@dataclass(frozen=True)
class SettingsDiff:
    """Keys whose values differ between two arms' settings.

    Attributes:
        left, right: arm names.
        differences: ``{key: (left_value, right_value)}``; a missing key shows as ``"<missing>"``.
    """

    left: str
    right: str
    differences: dict = field(default_factory=dict)

    @property
    def comparable(self) -> bool:
        """True when the arms differ only in allowed keys."""
        return not self.differences

    def render(self) -> str:
        """A human-readable diff, one line per differing key."""
        if not self.differences:
            return f"{self.left} vs {self.right}: comparable (only the adapter mode differs)"
        lines = [f"{self.left} vs {self.right}: NOT COMPARABLE, settings differ:"]
        for k, (a, b) in sorted(self.differences.items()):
            lines.append(f"  {k}: {self.left}={a!r}  {self.right}={b!r}")
        return "\n".join(lines)


def diff_settings(left: str, a: dict, right: str, b: dict, allowed=ALLOWED_TO_DIFFER) -> SettingsDiff:
    """Compare two arms' settings dicts, ignoring the keys in ``allowed``."""
    missing = "<missing>"
    diffs = {}
    for k in sorted(set(a) | set(b)):
        if k in allowed:
            continue
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb:
            diffs[k] = (va, vb)
    return SettingsDiff(left, right, diffs)


def check_comparable(settings: dict[str, dict], *, strict: bool = True,
                     allowed=ALLOWED_TO_DIFFER) -> list[SettingsDiff]:
    """Diff every arm against the first one.

    Args:
        settings: ``{arm_name: settings_dict}`` (at least one arm).
        strict: raise on any difference; otherwise return the diffs so the caller labels
            the comparison NOT COMPARABLE.
        allowed: keys that may differ (default :data:`ALLOWED_TO_DIFFER`; the online serving bench adds
            the served model name and the unapplied generation config file).

    Returns:
        One ``SettingsDiff`` per arm after the first.

    Raises:
        NotComparableError: ``strict`` and some arm differs in a setting other than the adapter mode.
        ValueError: ``settings`` is empty.
    """
    if not settings:
        raise InputError("no arms to compare")
    names = list(settings)
    ref = names[0]
    diffs = [diff_settings(ref, settings[ref], n, settings[n], allowed) for n in names[1:]]
    bad = [d for d in diffs if not d.comparable]
    if strict and bad:
        raise NotComparableError(
            "refusing to compare arms that differ in more than the adapter mode:\n"
            + "\n".join(d.render() for d in bad)
        )
    return diffs


def merged_provenance(base, adapter, merged) -> dict:
    """Check that ``merged`` was made from ``base`` + ``adapter``, from the sha256 sums in its ``d2serve_merge.json``.

    The merge manifest records the sha256 of every adapter file (config and weights) and of every base
    shard; each is recomputed from the given directories.

    Args:
        base, adapter, merged: the directories given to the bench (``adapter`` may be None: only the base
            shards are checked then).

    Returns:
        ``{"manifest": path, "checked_files": n, "matches": bool, "problems": [str]}``; each problem names
        the file (missing manifest, a file that is missing or whose sha256 differs, a shard set that differs).
    """
    import json
    from pathlib import Path

    from d2serve.checkpoint import Checkpoint
    from d2serve.digests import sha256_files
    from d2serve.export.manifest import MERGE_MANIFEST

    merged, base = Path(merged), Path(base)
    man_path = merged / MERGE_MANIFEST
    out = {"manifest": str(man_path), "checked_files": 0, "matches": False, "problems": []}
    if not man_path.is_file():
        out["problems"].append(f"{man_path}: missing; cannot tell whether {merged} was made from {base}"
                               + (f" + {adapter}" if adapter else "") + " (merge it with d2serve merge)")
        return out
    try:
        sums = json.loads(man_path.read_text())["sha256"]
        adapter_sums, shard_sums = dict(sums["adapter"]), dict(sums["base_shards"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        out["problems"].append(f"{man_path}: expected sha256.adapter and sha256.base_shards: {e}")
        return out
    pairs = [(base / name, want, "base shard") for name, want in shard_sums.items()]
    have_shards = set(Checkpoint(base).shards)
    if have_shards != set(shard_sums):
        out["problems"].append(f"{base}: shards {sorted(have_shards)} differ from the shards the merge read "
                               f"{sorted(shard_sums)} ({man_path})")
    if adapter is not None:
        from d2serve.adapters.io import load_adapter

        names = {p.name for p in load_adapter(adapter).files}
        if names != set(adapter_sums):
            out["problems"].append(f"{adapter}: adapter files {sorted(names)} differ from those the merge read "
                                   f"{sorted(adapter_sums)} ({man_path})")
        pairs += [(Path(adapter) / name, want, "adapter file") for name, want in adapter_sums.items()]
    for path, want, kind in pairs:
        if not path.is_file():
            out["problems"].append(f"{path}: {kind} recorded in {man_path} is missing")
            continue
        out["checked_files"] += 1
        got = sha256_files([path])[path]  # cached when an earlier merge hashed the same file (d2serve.digests)
        if got != want:
            out["problems"].append(f"{path}: sha256 {got[:12]}... differs from the {kind} {merged} was merged from "
                                   f"({want[:12]}... in {man_path})")
    out["matches"] = not out["problems"]
    return out


def generation_config_of(model_dir) -> dict | None:
    """The arm's ``generation_config.json`` without ``transformers_version`` (None when absent).

    It is part of an arm's settings: transformers' ``generate`` reads it (e.g. ``repetition_penalty``), so two
    arms whose generation configs differ do not run the same decoding.

    Raises:
        InputError: the file is not a JSON object (named).
    """
    import json
    from pathlib import Path

    from d2serve.errors import InputError

    p = Path(model_dir) / "generation_config.json"
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise InputError(f"{p}: expected a JSON object")
    cfg.pop("transformers_version", None)
    return cfg
