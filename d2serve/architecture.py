"""Architecture knowledge in one place: what transformers builds from a checkpoint's ``config.json``.

Per checkpoint, the architecture is read from transformers itself, with the
model built on the meta device (no memory, no weights, nothing downloaded):

* **layer kinds**: every weight-bearing layer as ``linear`` (``nn.Linear``,
  weight stored (out_features, in_features)), ``conv1d`` (GPT-2 family
  ``transformers.pytorch_utils.Conv1D``, weight stored (in_features,
  out_features)) or ``embedding`` (``nn.Embedding``, (num_embeddings, dim));
  fused projections (qkv, gate_up) are flagged. Every merge formula is
  row-wise over output features, so a fused layer merges like any other and a
  Conv1D weight is transposed to (out, in) for the math and back.
* **tie semantics**: whether the model ties its output embedding to its input
  embedding. With no ``tie_word_embeddings`` in ``config.json`` the
  architecture's config class default decides (False for Llama and Qwen2, True
  for GPT-2 and Gemma); the tie used is the one the meta model really has.
* **the full tensor list**: state-dict key -> shape of everything a checkpoint
  of this architecture must store (non-persistent buffers and tied duplicates
  left out, as ``save_pretrained`` does).

:func:`tie_plan` is the one place that decides what a merge does with tied
embeddings given the base and an adapter; merge, verify and both exports call
it (directly or through :attr:`d2serve.checkpoint.Checkpoint.tied_embeddings`).

Building the meta model needs transformers' model machinery (seconds to
import), so the facts of each config are also kept on disk
(:func:`architecture_cache_path`, plain JSON under
``<cache_dir>/architectures/``, see :mod:`d2serve.cache`): a known config is
answered without importing transformers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import dataclasses
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from d2serve.adapters.methods import get_method
from d2serve.cache import cache_dir, write_text_atomic
from d2serve.errors import AdapterError, CheckpointError

if TYPE_CHECKING:
    from d2serve.adapters.io import Adapter
    from d2serve.checkpoint import Checkpoint, TensorInfo

LINEAR, CONV1D, EMBEDDING = "linear", "conv1d", "embedding"
# last path component of fused projections: GPT-2 c_attn (q|k|v), Phi-3 qkv_proj / gate_up_proj, Falcon/GPT-NeoX
# query_key_value, MPT Wqkv, Baichuan W_pack
FUSED_NAMES = frozenset({"c_attn", "qkv_proj", "gate_up_proj", "query_key_value", "Wqkv", "W_pack"})


@dataclass(frozen=True)
class LayerKind:
    """How one weight-bearing layer stores its weight.

    Attributes:
        kind: ``linear`` | ``conv1d`` | ``embedding``.
        transposed: the weight is stored (in_features, out_features) (Conv1D; an
            nn.Embedding's (num_embeddings, dim) too: a one-hot input of num_embeddings
            features times the weight); the merge math runs on its transpose (out_features, in_features).
        fused: a fused projection (qkv or gate_up): one weight whose output rows
            are several projections; merges like any other (formulas are row-wise).
    """

    kind: str
    transposed: bool
    fused: bool


@dataclass(frozen=True)
class ExpectedTensor:
    """One tensor the architecture stores: its shape and whether it is floating point."""

    shape: tuple[int, ...]
    floating: bool


@dataclass(frozen=True)
class Architecture:
    """What transformers builds from one ``config.json``.

    Attributes:
        model_type: the config's ``model_type`` (e.g. ``llama``, ``gpt2``).
        config_class: the transformers config class name (e.g. ``LlamaConfig``).
        tie_default: the config class's default ``tie_word_embeddings`` (used when
            config.json has no such key).
        tied: the built model ties its output embedding weight to the input embedding.
        layers: module path -> :class:`LayerKind` of every Linear/Conv1D/Embedding layer.
        expected: state-dict key -> :class:`ExpectedTensor` a checkpoint must store
            (no non-persistent buffers, no tied duplicates).
        input_embedding / output_embedding: tensor names of the input embedding
            (e.g. ``model.embed_tokens.weight``) and output projection (``lm_head.weight``), or None.
        base_model_prefix: the model class's ``base_model_prefix`` (``transformer`` for GPT-2, ``model`` for
            Llama; may be empty): a checkpoint may store the base model's keys without it
            (:func:`model_key_names`).
        ignore_unexpected: regular expressions of stored keys transformers ignores when loading (the model's
            ``_keys_to_ignore_on_load_unexpected``, e.g. GPT-2's ``attn.bias`` causal masks that old checkpoints
            such as openai-community/gpt2 store, plus its rules for old ``rotary_emb.inv_freq`` / ``position_ids``
            buffers); such keys are not reported as extras.
    """

    model_type: str
    config_class: str
    tie_default: bool
    tied: bool
    layers: dict[str, LayerKind]
    expected: dict[str, ExpectedTensor]
    input_embedding: str | None
    output_embedding: str | None
    base_model_prefix: str = ""
    ignore_unexpected: tuple[str, ...] = ()

    def layer(self, module: str) -> LayerKind | None:
        """The :class:`LayerKind` of module path ``module`` (None if it is not a Linear/Conv1D/Embedding)."""
        return self.layers.get(module)

    @property
    def output_module(self) -> str | None:
        """Module path of the output projection (``lm_head``), or None."""
        return self.output_embedding.removesuffix(".weight") if self.output_embedding else None


def _config_default(cls, field: str):
    """The default of ``field`` in config class ``cls`` (from a default-constructed instance)."""
    try:
        return getattr(cls(), field)
    except Exception:  # a config class that cannot be built without arguments: read its signature
        import inspect

        p = inspect.signature(cls.__init__).parameters.get(field)
        return None if p is None or p.default is inspect.Parameter.empty else p.default


def _on_disk(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The (meta) state dict ``state`` as a checkpoint on disk holds it: transformers' own checkpoint conversion
    mapping applied in reverse (``transformers.core_model_loading.revert_weight_conversion``, what
    ``save_pretrained`` does), e.g. Qwen2-MoE's fused ``mlp.experts.gate_up_proj`` (experts, 2 x inter, hidden)
    -> per-expert ``mlp.experts.{e}.gate_proj.weight`` / ``up_proj.weight`` (inter, hidden). Architectures
    without a mapping get ``state`` unchanged."""
    from transformers.core_model_loading import (
        revert_weight_conversion,  # transformers >= 5 (pinned)
    )

    try:
        return revert_weight_conversion(model, state)
    except Exception:  # a converter that cannot run on meta tensors: the model's own keys (stricter, never looser)
        return state


def _build(config_json: str, where: str) -> Architecture:
    """Build the :class:`Architecture` of ``config_json`` with transformers (meta device); ``where`` for errors."""
    import transformers
    from torch import nn
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.pytorch_utils import Conv1D

    config = json.loads(config_json)
    model_type = config.get("model_type")
    cfg_file = f"{where}/config.json"
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"{cfg_file}: model_type {model_type!r} is not an architecture transformers {transformers.__version__} "
            "knows (remote code is never run)"
        )
    cls = CONFIG_MAPPING[model_type]
    try:
        cfg = cls.from_dict(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # transformers raises ValueError/KeyError/TypeError/ImportError variously
        raise CheckpointError(f"{cfg_file}: transformers cannot build the architecture: {e}") from e
    tied_keys = dict(getattr(model, "all_tied_weights_keys", None) or {})
    if not tied_keys:  # fallback: names sharing one Parameter object; the first one is the stored one
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        tied_keys = {n: names[0] for names in groups.values() for n in names[1:]}
    names = {id(m): n for n, m in model.named_modules()}

    def weight_name(module) -> str | None:
        return f"{names[id(module)]}.weight" if module is not None and id(module) in names else None

    inp = weight_name(model.get_input_embeddings())
    try:
        out = weight_name(model.get_output_embeddings())
    except (AttributeError, NotImplementedError):
        out = None
    layers = {}
    for n, m in model.named_modules():
        kind = CONV1D if isinstance(m, Conv1D) else LINEAR if isinstance(m, nn.Linear) else (
            EMBEDDING if isinstance(m, nn.Embedding) else None)
        if kind is not None:
            # an embedding's weight (num_embeddings, dim) maps one-hot inputs (in) to outputs (out): stored (in, out)
            layers[n] = LayerKind(kind, kind in (CONV1D, EMBEDDING), n.rsplit(".", 1)[-1] in FUSED_NAMES)
    stored = _on_disk({k: v for k, v in model.state_dict().items() if k not in tied_keys}, model)
    expected = {k: ExpectedTensor(tuple(v.shape), v.dtype.is_floating_point) for k, v in stored.items()}
    tie_default = _config_default(cls, "tie_word_embeddings")
    return Architecture(
        model_type=model_type,
        config_class=cls.__name__,
        tie_default=bool(tie_default) if tie_default is not None else False,
        tied=out is not None and out in tied_keys,
        layers=layers,
        expected=expected,
        input_embedding=inp,
        output_embedding=out,
        base_model_prefix=str(getattr(model, "base_model_prefix", "") or ""),
        ignore_unexpected=_ignored_unexpected(model),
    )


def _ignored_unexpected(model) -> tuple[str, ...]:
    """The patterns of stored keys transformers drops from ``unexpected_keys`` when it loads ``model``
    (``PreTrainedModel._adjust_missing_and_unexpected_keys``, transformers 5), sorted."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [n for n, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return tuple(sorted(str(p) for p in patterns))


# ------------------------------------------------------------------------------------------- on-disk cache

CACHE_SCHEMA = 2  # version of the entry layout below; an entry of another version is ignored and rebuilt
_KINDS = (LINEAR, CONV1D, EMBEDDING)
_log = logging.getLogger(__name__)


def _transformers_version() -> str | None:
    """The installed transformers version from its package metadata (transformers itself is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def _d2serve_version() -> str:
    """The running d2serve's ``__version__``."""
    import d2serve

    return d2serve.__version__


@functools.cache
def _source_sha256() -> str | None:
    """sha256 of this module's source file (any change to how facts are built invalidates every entry); None
    when the file cannot be read (then nothing is cached)."""
    try:
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    except OSError:
        return None


def _cache_key(config_json: str) -> str | None:
    """sha256 (hex) of the canonical JSON of: the config (``config_json``, keys sorted), the transformers and
    d2serve versions, and this module's source hash; None when transformers' version or the source hash is
    unknown (not cached)."""
    tv, src = _transformers_version(), _source_sha256()
    if tv is None or src is None:
        return None
    payload = {"config": json.loads(config_json), "transformers": tv, "d2serve": _d2serve_version(),
               "source_sha256": src}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _entry_path(config_json: str) -> Path | None:
    """``<cache_dir>/architectures/<key>.json`` for ``config_json``, or None (cache off, no key)."""
    root = cache_dir()
    key = _cache_key(config_json) if root is not None else None
    return None if key is None else root / "architectures" / f"{key}.json"


def architecture_cache_path(config: dict) -> Path | None:
    """Where the on-disk entry of ``config``'s :class:`Architecture` is (or would be) stored.

    ``<cache_dir>/architectures/<key>.json`` (:func:`d2serve.cache.cache_dir`), key = sha256 of the config (keys
    sorted), the transformers version (package metadata), d2serve's ``__version__`` and this module's source
    hash. None when the cache is off (``D2SERVE_CACHE_DIR=off``) or a key part is unknown. The file
    may not exist (not built yet, or not writable).
    """
    return _entry_path(json.dumps(config, sort_keys=True))


def _payload_sha256(entry: dict) -> str:
    """sha256 (hex) of the canonical JSON (keys sorted, no spaces) of ``entry`` without its ``sha256`` field."""
    payload = {k: v for k, v in entry.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _to_entry(arch: Architecture, key: str) -> dict:
    """The JSON entry of ``arch``: the schema version, the key, every field (LayerKind as ``[kind, transposed,
    fused]``, ExpectedTensor as ``[shape list, floating]``) and ``sha256``, the checksum of all of that
    (:func:`_payload_sha256`), so an entry edited by hand or damaged on disk is detected and rebuilt."""
    entry = {
        "schema": CACHE_SCHEMA,
        "key": key,
        "model_type": arch.model_type,
        "config_class": arch.config_class,
        "tie_default": arch.tie_default,
        "tied": arch.tied,
        "layers": {n: [k.kind, k.transposed, k.fused] for n, k in arch.layers.items()},
        "expected": {n: [list(e.shape), e.floating] for n, e in arch.expected.items()},
        "input_embedding": arch.input_embedding,
        "output_embedding": arch.output_embedding,
        "base_model_prefix": arch.base_model_prefix,
        "ignore_unexpected": list(arch.ignore_unexpected),
    }
    entry["sha256"] = _payload_sha256(entry)
    return entry


class _ChecksumMismatch(ValueError):
    """A cache entry whose content does not match its ``sha256`` (edited by hand or damaged)."""


def _from_entry(entry: object, key: str) -> Architecture:
    """The :class:`Architecture` of a JSON entry written by :func:`_to_entry` for ``key``.

    Raises:
        ValueError: anything not exactly that layout (other schema or key, content not matching its ``sha256``,
            missing field, wrong type).
    """

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"architecture cache entry: {what}")

    def is_bool(v) -> bool:
        return isinstance(v, bool)

    def is_name(v) -> bool:
        return v is None or isinstance(v, str)

    need(isinstance(entry, dict), "not a JSON object")
    need(entry.get("schema") == CACHE_SCHEMA and entry.get("key") == key, "other schema or key")
    if entry.get("sha256") != _payload_sha256(entry):
        raise _ChecksumMismatch("architecture cache entry: its content does not match its sha256 (edited or damaged)")
    need(isinstance(entry.get("model_type"), str) and isinstance(entry.get("config_class"), str), "names")
    need(is_bool(entry.get("tie_default")) and is_bool(entry.get("tied")), "tie flags")
    need(is_name(entry.get("input_embedding")) and is_name(entry.get("output_embedding")), "embedding names")
    need(isinstance(entry.get("base_model_prefix"), str), "base_model_prefix")
    ignore = entry.get("ignore_unexpected")
    need(isinstance(ignore, list) and all(isinstance(p, str) for p in ignore), "ignore_unexpected")
    layers, expected = entry.get("layers"), entry.get("expected")
    need(isinstance(layers, dict) and isinstance(expected, dict), "layers/expected")
    for v in layers.values():
        need(isinstance(v, list) and len(v) == 3 and v[0] in _KINDS and is_bool(v[1]) and is_bool(v[2]), "layer")
    for v in expected.values():
        need(isinstance(v, list) and len(v) == 2 and isinstance(v[0], list) and is_bool(v[1])
             and all(isinstance(d, int) and not is_bool(d) and d >= 0 for d in v[0]), "expected tensor")
    return Architecture(
        model_type=entry["model_type"],
        config_class=entry["config_class"],
        tie_default=entry["tie_default"],
        tied=entry["tied"],
        layers={n: LayerKind(*v) for n, v in layers.items()},
        expected={n: ExpectedTensor(tuple(v[0]), v[1]) for n, v in expected.items()},
        input_embedding=entry["input_embedding"],
        output_embedding=entry["output_embedding"],
        base_model_prefix=entry["base_model_prefix"],
        ignore_unexpected=tuple(ignore),
    )


def _read_entry(path: Path) -> Architecture | None:
    """The :class:`Architecture` stored at ``path``, or None when it is missing or cannot be trusted (unreadable,
    truncated, not JSON, other schema or key, content not matching its sha256 (a warning is logged), wrong layout):
    the caller rebuilds it."""
    try:
        return _from_entry(json.loads(path.read_text(encoding="utf-8")), path.stem)
    except _ChecksumMismatch as e:  # readable but not what d2serve wrote: say so, it is rebuilt
        _log.warning("d2serve cache: rebuilding %s: %s", path, e)
        return None
    except (OSError, ValueError, TypeError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError: ValueError
        if not isinstance(e, FileNotFoundError):
            _log.debug("d2serve cache: ignoring %s: %s", path, e)
        return None


@functools.lru_cache(maxsize=16)
def _architecture(config_json: str, where: str) -> Architecture:
    """In-process cache -> on-disk entry -> :func:`_build` (then the entry is written; build errors never are)."""
    path = _entry_path(config_json)
    if path is not None:
        arch = _read_entry(path)
        if arch is not None:
            return arch
    arch = _build(config_json, where)
    if path is not None:
        write_text_atomic(path, json.dumps(_to_entry(arch, path.stem), separators=(",", ":")))
    return arch


def architecture_of(config: dict, where: str | Path = "<config>") -> Architecture:
    """The :class:`Architecture` of a ``config.json`` dict.

    Cached per distinct config in the process and on disk (:func:`architecture_cache_path`): a config seen
    before, by this or another process with the same transformers and d2serve, is answered without importing
    transformers. An unreadable or stale entry is rebuilt; an unwritable cache is skipped silently.

    Args:
        config: the parsed config.json.
        where: the checkpoint directory, for error messages (not part of the cache key).

    Raises:
        CheckpointError: transformers does not know the ``model_type`` or cannot build the model from the config.
    """
    return _architecture(json.dumps(config, sort_keys=True), str(where))


def architecture_at(path: str | Path) -> Architecture:
    """:func:`architecture_of` the ``config.json`` in directory ``path``.

    Raises:
        CheckpointError: config.json missing or unreadable, or the architecture cannot be built.
    """
    cfg = Path(path) / "config.json"
    try:
        config = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: not readable JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg}: expected a JSON object")
    return architecture_of(config, path)


def expected_state_dict(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape that a checkpoint of the architecture in ``<path>/config.json`` must store."""
    return {k: e.shape for k, e in architecture_at(path).expected.items()}


def model_key_names(stored: Iterable[str], arch: Architecture, where: str | Path = "<checkpoint>") -> dict[str, str]:
    """Stored tensor key -> the state-dict key transformers loads it into, for every key that differs.

    transformers' own rule when it loads a checkpoint (``transformers.core_model_loading.rename_source_key``,
    step 3, transformers 5): a stored key that starts with ``base_model_prefix.`` and whose rest is a key of the
    model loses the prefix; else a key that is a model key once ``base_model_prefix.`` is put in front gets it.
    So a GPT-2 checkpoint saved from the base model (openai-community/gpt2: ``h.0.attn.c_attn.weight``,
    ``wte.weight``) loads into ``transformer.h.0.attn.c_attn.weight``, ``transformer.wte.weight``. The model's
    keys here are :attr:`Architecture.expected` and the two embeddings. Keys that are neither stay as they are
    (extras, which transformers ignores).

    Raises:
        CheckpointError: two stored keys that load into the same model key (``where`` names the checkpoint).
    """
    prefix = arch.base_model_prefix
    if not prefix:
        return {}
    model_keys = set(arch.expected) | {n for n in (arch.input_embedding, arch.output_embedding) if n}
    dot = prefix + "."
    renamed: dict[str, str] = {}
    for k in stored:
        if k.startswith(dot) and k[len(dot):] in model_keys:
            renamed[k] = k[len(dot):]
        elif dot + k in model_keys:
            renamed[k] = dot + k
    if renamed:
        stored = set(stored)
        seen: dict[str, str] = {}
        for k in sorted(stored):
            m = renamed.get(k, k)
            if m in seen:
                raise CheckpointError(f"{where}: tensors {seen[m]} and {k} are both stored; transformers loads both into "
                                      f"{m} (base_model_prefix {prefix!r} added or removed): a checkpoint holds each "
                                      "tensor once")
            seen[m] = k
    return renamed


@dataclass
class TensorListDiff:
    """Stored tensors against the architecture's full tensor list.

    Attributes:
        missing: expected keys not stored (transformers would silently re-initialise them).
        extra: stored keys the architecture does not have (adapter leftovers) and transformers does not ignore.
        wrong_shape: ``"name: stored (a, b), expected (c, d)"`` lines.
        not_float: ``"name: stored int8"`` lines for tensors the architecture holds as floating
            point but that are stored otherwise (quantized weights).
    """

    missing: list[str]
    extra: list[str]
    wrong_shape: list[str]
    not_float: list[str]
    ignored: list[str] = dataclasses.field(default_factory=list)  # stored keys transformers ignores (old buffers), passed through

    def problems(self, where: str | Path, *, extra: bool = True) -> list[str]:
        """One line per kind of problem, naming up to five tensors each; ``extra=False`` leaves extras out."""
        out = []
        if extra and self.extra:
            out.append(f"{where}: {len(self.extra)} stored tensors are not in the architecture's state dict "
                       f"(adapter leftovers?), e.g. {self.extra[:5]}")
        if self.missing:
            out.append(f"{where}: {len(self.missing)} tensors of the architecture's state dict are missing "
                       f"(transformers would re-initialise them at random), e.g. {self.missing[:5]}")
        if self.wrong_shape:
            out.append(f"{where}: {len(self.wrong_shape)} tensors have the wrong shape, e.g. {self.wrong_shape[:3]}")
        if self.not_float:
            out.append(f"{where}: {len(self.not_float)} floating-point weights of the architecture are stored as "
                       f"integers (a quantized checkpoint; d2serve reads full-precision weights only), "
                       f"e.g. {self.not_float[:3]}")
        return out


def compare_tensor_list(infos: dict[str, TensorInfo], arch: Architecture) -> TensorListDiff:
    """Compare stored tensor headers with ``arch.expected`` (keys, shapes, floating point or not).

    ``infos`` keyed by stored names or by model names (:attr:`d2serve.checkpoint.Checkpoint.tensors`): stored
    names are first put into the model's (:func:`model_key_names`), as transformers does when it loads them.
    """
    renamed = model_key_names(infos, arch)
    if renamed:
        infos = {renamed.get(k, k): v for k, v in infos.items()}
    exp = arch.expected
    both = sorted(set(infos) & set(exp))
    ignore = re.compile("|".join(f"({p})" for p in arch.ignore_unexpected)) if arch.ignore_unexpected else None
    unknown = sorted(set(infos) - set(exp))
    return TensorListDiff(
        missing=sorted(set(exp) - set(infos)),
        extra=[k for k in unknown if ignore is None or ignore.search(k) is None],
        ignored=[k for k in unknown if ignore is not None and ignore.search(k) is not None],
        wrong_shape=[f"{k}: stored {tuple(infos[k].shape)}, expected {exp[k].shape}"
                     for k in both if tuple(infos[k].shape) != exp[k].shape],
        not_float=[f"{k}: stored {str(infos[k].dtype).removeprefix('torch.')}"
                   for k in both if exp[k].floating and not infos[k].dtype.is_floating_point],
    )


def require_full_precision_base(ckpt: Checkpoint) -> None:
    """Refuse a base that transformers would not load exactly as stored, or that is quantized.

    Checks: no ``quantization_config`` in config.json; every tensor of the
    architecture's full list is stored (none left for transformers to
    re-initialise), with its shape; floating-point weights are stored as
    floating point (int8/uint8 weights are quantized). Extra stored tensors are
    allowed (transformers ignores them) and are passed through unchanged.

    Raises:
        CheckpointError: naming the field or the tensors.
    """
    qc = ckpt.config.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise CheckpointError(
            f"{ckpt.path}/config.json: has 'quantization_config' (quant_method {method!r}): a quantized base is not "
            "merged; use the full-precision base checkpoint"
        )
    problems = compare_tensor_list(ckpt.tensors, ckpt.architecture).problems(ckpt.path, extra=False)
    if problems:
        raise CheckpointError("\n".join(problems))


@dataclass(frozen=True)
class TiePlan:
    """What a merge does with tied embeddings (the one decision merge, verify and exports share).

    Attributes:
        tied_base: the base model ties ``lm_head`` to the input embedding (effective,
            architecture default included) and does not store ``lm_head.weight``.
        tied_out: the merged checkpoint keeps the tie.
        embedding: input embedding tensor name (e.g. ``model.embed_tokens.weight``) or None.
        lm_head: output projection tensor name (``lm_head.weight``) or None.
        lm_head_from: when the merged checkpoint must store ``lm_head`` but the base does not,
            the base tensor it is computed from (the original input embedding); else None.
        reason: why (for the manifest).
    """

    tied_base: bool
    tied_out: bool
    embedding: str | None
    lm_head: str | None
    lm_head_from: str | None
    reason: str


def _ensure_weight_tying(adapter: Adapter) -> bool:
    """PEFT's ``ensure_weight_tying`` of the adapter config (False, PEFT's default, when absent)."""
    v = getattr(adapter.config, "ensure_weight_tying", None)
    if v is None and adapter.path is not None and (adapter.path / "adapter_config.json").is_file():
        try:
            v = json.loads((adapter.path / "adapter_config.json").read_text()).get("ensure_weight_tying")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            v = None
    return bool(v)


def tie_plan(ckpt: Checkpoint, adapter: Adapter | None = None) -> TiePlan:
    """Decide the tie semantics of ``ckpt`` merged with ``adapter`` so the merge computes what PEFT's unmerged model does.

    With a tied base (no stored ``lm_head.weight``) and PEFT's default
    ``ensure_weight_tying=False``:

    * an adapter layer on ``lm_head`` adapts only the output projection: untie,
      ``lm_head.weight`` = merge of the original embedding;
    * ``modules_to_save`` holding the input embedding replaces only the input
      embedding (the output projection keeps the original weight): untie,
      ``lm_head.weight`` = the original embedding, the new embedding for input;
    * ``modules_to_save`` holding ``lm_head`` replaces only the output projection
      (PEFT wraps ``lm_head`` alone; the input embedding keeps the original weight):
      untie, ``lm_head.weight`` = the saved copy, the embedding unchanged;
    * a LoRA layer on the input embedding (PEFT ``lora_embedding_A/B``) changes only
      the input embedding: untie, ``lm_head.weight`` = the original embedding.

    Otherwise the tie is kept as it is. An untied base needs no decision.

    Raises:
        AdapterError: ``ensure_weight_tying=true`` with an adapted tied embedding
            (PEFT then adapts both ends together, which d2serve does not merge), or a
            config that ties but a base that also stores ``lm_head.weight`` (ignored by
            transformers) with an adapted embedding.
    """
    arch = ckpt.architecture
    emb, head = arch.input_embedding, arch.output_embedding
    tied = arch.tied and head is not None and head not in ckpt.tensors and emb in ckpt.tensors
    if adapter is None:
        return TiePlan(tied, tied, emb, head, None, "tied" if tied else "untied base")
    head_adapted = arch.output_module in adapter.layers
    emb_adapted = emb is not None and emb.removesuffix(".weight") in adapter.layers
    emb_saved = emb in adapter.modules_to_save
    head_saved = head is not None and head in adapter.modules_to_save
    changed = [why for cond, why in [
        (head_adapted, "lm_head is adapted: only the output projection changes"),
        (head_saved, f"modules_to_save replaces {head}: the input embedding keeps the original weight"),
        (emb_adapted, f"{emb} is adapted: lm_head keeps the original embedding"),
        (emb_saved, f"modules_to_save replaces {emb}: lm_head keeps the original embedding"),
    ] if cond]
    if arch.tied and not tied and head in ckpt.tensors and changed:
        raise AdapterError(
            f"{ckpt.path}/config.json ties lm_head to {emb} but the base also stores {head}, which transformers "
            "ignores; an adapted embedding of such a base is ambiguous (remove the stored copy or untie the config)"
        )
    if not tied:
        return TiePlan(False, False, emb, head, None, "untied base")
    if not changed:
        return TiePlan(True, True, emb, head, None, "tied; neither embedding adapted")
    if _ensure_weight_tying(adapter):
        raise AdapterError(
            f"{adapter.path or 'adapter'}: ensure_weight_tying is true and the tied "
            f"{'lm_head' if head_adapted or head_saved else emb} is adapted: PEFT then adapts the input embedding "
            "and lm_head together, which d2serve does not merge"
        )
    return TiePlan(True, False, emb, head, emb, f"untied ({'; '.join(changed)}, as in PEFT's unmerged model)")


def check_base_copies(ckpt: Checkpoint, adapter: Adapter) -> None:
    """Accept copies of base tensors that PEFT saves into adapter files only if they equal the base exactly.

    PEFT (``save_embedding_layers="auto"``) stores e.g. ``lm_head.base_layer.weight``
    beside an ``lm_head`` LoRA. Such a copy is harmless when it is bit-for-bit the
    base tensor (compared as exact values; on a tied base ``lm_head.weight`` is the
    input embedding); otherwise PEFT would load it and the merge would differ.

    Raises:
        AdapterError: naming the copy that differs from, or has no counterpart in, the base.
    """
    copies = getattr(adapter, "base_copies", None) or {}
    if not copies:
        return
    arch = ckpt.architecture
    where = adapter.path or "adapter"
    for name, t in copies.items():
        src = name
        if name not in ckpt.tensors and name == arch.output_embedding and tie_plan(ckpt).tied_base:
            src = arch.input_embedding
        if src not in ckpt.tensors:
            raise AdapterError(f"{where}: holds a copy of base tensor {name}, which base {ckpt.path} does not store")
        b = ckpt.get_tensor(src)
        if tuple(b.shape) != tuple(t.shape) or not torch.equal(b.double(), t.double()):
            raise AdapterError(
                f"{where}: its saved copy of base tensor {name} differs from {src} of base {ckpt.path}; the adapter "
                "replaces that weight (e.g. resized embeddings), which d2serve does not merge"
            )


def weight_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, int]]:
    """Module path -> (out_features, in_features) of every 2-D ``*.weight`` of the base, Conv1D transposed.

    With tied embeddings and no stored ``lm_head.weight``, the output module is
    listed with the input embedding's shape (see :func:`weight_source`).
    """
    arch = ckpt.architecture
    shapes = {}
    for k, v in ckpt.tensors.items():
        if k.endswith(".weight") and len(v.shape) == 2:
            m = k[: -len(".weight")]
            kind = arch.layer(m)
            shapes[m] = (v.shape[1], v.shape[0]) if kind is not None and kind.transposed else tuple(v.shape)
    plan = tie_plan(ckpt)
    if plan.tied_base and arch.output_module not in shapes:
        shapes[arch.output_module] = tuple(ckpt.tensors[plan.embedding].shape)
    return shapes


def weight_source(ckpt: Checkpoint, module: str) -> str:
    """The stored base tensor holding ``module``'s weight: ``<module>.weight``, or the input embedding
    for the output module of a tied base that does not store it."""
    name = f"{module}.weight"
    if name not in ckpt.tensors:
        plan = tie_plan(ckpt)
        if plan.tied_base and name == plan.lm_head:
            return plan.embedding
    return name


def to_out_in(w: torch.Tensor, kind: LayerKind | None) -> torch.Tensor:
    """A stored weight as (out_features, in_features): the transpose (a view) for Conv1D, else ``w``."""
    return w.t() if kind is not None and kind.transposed else w


def check_layer_kinds(ckpt: Checkpoint, adapter: Adapter) -> None:
    """Refuse adapter layers on modules whose layout the method cannot be merged (and verified) on.

    The method registry says which kinds each method is defined on (``Method.layer_kinds``):
    LoRA on nn.Linear, Conv1D and nn.Embedding (PEFT transposes Conv1D weights to (out, in);
    an embedding's (num_embeddings, dim) weight is read the same way), DoRA on nn.Linear and
    Conv1D (its norm is per output feature), D2-LoRA on nn.Linear only (its unmerged layer).

    Raises:
        AdapterError: naming the module, its layer kind and the method.
    """

    arch = ckpt.architecture
    allowed = get_method(adapter.method).layer_kinds
    bad = []
    for module in adapter.layers:
        kind = arch.layer(module)
        if kind is None or kind.kind not in allowed:
            got = ("not a Linear/Conv1D/Embedding layer" if kind is None else
                   f"{'an' if kind.kind[0] in 'aeiou' else 'a'} {kind.kind} layer")
            bad.append(f"{module} ({got} of {arch.config_class.removesuffix('Config')})")
    if bad:
        raise AdapterError(
            f"{adapter.path or 'adapter'}: method {adapter.method} is merged on {' and '.join(allowed)} layers only; "
            f"{len(bad)} adapter layers are not: " + "; ".join(bad[:5])
        )
