"""The comparability check: arms may differ in their adapter mode and nothing else.

Each arm records a flat settings dict (dtype, threads, batch sizes, prompt lengths,
max_new_tokens, backend, library versions, prompt hash, ...). Two arms are comparable
when their dicts are equal on every key except ``adapter_mode`` (and the arm name).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Keys allowed to differ between arms: what the arm *is*, not how it was measured.
ALLOWED_TO_DIFFER = frozenset({"adapter_mode", "arm", "model_dir", "adapter_dir", "load_s", "export_s"})


class NotComparableError(ValueError):
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


def check_comparable(settings: dict[str, dict], *, strict: bool = True) -> list[SettingsDiff]:
    """Diff every arm against the first one.

    Args:
        settings: ``{arm_name: settings_dict}`` (at least one arm).
        strict: raise on any difference; otherwise return the diffs so the caller labels
            the comparison NOT COMPARABLE.

    Returns:
        One ``SettingsDiff`` per arm after the first.

    Raises:
        NotComparableError: ``strict`` and some arm differs in a setting other than the adapter mode.
        ValueError: ``settings`` is empty.
    """
    if not settings:
        raise ValueError("no arms to compare")
    names = list(settings)
    ref = names[0]
    diffs = [diff_settings(ref, settings[ref], n, settings[n]) for n in names[1:]]
    bad = [d for d in diffs if not d.comparable]
    if strict and bad:
        raise NotComparableError(
            "refusing to compare arms that differ in more than the adapter mode:\n"
            + "\n".join(d.render() for d in bad)
        )
    return diffs
