"""Adapter configuration (``adapter_config.json``) and its validation.

One dataclass covers the methods of the registry (:mod:`d2serve.adapters.methods`):

* ``D2LORA``: d2serve's own format v1 (docs/adapter-format.md).
* ``LORA``: PEFT LoRA, and PEFT DoRA when ``use_dora`` is true.

Every field a config can carry is decided in ONE table, :data:`FIELDS`: each
is either implemented exactly, ignorable because it cannot change the merged
weights, or refused by name with the reason unless it holds the value that
turns its feature off. A PEFT field that is not in the table (a newer PEFT)
is refused by name unless its value is null/false/empty, the value PEFT writes
for an option that is not used. Unknown keys in our own D2LORA files are
always an error (typos such as ``lora_alhpa``).

Validation collects every problem before raising (the PEFT / vLLM habit).
Module selection (:meth:`AdapterConfig.targets`) reproduces PEFT's
``check_target_module_exists`` exactly (``target_modules``, ``exclude_modules``,
``layers_to_transform``, ``layers_pattern``, and the exclusion of
``modules_to_save``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2serve.adapters.methods import METHODS, format_fields, method_for, methods_of, peft_types, selector_fields
from d2serve.errors import InputError, InputNotFoundError

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
EXPORT_MARKER = "d2serve_export"  # written by d2serve.export.peft into the PEFT adapters it exports

IMPLEMENTED, IGNORED, REFUSED = "implemented", "ignored", "refused"
# which formats a shared field belongs to, resolved against the method registry when asked (FieldRule.formats)
_BOTH, _PEFT, _OURS = "every format", "PEFT's formats", "d2serve's formats"


def _format_group(group: str) -> tuple[str, ...]:
    """The ``peft_type`` values of a group: d2serve's own formats (``Method.strict_fields``) first, then PEFT's."""
    ours = tuple(dict.fromkeys(m.peft_type for m in METHODS.values() if m.strict_fields))
    peft = tuple(dict.fromkeys(m.peft_type for m in METHODS.values() if not m.strict_fields))
    return {_BOTH: ours + peft, _PEFT: peft, _OURS: ours}[group]


def _strict(peft_type: str) -> bool:
    """Whether ``peft_type`` is a format of d2serve's own, whose files may carry no unknown key."""
    return any(m.strict_fields for m in methods_of(peft_type))


@dataclass(frozen=True)
class FieldRule:
    """How d2serve treats one ``adapter_config.json`` field.

    Attributes:
        kind: ``implemented`` (applied exactly), ``ignored`` (cannot change the merged weights)
            or ``refused`` (refused by name unless its value is one of ``off``).
        reason: why it is ignorable / refused (quoted in errors and in docs).
        applies_to: a group of formats (every format, PEFT's, d2serve's: resolved against the method registry) or
            an explicit tuple of ``peft_type`` values (a method's own fields).
        off: for ``refused``: the values that turn the feature off (PEFT's default among them);
            they cannot change the merged weights and are accepted.
    """

    kind: str
    reason: str
    applies_to: str | tuple[str, ...] = _PEFT
    off: tuple = (None,)

    @property
    def formats(self) -> tuple[str, ...]:
        """The ``peft_type`` values whose files may carry the field."""
        return self.applies_to if isinstance(self.applies_to, tuple) else _format_group(self.applies_to)


_VARIANT = "a PEFT LoRA variant with its own layer and merge rule, which d2serve does not implement"
_INIT_REWRITES_BASE = (
    "PEFT rewrites the base weight when it loads such an adapter (PiSSA/OLoRA/CorDA: a residual base "
    "W0 - B0 A0; LoftQ: a quantised base; LoRA-GA: W0 minus an offset) or uses a variant layer (MiCA), "
    "so no merge into the untouched base equals PEFT's model; save the adapter with PEFT's "
    "save_pretrained(path_initial_model_for_weight_conversion=...) to get a plain LoRA"
)
_INIT_ONLY = "only decides the initial factors; the trained factors in the file are what is merged"

# The fields every method shares (PEFT 0.21 LoraConfig + PeftConfig, and d2serve format v1); each method's own
# fields (selector, tau, ...) come from its registry entry (Method.config_fields), see field_rules().
# tests/test_adapter_fields.py checks that every field of the installed peft.LoraConfig is listed in FIELDS.
_SHARED_FIELDS: dict[str, FieldRule] = {
    # --- what the method and its factors are
    "r": FieldRule(IMPLEMENTED, "rank; scale = lora_alpha / r", _BOTH),
    "lora_alpha": FieldRule(IMPLEMENTED, "scale numerator", _BOTH),
    "use_rslora": FieldRule(IMPLEMENTED, "scale = lora_alpha / sqrt(r)", _BOTH, off=(None, False)),
    "rank_pattern": FieldRule(IMPLEMENTED, "per-module r (PEFT get_pattern_key)", _BOTH),
    "alpha_pattern": FieldRule(IMPLEMENTED, "per-module lora_alpha (PEFT get_pattern_key)", _BOTH),
    # --- which modules are adapted (PEFT check_target_module_exists)
    "target_modules": FieldRule(IMPLEMENTED, "list of name suffixes or a full-match regex", _BOTH),
    "exclude_modules": FieldRule(IMPLEMENTED, "list of name suffixes or a full-match regex", _BOTH),
    "layers_to_transform": FieldRule(IMPLEMENTED, "layer indices (with a list target_modules)", _BOTH),
    "layers_pattern": FieldRule(IMPLEMENTED, "name of the layer list holding those indices", _BOTH),
    "modules_to_save": FieldRule(IMPLEMENTED, "full replacement tensors; never adapted themselves", _BOTH),
    "bias": FieldRule(IMPLEMENTED, "'none' exactly; 'all'/'lora_only' only when the file stores no bias tensor "
                      "(stored bias tensors are refused by name)", _BOTH),
    "fan_in_fan_out": FieldRule(IGNORED, "PEFT resets it per layer from the layer's type (true for GPT-2 Conv1D, "
                                "false for nn.Linear); the merge takes the layout from the base's architecture"),
    "ensure_weight_tying": FieldRule(IMPLEMENTED, "no effect unless a tied embedding is adapted, which is refused "
                                     "by name (d2serve.architecture.tie_plan)", off=(None, False)),
    # --- informational, or only matter while training / initialising
    "base_model_name_or_path": FieldRule(IGNORED, "informational (the base is given to the merge)", _BOTH),
    "revision": FieldRule(IGNORED, "informational (hub revision of the base)", _BOTH),
    "task_type": FieldRule(IGNORED, "picks PEFT's model wrapper; saved head tensors are matched as modules_to_save", _BOTH),
    "inference_mode": FieldRule(IGNORED, "trainability flag only", _BOTH),
    "d2serve_version": FieldRule(IGNORED, "informational", _OURS),
    "auto_mapping": FieldRule(IGNORED, "PEFT's record of the base class; informational"),
    EXPORT_MARKER: FieldRule(IGNORED, "d2serve export dora / export lora's record of the source adapter and base "
                             "(d2serve inspect shows it); PEFT ignores it, the factors in the file are what is merged"),
    "peft_version": FieldRule(IGNORED, "informational"),
    "lora_dropout": FieldRule(IGNORED, "dropout is the identity at inference"),
    "runtime_config": FieldRule(IGNORED, "PEFT runtime options (device offload); never saved, no effect on weights"),
    "megatron_core": FieldRule(IGNORED, "only read together with megatron_config"),
    "qalora_group_size": FieldRule(IGNORED, "only read together with use_qalora"),
    "loftq_config": FieldRule(IGNORED, "only read with init_lora_weights='loftq' (refused)"),
    "eva_config": FieldRule(IGNORED, _INIT_ONLY + " (EVA's ranks are saved in rank_pattern)"),
    "corda_config": FieldRule(IGNORED, "only read with init_lora_weights='corda' (refused)"),
    "lora_ga_config": FieldRule(IGNORED, "only read with init_lora_weights='lora_ga' (refused)"),
    "init_lora_weights": FieldRule(REFUSED, _INIT_REWRITES_BASE, off=(None, True, False, "gaussian", "eva", "orthogonal")),
    # --- features whose model is not a merged dense checkpoint of the same architecture
    "megatron_config": FieldRule(REFUSED, "Megatron parallel layers are not HF nn.Linear checkpoints"),
    "trainable_token_indices": FieldRule(REFUSED, "trainable-token deltas of embedding rows are not merged"),
    "alora_invocation_tokens": FieldRule(REFUSED, "activated LoRA applies the adapter only after the invocation "
                                         "tokens; no single merged weight equals it"),
    "use_qalora": FieldRule(REFUSED, "QA-LoRA's A acts on group-pooled inputs (quantisation-aware); not merged",
                            off=(None, False)),
    "lora_bias": FieldRule(REFUSED, "a bias on lora_B changes the layer's bias on merge; not implemented",
                           off=(None, False)),
    "layer_replication": FieldRule(REFUSED, "PEFT duplicates decoder layers, changing the architecture"),
    "target_parameters": FieldRule(REFUSED, "LoRA on raw nn.Parameters (MoE experts) is not merged", off=(None, [])),
    "velora_config": FieldRule(REFUSED, _VARIANT),
    "monteclora_config": FieldRule(REFUSED, _VARIANT),
    "use_bdlora": FieldRule(REFUSED, _VARIANT),
    "arrow_config": FieldRule(REFUSED, "Arrow routing mixes several LoRA experts per token; " + _VARIANT),
    "kasa_config": FieldRule(REFUSED, _VARIANT),
}



def _format_names() -> str:
    """``'D2LORA' (d2serve format v1) or 'LORA' (PEFT)``: every format the registry reads, for messages."""
    return " or ".join(f"{pt!r} ({methods_of(pt)[0].format_label})" for pt in _format_group(_BOTH))


def field_rules() -> dict[str, FieldRule]:
    """The one table of fields: ``peft_type``, the shared fields and every method's own fields (its
    ``config_fields``, for its ``peft_type``; a selector is off when null or false), built from the registry
    (d2serve.adapters.methods) when called."""
    rules = {"peft_type": FieldRule(IMPLEMENTED, f"selects the format: {_format_names()}", _BOTH)}
    rules |= _SHARED_FIELDS
    for m in METHODS.values():
        for name, reason in m.config_fields.items():
            prev = rules.get(name)
            formats = tuple(dict.fromkeys((prev.formats if prev else ()) + (m.peft_type,)))
            rules[name] = FieldRule(IMPLEMENTED, reason, formats, off=(None, False) if name == m.selector else (None,))
    return rules


FIELDS: dict[str, FieldRule] = field_rules()
"""The table at import (:func:`field_rules`; docs/adapter-format.md lists it)."""


def _same(v: Any, o: Any) -> bool:
    """Equality that keeps 0 != False and 1 != True."""
    return v is o or (type(v) is type(o) and v == o)


def _is_unset(v: Any) -> bool:
    """The value PEFT writes for an option that is not used: null, false or empty."""
    return v is None or v is False or (isinstance(v, (dict, list)) and not v)


def _check_fields(raw: dict[str, Any], peft_type: str) -> tuple[list[str], list[str]]:
    """(problems, ignored field names) of every key of ``raw`` against :data:`FIELDS`."""
    problems: list[str] = []
    ignored: list[str] = []
    rules, strict = field_rules(), _strict(peft_type)
    for key in sorted(raw):
        value = raw[key]
        rule = rules.get(key)
        if rule is None or peft_type not in rule.formats:
            if strict or not _is_unset(value):
                owner = "" if rule is None else f" (a field of peft_type {'/'.join(rule.formats)})"
                allowed = sorted(k for k, r in rules.items() if peft_type in r.formats)
                problems.append(
                    f"field '{key}' = {value!r} is not known to d2serve for peft_type {peft_type}{owner}; refused "
                    "rather than ignored, since it may change the weights"
                    + (f"; allowed: {allowed}" if strict else "")
                )
            else:
                ignored.append(key)
            continue
        if rule.kind == REFUSED and not any(_same(value, o) for o in rule.off):
            problems.append(f"field '{key}' is {value!r}: {rule.reason}")
        elif rule.kind == IGNORED or rule.kind == REFUSED:
            ignored.append(key)
    return problems, ignored


class AdapterConfigError(InputError):
    """An ``adapter_config.json`` is missing, unreadable or invalid; the message lists every problem."""


@dataclass(frozen=True)
class AdapterConfig:
    """Validated adapter configuration.

    Attributes:
        peft_type: ``"D2LORA"`` or ``"LORA"``.
        r: default rank r of each adapted layer (int > 0).
        lora_alpha: default scaling numerator (float > 0); scale = lora_alpha / r
            (or lora_alpha / sqrt(r) with ``use_rslora``), as in PEFT.
        target_modules: module-name suffixes or one full-match regular expression (PEFT semantics).
        tau: D2-LoRA weight of the negative branch (float, finite); None for LORA.
        magnitude_axis: ``"out"``: the norm is taken per output row of the
            (out_features, in_features) weight, over in_features (PEFT's DoRA axis).
        use_rslora: rank-stabilised scale lora_alpha / sqrt(r).
        use_dora: PEFT DoRA (LORA only).
        rank_pattern / alpha_pattern: per-module overrides of r / lora_alpha,
            keyed by regex matched against the end of the module path (PEFT semantics).
        modules_to_save: modules whose full weights the adapter replaces (never adapted themselves).
        exclude_modules: module-name suffixes or one full-match regex never adapted (PEFT semantics).
        layers_to_transform: layer indices to adapt (int or tuple of ints), None for all.
        layers_pattern: name(s) of the layer list holding those indices (e.g. ``layers``), None for any.
        bias: PEFT's ``bias`` ('none', 'all', 'lora_only'); stored bias tensors are refused.
        ensure_weight_tying: PEFT's flag; refused by d2serve.architecture.tie_plan when a tied
            embedding is adapted, no effect otherwise.
        base_model_name_or_path: informational.
        ignored_fields: fields present in the file that cannot change the merged weights
            (see :data:`FIELDS`), for the manifest and ``inspect``.
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
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    bias: str = "none"
    ensure_weight_tying: bool = False
    base_model_name_or_path: str | None = None
    ignored_fields: tuple[str, ...] = ()
    source: str = "<memory>"
    method_fields: dict[str, Any] = field(default_factory=dict)

    def field_value(self, name: str) -> Any:
        """The value of a method's own config field (``Method.config_fields``, the selector): the attribute of
        that name (``tau``, ``magnitude_axis``, ``use_dora``), else ``method_fields[name]``.

        Raises:
            KeyError: ``name`` is neither.
        """
        if name in _ATTRIBUTES:
            return getattr(self, name)
        return self.method_fields[name]

    @property
    def method(self) -> str:
        """Registry name of the merge method: ``"d2lora"``, ``"lora"`` or ``"dora"``."""
        return method_for(self.peft_type, {s: self.field_value(s) for s in selector_fields()
                                           if s in format_fields(self.peft_type)}).name

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
        """True if ``module_path`` (e.g. ``model.layers.0.self_attn.q_proj``) is adapted.

        PEFT 0.21 ``check_target_module_exists``, step by step: ``exclude_modules`` (regex
        full match, or equal / ``.entry`` suffix) and ``modules_to_save`` (the module or a
        child of it) exclude; a string ``target_modules`` is a full-match regex; a list
        matches a path equal to an entry (then ``layers_to_transform`` is not applied), or
        ending with ``"." + entry``, in which case, when ``layers_to_transform`` is set, the
        first ``<layers_pattern>.<index>.`` (any ``<name>.<index>.`` without a pattern)
        must carry one of the indices.
        """
        key = module_path
        ex = self.exclude_modules
        if ex:
            if isinstance(ex, str):
                if re.fullmatch(ex, key):
                    return False
            elif key in ex or any(key.endswith(f".{e}") for e in ex):
                return False
        if self.modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in self.modules_to_save):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, key) is not None
        if key in self.target_modules:
            return True
        if not any(key.endswith(f".{t}") for t in self.target_modules):
            return False
        idx = self.layers_to_transform
        if idx is None or (isinstance(idx, tuple) and len(idx) == 0):
            return True
        match = None
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for pattern in (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        layer = int(match.group("idx"))
        return layer == idx if isinstance(idx, int) else layer in idx

    def to_json_dict(self) -> dict[str, Any]:
        """The config as written to ``adapter_config.json`` (selection fields only when set)."""
        d: dict[str, Any] = {
            "peft_type": self.peft_type,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": _jsonable(self.target_modules),
            "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "modules_to_save": list(self.modules_to_save) or None,
            "base_model_name_or_path": self.base_model_name_or_path,
        }
        for name in ("exclude_modules", "layers_to_transform", "layers_pattern"):
            if getattr(self, name) is not None:
                d[name] = _jsonable(getattr(self, name))
        if self.bias != "none":
            d["bias"] = self.bias
        if self.ensure_weight_tying:
            d["ensure_weight_tying"] = True
        for name in format_fields(self.peft_type):  # the format's own fields (d2serve.adapters.methods)
            d[name] = self.field_value(name)
        return d


_ATTRIBUTES = frozenset(f.name for f in dataclasses.fields(AdapterConfig))


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _pattern_key(patterns: dict[str, Any], module_path: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None


def _names_or_regex(raw: dict, name: str, problems: list[str], *, allow_empty: bool) -> tuple[str, ...] | str | None:
    """A ``target_modules``-like field: a regex string, or a list of non-empty names."""
    v = raw.get(name)
    if v is None:
        return None
    if isinstance(v, str):
        try:
            re.compile(v)
        except re.error as e:
            problems.append(f"field '{name}' is not a valid regex: {e}")
        return v
    if isinstance(v, list) and (v or allow_empty) and all(isinstance(t, str) and t for t in v):
        return tuple(v)
    problems.append(f"field '{name}' must be a {'' if allow_empty else 'non-empty '}list of names or a regex string, got {v!r}")
    return None


def _selection(raw: dict, problems: list[str]) -> dict[str, Any]:
    """Validate target_modules, exclude_modules, layers_to_transform, layers_pattern (PEFT LoraConfig.__post_init__)."""
    tm = _names_or_regex(raw, "target_modules", problems, allow_empty=False)
    if isinstance(tm, str) and tm.lower() == "all-linear":
        problems.append(
            "field 'target_modules' is 'all-linear': PEFT expands it from the module types of the live model "
            "(every nn.Linear/Conv1D but the output layer) and saves the expanded list; d2serve reads checkpoints, "
            "not module types, so give the explicit list of module names"
        )
    ex = _names_or_regex(raw, "exclude_modules", problems, allow_empty=True)
    idx = raw.get("layers_to_transform")
    if idx is not None:
        ints = [idx] if isinstance(idx, int) else idx
        if isinstance(idx, bool) or not isinstance(ints, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints
        ):
            problems.append(f"field 'layers_to_transform' must be a layer index or a list of them, got {idx!r}")
            idx = None
        elif isinstance(idx, list):
            idx = tuple(idx)
    pat = raw.get("layers_pattern")
    if pat is not None:
        if isinstance(pat, list) and all(isinstance(p, str) for p in pat):
            pat = tuple(pat)
        elif not isinstance(pat, str):
            problems.append(f"field 'layers_pattern' must be a name or a list of names, got {pat!r}")
            pat = None
        for p in (pat,) if isinstance(pat, str) else pat or ():
            try:
                re.compile(p)
            except re.error as e:
                problems.append(f"field 'layers_pattern' entry {p!r} is not a valid regex: {e}")
    if isinstance(tm, str) and raw.get("layers_to_transform") is not None:
        problems.append("field 'layers_to_transform' cannot be used when 'target_modules' is a regex string (PEFT refuses it)")
    if isinstance(tm, str) and raw.get("layers_pattern") is not None:
        problems.append("field 'layers_pattern' cannot be used when 'target_modules' is a regex string (PEFT refuses it)")
    if pat and raw.get("layers_to_transform") is None:
        problems.append("field 'layers_pattern' is set but 'layers_to_transform' is not (PEFT refuses it)")
    return {"target_modules": tm, "exclude_modules": ex, "layers_to_transform": idx, "layers_pattern": pat}


def parse_config(raw: dict[str, Any], source: str = "<memory>") -> AdapterConfig:
    """Validate a raw config dict and build an :class:`AdapterConfig`.

    Every key is checked against :data:`FIELDS` (implemented / ignorable / refused unless off);
    then types and values of the implemented fields.

    Args:
        raw: the decoded JSON object.
        source: file name used in error messages.

    Raises:
        AdapterConfigError: listing every problem found (missing required fields, wrong
            types, out-of-range values, refused fields with their reason, unknown keys).
    """
    if not isinstance(raw, dict):
        raise AdapterConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type not in peft_types():
        raise AdapterConfigError(f"{source}: field 'peft_type' is {peft_type!r}; expected {_format_names()}")
    method = method_for(peft_type, raw)  # its required fields, own-field checks and values (the registry)
    problems: list[str] = []
    for key in method.required_fields:
        if raw.get(key) is None:
            problems.append(f"missing required field '{key}' (no default is assumed)")
    field_problems, ignored = _check_fields(raw, peft_type)
    problems += field_problems

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
    problems += method.check_config(raw)
    sel = _selection(raw, problems)
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
    for flag in ("use_rslora", *selector_fields(), "ensure_weight_tying"):
        if flag in raw and raw[flag] is not None and not isinstance(raw[flag], bool):
            problems.append(f"field '{flag}' must be true or false, got {raw[flag]!r}")
    bias = raw.get("bias") or "none"
    if bias not in ("none", "all", "lora_only"):
        problems.append(f"field 'bias' must be 'none', 'all' or 'lora_only', got {bias!r}")
    bm = raw.get("base_model_name_or_path")
    if bm is not None and not isinstance(bm, str):
        problems.append(f"field 'base_model_name_or_path' must be a string, got {bm!r}")

    if problems:
        raise AdapterConfigError(f"{source}: invalid adapter config:\n  - " + "\n  - ".join(problems))
    if ignored:
        log.debug("%s: fields that cannot change the merged weights: %s", source, ignored)
    own = method.config_values(raw) | {s: bool(raw.get(s) or False) for s in selector_fields()
                                       if s in format_fields(peft_type)}
    return AdapterConfig(
        peft_type=peft_type,
        r=int(r),
        lora_alpha=float(alpha),
        target_modules=sel["target_modules"],
        use_rslora=bool(raw.get("use_rslora") or False),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern={k: float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
        modules_to_save=tuple(mts),
        exclude_modules=sel["exclude_modules"],
        layers_to_transform=sel["layers_to_transform"],
        layers_pattern=sel["layers_pattern"],
        bias=bias,
        ensure_weight_tying=bool(raw.get("ensure_weight_tying") or False),
        base_model_name_or_path=bm,
        ignored_fields=tuple(ignored),
        source=source,
        **{k: v for k, v in own.items() if k in _ATTRIBUTES},
        method_fields={k: v for k, v in own.items() if k not in _ATTRIBUTES},
    )


def read_config(adapter_dir: str | Path) -> AdapterConfig:
    """Read and validate ``<adapter_dir>/adapter_config.json``.

    Raises:
        FileNotFoundError: the directory or the config file does not exist.
        AdapterConfigError: the file is not valid JSON or the config is invalid.
    """
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise InputNotFoundError(f"{path}: adapter config not found (an adapter dir holds {CONFIG_NAME} and adapter_model.safetensors)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterConfigError(f"{path}: not valid JSON: {e}") from e
    return parse_config(raw, source=str(path))
