"""The fused merge kernel: everything after the rank-2r float64 GEMM of a row block, compiled with numba.

The torch path of :mod:`d2serve.merge_blocks` runs ~12 elementwise passes over a row block after
``dW = B' @ A'`` (the conversion of W0 to float64, two row norms, the formula, the finite check, the cast,
four passes of statistics). Here each row is handled once, while it sits in the L1/L2 cache: its W0 is
converted to float64, the row norms are taken, the registry's formula applied (its *fused form*,
:attr:`d2serve.adapters.methods.Method.fused_form`: ``add`` W0 + dW, ``rescale`` diag(s)(W0 + dW),
``rescale_add`` diag(s)(W0 + dW) + dW), the value checked finite, cast once to the output dtype and the
manifest statistics accumulated. The row blocks still run on the merge's worker threads (the kernel is
compiled ``nogil``).

Bit identity with the torch path is the contract, not a tolerance: the kernel reproduces

* torch's row norm (``linalg.vector_norm(ord=2, dim=1)`` on a contiguous float64 row: 4 lane accumulators
  with a plain multiply and add, folded left, the tail accumulated with a fused multiply-add, then sqrt),
* ``torch.addcmul`` (one fused multiply-add per element) and ``torch.mul``/``torch.add``,
* torch's casts: float64 -> float32 rounds to nearest even; float64 -> bfloat16/float16 goes through
  float32 (torch rounds twice), float32 -> bfloat16/float16 rounds to nearest even (ties to even,
  overflow to +-Inf, float16 subnormals),

and :func:`load` checks the first two against torch on this machine before the kernel is used (another
torch build or CPU could reduce in another order): if the check, the numba import or the compilation
fails, :func:`load` returns None with the reason and the merge runs the torch path (the manifest records
which path ran and why). A row block with any error (a zero row norm, a NaN/Inf, an overflow of the
output dtype) is redone on the torch path, which raises the engine's own error message.

Choice: ``D2SERVE_MERGE_KERNEL`` = ``auto`` (default: fused when available), ``fused`` (the same, but the
reason is logged as a warning when it is not) or ``torch``. Compiled code is cached (numba ``cache=True``)
under ``$D2SERVE_CACHE_DIR/numba`` (:mod:`d2serve.cache`; not cached when the cache is ``off``).
"""

from __future__ import annotations

import logging
import os
import threading

import torch

ENV = "D2SERVE_MERGE_KERNEL"
CHOICES = ("auto", "fused", "torch")
FORMS = {"add": 0, "rescale": 1, "rescale_add": 2}  # Method.fused_form -> kernel code
# dtype codes of the kernel: how a stored array's elements are read / written
_KIND = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# flag codes returned by the kernel
OK, ZERO_NORM, NON_FINITE, OVERFLOW = 0, 1, 2, 3

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {}  # "kernel": the compiled module namespace or None, "reason": why not


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


def load() -> tuple[object | None, str]:
    """The compiled kernel (once per process; thread-safe) and a reason string.

    Returns:
        (kernel, "") when numba is importable, the kernel compiles (or loads from the cache) and reproduces
        torch's row norm and ``addcmul`` bit for bit on this machine; else (None, why).
    """
    with _lock:
        if "kernel" not in _state:
            _state["kernel"], _state["reason"] = _build()
        return _state["kernel"], _state["reason"]


def prefetch() -> None:
    """Start :func:`load` in a background thread (the numba import takes ~0.3-0.6 s: overlap it with the
    merge's checks). Does nothing when the torch path was asked for or the kernel is already loaded."""
    if "kernel" in _state or os.environ.get(ENV, "").strip().lower() == "torch":
        return
    threading.Thread(target=load, name="d2serve-merge-kernel-load", daemon=True).start()


def _build() -> tuple[object | None, str]:
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
    except Exception as e:  # noqa: BLE001 - any failure means: use the torch path, say why
        return None, f"numba kernel unavailable ({type(e).__name__}: {e})"
    why = _self_check(k)
    if why:
        return None, why
    return k, ""


def _self_check(k) -> str:
    """"" when the kernel's row norm and rescale-add reproduce torch's on rows of many lengths; else why not.
    (Row-wise results do not depend on how many threads torch splits the rows over.)"""
    import numpy as np

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
        flag, *_ = k.fused_rows(w0.numpy(), 0, dw.numpy(), np.empty(0), 2, out.numpy(), 0, mk.numpy(),
                                sk.numpy(), True)
        if flag != OK or not (torch.equal(mk, m) and torch.equal(sk, s) and torch.equal(out, ref)):
            return ("numba kernel does not reproduce torch's row norm / addcmul bit for bit on this CPU and "
                    f"torch build (row length {n}); the torch path keeps the bytes of today's engine")
    return ""


class Handle:
    """The kernel as one merge sees it: :meth:`get` returns it once loaded, else None (that block runs the torch
    path, with the same bytes), so a merge never waits for numba's import or a first compilation
    (``wait=False``, the ``auto`` choice) unless asked to (``wait=True``, ``fused``)."""

    def __init__(self, wait: bool):
        self.wait = wait
        self.blocks_fused = self.blocks_torch = 0
        self._counts = threading.Lock()
        if wait:
            load()

    def get(self):
        """The compiled kernel, or None while it is loading or when it is unavailable."""
        if self.wait or "kernel" in _state:
            return load()[0]
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
        done = "kernel" in _state
        if done and _state["kernel"] is None:
            reason = _state["reason"]
        elif not done:
            reason = "the kernel was still loading (numba import / first compilation) when the merge ended"
        elif not self.blocks_fused and self.blocks_torch:
            reason = "the kernel was loaded after the last merged block"
        else:
            reason = ""
        used = "fused" if self.blocks_fused and not self.blocks_torch else "torch" if not self.blocks_fused else "both"
        return {"requested": choice, "used": used, "reason": reason, "blocks_fused": self.blocks_fused,
                "blocks_torch": self.blocks_torch}


def as_numpy(t: torch.Tensor):
    """A numpy view of ``t`` for the kernel: float32/float64 as they are, bfloat16/float16 as their uint16 bits."""
    import numpy as np

    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def run_rows(kernel, w0: torch.Tensor, dw: torch.Tensor, mag: torch.Tensor | None, form: str, out: torch.Tensor,
             m: torch.Tensor, s: torch.Tensor) -> tuple[int, float, float, int, int]:
    """One row block through the kernel.

    Args:
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
    import numpy as np

    same = _KIND[w0.dtype] == _KIND[out.dtype]
    mag_np = mag.numpy() if mag is not None else np.empty(0)
    return kernel.fused_rows(as_numpy(w0), _KIND[w0.dtype], dw.numpy(), mag_np, FORMS[form], as_numpy(out),
                             _KIND[out.dtype], m.numpy(), s.numpy(), same)


def round_trip_cast(kernel, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float32 or float64, 1-d) cast to ``out_dtype`` by the kernel's own rounding (for tests against
    torch's ``Tensor.to``)."""
    out = torch.empty(x.shape, dtype=out_dtype)
    kernel.cast_1d(as_numpy(x.contiguous()), _KIND[x.dtype], as_numpy(out), _KIND[out_dtype])
    return out
