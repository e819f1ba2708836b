"""Read and write Hugging Face safetensors checkpoints.

A checkpoint directory holds ``config.json``, one ``model.safetensors`` or
several ``model-0000i-of-0000N.safetensors`` shards with a
``model.safetensors.index.json`` (``metadata.total_size`` + ``weight_map``),
and side files (tokenizer, chat template, ``generation_config.json``).

Only safetensors are read: nothing here unpickles anything. Tensors are read
lazily through ``safetensors.safe_open``, one shard at a time. Outputs are
written into a temporary sibling directory and renamed into place at the end
(:func:`atomic_output_dir`), so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from d2serve.architecture import architecture_of, model_key_names, tie_plan
from d2serve.errors import CheckpointError  # raised here; also importable from d2serve.checkpoint (public API)
from d2serve.export.manifest import EXPORT_MANIFEST, MERGE_MANIFEST  # d2serve's bookkeeping is no side file
from d2serve.outdir import atomic_output_dir, prepare_output_dir  # noqa: F401  (re-exported: output dirs live there)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

SAFETENSORS_DTYPES = {  # safetensors dtype name -> torch dtype
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class TensorInfo:
    """Header facts of one stored tensor: its shard file, dtype, shape and byte range [begin, end) in the file."""

    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0


def read_safetensors_header(path: Path) -> dict:
    """Parse the JSON header of a safetensors file without reading tensor data.

    Returns:
        The header dict (tensor name -> {"dtype", "shape", "data_offsets"}, plus
        ``__metadata__``).

    Raises:
        CheckpointError: the file is not safetensors (e.g. a pickle), its header
            is malformed, or it is shorter than the header says (truncated).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100_000_000):
            raise CheckpointError(
                f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file; "
                "pickle .bin/.pt files are refused, convert them to safetensors)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    ranges = []
    for name, v in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(v, dict)
            and isinstance(v.get("dtype"), str)
            and isinstance(v.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v["shape"])
            and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in v["data_offsets"])
            and 0 <= v["data_offsets"][0] <= v["data_offsets"][1]
        )
        if not ok:
            raise CheckpointError(
                f"{path}: malformed header entry for tensor {name!r}: expected {{'dtype': str, 'shape': [int >= 0], "
                f"'data_offsets': [begin, end] with 0 <= begin <= end}}, got {str(v)[:200]}"
            )
        ranges.append((v["data_offsets"][0], v["data_offsets"][1], name))
    ranges.sort()
    pos = 0
    for begin, end, name in ranges:  # the data section must be tiled exactly, as safetensors itself requires
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise CheckpointError(f"{path}: malformed header: tensor {name!r} at byte {begin} {what}")
        pos = end
    if 8 + n + pos > size:
        raise CheckpointError(f"{path}: truncated: the header declares {8 + n + pos} bytes, the file has {size}")
    if 8 + n + pos < size:  # safetensors itself refuses such a file ("not fully covered"): so would every loader
        raise CheckpointError(f"{path}: {size - 8 - n - pos} bytes after the last tensor's data (the header declares "
                              f"{8 + n + pos} bytes, the file has {size}): not a file safetensors can load")
    return header


def tensor_infos(path: Path) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` for every tensor of one safetensors file (header only)."""
    out = {}
    header = read_safetensors_header(path)
    with open(path, "rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
    for name, v in header.items():
        if name == "__metadata__":
            continue
        if v["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {v['dtype']}")
        begin, end = (data_start + int(o) for o in v["data_offsets"])
        info = TensorInfo(path.name, SAFETENSORS_DTYPES[v["dtype"]], tuple(v["shape"]), begin, end)
        if end - begin != _nbytes(info.dtype, info.shape):
            raise CheckpointError(f"{path}: tensor {name} spans {end - begin} bytes, its dtype and shape need "
                                  f"{_nbytes(info.dtype, info.shape)}")
        out[name] = info
    return out


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """Read one tensor with a plain positioned read (no mmap), so only this tensor is resident.

    Raises:
        CheckpointError: the file ends before the tensor's byte range.
    """
    with open(path, "rb", buffering=0) as f:
        return _read_at(f, path, info.begin, info.end, info.dtype, info.shape)


def _read_at(f, path: Path, begin: int, end: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes [begin, end) of open file ``f`` as a tensor of ``dtype``/``shape``, read straight into its storage."""
    n = end - begin
    buf = torch.empty(n, dtype=torch.uint8)  # uninitialised: no zero-fill pass before the read
    if n:
        f.seek(begin)
        view, got = memoryview(buf.numpy()), 0
        while got < n:  # readinto may return short counts for large reads
            k = f.readinto(view[got:])
            if not k:
                break
            got += k
        if got != n:
            raise CheckpointError(f"{path}: truncated while reading a {n}-byte tensor at offset {begin}")
    return buf.view(dtype).reshape(shape)


def open_safetensors(path: Path):
    """``safe_open`` with a clear error for non-safetensors and truncated files."""
    read_safetensors_header(path)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot open as safetensors: {e}") from e


class Checkpoint:
    """A Hugging Face safetensors checkpoint directory, read lazily.

    Attributes:
        path: the directory.
        config: the parsed ``config.json``.
        shards: shard file names in index order (one name for a single file).
        tensors: model state-dict key -> :class:`TensorInfo` from the shard headers (see :attr:`tensors`).
        stored_tensors: the same keyed by the names stored in the files.
        sharded: True when an index file is present.

    Raises:
        CheckpointError: no config.json, no safetensors weights (e.g. only
            pickle ``pytorch_model.bin``), an index naming missing shards or
            tensors absent from them, or a malformed shard.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory not found")
        if not cfg.is_file():
            raise CheckpointError(f"{self.path}: no config.json; expected a Hugging Face checkpoint directory")
        try:
            self.config: dict = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg}: not valid UTF-8 JSON: {e}") from e
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cfg}: expected a JSON object, got {type(self.config).__name__}")
        index = self.path / INDEX_FILE
        self.index: dict | None = None
        if index.is_file():
            try:
                self.index = json.loads(index.read_text())
                weight_map: dict[str, str] = self.index["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed index (expected a JSON object with 'weight_map'): {e}") from e
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) and v for v in weight_map.values())):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names (strings)")
            self.shards = list(dict.fromkeys(weight_map.values()))
        elif (self.path / SINGLE_FILE).is_file():
            weight_map = {}
            self.shards = [SINGLE_FILE]
        else:
            found = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (found {found}: pickle files are not read; convert them to safetensors)" if found else ""
            raise CheckpointError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        self.sharded = self.index is not None
        self.stored_tensors: dict[str, TensorInfo] = {}
        self._tensors: dict[str, TensorInfo] | None = None
        self._stored_names: dict[str, str] = {}  # model key -> stored key, where they differ
        self._prefix_added = ""  # the base_model_prefix the stored keys lack (transformers adds it on load)
        for shard in self.shards:
            p = self.path / shard
            if not p.is_file():
                raise CheckpointError(f"{index}: names shard {shard}, which is not in {self.path}")
            infos = tensor_infos(p)
            dup = sorted(set(infos) & set(self.stored_tensors))
            if dup:
                raise CheckpointError(
                    f"{self.path}: tensor {dup[0]} is stored in both {self.stored_tensors[dup[0]].shard} and {shard} "
                    f"({len(dup)} duplicated); a checkpoint holds each tensor once"
                )
            self.stored_tensors.update(infos)
        missing = [k for k, s in weight_map.items() if k not in self.stored_tensors or self.stored_tensors[k].shard != s]
        if missing:
            raise CheckpointError(f"{index}: {len(missing)} tensors of the weight_map are not in their shard, e.g. {missing[:3]}")

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Model state-dict key -> :class:`TensorInfo` of every stored tensor: the key transformers loads it into.

        Stored keys without the architecture's ``base_model_prefix`` (a GPT-2 saved from its base model,
        openai-community/gpt2: ``h.0.attn.c_attn.weight``) are named as in the model
        (``transformer.h.0.attn.c_attn.weight``), by transformers' own rule
        (:func:`d2serve.architecture.model_key_names`); every comparison with the architecture and with adapter
        module paths uses these names, and writers put a tensor back under its stored name
        (:meth:`stored_name`). When transformers cannot build the architecture the stored names are used (the
        architecture's own error comes where it is needed).

        Raises:
            CheckpointError: two stored keys that load into the same model key.
        """
        if self._tensors is None:
            try:
                arch = self.architecture
            except CheckpointError:
                renamed = {}
            else:
                renamed = model_key_names(self.stored_tensors, arch, self.path)
                added = {m[: len(m) - len(k) - 1] for k, m in renamed.items() if m.endswith("." + k)}
                self._prefix_added = arch.base_model_prefix if arch.base_model_prefix in added else ""
            self._stored_names = {m: k for k, m in renamed.items()}
            self._tensors = {renamed.get(k, k): v for k, v in self.stored_tensors.items()}
        return self._tensors

    def stored_name(self, name: str) -> str:
        """The key under which model tensor ``name`` is (or, written into a checkpoint of this layout, goes) in
        the files: its stored key; for a tensor the base does not store (an untied ``lm_head.weight``), ``name``
        without the ``base_model_prefix`` the stored keys lack, else ``name``."""
        self.tensors  # noqa: B018 -- builds the name maps
        if name in self._stored_names:
            return self._stored_names[name]
        if self._prefix_added and name.startswith(self._prefix_added + ".") and name not in self._tensors:
            return name[len(self._prefix_added) + 1:]
        return name

    @property
    def architecture(self):
        """The :class:`d2serve.architecture.Architecture` transformers builds from ``config.json`` (cached).

        Raises:
            CheckpointError: transformers cannot build the architecture.
        """
        return architecture_of(self.config, self.path)

    @property
    def tied_embeddings(self) -> bool:
        """The model ties ``lm_head`` to the input embedding and does not store ``lm_head.weight``.

        From the architecture (:func:`d2serve.architecture.tie_plan`): config.json's
        ``tie_word_embeddings``, else the architecture's config class default.
        """
        return tie_plan(self).tied_base

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the floating-point weights (the most common one by element count)."""
        counts: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                n = 1
                for d in t.shape:
                    n *= d
                counts[t.dtype] = counts.get(t.dtype, 0) + n
        if not counts:
            raise CheckpointError(f"{self.path}: no floating-point tensors")
        return max(counts, key=counts.get)

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor by name with a positioned read of its byte range (only it becomes resident).

        Raises:
            KeyError: no such tensor. CheckpointError: the shard is truncated.
        """
        info = self.tensors[name]
        return read_tensor(self.path / info.shard, info)

    def side_files(self) -> list[Path]:
        """Non-weight files and folders to copy into a derived checkpoint (see :func:`side_entries`)."""
        return side_entries(self.path)


_NOT_SIDE = {INDEX_FILE, "config.json", MERGE_MANIFEST, EXPORT_MANIFEST}


def _is_weight(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def side_entries(folder: Path) -> list[Path]:
    """Every non-weight file and folder of a checkpoint directory, to carry into a derived checkpoint.

    Tokenizer files, chat templates (``chat_template.jinja`` and transformers'
    named ``additional_chat_templates/`` folder), ``generation_config.json``,
    README, and any other file or folder, are side entries. Not: weight files
    (``*.safetensors``, ``*.bin``, ``*.pt``, ... and ``*.index.json``),
    ``config.json`` (rewritten by the caller), d2serve's own reports, and hidden
    names (``.cache``, ``.git``). Copy them with :func:`copy_side_entries`.
    """
    return sorted(
        p for p in Path(folder).iterdir()
        if not p.name.startswith(".") and p.name not in _NOT_SIDE and (p.is_dir() or (p.is_file() and not _is_weight(p.name)))
    )


def copy_side_entries(entries: list[Path], dst: Path) -> None:
    """Copy side files (``copy2``) and side folders (recursively, weight files left out) into ``dst``.

    Symlinks are followed: the copy holds the contents, never a link back into the source.
    """
    for p in entries:
        if p.is_dir():
            shutil.copytree(p, dst / p.name, ignore=lambda d, names: [n for n in names if _is_weight(n)])
        else:
            shutil.copy2(p, dst / p.name)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def set_config_dtype(config: dict, dtype: torch.dtype) -> None:
    """Set both ``torch_dtype`` (transformers < 5) and ``dtype`` (transformers >= 5) in a config dict."""
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    config["dtype"] = name


def read_json(path: Path):
    """Parse a user-given UTF-8 JSON file.

    Raises:
        CheckpointError: the file is missing, unreadable, not UTF-8 or not JSON (the path is named).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: not found") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable as UTF-8 JSON: {e}") from e


def write_json(path: Path, obj) -> None:
    """Write JSON with indentation and a trailing newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
