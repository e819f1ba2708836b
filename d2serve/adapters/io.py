"""Load and save adapter directories (safetensors only) and match their tensors to base modules.

An adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` (docs/adapter-format.md). Tensor keys follow
PEFT: ``base_model.model.<module path>.<factor>``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A_plus.weight``.
Pickle files (``adapter_model.bin``) are refused, never unpickled.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from d2serve.adapters.config import CONFIG_NAME, AdapterConfig, read_config
from d2serve.adapters.methods import METHODS, LayerFactors, Method, get_method
from d2serve.architecture import weight_shapes, weight_source
from d2serve.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_output_dir,
    open_safetensors,
)
from d2serve.errors import AdapterError, InputNotFoundError  # AdapterError: also importable from here (public API)

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# every per-layer key suffix some method of the registry reads (factors, learned tau, fingerprint)
def _known_suffixes() -> list[str]:
    """Every tensor-key suffix some registered method reads, longest first (the registry as it is now)."""
    return sorted({k for m in METHODS.values() for k in (*m.file_keys, *m.extra_keys)}, key=len, reverse=True)
_SAVED_EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES (save_embedding_layers)


@dataclass
class Adapter:
    """A loaded, self-consistent adapter.

    Attributes:
        config: the validated :class:`AdapterConfig`.
        layers: module path -> :class:`LayerFactors` for every adapted nn.Linear.
        modules_to_save: full base tensor name -> replacement tensor (PEFT ``modules_to_save``).
        path: the adapter directory.
        files: the files that define it (config and weights), for hashing.
        base_copies: base tensor name -> copy of it that PEFT saved into the adapter file
            (e.g. ``lm_head.base_layer.weight`` stored as ``lm_head.weight``); must equal the base.
    """

    config: AdapterConfig
    layers: dict[str, LayerFactors]
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None
    files: tuple[Path, ...] = ()
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """Registry name of the merge method (``d2lora``, ``lora`` or ``dora``)."""
        return self.config.method

    def num_parameters(self) -> int:
        """Number of adapter parameters (all factors, tau and magnitudes)."""
        n = sum(t.numel() for f in self.layers.values() for t in f.tensors.values())
        return n + sum(t.numel() for t in self.modules_to_save.values())


def _split_key(key: str, weights: Path) -> tuple[str, str]:
    if not key.startswith(PREFIX):
        raise AdapterError(f"{weights}: tensor {key!r} does not start with {PREFIX!r} (PEFT key convention)")
    rest = key[len(PREFIX) :]
    for suffix in _known_suffixes():
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix
    return rest, ""


def _check_finite(name: str, t: torch.Tensor, weights: Path) -> None:
    if not t.dtype.is_floating_point:
        raise AdapterError(f"{weights}: tensor {name} has dtype {t.dtype}; expected a floating-point dtype")
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise AdapterError(f"{weights}: tensor {name} has {bad} NaN/Inf value(s) of {t.numel()}")


def load_adapter(path: str | Path) -> Adapter:
    """Load an adapter directory and check it is self-consistent.

    Checks: config fields (see :func:`read_config`), every tensor key recognised,
    each adapted layer has every factor its method needs (e.g. both D2-LoRA
    branches), factor shapes agree with each other and with the rank r of the
    config (``rank_pattern`` honoured), all values finite, ``d2_tau`` a scalar,
    ``d2_magnitude`` of shape (out,) and positive.

    Args:
        path: adapter directory with adapter_config.json and adapter_model.safetensors.

    Returns:
        The :class:`Adapter` (tensors on CPU in their stored dtype).

    Raises:
        FileNotFoundError: missing directory, config or weights file.
        AdapterConfigError: invalid config.
        CheckpointError: the weights file is truncated or not safetensors;
            a pickle ``adapter_model.bin`` is refused, never unpickled.
        AdapterError: unrecognised, missing, misshapen or non-finite tensors; a directory
            holding several adapters (PEFT sub-directories with their own adapter_config.json).
    """
    path = Path(path)
    if not path.is_dir():
        raise InputNotFoundError(f"{path}: adapter directory not found")
    others = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
    if others and (path / CONFIG_NAME).is_file():
        raise AdapterError(
            f"{path}: holds several adapters (PEFT's save_pretrained writes each adapter after the first into a "
            f"sub-directory): this directory's and {others}. d2serve merges one adapter at a time; pass the "
            f"directory of the one to merge (e.g. {path / others[0]}), and merge several one after another"
        )
    config = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        if pickles:
            raise CheckpointError(
                f"{path}: only pickle weights {pickles} found; d2serve never unpickles files. Convert them once, "
                "in a trusted environment, e.g. safetensors.torch.save_file(torch.load(f, weights_only=True), "
                f"'{WEIGHTS_NAME}')"
            )
        raise InputNotFoundError(f"{path}: {WEIGHTS_NAME} not found")
    method = get_method(config.method)
    raw: dict[str, dict[str, torch.Tensor]] = {}
    modules_to_save: dict[str, torch.Tensor] = {}
    base_copies: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    with open_safetensors(weights) as f:
        for key in f.keys():
            module, suffix = _split_key(key, weights)
            t = f.get_tensor(key)
            _check_finite(key, t, weights)
            if suffix:
                raw.setdefault(module, {})[suffix] = t
                continue
            # modules_to_save: PEFT stores "<module>.modules_to_save.<adapter>.<param>" or "<module>.<param>"
            name = module.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
            owner = name.rsplit(".", 1)[0]
            if config.modules_to_save and any(owner == m or owner.endswith("." + m) for m in config.modules_to_save):
                modules_to_save[name] = t
            elif name.endswith(".base_layer.weight") or owner.rsplit(".", 1)[-1] in _SAVED_EMBEDDING_NAMES:
                # PEFT's save_embedding_layers copy of a base weight; checked against the base at merge
                # (d2serve.architecture.check_base_copies): accepted only if bit-for-bit equal
                base_copies[name.replace(".base_layer.weight", ".weight")] = t
            elif name.endswith(".bias") and config.bias != "none":
                problems.append(
                    f"tensor {key!r} is a trained bias (field 'bias' is {config.bias!r}): PEFT loads it over the "
                    "base's bias; d2serve does not merge bias tensors"
                )
            else:
                problems.append(
                    f"tensor {key!r} is not a recognised {method.name} factor (expected a suffix among "
                    f"{sorted(method.file_keys) + list(method.extra_keys)}) nor part of modules_to_save"
                )
    layers: dict[str, LayerFactors] = {}
    for module, parts in raw.items():
        layer, layer_problems = _layer(module, parts, method, config)
        problems += layer_problems
        if layer is not None:
            layers[module] = layer
    if not layers and not modules_to_save:
        problems.append("no adapter layers found")
    if problems:
        raise AdapterError(f"{weights}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems[:20]))
    return Adapter(config, layers, modules_to_save, path, (path / CONFIG_NAME, weights), base_copies=base_copies)


def _layer(module: str, parts: dict[str, torch.Tensor], method: Method, config: AdapterConfig):
    """(LayerFactors or None, problems) of one module's tensors, checked against the method's format."""
    foreign = [s for s in parts if s not in method.file_keys and s not in method.extra_keys]
    if foreign:
        return None, [f"module {module}: tensors {foreign} do not belong to method {method.name}"]
    tensors = {method.file_keys[s]: t for s, t in parts.items() if s in method.file_keys}
    missing = [n for n in method.factor_names if n not in tensors]
    if missing:
        what = [f" (the {label} branch)" for label, (a, b) in zip(method.branches, method.pairs) if a in missing and b in missing]
        return None, [f"module {module}: missing {missing}{''.join(what)} for method {method.name}"]
    problems = _check_shapes(module, tensors, config.rank_for(module), method)
    if problems:
        return None, problems
    out = tensors[method.pairs[0][1]].shape[0]
    tau = config.tau
    if method.tau_key and method.tau_key in parts:
        t = parts[method.tau_key]
        if t.numel() != 1:
            return None, [f"module {module}: {method.tau_key} must be a scalar, got shape {tuple(t.shape)}"]
        tau = float(t.double().item())
    mag = parts.get(method.fingerprint_key) if method.fingerprint_key else None
    if mag is not None:
        if tuple(mag.shape) != (out,):
            return None, [f"module {module}: {method.fingerprint_key} has shape {tuple(mag.shape)}, expected ({out},) "
                          "(||W0|| per output row)"]
        bad = (mag <= 0).nonzero().flatten()
        if bad.numel():
            return None, [
                f"module {module}: {method.fingerprint_key} row {int(bad[0])} is {float(mag[bad[0]]):g} "
                f"({bad.numel()} row(s) <= 0): a zero row of the training base's W0 has no defined D2-LoRA "
                "scale m / ||W0 + dW||, and a norm is never negative"
            ]
    return LayerFactors(module, tensors, config.scale_for(module), tau, mag), []


def _check_shapes(module: str, t: dict[str, torch.Tensor], r: int, method: Method) -> list[str]:
    """Each (A, B) pair is (r, in) x (out, r), all pairs agree on in/out, each vector is (out,)."""
    problems = []
    not_2d = [f"{n} {tuple(t[n].shape)}" for pair in method.pairs for n in pair if t[n].dim() != 2]
    if not_2d:
        return [f"module {module}: factors must be 2-D matrices, got {', '.join(not_2d)}"]
    a0, b0 = (t[n] for n in method.pairs[0])
    for a_name, b_name in method.pairs:
        a, b = t[a_name], t[b_name]
        if a.shape[0] != r or b.shape[1] != r:
            problems.append(
                f"module {module}: {a_name} has shape {tuple(a.shape)} and {b_name} {tuple(b.shape)}; "
                f"expected (r={r}, in_features) and (out_features, r={r})"
            )
        if a.shape[1] != a0.shape[1] or b.shape[0] != b0.shape[0]:
            problems.append(f"module {module}: {a_name}/{b_name} shapes {tuple(a.shape)}/{tuple(b.shape)} disagree "
                            f"with {method.pairs[0][0]}/{method.pairs[0][1]}")
    for v in method.vectors:
        if tuple(t[v].shape) != (b0.shape[0],):
            problems.append(f"module {module}: {v} has shape {tuple(t[v].shape)}, expected ({b0.shape[0]},)")
    return problems


def base_weight_name(module: str, base: Checkpoint) -> str:
    """The stored tensor holding module ``module``'s weight: ``<module>.weight``.

    With tied embeddings and no stored ``lm_head.weight``, ``lm_head`` reads
    ``model.embed_tokens.weight`` (the tensor it is tied to).
    """
    return weight_source(base, module)


def linear_modules(base: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Module path -> (out, in) shape of every 2-D ``*.weight`` of the base (Conv1D's (in, out) transposed).

    With tied embeddings and no stored ``lm_head.weight``, ``lm_head`` is listed
    with the embedding's shape (see :func:`base_weight_name`).
    """
    return weight_shapes(base)


def match_to_base(adapter: Adapter, base: Checkpoint) -> dict[str, str]:
    """Match every adapted layer to a 2-D base weight with compatible shape.

    Returns:
        module path -> base tensor name holding W0 (out, in).

    Raises:
        AdapterError: adapter layers with no base module ("matched X of Y",
            the first unmatched names with their nearest candidate), targeted
            base modules that received no tensor, or shape mismatches
            (expected vs got, naming both conventions).
    """
    linear = linear_modules(base)
    where = adapter.path / WEIGHTS_NAME if adapter.path else "adapter"
    problems: list[str] = []
    unmatched = [m for m in adapter.layers if m not in linear]
    if unmatched:
        lines = []
        for m in unmatched[:5]:
            near = difflib.get_close_matches(m, list(linear), n=1, cutoff=0.0)
            lines.append(f"{m} (nearest base module: {near[0] if near else 'none'})")
        problems.append(
            f"matched {len(adapter.layers) - len(unmatched)} of {len(adapter.layers)} adapter layers to base modules; "
            f"unmatched: " + "; ".join(lines)
        )
        prefix = base.architecture.base_model_prefix
        if prefix and all(f"{prefix}.{m}" in linear for m in unmatched):
            # PEFT keys name modules of the model PEFT wrapped: the base model alone (e.g. GPT2Model) has no prefix
            problems.append(
                f"the adapter's module paths lack the model's base_model_prefix {prefix!r} (it was saved on the base "
                f"model without its LM head, e.g. AutoModel): PEFT does not load such keys into the causal-LM model "
                f"(it reports them as missing adapter keys and leaves the layers unchanged); save the adapter from "
                f"the causal-LM model, or rename its keys to base_model.model.{prefix}.<module>"
            )
    unselected = [m for m in adapter.layers if not adapter.config.targets(m)]
    if unselected:
        problems.append(
            f"{len(unselected)} adapter layers are not selected by target_modules {adapter.config.target_modules!r} "
            f"(PEFT would ignore their tensors), e.g. {unselected[:3]}"
        )
    targeted = [m for m in linear if adapter.config.targets(m) and m != "model.embed_tokens"]
    starving = [m for m in targeted if m not in adapter.layers]
    if starving:
        problems.append(
            f"target_modules {adapter.config.target_modules!r} matches {len(targeted)} base modules but "
            f"{len(starving)} received no adapter tensors, e.g. {starving[:3]}"
        )
    for m, f in adapter.layers.items():
        if m not in linear:
            continue
        out_f, in_f = linear[m]
        a_name, b_name = get_method(adapter.method).pairs[0]
        a, b = f.tensors[a_name], f.tensors[b_name]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            problems.append(
                f"adapter tensor {PREFIX}{m}.{a_name} has shape {tuple(a.shape)} and {b_name} {tuple(b.shape)}; "
                f"expected ({a.shape[0]}, {in_f}) and ({out_f}, {b.shape[1]}) for base module {m} whose weight is "
                f"(out_features={out_f}, in_features={in_f}) as stored by nn.Linear"
                + (" (the adapter looks transposed)" if (a.shape[1], b.shape[0]) == (out_f, in_f) else "")
            )
    for name, t in adapter.modules_to_save.items():
        # a tied base stores no lm_head.weight: its counterpart is the input embedding it is tied to
        # (architecture.tie_plan unties the output; the saved copy becomes lm_head.weight)
        src = base_weight_name(name.removesuffix(".weight"), base) if name.endswith(".weight") else name
        if src not in base.tensors:
            problems.append(f"modules_to_save tensor {name} has no counterpart in the base checkpoint")
        elif tuple(base.tensors[src].shape) != tuple(t.shape):
            problems.append(f"modules_to_save tensor {name} has shape {tuple(t.shape)}, base has "
                            f"{tuple(base.tensors[src].shape)}" + (f" (as {src})" if src != name else ""))
    if problems:
        raise AdapterError(f"{where} does not fit base {base.path}:\n  - " + "\n  - ".join(problems))
    return {m: base_weight_name(m, base) for m in adapter.layers}


def write_adapter_files(
    directory: Path, config: AdapterConfig, layers: dict[str, LayerFactors], *, metadata: dict | None = None
) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing directory.

    ``tau`` differing from ``config.tau`` is written as ``d2_tau``; ``magnitude`` as ``d2_magnitude``.
    """
    tensors: dict[str, torch.Tensor] = {}
    method = get_method(config.method)
    inverse: dict[str, str] = {}
    for suffix, name in method.file_keys.items():  # the first suffix of a factor is the one written
        inverse.setdefault(name, suffix)
    for module, f in layers.items():
        for name, t in f.tensors.items():
            tensors[f"{PREFIX}{module}.{inverse[name]}"] = t.detach().contiguous().cpu()
        if method.tau_key and f.tau is not None and f.tau != config.tau:
            tensors[f"{PREFIX}{module}.{method.tau_key}"] = torch.tensor(float(f.tau), dtype=torch.float32)
        if method.fingerprint_key and f.magnitude is not None:
            tensors[f"{PREFIX}{module}.{method.fingerprint_key}"] = f.magnitude.detach().float().contiguous().cpu()
    save_file(tensors, str(Path(directory) / WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})
    (Path(directory) / CONFIG_NAME).write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")


def save_adapter(
    out: str | Path, config: AdapterConfig, layers: dict[str, LayerFactors], *, overwrite: bool = False
) -> Path:
    """Write an adapter directory (format v1 for D2LORA, PEFT layout for LORA), atomically.

    Args:
        out: output directory.
        config: the adapter config (written as adapter_config.json).
        layers: module path -> factors (see :func:`write_adapter_files`).
        overwrite: replace a non-empty ``out``.

    Raises:
        FileExistsError: ``out`` is non-empty and ``overwrite`` is False.
    """
    with atomic_output_dir(out, overwrite) as tmp:
        write_adapter_files(tmp, config, layers)
    return Path(out)
