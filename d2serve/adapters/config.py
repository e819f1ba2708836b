"""Adapter configuration (``adapter_config.json``) and its validation.

One dataclass covers the three methods d2serve merges:

* ``D2LORA``: d2serve's own format v1 (docs/adapter-format.md).
* ``LORA``: PEFT LoRA, and PEFT DoRA when ``use_dora`` is true.

Validation collects every problem before raising (the PEFT / vLLM habit):
``TypeError`` when a field has the wrong type, ``ValueError`` for wrong values
or missing fields. Unknown keys are rejected in our own D2LORA files and
tolerated (logged) in PEFT's files, whose schema grows with every release.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"

# Keys of our own format v1; anything else in a D2LORA config is an error.
_D2LORA_KEYS = {
    "peft_type",
    "r",
    "lora_alpha",
    "tau",
    "target_modules",
    "magnitude_axis",
    "base_model_name_or_path",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "task_type",
    "d2serve_version",
    "revision",
    "inference_mode",
    "bias",
}
_REQUIRED = {"D2LORA": ("r", "lora_alpha", "tau", "target_modules"), "LORA": ("r", "lora_alpha", "target_modules")}


class AdapterConfigError(ValueError):
    """An ``adapter_config.json`` is missing, unreadable or invalid; the message lists every problem."""


@dataclass(frozen=True)
class AdapterConfig:
    """Validated adapter configuration.

    Attributes:
        peft_type: ``"D2LORA"`` or ``"LORA"``.
        r: default rank r of each adapted layer (int > 0).
        lora_alpha: default scaling numerator (float > 0); scale = lora_alpha / r
            (or lora_alpha / sqrt(r) with ``use_rslora``), as in PEFT.
        target_modules: module-name suffixes or one regular expression (PEFT semantics).
        tau: D2-LoRA weight of the negative branch (float, finite); None for LORA.
        magnitude_axis: ``"out"``: the norm is taken per output row of the
            (out_features, in_features) weight, over in_features (PEFT's DoRA axis).
        use_rslora: rank-stabilised scale lora_alpha / sqrt(r).
        use_dora: PEFT DoRA (LORA only).
        rank_pattern / alpha_pattern: per-module overrides of r / lora_alpha,
            keyed by regex matched against the end of the module path (PEFT semantics).
        modules_to_save: modules whose full weights the adapter replaces.
        base_model_name_or_path: informational.
        fan_in_fan_out: PEFT flag for Conv1D (GPT-2) layers; not supported, rejected.
        source: the file this config was read from (for error messages).
    """

    peft_type: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    tau: float | None = None
    magnitude_axis: str = "out"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    source: str = "<memory>"

    @property
    def method(self) -> str:
        """Registry name of the merge method: ``"d2lora"``, ``"lora"`` or ``"dora"``."""
        if self.peft_type == "D2LORA":
            return "d2lora"
        return "dora" if self.use_dora else "lora"

    def rank_for(self, module_path: str) -> int:
        """Rank r of one module, honouring ``rank_pattern`` (PEFT's regex suffix match)."""
        key = _pattern_key(self.rank_pattern, module_path)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_path: str) -> float:
        """lora_alpha of one module, honouring ``alpha_pattern``."""
        key = _pattern_key(self.alpha_pattern, module_path)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scale_for(self, module_path: str) -> float:
        """scale = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora (PEFT LoraLayer.update_layer)."""
        r = self.rank_for(module_path)
        alpha = self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module_path: str) -> bool:
        """True if ``module_path`` (e.g. ``model.layers.0.self_attn.q_proj``) is a target.

        PEFT semantics: a string is a full-match regex; a list matches a module
        whose path equals an entry or ends with ``"." + entry``.
        """
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_path) is not None
        return any(module_path == t or module_path.endswith("." + t) for t in self.target_modules)

    def to_json_dict(self) -> dict[str, Any]:
        """The config as written to ``adapter_config.json``."""
        d: dict[str, Any] = {
            "peft_type": self.peft_type,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": list(self.target_modules)
            if not isinstance(self.target_modules, str)
            else self.target_modules,
            "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": list(self.modules_to_save) or None,
            "base_model_name_or_path": self.base_model_name_or_path,
        }
        if self.peft_type == "D2LORA":
            d["tau"] = self.tau
            d["magnitude_axis"] = self.magnitude_axis
        else:
            d["use_dora"] = self.use_dora
        return d


def _pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def parse_config(raw: dict[str, Any], source: str = "<memory>") -> AdapterConfig:
    """Validate a raw config dict and build an :class:`AdapterConfig`.

    Args:
        raw: the decoded JSON object.
        source: file name used in error messages.

    Raises:
        AdapterConfigError: listing every problem found (missing required fields,
            wrong types, out-of-range values, unknown keys in a D2LORA file).
    """
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise AdapterConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type not in ("D2LORA", "LORA"):
        raise AdapterConfigError(
            f"{source}: field 'peft_type' is {peft_type!r}; expected 'D2LORA' (d2serve format v1) or 'LORA' (PEFT)"
        )
    for key in _REQUIRED[peft_type]:
        if raw.get(key) is None:
            problems.append(f"missing required field '{key}' (no default is assumed)")
    if peft_type == "D2LORA":
        unknown = sorted(set(raw) - _D2LORA_KEYS)
        if unknown:
            problems.append(f"unknown field(s) {unknown}; allowed: {sorted(_D2LORA_KEYS)}")
    else:
        known = {f for f in AdapterConfig.__dataclass_fields__} | {"fan_in_fan_out"}
        ignored = sorted(k for k in raw if k not in known)
        if ignored:
            log.debug("%s: ignoring PEFT fields %s", source, ignored)
        if raw.get("fan_in_fan_out"):
            problems.append("field 'fan_in_fan_out' is true (GPT-2 Conv1D layout); only nn.Linear adapters are supported")

    r = raw.get("r")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int)):
        problems.append(f"field 'r' must be an integer, got {type(r).__name__} {r!r}")
    elif isinstance(r, int) and r <= 0:
        problems.append(f"field 'r' must be > 0, got {r}")
    alpha = raw.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        problems.append(f"field 'lora_alpha' must be a number, got {type(alpha).__name__} {alpha!r}")
    elif isinstance(alpha, (int, float)) and not (math.isfinite(alpha) and alpha > 0):
        problems.append(f"field 'lora_alpha' must be finite and > 0, got {alpha}")
    tau = raw.get("tau")
    if peft_type == "D2LORA" and tau is not None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)):
            problems.append(f"field 'tau' must be a number, got {type(tau).__name__} {tau!r}")
        elif not math.isfinite(tau):
            problems.append(f"field 'tau' must be finite, got {tau}")
    axis = raw.get("magnitude_axis", "out")
    if peft_type == "D2LORA" and axis != "out":
        problems.append(
            f"field 'magnitude_axis' is {axis!r}; only 'out' (norm per output row over in_features, "
            "PEFT's DoRA axis) is defined in format v1"
        )
    tm = raw.get("target_modules")
    if tm is not None:
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as e:
                problems.append(f"field 'target_modules' is not a valid regex: {e}")
        elif not (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)):
            problems.append(f"field 'target_modules' must be a non-empty list of names or a regex string, got {tm!r}")
    for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pat = raw.get(name) or {}
        if not isinstance(pat, dict) or not all(
            isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in pat.values()
        ):
            problems.append(f"field '{name}' must map module patterns to positive numbers, got {pat!r}")
            continue
        for key in pat:
            try:
                re.compile(key)
            except re.error as e:
                problems.append(f"field '{name}' key {key!r} is not a valid regex: {e}")
    mts = raw.get("modules_to_save") or []
    if not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        problems.append(f"field 'modules_to_save' must be a list of module names, got {mts!r}")
    for flag in ("use_rslora", "use_dora"):
        if flag in raw and raw[flag] is not None and not isinstance(raw[flag], bool):
            problems.append(f"field '{flag}' must be true or false, got {raw[flag]!r}")
    bm = raw.get("base_model_name_or_path")
    if bm is not None and not isinstance(bm, str):
        problems.append(f"field 'base_model_name_or_path' must be a string, got {bm!r}")
    if peft_type == "D2LORA" and raw.get("use_dora"):
        problems.append("field 'use_dora' is not valid for peft_type D2LORA")

    if problems:
        raise AdapterConfigError(f"{source}: invalid adapter config:\n  - " + "\n  - ".join(problems))
    return AdapterConfig(
        peft_type=peft_type,
        r=int(r),
        lora_alpha=float(alpha),
        target_modules=tm if isinstance(tm, str) else tuple(tm),
        tau=float(tau) if peft_type == "D2LORA" else None,
        magnitude_axis=axis,
        use_rslora=bool(raw.get("use_rslora") or False),
        use_dora=bool(raw.get("use_dora") or False),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern={k: float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
        modules_to_save=tuple(mts),
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        source=source,
    )


def read_config(adapter_dir: str | Path) -> AdapterConfig:
    """Read and validate ``<adapter_dir>/adapter_config.json``.

    Raises:
        FileNotFoundError: the directory or the config file does not exist.
        AdapterConfigError: the file is not valid JSON or the config is invalid.
    """
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter config not found (an adapter dir holds {CONFIG_NAME} and adapter_model.safetensors)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterConfigError(f"{path}: not valid JSON: {e}") from e
    return parse_config(raw, source=str(path))
