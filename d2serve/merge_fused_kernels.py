"""numba source of the fused merge kernel (:mod:`d2serve.merge_fused` loads, checks and calls it).

Imported only by :func:`d2serve.merge_fused.load` (it imports numba). The functions are plain Python until
:func:`compile_all` wraps them with ``numba.njit`` (``nogil``, no fast-math, numpy error model, cached on disk
when asked), so that the on-disk cache can be switched off with d2serve's cache.

Dtype codes (``*_kind``): 0 float32, 1 float64, 2 bfloat16 (uint16 bits), 3 float16 (uint16 bits).
Fused forms (``form``): 0 ``add`` W0 + dW (LoRA), 1 ``rescale`` diag(mag / ||W0 + dW||)(W0 + dW) (DoRA),
2 ``rescale_add`` diag(||W0|| / ||W0 + dW||)(W0 + dW) + dW (D2-LoRA); the formulas are the registry's
(:mod:`d2serve.adapters.methods`), written here in the order of torch's ops so that every rounding is the same.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (LLVM ``llvm.fma.f64``; a libm call where the CPU has no FMA unit)."""
    sig = types.float64(types.float64, types.float64, types.float64)

    def codegen(context, builder, signature, args):
        d = ir.DoubleType()
        fn = builder.module.declare_intrinsic("llvm.fma", [d], ir.FunctionType(d, [d, d, d]))
        return builder.call(fn, args)

    return sig, codegen


def _row_norm(x, n):
    """torch's ``vector_norm(ord=2)`` of a contiguous float64 row: 4 lanes (plain multiply, add), folded left,
    the tail by fused multiply-adds, then sqrt."""
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    nv = n - n % 4
    for d in range(0, nv, 4):
        a0 = a0 + x[d] * x[d]
        a1 = a1 + x[d + 1] * x[d + 1]
        a2 = a2 + x[d + 2] * x[d + 2]
        a3 = a3 + x[d + 3] * x[d + 3]
    b = a0 + a1
    b = b + a2
    b = b + a3
    for d in range(nv, n):
        b = _fma(x[d], x[d], b)
    return np.sqrt(b)


def _h2f(h):
    """float16 bits -> float32 bits (exact; subnormals normalised)."""
    h = np.int64(h)
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        if m == 0:
            return np.uint32(sign)
        e = 113  # float32 exponent of 2^-14, before normalising
        while (m & 0x400) == 0:
            m <<= 1
            e -= 1
        return np.uint32(sign | (e << 23) | ((m & 0x3FF) << 13))
    if e == 31:
        return np.uint32(sign | 0x7F800000 | (m << 13))
    return np.uint32(sign | ((e + 112) << 23) | (m << 13))


def _f2h(u):
    """float32 bits -> float16 bits, round to nearest even (overflow -> Inf, subnormals, NaN stays NaN)."""
    u = np.int64(u)
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return np.uint16(sign | 0x7E00)
    if a >= 0x477FF000:  # >= 65520: rounds to Inf (the tie 65520 goes to the even Inf)
        return np.uint16(sign | 0x7C00)
    if a < 0x38800000:  # below 2^-14: a float16 subnormal (or zero)
        e = a >> 23
        shift = 126 - e
        if shift > 24:
            return np.uint16(sign)
        m = (a & 0x7FFFFF) | 0x800000
        q = m >> shift
        rem = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (q & 1) == 1):
            q += 1
        return np.uint16(sign | q)
    h = (a - 0x38000000) >> 13
    rem = a & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
        h += 1
    return np.uint16(sign | h)


def _to_f32bits(src, kind, u32, f32, n):
    """Row ``src`` (kind 0/1 floats, 2/3 uint16 bits) into float32 bits ``u32`` (``f32`` is its float view)."""
    if kind == 0 or kind == 1:
        for d in range(n):
            f32[d] = np.float32(src[d])
    elif kind == 2:
        for d in range(n):
            u32[d] = np.uint32(src[d]) << np.uint32(16)
    else:
        for d in range(n):
            u32[d] = _h2f(src[d])


def _round_out(o32u, kind, dst, n):
    """Round float32 values (bits ``o32u``) to output kind ``kind`` into ``dst`` (None: only in place) and
    replace ``o32u`` by the exact float32 value of what was written."""
    if kind == 2:
        for d in range(n):
            u = np.int64(o32u[d])
            r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            dst[d] = np.uint16(r)
            o32u[d] = np.uint32(r << 16)
    elif kind == 3:
        for d in range(n):
            h = _f2h(o32u[d])
            dst[d] = h
            o32u[d] = _h2f(h)


_ABS = 0x7FFFFFFFFFFFFFFF  # float64 bits without the sign: for non-negative non-NaN doubles, the order of
_EXP = 0x7FF0000000000000  # the bits is the order of the values (integer max/count loops vectorize without fast-math)


def fused_rows(w0, in_kind, dw, mag, form, out, out_kind, m_out, s_out, same):
    """The merge of a row block after dW: see :func:`d2serve.merge_fused.run_rows` for the contract."""
    rows, n = dw.shape
    r64 = np.empty(n)
    v64 = np.empty(n)
    wh = np.empty(n)
    whb = wh.view(np.int64)
    err = np.empty(n)
    errb = err.view(np.int64)
    u32 = np.empty(n, np.uint32)
    f32 = u32.view(np.float32)
    o32u = np.empty(n, np.uint32)
    o32 = o32u.view(np.float32)
    c32u = np.empty(n, np.uint32)
    c32 = c32u.view(np.float32)
    o16 = np.empty(n, np.uint16)
    amax = np.int64(0)
    emax = np.int64(0)
    n_same_cast = 0
    n_same = 0
    for i in range(rows):
        wrow = w0[i]
        drow = dw[i]
        orow = out[i]
        # W0 row -> float64 (exact)
        if in_kind == 0 or in_kind == 1:
            for d in range(n):
                r64[d] = wrow[d]
        else:
            _to_f32bits(wrow, in_kind, u32, f32, n)
            for d in range(n):
                r64[d] = f32[d]
        m = _row_norm(r64, n)
        m_out[i] = m
        for d in range(n):
            v64[d] = r64[d] + drow[d]
        if form == 0:
            for d in range(n):
                wh[d] = v64[d]
        else:
            if form == 2 and m == 0.0:
                return 1, 0.0, 0.0, 0, 0
            nv = _row_norm(v64, n)
            if nv == 0.0:
                return 1, 0.0, 0.0, 0, 0
            if form == 1:
                s = mag[i] / nv
                for d in range(n):
                    wh[d] = v64[d] * s
            else:
                s = m / nv
                for d in range(n):
                    wh[d] = _fma(v64[d], s, drow[d])
            s_out[i] = s
        bad = 0
        for d in range(n):
            b = whb[d] & _ABS
            bad += b >= _EXP  # NaN or +-Inf
            amax = b if b > amax else amax
        if bad:
            return 2, 0.0, 0.0, 0, 0
        # the one cast: float64 -> float32 (round to nearest even), then -> bfloat16/float16 as torch does
        for d in range(n):
            o32[d] = np.float32(wh[d])
        if out_kind == 0:
            for d in range(n):
                orow[d] = o32[d]
        else:
            _round_out(o32u, out_kind, o16, n)
            for d in range(n):
                orow[d] = o16[d]
        bad = 0
        for d in range(n):
            bad += (o32u[d] & 0x7FFFFFFF) >= 0x7F800000  # the cast overflowed to +-Inf
        if bad:
            return 3, 0.0, 0.0, 0, 0
        # W0 in the output dtype (for "changed but equal after the cast")
        for d in range(n):
            c32[d] = np.float32(r64[d])
        if not same and out_kind != 0:
            _round_out(c32u, out_kind, o16, n)
        for d in range(n):
            err[d] = np.float64(o32[d]) - wh[d]
        for d in range(n):
            b = errb[d] & _ABS
            emax = b if b > emax else emax
            n_same_cast += o32[d] == c32[d]
            n_same += wh[d] == r64[d]
    return 0, _bits_to_f64(amax), _bits_to_f64(emax), n_same_cast, n_same


def _bits_to_f64(b):
    """The float64 whose bits are ``b``."""
    a = np.empty(1, np.int64)
    a[0] = b
    return a.view(np.float64)[0]


def cast_1d(x, in_kind, out, out_kind):
    """Cast a 1-d float32/float64 array to ``out_kind`` with the kernel's rounding (float64 -> float32 -> out)."""
    n = x.shape[0]
    o32u = np.empty(n, np.uint32)
    o32 = o32u.view(np.float32)
    o16 = np.empty(n, np.uint16)
    for d in range(n):
        o32[d] = np.float32(x[d])
    if out_kind == 0:
        for d in range(n):
            out[d] = o32[d]
    else:
        _round_out(o32u, out_kind, o16, n)
        for d in range(n):
            out[d] = o16[d]


_PLAIN = {name: globals()[name] for name in ("_row_norm", "_h2f", "_f2h", "_to_f32bits", "_round_out",
                                              "_bits_to_f64", "fused_rows", "cast_1d")}


def compile_all(cache: bool) -> None:
    """Wrap every kernel function with ``numba.njit`` (in dependency order; module globals are rebound so that
    the jitted callers call the jitted helpers). Compilation itself happens at the first call of a signature
    (or is loaded from numba's on-disk cache when ``cache``)."""
    opts = {"nogil": True, "cache": cache, "error_model": "numpy", "boundscheck": False}
    g = globals()
    for name, fn in _PLAIN.items():
        g[name] = numba.njit(**opts)(fn)
