"""Inspect and open exported ONNX files: external data, initializer bytes, duplicate weights.

One job: facts about ONNX files on disk and opening them safely. An exported
folder is *self-contained* when every external-data ``location`` is a plain
relative file name inside the folder; then it opens from any working
directory and after being moved. A missing external-data file is reported by
name (ONNX Runtime's own message is a bare "file not found").
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2serve.errors import InputError

# Initializers that are rotary-embedding buffers (not model parameters): excluded
# from the initializer-bytes vs parameter-bytes comparison.
ROTARY_BUFFER_NAMES = ("cos_cache", "sin_cache", "inv_freq")

_ONNX_ELEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 21: 1, 22: 1}


class OnnxExportError(InputError):
    """Bad input or an unusable exported folder (missing file, absolute external path, builder failure)."""


def external_data_locations(model_path: Path) -> list[str]:
    """The distinct external-data ``location`` values of an ONNX file (header only, no weights read).

    Raises:
        OnnxExportError: ``model_path`` is missing or not an ONNX protobuf.
    """
    import onnx

    if not model_path.is_file():
        raise OnnxExportError(f"{model_path}: ONNX model file not found")
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError / ValueError variants
        raise OnnxExportError(f"{model_path}: not a readable ONNX model: {e}") from e
    locs: list[str] = []
    for t in _all_tensors(proto):
        for kv in t.external_data:
            if kv.key == "location" and kv.value not in locs:
                locs.append(kv.value)
    return locs


def check_external_data(model_path: Path) -> list[Path]:
    """Check that every external-data file of ``model_path`` is relative, inside its folder, and present.

    Returns:
        The external-data files (absolute paths).

    Raises:
        OnnxExportError: a location is absolute or leaves the folder (not
            self-contained), or a file is missing -- the message names it.
    """
    folder = model_path.parent.resolve()
    files = []
    for loc in external_data_locations(model_path):
        p = Path(loc)
        if p.is_absolute() or ".." in p.parts:
            raise OnnxExportError(
                f"{model_path}: external data location {loc!r} is not a relative path inside the folder; "
                "the export is not self-contained"
            )
        f = folder / p
        if not f.is_file():
            raise OnnxExportError(
                f"{model_path}: external data file {loc!r} is missing (expected at {f}); "
                "copy the whole exported folder, not only the .onnx file"
            )
        files.append(f)
    return files


def ort_session(model_path: Path, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on CPU, after :func:`check_external_data`.

    Raises:
        OnnxExportError: see :func:`check_external_data`.
    """
    import onnxruntime as ort

    check_external_data(model_path)
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path.resolve()), so, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class InitializerStats:
    """Byte counts of an ONNX file's initializers.

    Attributes:
        total_bytes: all initializers (inline and external), bytes.
        parameter_bytes: ``total_bytes`` minus rotary buffers (:data:`ROTARY_BUFFER_NAMES`), bytes.
        copies_of: number of initializers whose values equal a given reference
            matrix or its transpose (filled by :func:`initializer_stats`).
    """

    total_bytes: int
    parameter_bytes: int
    copies_of: int


def _all_tensors(proto):
    """Initializers of the main graph plus ``Constant`` node tensors (where exporters may hide weights)."""
    yield from proto.graph.initializer
    for n in proto.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t


def _tensor_nbytes(t) -> int:
    """Stored bytes of a TensorProto (external length, raw data, or typed fields)."""
    for kv in t.external_data:
        if kv.key == "length":
            return int(kv.value)
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    return n * _ONNX_ELEM_BYTES.get(t.data_type, 4)


def initializer_stats(model_path: Path, reference: np.ndarray | None = None) -> InitializerStats:
    """Count initializer bytes and how many initializers hold ``reference`` (e.g. the tied embedding).

    Args:
        model_path: the ``.onnx`` file (its external data must be present).
        reference: a 2-D float32 matrix (e.g. the ``(vocab, hidden)`` embedding);
            an initializer counts as a copy when it equals it or its transpose
            after casting to float32 (quantized copies are not detected).

    Raises:
        OnnxExportError: missing external data (named).
    """
    import onnx
    from onnx import numpy_helper

    check_external_data(model_path)
    proto = onnx.load(str(model_path), load_external_data=False)
    total = params = copies = 0
    shapes = {tuple(reference.shape), tuple(reference.shape[::-1])} if reference is not None else set()
    for t in _all_tensors(proto):
        nb = _tensor_nbytes(t)
        total += nb
        if not any(r in t.name for r in ROTARY_BUFFER_NAMES):
            params += nb
        if tuple(t.dims) in shapes and t.data_type in (1, 10, 11, 16):
            onnx.external_data_helper.load_external_data_for_tensor(t, str(model_path.parent))
            arr = numpy_helper.to_array(t).astype(np.float32)
            if arr.shape == reference.shape and np.array_equal(arr, reference):
                copies += 1
            elif arr.shape == reference.shape[::-1] and np.array_equal(arr.T, reference):
                copies += 1
    return InitializerStats(total_bytes=total, parameter_bytes=params, copies_of=copies)


def dedupe_initializers(model) -> int:
    """Merge byte-identical initializers of an ``onnx_ir.Model`` in place (uses rewired to one copy).

    Exact duplicates are always safe to merge; this removes a tied embedding
    that an exporter wrote twice. Returns the number of initializers removed.
    """
    groups: dict[tuple, list] = defaultdict(list)
    for name, v in list(model.graph.initializers.items()):
        if v.const_value is None:
            continue
        t = v.const_value
        if t.nbytes < 1024:  # small constants: not worth hashing
            continue
        key = (str(t.dtype), tuple(t.shape), hashlib.sha256(t.tobytes()).hexdigest())
        groups[key].append(v)
    removed = 0
    for vals in groups.values():
        keep, *dups = vals
        for d in dups:
            if d.is_graph_output() or d.is_graph_input():
                continue
            d.replace_all_uses_with(keep)
            del model.graph.initializers[d.name]
            removed += 1
    return removed


def file_records(folder: Path, skip: tuple[str, ...] = ()) -> list[dict]:
    """``[{"path", "size_bytes", "sha256"}]`` for every file under ``folder`` (sorted, relative paths)."""
    from d2serve.checkpoint import sha256_file

    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in skip:
            out.append({"path": p.relative_to(folder).as_posix(), "size_bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return out
