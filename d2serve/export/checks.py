"""Static checks of a Hugging Face checkpoint directory that a serving runtime must load untouched.

vLLM (and the ONNX Runtime GenAI builder) read a plain HF checkpoint: the
safetensors tensors named exactly like the state dict of the architecture in
``config.json``, a config without ``quantization_config`` whose dtype matches
the tensors, an index that names exactly the shards on disk, and a tokenizer
that loads offline. These checks read only headers, JSON files and the
tokenizer (no tensor data), and report *every* problem found, not just the
first, as one line each that names the file/tensor/field and what was expected.

Entry points: :func:`check_hf_checkpoint` (list of problems) and
:func:`require_hf_checkpoint` (raises :class:`CheckpointError` listing them).
"""

from __future__ import annotations

import json
from pathlib import Path

from d2serve.architecture import (  # noqa: F401 (re-export)
    architecture_of,
    compare_tensor_list,
    expected_state_dict,
)
from d2serve.checkpoint import (
    DTYPE_NAMES,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    TensorInfo,
    tensor_infos,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json", "hf_quant_config.json")
TOKENIZER_PROBE = "Hello, world! The capital of France is Paris. 1234 <tag> héllo\n  two  spaces"


def _load_json(path: Path, problems: list[str]) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        problems.append(f"{path}: not readable JSON: {e}")
        return None
    if not isinstance(obj, dict):
        problems.append(f"{path}: expected a JSON object")
        return None
    return obj


def read_tensor_infos(path: Path, problems: list[str]) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every safetensors weight file of the checkpoint (headers only).

    Which files: the shards named by ``model.safetensors.index.json`` when it
    exists (else ``model.safetensors``). Index/disk disagreements, unreadable
    shards, stray weight files (e.g. pickles, an unindexed shard) and index
    entries not found in their shard are appended to ``problems``.
    """
    path = Path(path)
    on_disk = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    index_path = path / INDEX_FILE
    weight_map: dict[str, str] = {}
    if index_path.is_file():
        index = _load_json(index_path, problems)
        if index is None:
            return {}
        if not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
            problems.append(f"{index_path}: missing or empty 'weight_map'")
            return {}
        weight_map = index["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        shards = [SINGLE_FILE]
    else:
        problems.append(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}")
        return {}
    for shard in shards:
        if not (path / shard).is_file():
            problems.append(f"{index_path}: names shard {shard}, which is not in {path}")
    stray = [f for f in on_disk if f not in shards]
    if stray:
        where = f"{index_path.name} does not name" if weight_map else f"besides {SINGLE_FILE}:"
        problems.append(
            f"{path}: weight files on disk that {where} {stray}; a runtime may load them too (remove them)"
        )
    infos: dict[str, TensorInfo] = {}
    for shard in shards:
        if not (path / shard).is_file():
            continue
        try:
            got = tensor_infos(path / shard)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        dup = sorted(set(got) & set(infos))
        if dup:
            problems.append(f"{path / shard}: tensors also stored in another shard, e.g. {dup[:3]}")
        infos.update(got)
    if weight_map:
        wrong = sorted(k for k, s in weight_map.items() if (path / s).is_file() and (k not in infos or infos[k].shard != s))
        if wrong:
            problems.append(f"{index_path}: {len(wrong)} weight_map entries are not in the shard named, e.g. {wrong[:3]}")
        unlisted = sorted(k for k in infos if k not in weight_map)
        if unlisted:
            problems.append(f"{index_path}: {len(unlisted)} stored tensors are missing from weight_map, e.g. {unlisted[:3]}")
    return infos


def config_dtype(config: dict) -> str | None:
    """The dtype name of a config dict (``dtype``, else ``torch_dtype``), or None."""
    d = config.get("dtype") or config.get("torch_dtype")
    return str(d).removeprefix("torch.") if d else None


def check_config(path: Path, config: dict, infos: dict[str, TensorInfo]) -> list[str]:
    """Config-level problems: architectures, quantization, tie flag vs lm_head, dtype vs tensors."""
    problems = []
    cfg_file = Path(path) / "config.json"
    if not config.get("architectures"):
        problems.append(f"{cfg_file}: no 'architectures'; vLLM picks the model class from it")
    if "quantization_config" in config:
        problems.append(f"{cfg_file}: has 'quantization_config'; a merged full-precision checkpoint must not")
    for name in QUANT_CONFIG_FILES:
        if (Path(path) / name).is_file():
            problems.append(f"{Path(path) / name}: quantization config file present; a runtime would treat the model as quantized")
    try:  # the tie transformers builds: config.json's tie_word_embeddings, else the architecture's default
        tied = architecture_of(config, path).tied
    except CheckpointError:
        tied = None  # reported by check_keys
    if infos and tied is not None:
        if tied and "lm_head.weight" in infos:
            problems.append(f"{cfg_file}: tie_word_embeddings is true but lm_head.weight is stored (it would be ignored)")
        if not tied and "lm_head.weight" not in infos and "model.embed_tokens.weight" in infos:
            problems.append(f"{cfg_file}: tie_word_embeddings is false but lm_head.weight is not stored")
    both = {k: str(config[k]).removeprefix("torch.") for k in ("dtype", "torch_dtype") if config.get(k)}
    if len(set(both.values())) > 1:
        problems.append(f"{cfg_file}: 'dtype' and 'torch_dtype' disagree: {both}")
    want = config_dtype(config)
    if want is None:
        problems.append(f"{cfg_file}: no 'dtype'/'torch_dtype'; runtimes would guess the weights' dtype")
    elif want not in DTYPE_NAMES:
        problems.append(f"{cfg_file}: dtype {want!r} is not one of {sorted(DTYPE_NAMES)}")
    else:
        bad = sorted(k for k, t in infos.items() if t.dtype.is_floating_point and t.dtype != DTYPE_NAMES[want])
        if bad:
            got = sorted({str(infos[k].dtype).removeprefix("torch.") for k in bad})
            problems.append(f"{cfg_file}: dtype is {want} but {len(bad)} tensors are {got}, e.g. {bad[:3]}")
    return problems


def check_keys(path: Path, infos: dict[str, TensorInfo], config: dict | None = None) -> list[str]:
    """Stored tensors vs the architecture's full tensor list (:func:`d2serve.architecture.compare_tensor_list`,
    the same check merge and verify run): extra (e.g. adapter) keys, missing keys, wrong shapes, integer
    (quantized) weights where the architecture holds floating point."""
    try:
        arch = architecture_of(config, path) if config is not None else architecture_of(
            json.loads((Path(path) / "config.json").read_text()), path)
    except (CheckpointError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return [str(e)]
    return compare_tensor_list(infos, arch).problems(path)


def _eos_ids(path: Path) -> list[int] | None:
    from transformers import GenerationConfig

    if not (Path(path) / "generation_config.json").is_file():
        return None
    eos = GenerationConfig.from_pretrained(str(path), local_files_only=True).eos_token_id
    return sorted(eos if isinstance(eos, list) else [eos]) if eos is not None else []


def tokenizer_fingerprint(path: Path) -> dict:
    """What a runtime takes from the tokenizer files: special tokens, vocab size, chat template, eos ids, a probe encoding.

    Raises:
        CheckpointError: the tokenizer (or generation_config) does not load offline.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        eos = _eos_ids(path)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError variously
        raise CheckpointError(f"{path}: the tokenizer does not load offline: {e}") from e
    return {
        "special_tokens": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "special_ids": sorted(tok.all_special_ids),
        "vocab_size": len(tok),
        "chat_template": tok.chat_template,
        "generation_eos_token_id": eos,
        "probe_ids": tok(TOKENIZER_PROBE)["input_ids"],
    }


def _template_summary(t) -> str:
    """A short repr of a chat template: None, a string (first 80 characters), or transformers' named templates.

    transformers gives ``tokenizer.chat_template`` as a string, or as a dict name -> template (or a list of
    ``{"name", "template"}``) when the checkpoint has named templates (``additional_chat_templates/``).
    """
    if isinstance(t, dict):
        return "named templates " + repr(sorted(t))
    if isinstance(t, list):
        return "named templates " + repr(sorted(str(x.get("name")) if isinstance(x, dict) else str(x) for x in t))
    return repr(t if t is None else str(t)[:80] + ("..." if len(str(t)) > 80 else ""))


def check_tokenizer(path: Path, reference_dir: Path | None = None) -> list[str]:
    """The tokenizer loads offline; with ``reference_dir`` (the base) everything in :func:`tokenizer_fingerprint` is identical."""
    try:
        mine = tokenizer_fingerprint(path)
    except CheckpointError as e:
        return [str(e)]
    if reference_dir is None:
        return []
    try:
        ref = tokenizer_fingerprint(reference_dir)
    except CheckpointError as e:
        return [f"reference {e}"]
    labels = {"special_tokens": "special tokens", "special_ids": "special token ids", "vocab_size": "vocabulary size",
              "chat_template": "chat template", "generation_eos_token_id": "generation_config.json eos_token_id",
              "probe_ids": f"encoding of the probe text {TOKENIZER_PROBE!r}"}
    problems = []
    for key, label in labels.items():
        if mine[key] != ref[key]:
            a, b = (_template_summary(x) if key == "chat_template" else repr(x) for x in (mine[key], ref[key]))
            problems.append(f"{path}: tokenizer {label} differs from the base {reference_dir}: {a} vs {b}")
    return problems


def check_hf_checkpoint(path: str | Path, reference_dir: str | Path | None = None) -> list[str]:
    """Every static problem that would stop a runtime from loading ``path`` as a plain HF checkpoint.

    Checks: config.json readable with ``architectures``; no quantization
    config; the index names exactly the shards on disk and each entry is in
    its shard; stored keys equal the architecture's state dict (no adapter
    keys, nothing missing or extra, same shapes); ``tie_word_embeddings``
    agrees with the presence of ``lm_head.weight``; the config dtype equals
    every floating tensor's dtype; the tokenizer loads offline and (given
    ``reference_dir``, the base checkpoint) has identical special tokens,
    chat template, vocabulary, probe encoding and generation_config eos ids.
    Non-weight files (``d2serve_*.json`` reports, README) are ignored.

    Args:
        path: checkpoint directory (read only).
        reference_dir: the base checkpoint whose tokenizer must be reproduced.

    Returns:
        One human-readable line per problem; empty when the checkpoint passes.
    """
    path = Path(path)
    if not path.is_dir():
        return [f"{path}: checkpoint directory not found"]
    problems: list[str] = []
    config = _load_json(path / "config.json", problems) if (path / "config.json").is_file() else None
    if config is None:
        if not problems:
            problems.append(f"{path}: no config.json")
        return problems
    infos = read_tensor_infos(path, problems)
    problems += check_config(path, config, infos)
    if infos:
        problems += check_keys(path, infos, config)
    problems += check_tokenizer(path, Path(reference_dir) if reference_dir else None)
    return problems


def require_hf_checkpoint(path: str | Path, reference_dir: str | Path | None = None) -> None:
    """:func:`check_hf_checkpoint`, raising when anything is wrong.

    Raises:
        CheckpointError: listing every problem, one per line.
    """
    problems = check_hf_checkpoint(path, reference_dir)
    if problems:
        raise CheckpointError(f"{path} fails {len(problems)} static check(s):\n  - " + "\n  - ".join(problems))
