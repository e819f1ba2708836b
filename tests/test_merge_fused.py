"""The fused merge kernel against the torch path: identical bytes, statistics and refusals; torch's roundings."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from d2serve import merge_fused
from d2serve.adapters.methods import MergeMathError
from d2serve.adapters.synthetic import random_adapter
from d2serve.merge import merge
from conftest import make_tiny_llama

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUT_DTYPES = ("float32", "bfloat16", "float16")


IMPLS = ("c", "numba")
# numba is an optional fallback (not a core dependency): its cases need it installed
IMPL_PARAMS = ["c", pytest.param("numba", marks=pytest.mark.extras)]


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-identical tensors (16-bit dtypes compared as raw bits, so a -0/+0 or NaN-payload difference counts)."""
    assert got.dtype == want.dtype
    if want.dtype == torch.float32:
        assert torch.equal(got, want)
    else:
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def _kernel(impl: str = "c"):
    kernel, why = merge_fused.load(impl)
    assert kernel is not None, why  # a C compiler and numba are here: a missing kernel is a failure, never a skip
    return kernel


@pytest.fixture(scope="module")
def bases(tiny_llama_dir, tmp_path_factory):
    bf16 = make_tiny_llama(tmp_path_factory.mktemp("bf16") / "base", dtype=torch.bfloat16, seed=1)
    return {"float32": tiny_llama_dir, "bfloat16": bf16}


def _both(base, adapter, out, dtype, impl="c"):
    """Merge with the torch path and with the fused kernel ``impl``; returns {path: (result, {file: bytes})}."""
    res = {}
    for kernel in ("torch", impl):
        r = merge(base=base, adapter=adapter, out=out / kernel, dtype=dtype, kernel=kernel)
        files = {p.name: p.read_bytes() for p in sorted((out / kernel).glob("*.safetensors"))}
        res["fused" if kernel == impl else kernel] = (r, files)
    return res


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("method", ["d2lora", "lora", "dora"])
@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_fused_kernel_writes_the_torch_paths_bytes_and_statistics(bases, method, base_dtype, impl, tmp_path):
    _kernel(impl)
    ad = random_adapter(bases[base_dtype], tmp_path / "ad", method=method, target_modules=ALL_LINEAR, std=0.2, seed=5)
    for dtype in OUT_DTYPES:
        res = _both(bases[base_dtype], ad, tmp_path / dtype, dtype, impl)
        (rt, ft), (rf, ff) = res["torch"], res["fused"]
        assert rt.manifest["merge_kernel"]["used"] == "torch" and rt.manifest["merge_kernel"]["blocks_fused"] == 0
        assert rf.manifest["merge_kernel"]["used"] == "fused" and rf.manifest["merge_kernel"]["blocks_fused"] > 0
        assert rf.manifest["merge_kernel"]["impl"] == impl
        assert rf.manifest["merge_kernel"]["layers_fusable"] == rf.manifest["num_layers_merged"] > 0
        assert ft == ff, f"{method} {base_dtype}->{dtype}: bytes differ"
        assert rt.manifest["layers"] == rf.manifest["layers"], f"{method} {base_dtype}->{dtype}: statistics differ"
        assert rt.manifest["base_fingerprint"] == rf.manifest["base_fingerprint"]
        # the statistics are not trivially equal: the cast lost part of the update somewhere for bf16/fp16
        if dtype != "float32":
            assert any(v["cast_max_abs_err"] > 0 for v in rf.manifest["layers"].values())


def test_fused_kernel_with_many_row_blocks_and_workers(bases, tmp_path, monkeypatch):
    """Blocks of 1-2 rows on 3 workers: the same bytes and statistics as the serial torch path."""
    import d2serve.merge_blocks as mb

    ad = random_adapter(bases["float32"], tmp_path / "ad", target_modules=ALL_LINEAR, std=0.2, seed=6)
    monkeypatch.setattr(mb, "ROW_BLOCK_ELEMENTS", 150)
    serial = merge(base=bases["float32"], adapter=ad, out=tmp_path / "t", dtype="bfloat16", kernel="torch", threads=1)
    pooled = merge(base=bases["float32"], adapter=ad, out=tmp_path / "f", dtype="bfloat16", kernel="fused", threads=3)
    assert pooled.manifest["threads"]["row_workers"] == 3 and serial.manifest["threads"]["row_workers"] == 1
    assert (tmp_path / "t" / "model.safetensors").read_bytes() == (tmp_path / "f" / "model.safetensors").read_bytes()
    assert serial.manifest["layers"] == pooled.manifest["layers"]


def _refusal(base, ad, tmp_path, dtype, kernel):
    with pytest.raises(MergeMathError) as e:
        merge(base=base, adapter=ad, out=tmp_path / f"o-{kernel}", dtype=dtype, kernel=kernel)
    assert not (tmp_path / f"o-{kernel}").exists()
    return str(e.value)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("case", ["float16_overflow", "nan_row", "inf_row", "zero_row"])
def test_fused_kernel_refuses_what_the_torch_path_refuses_with_its_message(tiny_llama_dir, tmp_path, case, impl):
    _kernel(impl)
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    t = load_file(str(base / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    w = t[name]
    if case == "float16_overflow":
        w[5] = 7e4  # finite in float32, above float16's max after the merge
    elif case == "nan_row":
        w[3, 7] = float("nan")
    elif case == "inf_row":
        w[3, 7] = float("inf")
    else:
        w[2] = 0.0  # D2-LoRA's m = ||W0|| of that row is 0
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    ad = random_adapter(base, tmp_path / "ad", target_modules=("q_proj",), std=0.2, with_magnitude=False)
    dtype = "float16" if case == "float16_overflow" else "bfloat16"
    msg_torch = _refusal(base, ad, tmp_path, dtype, "torch")
    msg_fused = _refusal(base, ad, tmp_path, dtype, impl)
    assert msg_fused == msg_torch
    assert "q_proj" in msg_fused


def test_fused_kernel_refuses_a_dora_row_whose_update_cancels_w0(tiny_llama_dir, tmp_path):
    """DoRA divides by ||W0 + dW||: a row with W0 + dW == 0 exactly is refused by both paths alike."""
    from d2serve.adapters.io import load_adapter

    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", method="dora", target_modules=("v_proj",), std=0.2)
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    t = load_file(str(base / "model.safetensors"))
    module = "model.layers.0.self_attn.v_proj"
    assert module in load_adapter(ad).layers
    t[f"{module}.weight"][1] = 0.0  # W0's row 1 and B's row 1 zero: W0 + dW has a zero row
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    at = load_file(str(ad / "adapter_model.safetensors"))
    key = next(k for k in at if module in k and "lora_B" in k)
    at[key][1] = 0.0
    save_file(at, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    msg_torch = _refusal(base, ad, tmp_path, "float32", "torch")
    msg_fused = _refusal(base, ad, tmp_path, "float32", "fused")
    assert msg_fused == msg_torch and "zero norm" in msg_fused


def _tie_float32s() -> torch.Tensor:
    """float32 values at, just below and just above every bfloat16 and float16 rounding tie, over all exponents
    (incl. float16 subnormals, the float16 overflow threshold 65520 and bfloat16's largest values)."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16  # every bfloat16 as float32 bits
    bits = [hi | low for low in (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF)]
    # float16 normal ties: the 13 dropped mantissa bits at half (0x1000), on both parities of the kept bit
    bits += [hi | low for low in (0x1000, 0x0FFF, 0x1001, 0x3000, 0x2FFF, 0x3001)]
    # float16 subnormal ties: exponents 2^-25 .. 2^-15, every mantissa pattern with a tie at the shift
    sub = []
    for e in range(102, 113):
        shift = 126 - e
        for q in range(0, 64):
            m = (q << shift) | (1 << (shift - 1))
            for dm in (-1, 0, 1):
                mm = (m + dm) & 0x7FFFFF
                sub.append((e << 23) | mm)
    bits.append(np.array(sub, dtype=np.uint32))
    rng = np.random.default_rng(0)
    bits.append(rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32))
    bits.append(np.array([0x477FF000, 0x477FEFFF, 0x477FF001, 0x477FE000, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF],
                         dtype=np.uint32))
    allb = np.concatenate(bits)
    allb = np.concatenate([allb, allb | np.uint32(0x80000000)])  # both signs
    x = torch.from_numpy(allb.view(np.float32).copy())
    return x[torch.isfinite(x)]


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_casts_round_to_nearest_even_like_torch(out_dtype, impl):
    """The kernel's float32 -> bfloat16/float16 rounding equals torch's ``Tensor.to`` bit for bit at every tie,
    and float64 -> bfloat16/float16 goes through float32 as torch's does (a float64 just above a tie that
    float32 rounds onto the tie rounds to even, not up)."""
    k = _kernel(impl)
    x = _tie_float32s()
    assert x.numel() > 2_000_000
    _assert_same_bits(merge_fused.round_trip_cast(k, x, out_dtype), x.to(out_dtype))
    # float64 inputs: ties of the output dtype plus/minus amounts float32 cannot hold, and plain randoms
    eps = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}[out_dtype]
    base = torch.tensor([1.0, 1.5, 3.0, 1024.0, 2.0**-10, 2.0**-20], dtype=torch.float64)
    ties = torch.cat([base * (1 + eps), base * (1 + 3 * eps)])
    d = torch.cat([ties + ties * s for s in (2.0**-40, -(2.0**-40), 2.0**-30, -(2.0**-30), 0.0)])
    d = torch.cat([d, -d, torch.randn(100_000, dtype=torch.float64) * 100, torch.tensor([65519.99, 65520.0001])])
    _assert_same_bits(merge_fused.round_trip_cast(k, d, out_dtype), d.to(out_dtype))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_kernel_row_norm_and_formula_match_torch_bit_for_bit_on_odd_lengths(impl):
    k = _kernel(impl)
    gen = torch.Generator().manual_seed(7)
    for n in (1, 2, 3, 4, 5, 6, 7, 13, 63, 65, 127, 1000, 2047, 4099):
        for wdt in (torch.float32, torch.bfloat16, torch.float16):
            w0 = (torch.randn(5, n, generator=gen) * 0.1).to(wdt)
            dw = torch.randn(5, n, generator=gen, dtype=torch.float64) * 1e-2
            w64 = w0.double()
            m = torch.linalg.vector_norm(w64, ord=2, dim=1)
            v = w64 + dw
            s = m / torch.linalg.vector_norm(v, ord=2, dim=1)
            ref = torch.addcmul(dw, v, s.unsqueeze(1)).to(torch.bfloat16)
            out = torch.empty(5, n, dtype=torch.bfloat16)
            mk, sk = torch.empty(5, dtype=torch.float64), torch.empty(5, dtype=torch.float64)
            flag, big, *_ = merge_fused.run_rows(k, w0, dw, None, "rescale_add", out, mk, sk)
            assert flag == merge_fused.OK
            assert torch.equal(mk, m) and torch.equal(sk, s), (n, wdt)
            assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), (n, wdt)
            assert big == float(torch.addcmul(dw, v, s.unsqueeze(1)).abs().max())


def test_missing_numba_falls_back_to_torch_with_the_reason_recorded(tiny_llama_dir, tmp_path, monkeypatch, caplog):
    import logging
    import sys

    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", target_modules=ALL_LINEAR, std=0.2, seed=8)
    ref = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "ref", dtype="bfloat16", kernel="torch")
    monkeypatch.setattr(merge_fused, "_state", {})
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    monkeypatch.delitem(sys.modules, "d2serve.merge_fused_kernels", raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))  # and no C compiler either
    with caplog.at_level(logging.WARNING, logger="d2serve.merge"):
        r = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "fb", dtype="bfloat16", kernel="fused")
    rec = r.manifest["merge_kernel"]
    assert rec["used"] == "torch" and rec["requested"] == "fused" and "numba" in rec["reason"]
    assert "no-such-compiler" in rec["reason"] and rec["impl"] is None
    assert rec["blocks_fused"] == 0 and rec["blocks_torch"] > 0
    assert any("torch path" in m and "numba" in m for m in caplog.messages)
    assert (tmp_path / "fb" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert r.manifest["layers"] == ref.manifest["layers"]


@pytest.mark.extras
def test_a_kernel_that_fails_to_compile_or_disagrees_with_torch_is_not_used(tiny_llama_dir, tmp_path, monkeypatch):
    import d2serve.merge_fused_kernels as kmod

    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", target_modules=("q_proj",), std=0.2, seed=9)
    monkeypatch.setattr(merge_fused, "_state", {})

    def broken(cache):
        raise RuntimeError("LLVM says no")

    monkeypatch.setattr(kmod, "compile_all", broken)
    r = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "a", kernel="numba")
    assert r.manifest["merge_kernel"]["used"] == "torch" and "LLVM says no" in r.manifest["merge_kernel"]["reason"]
    # a C source that does not compile: the compiler's message, the torch path
    monkeypatch.setattr(merge_fused, "_state", {})
    bad = tmp_path / "cc"
    bad.write_text("#!/bin/sh\necho 'error: no such thing' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    r = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "b", kernel="c")
    assert r.manifest["merge_kernel"]["used"] == "torch" and "no such thing" in r.manifest["merge_kernel"]["reason"]
    monkeypatch.undo()
    # a kernel whose row norm differs from torch's in the last bit (another reduction order) is refused by the check
    monkeypatch.setattr(merge_fused, "_state", {})
    for impl in IMPLS:
        kernel = _kernel(impl)
        assert merge_fused._self_check(kernel) == ""
        fake = type("K", (), {})()
        fake.rows = lambda *a, kernel=kernel: _perturbed(kernel, *a)
        assert "does not reproduce" in merge_fused._self_check(fake)


def _perturbed(kernel, w0, dw, mag, form, out, m, s):
    r = kernel.rows(w0, dw, mag, form, out, m, s)
    m[0] = float(np.nextafter(m[0].item(), np.inf))
    return r


def test_kernel_choice_comes_from_the_environment(monkeypatch):
    from d2serve.errors import InputError

    monkeypatch.setenv(merge_fused.ENV, "torch")
    assert merge_fused.choice() == "torch"
    monkeypatch.setenv(merge_fused.ENV, "")
    assert merge_fused.choice() == "auto"
    monkeypatch.setenv(merge_fused.ENV, "cuda")
    with pytest.raises(InputError, match="D2SERVE_MERGE_KERNEL"):
        merge_fused.choice()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_c_kernel_finite_check_of_copies_returns_torchs_max_abs(dtype):
    from d2serve.merge_blocks import check_finite

    k = _kernel("c")
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(100_003, generator=gen) * 50).to(dtype)
    x[7] = -x.abs().max() * 1.5  # the largest magnitude is negative
    x[8], x[9] = 0.0, -0.0
    x[10] = torch.finfo(dtype).tiny / 4 if dtype != torch.bfloat16 else 1e-40  # a subnormal
    assert k.check_finite(x) == check_finite("t", x, "base tensor")
    assert k.check_finite(torch.zeros(5, dtype=dtype)) == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[50_000] = bad
        assert k.check_finite(y) is None


@pytest.mark.parametrize("kernel", ["torch", "c"])
def test_a_nan_in_a_copied_tensor_is_refused_with_the_same_count(tiny_llama_dir, tmp_path, kernel):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    t = load_file(str(base / "model.safetensors"))
    t["model.embed_tokens.weight"][3, :5] = float("nan")
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    ad = random_adapter(base, tmp_path / "ad", target_modules=("q_proj",), std=0.2, with_magnitude=False)
    with pytest.raises(MergeMathError, match=r"base tensor model\.embed_tokens\.weight has 5 NaN/Inf"):
        merge(base=base, adapter=ad, out=tmp_path / "o", dtype="bfloat16", kernel=kernel)


def test_a_merge_that_ends_before_the_kernel_has_loaded_exits_0(tiny_llama_dir, tmp_path):
    """Each merge below runs in a fresh process (kernel not loaded yet; `auto` loads it in the background while
    the tiny merge finishes). The loader thread used to be a daemon still inside torch when the interpreter
    finalized: about half of these processes aborted with exit -6 ("terminate called without an active
    exception") after writing a correct output."""
    import subprocess
    import sys

    ad = random_adapter(tiny_llama_dir, tmp_path / "ad", method="d2lora", r=4, lora_alpha=8.0, std=0.1, seed=3)
    codes = []
    for i in range(6):
        r = subprocess.run([sys.executable, "-m", "d2serve.cli", "merge", "--base", str(tiny_llama_dir), "--adapter",
                            str(ad), "--out", str(tmp_path / f"m{i}")], capture_output=True, text=True, timeout=300)
        codes.append((r.returncode, r.stderr[-300:] if r.returncode else ""))
    assert [c for c, _ in codes] == [0] * 6, codes
