"""The fused merge kernel: everything after the rank-2r float64 GEMM of a row block, in one pass per row.

The torch path of :mod:`d2serve.merge_blocks` runs ~12 elementwise passes over a row block after
``dW = B' @ A'`` (the conversion of W0 to float64, two row norms, the formula, the finite check, the cast,
four passes of statistics). Here each row is handled once, while it sits in the L1/L2 cache: its W0 is
converted to float64, the row norms are taken, the registry's formula applied (its *fused form*,
:attr:`d2serve.adapters.methods.Method.fused_form`: ``add`` W0 + dW, ``rescale`` diag(s)(W0 + dW),
``rescale_add`` diag(s)(W0 + dW) + dW), the value checked finite, cast once to the output dtype and the
manifest statistics accumulated. The row blocks still run on the merge's worker threads (the kernel
releases the GIL).

Two implementations of the same arithmetic:

* ``c`` (preferred): ``d2serve/data/kernels/merge_fused.c``, compiled once per machine with the system C compiler
  (``$CC``, else ``cc``; ``-O3 -march=native -ffp-contract=off``, no fast-math) into
  ``$D2SERVE_CACHE_DIR/kernels/`` (a temporary directory when the cache is ``off``) and loaded with
  ctypes: ~0.08 s to load (the compiler's version check for the cache key, the self-check) and ~16 MiB;
* ``numba`` (when no C compiler works): ``merge_fused_kernels.py``, ``njit(cache=True)`` into
  ``$D2SERVE_CACHE_DIR/numba``; its import and LLVM cost ~0.5-0.9 s and ~200 MiB of resident memory per process.

Bit identity with the torch path is the contract, not a tolerance: both reproduce

* torch's row norm (``linalg.vector_norm(ord=2, dim=1)`` on a contiguous float64 row: 4 lane accumulators
  with a plain multiply and add, folded left, the tail accumulated with a fused multiply-add, then sqrt),
* ``torch.addcmul`` (one fused multiply-add per element) and ``torch.mul``/``torch.add``,
* torch's casts: float64 -> float32 rounds to nearest even; float64 -> bfloat16/float16 goes through
  float32 (torch rounds twice), float32 -> bfloat16/float16 rounds to nearest even (ties to even,
  overflow to +-Inf, float16 subnormals),

and :func:`load` checks the first two against torch on this machine before a kernel is used (another
torch build or CPU could reduce in another order): if the check, the compiler, the numba import or the
compilation fails, the next implementation is tried, and with none the merge runs the torch path (the
manifest records which path ran and why). A row block with any error (a zero row norm, a NaN/Inf, an
overflow of the output dtype) is redone on the torch path, which raises the engine's own error message.

Choice: ``D2SERVE_MERGE_KERNEL`` = ``auto`` (default: the fused kernel from the first block after it is
loaded, torch before), ``fused`` (wait for it; a fallback is logged as a warning), ``c`` or ``numba`` (that
implementation only, waiting for it) or ``torch``.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

ENV = "D2SERVE_MERGE_KERNEL"
CHOICES = ("auto", "fused", "c", "numba", "torch")
IMPLS = ("c", "numba")
FORMS = {"add": 0, "rescale": 1, "rescale_add": 2}  # Method.fused_form -> kernel code
# dtype codes of the kernel: how a stored array's elements are read / written
_KIND = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# flag codes returned by the kernel
OK, ZERO_NORM, NON_FINITE, OVERFLOW = 0, 1, 2, 3

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}  # "kernel": the compiled module namespace or None, "reason": why not
_loaders: dict = {}  # impl -> its background loader thread (prefetch), at most one alive per impl


def choice() -> str:
    """The kernel asked for by ``D2SERVE_MERGE_KERNEL`` (``auto`` when unset).

    Raises:
        InputError: another value.
    """
    from d2serve.errors import InputError

    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise InputError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernel reads/writes tensors of ``dtype``."""
    return dtype in _KIND


def load(impl: str | None = None) -> tuple[object | None, str]:
    """The loaded kernel (once per process and implementation; thread-safe) and a reason string.

    Args:
        impl: ``c``, ``numba`` or None (``c``, else ``numba``).

    Returns:
        (kernel, "") for the first implementation that builds (or loads from the cache) and reproduces torch's
        row norm and ``addcmul`` bit for bit on this machine; else (None, why each one was not used).
    """
    reasons = []
    for name in (impl,) if impl else IMPLS:
        with _lock:
            if name not in _state:
                _state[name] = _build_c() if name == "c" else _build_numba()
            kernel, why = _state[name]
        if kernel is not None:
            return kernel, ""
        reasons.append(why)
    return None, "; ".join(reasons)


def loaded(impl: str | None = None) -> bool:
    """Whether :func:`load` (for ``impl``) has finished, successfully or not."""
    names = (impl,) if impl else IMPLS
    for name in names:
        if name not in _state:
            return False
        if _state[name][0] is not None:
            return True
    return True


def prefetch(impl: str | None = None) -> None:
    """Start :func:`load` in a background thread (a first C compilation takes ~1 s, numba's import ~0.5 s:
    overlap them with the merge's checks). Does nothing when already loaded.

    At most one loader thread per ``impl`` runs at a time (merges started while it loads share it). It is the
    process's, not a merge's: it may outlive the merge that started it. The thread is not a daemon: a merge that finishes before the kernel has loaded (small checkpoints) leaves
    the interpreter waiting for it at exit (bounded by the compiler's 300 s timeout). A daemon thread still inside
    torch (the load's self-check) while the interpreter finalizes aborted the process ("terminate called without
    an active exception", exit -6) after a merge that had succeeded: tests/test_merge_fused.py repeats that case.
    """
    with _lock:
        if loaded(impl) or (impl in _loaders and _loaders[impl].is_alive()):
            return  # loaded, or being loaded by the one loader thread of this implementation
        _loaders[impl] = threading.Thread(target=load, args=(impl,), name="d2serve-merge-kernel-load", daemon=False)
        _loaders[impl].start()


def _cpu_signature() -> str:
    """What the compiled code depends on besides its source and the compiler: the machine and its CPU flags."""
    import platform

    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        flags = platform.processor()
    return f"{platform.system()} {platform.machine()} {flags}"


C_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-std=c99")


def _build_c() -> tuple[object | None, str]:
    import ctypes
    import hashlib
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from d2serve import cache

    src = Path(__file__).parent / "data" / "kernels" / "merge_fused.c"  # package data: shipped in the wheel
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "C kernel: no C compiler (cc, gcc, clang or $CC) found"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([src.read_text(), cc, version, " ".join(C_FLAGS), _cpu_signature()]).encode()
                             ).hexdigest()[:24]
        root = cache.cache_dir()
        lib_dir = None if root is None else root / "kernels"
        so = None if lib_dir is None else lib_dir / f"merge_fused-{key}.so"
        if so is None or not so.is_file():
            tmp_dir = Path(tempfile.mkdtemp(prefix="d2serve-kernel-"))
            try:
                built = tmp_dir / "merge_fused.so"
                r = subprocess.run([cc, *C_FLAGS, "-o", str(built), str(src), "-lm"], capture_output=True, text=True,
                                   timeout=300)
                if r.returncode != 0:
                    return None, f"C kernel: {cc} failed (exit {r.returncode}): {r.stderr.strip()[-500:]}"
                placed = False
                if lib_dir is not None:
                    try:
                        lib_dir.mkdir(parents=True, exist_ok=True)
                        part = lib_dir / f".{so.name}.{os.getpid()}.tmp"
                        shutil.copyfile(built, part)
                        os.replace(part, so)  # readers see no file or a whole one
                        placed = True
                    except OSError:
                        placed = False
                lib = ctypes.CDLL(str(so if placed else built))
            finally:
                shutil.rmtree(tmp_dir, ignore_errors=True)  # a loaded library stays mapped
        else:
            lib = ctypes.CDLL(str(so))
        kernel = CKernel(lib)
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        return None, f"C kernel unavailable ({type(e).__name__}: {e})"
    why = _self_check(kernel)
    return (kernel, "") if not why else (None, "C kernel: " + why)


def _build_numba() -> tuple[object | None, str]:
    try:
        from d2serve import cache

        root = cache.cache_dir()
        use_cache = False
        if root is not None:
            try:
                (root / "numba").mkdir(parents=True, exist_ok=True)
                use_cache = os.access(root / "numba", os.W_OK)
            except OSError:
                use_cache = False
        if use_cache and "NUMBA_CACHE_DIR" not in os.environ:
            os.environ["NUMBA_CACHE_DIR"] = str(root / "numba")  # read by numba at its import
        import numba

        if use_cache:
            numba.config.CACHE_DIR = str(root / "numba")
        from d2serve import merge_fused_kernels as k

        k.compile_all(use_cache)
        kernel = NumbaKernel(k)
    except Exception as e:  # noqa: BLE001 - any failure means: use another path, say why
        return None, f"numba kernel unavailable ({type(e).__name__}: {e})"
    why = _self_check(kernel)
    return (kernel, "") if not why else (None, "numba kernel: " + why)


class CKernel:
    """The compiled ``merge_fused.c`` behind the kernel interface (:meth:`rows`, :meth:`cast`)."""

    name = "c"

    def __init__(self, lib):
        import ctypes

        p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        self._rows = lib.d2s_fused_rows
        self._rows.restype = i
        self._rows.argtypes = [p, i, p, p, i, p, i, p, p, i, i64, i64, p]
        self._check = lib.d2s_check_finite
        self._check.restype = i
        self._check.argtypes = [p, i, i64, p]
        self._cast = lib.d2s_cast_1d
        self._cast.restype = i
        self._cast.argtypes = [p, i, p, i, i64]

    def rows(self, w0, dw, mag, form: int, out, m, s) -> tuple[int, float, float, int, int]:
        """See :func:`run_rows` (tensors C-contiguous; ``mag`` None or float64)."""
        stats = torch.empty(4, dtype=torch.float64)
        rows, n = dw.shape
        flag = self._rows(w0.data_ptr(), _KIND[w0.dtype], dw.data_ptr(), mag.data_ptr() if mag is not None else None,
                          form, out.data_ptr(), _KIND[out.dtype], m.data_ptr(), s.data_ptr(),
                          int(_KIND[w0.dtype] == _KIND[out.dtype]), rows, n, stats.data_ptr())
        if flag < 0:
            raise MemoryError("merge kernel: out of memory for a row's temporaries")
        a, e, nsc, ns = stats.tolist()
        return flag, a, e, int(nsc), int(ns)

    def check_finite(self, x) -> float | None:
        """max |x| of a contiguous floating tensor (float32/float64/bfloat16/float16), or None when it holds a NaN
        or +-Inf: the value :func:`d2serve.merge_blocks.check_finite` returns, in one integer pass over the bits."""
        if not x.is_contiguous() or x.dtype not in _KIND:
            raise ValueError("merge kernel: a contiguous float32/float64/bfloat16/float16 tensor is expected")
        if not x.numel():
            return 0.0
        big = torch.empty(1, dtype=torch.float64)
        if self._check(x.data_ptr(), _KIND[x.dtype], x.numel(), big.data_ptr()):
            return None
        return float(big)

    def cast(self, x, out) -> None:
        """``x`` (float32/float64, 1-d, contiguous) -> ``out`` with the kernel's rounding."""
        if self._cast(x.data_ptr(), _KIND[x.dtype], out.data_ptr(), _KIND[out.dtype], x.numel()) < 0:
            raise MemoryError("merge kernel: out of memory")


class NumbaKernel:
    """``merge_fused_kernels`` (numba) behind the kernel interface (:meth:`rows`, :meth:`cast`)."""

    name = "numba"

    def __init__(self, module):
        self.module = module

    def rows(self, w0, dw, mag, form: int, out, m, s) -> tuple[int, float, float, int, int]:
        """See :func:`run_rows`."""
        import numpy as np

        mag_np = mag.numpy() if mag is not None else np.empty(0)
        return self.module.fused_rows(as_numpy(w0), _KIND[w0.dtype], dw.numpy(), mag_np, form, as_numpy(out),
                                      _KIND[out.dtype], m.numpy(), s.numpy(), _KIND[w0.dtype] == _KIND[out.dtype])

    def cast(self, x, out) -> None:
        """``x`` (float32/float64, 1-d, contiguous) -> ``out`` with the kernel's rounding."""
        self.module.cast_1d(as_numpy(x), _KIND[x.dtype], as_numpy(out), _KIND[out.dtype])


def _self_check(k) -> str:
    """"" when the kernel's row norm and rescale-add reproduce torch's on rows of many lengths; else why not.
    (Row-wise results do not depend on how many threads torch splits the rows over.)"""
    gen = torch.Generator().manual_seed(1234)
    for n in (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 257, 2048, 2051, 5632):
        w0 = torch.randn(9, n, generator=gen) * 3  # float32 rows: the signature of a float32 merge
        dw = torch.randn(9, n, generator=gen, dtype=torch.float64) * 0.01
        m = torch.linalg.vector_norm(w0.double(), ord=2, dim=1)
        v = w0.double() + dw
        s = m / torch.linalg.vector_norm(v, ord=2, dim=1)
        ref = torch.addcmul(dw, v, s.unsqueeze(1)).to(torch.float32)
        out = torch.empty(9, n, dtype=torch.float32)
        mk, sk = torch.empty(9, dtype=torch.float64), torch.empty(9, dtype=torch.float64)
        flag, *_ = k.rows(w0, dw, None, FORMS["rescale_add"], out, mk, sk)
        if flag != OK or not (torch.equal(mk, m) and torch.equal(sk, s) and torch.equal(out, ref)):
            return ("does not reproduce torch's row norm / addcmul bit for bit on this CPU and torch build "
                    f"(row length {n}); the torch path keeps the bytes of today's engine")
    return ""


class Handle:
    """The kernel as one merge sees it: :meth:`get` returns it once loaded, else None (that block runs the torch
    path, with the same bytes), so a merge never waits for a first compilation (``wait=False``, the ``auto``
    choice) unless asked to (``wait=True``: ``fused``, ``c``, ``numba``).

    Args:
        wait: load now (blocking) instead of using the kernel only once a background load has finished.
        impl: ``c``, ``numba`` or None (the first that works).
    """

    def __init__(self, wait: bool, impl: str | None = None):
        self.wait, self.impl = wait, impl
        self.blocks_fused = self.blocks_torch = 0
        self._counts = threading.Lock()
        if wait:
            load(impl)
        else:
            prefetch(impl)

    def get(self):
        """The loaded kernel, or None while it is loading or when it is unavailable."""
        if self.wait or loaded(self.impl):
            return load(self.impl)[0]
        return None

    def count(self, fused: bool) -> None:
        """Count one row block (fused or torch) for the manifest."""
        with self._counts:
            if fused:
                self.blocks_fused += 1
            else:
                self.blocks_torch += 1

    def record(self, choice: str) -> dict:
        """What the manifest records (``merge_kernel``)."""
        impl = None
        if not loaded(self.impl):
            reason = "the kernel was still loading (a first compilation) when the merge ended"
        else:
            kernel, reason = load(self.impl)
            impl = kernel.name if kernel is not None else None
            if kernel is not None and not self.blocks_fused and self.blocks_torch:
                reason = "the kernel was loaded after the last merged block"
        used = "fused" if self.blocks_fused and not self.blocks_torch else "torch" if not self.blocks_fused else "both"
        return {"requested": choice, "used": used, "impl": impl if self.blocks_fused else None, "reason": reason,
                "blocks_fused": self.blocks_fused, "blocks_torch": self.blocks_torch}


def as_numpy(t: torch.Tensor):
    """A numpy view of ``t`` for the numba kernel: float32/float64 as they are, bfloat16/float16 as uint16 bits."""
    import numpy as np

    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def run_rows(kernel, w0: torch.Tensor, dw: torch.Tensor, mag: torch.Tensor | None, form: str, out: torch.Tensor,
             m: torch.Tensor, s: torch.Tensor) -> tuple[int, float, float, int, int]:
    """One row block through the kernel.

    Args:
        kernel: from :func:`load`.
        w0: (rows, in) base rows as stored (float32, float64, bfloat16 or float16; C-contiguous).
        dw: (rows, in) float64 dW of the same rows (C-contiguous).
        mag: (rows,) float64 target magnitudes of the ``rescale`` form (DoRA's ``lora_magnitude_vector``);
            None for ``add`` and ``rescale_add`` (D2-LoRA's m = ||W0|| is the kernel's own row norm).
        form: the method's ``fused_form``.
        out: (rows, in) output buffer in the output dtype (C-contiguous); receives cast(W_hat).
        m: (rows,) float64, receives ||W0|| per row; ``s``: (rows,) float64, receives the row scale
            (left unwritten for ``add``).

    Returns:
        (flag, max |W_hat|, max |cast(W_hat) - W_hat| (float64), #(cast W_hat == cast W0), #(W_hat == W0)),
        flag one of OK, ZERO_NORM, NON_FINITE, OVERFLOW (the values after a flag are meaningless: redo the
        block on the torch path, which raises its own error).
    """
    for t in (w0, dw, out, m, s) + ((mag,) if mag is not None else ()):
        if not t.is_contiguous():
            raise ValueError("merge kernel: every tensor must be C-contiguous")
    if dw.dtype != torch.float64 or m.dtype != torch.float64 or s.dtype != torch.float64 or w0.shape != dw.shape \
            or out.shape != dw.shape or m.shape[0] < dw.shape[0] or s.shape[0] < dw.shape[0]:
        raise ValueError("merge kernel: dW, norms and scales must be float64 of the block's shape")
    if mag is not None and (mag.dtype != torch.float64 or mag.shape[0] < dw.shape[0]):
        raise ValueError("merge kernel: magnitudes must be float64, one per row")
    return kernel.rows(w0, dw, mag, FORMS[form], out, m, s)


def round_trip_cast(kernel, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32 or float64, 1-d) cast to ``out_dtype`` by the kernel's own rounding (for tests against
    torch's ``Tensor.to``)."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype)
    kernel.cast(x, out)
    return out
