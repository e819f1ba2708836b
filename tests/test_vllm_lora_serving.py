"""Unmerged vLLM serving the way vLLM users run it (issue 20): fewer LoRA slots than adapters (eviction and
re-activation), runtime loading over the HTTP API, and tensor parallelism 2 on this CPU.

The right value everywhere is the merged model: each adapter is merged (``d2serve merge``, float32) and the merged
checkpoint is served by plain vLLM (no LoRA); every request to the unmerged engine must give the same greedy tokens
(float32: all of them, ``ignore_eos``) with chosen-token logprobs within 1e-3, and base requests the plain base's.

Engines (the cost): one worker process (d2serve.export._vllm_lora_worker) runs the four reference engines (base + 3
merged), a second the two LoRA engines (max_loras 1 and 2 for 3 adapters, each with a concurrent and an interleaved
run); ONE ``d2serve serve`` server (tensor parallel 2, max_loras 1, runtime LoRA updating on, d2serve's folding
resolver) serves the HTTP checks.
Run under ``flock /tmp/d2s-heavy.lock``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_vllm_tiny_llama

from d2serve.adapters.synthetic import random_adapter
from d2serve.errors import InputError
from d2serve.export.vllm import PROMPTS, prompt_token_ids
from d2serve.export.vllm_lora import export_vllm_lora, lora_serve_args
from d2serve.export.vllm_lora_check import compare, run_jobs

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAMES = ("d2", "dora", "lora")
N_PROMPTS, MAX_TOKENS, MAX_MODEL_LEN = 3, 24, 256
ATOL = 1e-3  # float32 chosen-token logprobs, unmerged vs merged (the parity gate's float32 tolerance)
# Only the evicting settings (1 and 2 slots for 3 adapters + base): a slot for every adapter (no eviction) is the
# setting of the LoRA engines in test_vllm_lora.py; each engine start here costs ~40 s of the suite.
SLOTS = (1, 2)


@dataclass
class Fixture:
    base: Path
    raw: dict[str, Path]  # name -> adapter folder as trained (D2-LoRA format v1 / PEFT DoRA / PEFT LoRA)
    folded: dict[str, Path]  # name -> d2serve export vllm-lora folder
    merged: dict[str, Path]  # name -> d2serve merge (float32)
    ids: list[list[int]]


def _build(root: Path) -> Fixture:
    from peft_oracle import peft_adapter

    from d2serve.merge import merge

    base = make_vllm_tiny_llama(root / "base")
    raw = {"d2": random_adapter(base, root / "d2", method="d2lora", r=4, lora_alpha=8.0, std=0.1, seed=1,
                                target_modules=ALL7),
           "dora": peft_adapter(base, root / "dora", seed=2, target_modules=list(ALL7), use_dora=True),
           "lora": peft_adapter(base, root / "lora", seed=3, target_modules=["q_proj", "v_proj", "down_proj"])}
    folded, merged = {}, {}
    for n, a in raw.items():
        folded[n], merged[n] = root / f"{n}-vl", root / f"{n}-merged"
        export_vllm_lora(base=base, adapter=a, out=folded[n])
        merge(base=base, adapter=a, out=merged[n], dtype="float32")
    return Fixture(base, raw, folded, merged, prompt_token_ids(base, list(PROMPTS[:N_PROMPTS]))[0])


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixture:
    return _build(tmp_path_factory.mktemp("vllm_serving"))


def _mix(ids: list[list[int]]) -> list[tuple[str | None, int]]:
    """(adapter or None, prompt index) for every prompt x {base, d2, dora, lora}, the order rotated per prompt so
    consecutive requests switch adapter (each switch with one slot is an eviction + re-activation)."""
    models = [None, *NAMES]
    return [(models[(i + k) % len(models)], i) for i in range(len(ids)) for k in range(len(models))]


# ------------------------------------------------------------------------------ fast: the --max-loras handling

@pytest.mark.extras
def test_user_max_loras_replaces_the_spare_slot_and_needs_the_plugin(tiny_llama_dir, tmp_path, monkeypatch):
    """A user's --max-loras replaces d2serve's N+1 (no second, conflicting value is emitted); below N+1 it is
    refused by name when d2serve's vLLM plugin would not be loaded (without it base tokens read the last slot)."""
    monkeypatch.setenv("D2SERVE_CACHE_DIR", str(tmp_path / "cache"))
    ads = {n: random_adapter(tiny_llama_dir, tmp_path / n, method="lora", r=4, seed=i, std=0.1)
           for i, n in enumerate(("a", "b", "c"))}
    default = lora_serve_args(tiny_llama_dir, ads)
    assert default[default.index("--max-loras") + 1] == "4"
    for user in (["--max-loras", "1"], ["--max-loras=2"], ["--max-loras", "9", "--max-loras", "1"]):
        args = lora_serve_args(tiny_llama_dir, ads, user_args=user)
        assert "--max-loras" not in args and not any(a.startswith("--max-loras=") for a in args), args
    with pytest.raises(InputError, match="positive integer"):
        lora_serve_args(tiny_llama_dir, ads, user_args=["--max-loras", "0"])
    monkeypatch.setenv("VLLM_PLUGINS", "")  # plain LoRA folders are served without the plugin ...
    assert "--max-loras" in lora_serve_args(tiny_llama_dir, ads)
    assert lora_serve_args(tiny_llama_dir, ads, user_args=["--max-loras", "4"])  # ... a spare slot left: fine
    with pytest.raises(InputError, match=r"--max-loras 1 leaves no spare LoRA slot for 3 adapters.*VLLM_PLUGINS"):
        lora_serve_args(tiny_llama_dir, ads, user_args=["--max-loras", "1"])


def test_plugin_refuses_unfolded_folders_by_config(tmp_path, tiny_llama_dir):
    """The plugin's PEFTHelper.from_local_dir check: a raw D2-LoRA folder and a PEFT DoRA folder without the marker
    are refused naming `d2serve export vllm-lora` and the folder; folded folders and plain LoRA pass."""
    from d2serve.vllm_plugin.patches import _refuse_unfolded

    raw = random_adapter(tiny_llama_dir, tmp_path / "d2", method="d2lora", r=4, seed=1)
    cfg = json.loads((raw / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match=r"unfolded D2-LoRA adapter.*d2serve export vllm-lora --base BASE --adapter "):
        _refuse_unfolded(str(raw), cfg)
    with pytest.raises(ValueError, match=r"unfolded PEFT DoRA adapter.*d2serve export vllm-lora"):
        _refuse_unfolded("/x/dora", {"peft_type": "LORA", "use_dora": True})
    folded = export_vllm_lora(base=tiny_llama_dir, adapter=raw, out=tmp_path / "vl")
    assert folded["needs_plugin"]
    assert _refuse_unfolded(str(tmp_path / "vl"), json.loads((tmp_path / "vl" / "adapter_config.json").read_text())) \
        is None
    assert _refuse_unfolded("/x/lora", {"peft_type": "LORA", "use_dora": False}) is None


@pytest.mark.vllm
def test_cpu_shrink_gives_slot_minus_one_no_lora():
    """After the plugin's install, vLLM's CPU bgmv/sgmv shrink give tokens of slot -1 an all-zero row (they read the
    LAST slot before) and every other token x @ A[slot]^T * scaling (float64 reference), decode and prefill path."""
    import torch

    from d2serve.vllm_plugin import patches

    patches.install()
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 1, 8, 16, generator=g)  # (slots, 1, rank, in): both slots filled
    x = torch.randn(5, 16, generator=g)
    idx = torch.tensor([-1, 0, 1, -1, 1])
    want = torch.stack([torch.zeros(8, dtype=torch.float64) if int(i) < 0
                        else 0.5 * (a[int(i), 0].double() @ r.double()) for i, r in zip(idx, x)])
    out = torch.full((5, 8), 7.0)
    punica_cpu.bgmv_shrink(x, a, out, idx, 0.5)
    assert torch.allclose(out.double(), want, atol=1e-5, rtol=0), out
    out2 = torch.full((5, 8), 7.0)  # prefill: per-run slots [-1, 0, 1, -1, 1] with run lengths 1 (sgmv -> bgmv)
    lora_ops.sgmv_shrink(x, a, out2, None, torch.ones(5, dtype=torch.long), idx, 5, 1, 5, 0.5)
    assert torch.equal(out, out2)


@pytest.mark.vllm
def test_tp_slices_of_scales_match_hand_sliced_full_width():
    """The plugin's TP scale rows (patches._slot_row, with vLLM's own slice_lora_b of each layer class) equal the
    full-width s sliced by hand: QKV on rank 1 of 2 (q rows 64..127, k/v rows 32..63, ones for the unadapted k),
    gate_up (each half's rank-1 rows), row-parallel o_proj (the full width: it scales partial sums before the
    all-reduce); and _scale_rows multiplies each token by its slot's row, slot -1 and padded rows by the ones row."""
    from types import SimpleNamespace

    import torch
    from vllm.lora.layers.column_parallel_linear import (
        MergedColumnParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
    )
    from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA

    from d2serve.vllm_plugin.patches import _scale_rows, _slot_row

    g = torch.Generator().manual_seed(0)
    full = {n: torch.rand(w, generator=g) + 0.5 for n, w in (("q_proj", 128), ("v_proj", 64), ("gate_proj", 192),
                                                            ("up_proj", 192), ("o_proj", 128))}
    manager = SimpleNamespace(packed_modules={"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                              "gate_up_proj": ["gate_proj", "up_proj"]})

    def layer(cls, **kw):
        m = SimpleNamespace(tp_size=2, tp_rank=1, **kw)
        m.slice_lora_b = cls.slice_lora_b.__get__(m)
        return m

    qkv = layer(MergedQKVParallelLinearWithLoRA, n_slices=3, output_slices=(64, 32, 32), output_ids=(1, 1, 1))
    want = torch.cat([full["q_proj"][64:], torch.ones(32), full["v_proj"][32:]])
    assert torch.equal(_slot_row(manager, "qkv_proj", qkv, full), want)
    gu = layer(MergedColumnParallelLinearWithLoRA, n_slices=2, output_slices=(96, 96), output_ids=(1, 1))
    want = torch.cat([full["gate_proj"][96:], full["up_proj"][96:]])
    assert torch.equal(_slot_row(manager, "gate_up_proj", gu, full), want)
    o = layer(RowParallelLinearWithLoRA, n_slices=1, output_slices=(128,))
    assert torch.equal(_slot_row(manager, "o_proj", o, full), full["o_proj"])
    assert _slot_row(manager, "down_proj", o, full) is None  # not adapted: every row 1

    buf = torch.ones(3, 4)  # max_loras 2 + the ones row (slot -1)
    buf[0], buf[1] = torch.tensor([2.0, 3, 4, 5]), torch.tensor([0.5, 0.25, 1, 2])
    out = torch.arange(20, dtype=torch.float32).reshape(5, 4)
    wrapper = SimpleNamespace(token_lora_indices=torch.tensor([1, -1, 0, 0]))
    lay = SimpleNamespace(d2_scale_stacked=buf, punica_wrapper=wrapper)
    got = _scale_rows(lay, out)
    want = out * torch.stack([buf[1], torch.ones(4), buf[0], buf[0], torch.ones(4)])  # row 5: padding, no adapter
    assert torch.equal(got, want)


# ------------------------------------------------------------------------ offline engines: few slots, LRU

@pytest.fixture(scope="module")
def refs(fx) -> dict:
    """The right values: greedy outputs of the plain base (key None) and each merged model, plain vLLM, one worker."""
    jobs = [{"model": str(m), "dtype": "float32", "max_model_len": MAX_MODEL_LEN, "max_tokens": MAX_TOKENS,
             "runs": [{"name": "ref", "requests": [{"prompt_token_ids": x, "lora": None} for x in fx.ids]}]}
            for m in (fx.base, *(fx.merged[n] for n in NAMES))]
    res = run_jobs(jobs)
    print(json.dumps({"refs_worker_wall_s": res["wall_s"], "startup_s": [j["startup_s"] for j in res["jobs"]]}))
    return dict(zip([None, *NAMES], (j["runs"]["ref"] for j in res["jobs"])))


@pytest.fixture(scope="module")
def offline(fx, refs):
    """One worker: LoRA engines with max_loras 1 and 2, each with a concurrent and an interleaved run of _mix."""
    mix = _mix(fx.ids)
    reqs = [{"prompt_token_ids": fx.ids[i], "lora": lora} for lora, i in mix]
    runs = [{"name": "concurrent", "requests": reqs}]
    runs += [{"name": f"interleaved:{k}", "requests": [r]} for k, r in enumerate(reqs)]
    jobs = [{"model": str(fx.base), "dtype": "float32", "max_model_len": MAX_MODEL_LEN, "max_tokens": MAX_TOKENS,
             "loras": {n: str(fx.folded[n]) for n in NAMES}, "max_lora_rank": 8, "max_loras": slots, "runs": runs}
            for slots in SLOTS]
    res = run_jobs(jobs)
    print(json.dumps({"lora_worker_wall_s": res["wall_s"], "startup_s": [j["startup_s"] for j in res["jobs"]]}))
    return mix, refs, dict(zip(SLOTS, res["jobs"]))


@pytest.mark.vllm
def test_references_are_not_vacuous(refs):
    """Every adapter changes the greedy tokens of at least 2 of the 3 prompts (a base-serving bug would show)."""
    for n in NAMES:
        assert sum(a["token_ids"] != b["token_ids"] for a, b in zip(refs[n], refs[None])) >= 2, n


@pytest.mark.vllm
@pytest.mark.parametrize("slots", SLOTS)
def test_fewer_slots_than_adapters_exact(offline, slots):
    """max_loras 1 / 2 with base + 3 adapters: one concurrent batch (the scheduler swaps adapters in and out
    while base requests keep running beside them: slot -1 with every slot full) and one request at a time in an
    order that evicts at every switch; every request equals its merged model (base: the plain base)."""
    mix, refs, jobs = offline
    job = jobs[slots]
    for run in ("concurrent", "interleaved"):
        got = job["runs"]["concurrent"] if run == "concurrent" else [
            job["runs"][f"interleaved:{k}"][0] for k in range(len(mix))]
        for model in (None, *NAMES):
            sel = [(g, refs[model][i]) for g, (m, i) in zip(got, mix) if m == model]
            rep = compare([g for g, _ in sel], [r for _, r in sel], dtype="float32", logprob_atol=ATOL)
            assert rep["passed"] and rep["first_divergences"] == [None] * N_PROMPTS, (slots, run, model, rep)


# ----------------------------------------------------------- one server: tensor parallel 2 + runtime loading

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300.0) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


@dataclass
class Server:
    url: str
    log: Path
    base_name: str


@pytest.fixture(scope="module")
def server(fx, tmp_path_factory):
    """``d2serve serve --model BASE --adapter d2=<raw D2-LoRA> --tensor-parallel-size 2 --max-loras 1`` with
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, one OpenMP thread per rank (VLLM_CPU_OMP_THREADS_BIND=0|1), and d2serve's
    folding resolver on a folder holding the raw PEFT DoRA adapter as ``dora-auto``."""
    from d2serve.serve import server_env, stop_server, wait_until_ready

    root = tmp_path_factory.mktemp("vllm_server")
    port, log = _free_port(), root / "server.log"
    (root / "resolver").mkdir()
    (root / "resolver" / "dora-auto").symlink_to(fx.raw["dora"], target_is_directory=True)
    cmd = [sys.executable, "-m", "d2serve.cli", "serve", "--model", str(fx.base), "--port", str(port),
           "--served-model-name", "base", "--adapter", f"d2={fx.raw['d2']}", "--tensor-parallel-size", "2",
           "--max-loras", "1", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--seed", "0"]
    env = server_env() | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_OMP_THREADS_BIND": "0|1",
                          "VLLM_CPU_KVCACHE_SPACE": "1", "D2SERVE_CACHE_DIR": str(root / "cache"),
                          "D2SERVE_LORA_RESOLVER_DIR": str(root / "resolver"), "VLLM_LOGGING_LEVEL": "INFO"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            waited = wait_until_ready(proc, url, timeout_s=900)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{log.read_text()[-6000:]}") from None
        print(json.dumps({"server_ready_s": waited}))
        yield Server(url, log, "base")
    finally:
        stop_server(proc)


def _complete(srv: Server, jobs: list[tuple[str, list[int]]]) -> list[dict]:
    """Send every (model, prompt ids) at once (concurrent requests); per request {"token_ids", "logprobs"}."""
    def one(job):
        model, ids = job
        status, body = _post(f"{srv.url}/v1/completions", {
            "model": model, "prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "logprobs": 1, "return_token_ids": True})
        assert status == 200, (model, status, body)
        ch = body["choices"][0]
        return {"token_ids": list(ch["token_ids"]), "logprobs": [float(x) for x in ch["logprobs"]["token_logprobs"]]}

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def _assert_serves(srv: Server, fx: Fixture, refs: dict, served: dict[str | None, str]) -> None:
    """Concurrent requests of every served name x every prompt equal the reference of the adapter behind it."""
    jobs = [(name or srv.base_name, x, key) for key, name in served.items() for x in fx.ids]
    got = _complete(srv, [(m, x) for m, x, _ in jobs])
    for key in served:
        sel = [g for g, (_, _, k) in zip(got, jobs) if k == key]
        rep = compare(sel, refs[key], dtype="float32", logprob_atol=ATOL)
        assert rep["passed"] and rep["first_divergences"] == [None] * N_PROMPTS, (key, served[key], rep)


@pytest.mark.vllm
def test_tensor_parallel_2_serves_d2lora_exactly(server, fx, refs):
    """TP=2 really ran (two worker ranks) and the D2-LoRA on all 7 projections is exact: q/k/v and gate/up are
    column-parallel (each rank's slice of s, QKV sliced per head group), o/down row-parallel (partial sums scaled
    before the all-reduce); base requests batched with it equal the plain base, with ONE slot (no spare)."""
    from safetensors.torch import load_file

    log = server.log.read_text()
    assert "Worker_TP0" in log and "Worker_TP1" in log, log[-3000:]
    scales = next((server.log.parent / "cache").glob("vllm-lora/*/d2serve_scales.safetensors"))
    assert max(float((s - 1).abs().max()) for s in load_file(str(scales)).values()) > 1e-2  # s really is not 1
    _assert_serves(server, fx, refs, {None: None, "d2": "d2"})


@pytest.mark.vllm
def test_runtime_load_unload_reload_exact(server, fx, refs):
    """POST /v1/load_lora_adapter of a folded folder serves it exactly (beside the static adapter, one slot: they
    evict each other); after unload the name is gone; another folder loaded under the same name serves the new
    adapter, and load_inplace swaps it again (same id: the slot's scales are rewritten)."""
    load = f"{server.url}/v1/load_lora_adapter"
    st, body = _post(load, {"lora_name": "rt", "lora_path": str(fx.folded["dora"])})
    assert st == 200, body
    _assert_serves(server, fx, refs, {None: None, "dora": "rt", "d2": "d2"})
    st, body = _post(f"{server.url}/v1/unload_lora_adapter", {"lora_name": "rt"})
    assert st == 200, body
    st, body = _post(f"{server.url}/v1/completions", {"model": "rt", "prompt": fx.ids[0], "max_tokens": 2})
    assert st == 404, (st, body)
    st, body = _post(load, {"lora_name": "rt", "lora_path": str(fx.folded["lora"])})
    assert st == 200, body
    _assert_serves(server, fx, refs, {"lora": "rt", None: None})
    st, body = _post(load, {"lora_name": "rt", "lora_path": str(fx.folded["dora"]), "load_inplace": True})
    assert st == 200, body
    _assert_serves(server, fx, refs, {"dora": "rt", "d2": "d2"})


@pytest.mark.vllm
def test_resolver_folds_on_first_use(server, fx, refs):
    """With D2SERVE_LORA_RESOLVER_DIR, a request for ``dora-auto`` (a raw PEFT DoRA folder there) is folded for the
    served base on first use and served exactly, beside the base and the static adapter; an unknown name is 404."""
    _assert_serves(server, fx, refs, {"dora": "dora-auto", None: None, "d2": "d2"})
    st, body = _post(f"{server.url}/v1/completions", {"model": "no-such", "prompt": fx.ids[0], "max_tokens": 2})
    assert st == 404, (st, body)


@pytest.mark.vllm
def test_runtime_load_refuses_unfolded_folders(server, fx, refs):
    """A raw D2-LoRA folder or a PEFT DoRA folder posted directly is refused with the command that folds it (never
    "Success" followed by wrong or base outputs); a missing path is vLLM's 404; the server keeps serving exactly.

    Runs last: under TP=2, vLLM 0.32's MultiprocExecutor.collective_rpc raises at the first rank's failure and leaves
    the other ranks' replies queued, so the NEXT adapter load after a refused one fails with the stale error
    (measured: a resolver load right after these refusals got "...d2 is an unfolded D2-LoRA adapter"); a refusal,
    never a wrong answer, and generation is unaffected (checked below)."""
    load = f"{server.url}/v1/load_lora_adapter"
    for name in ("d2", "dora"):
        st, body = _post(load, {"lora_name": f"raw-{name}", "lora_path": str(fx.raw[name])})
        msg = json.dumps(body)
        # vLLM's server replaces paths in error messages by "<path>" (entrypoints/serve/exception_handling)
        assert st == 500 and "d2serve export vllm-lora" in msg and "unfolded" in msg, (name, st, msg)
        st, body = _post(f"{server.url}/v1/completions", {"model": f"raw-{name}", "prompt": fx.ids[0], "max_tokens": 2})
        assert st == 404, (name, st, body)
    st, body = _post(load, {"lora_name": "missing", "lora_path": str(fx.base.parent / "no-such-adapter")})
    assert st == 404, (st, body)
    _assert_serves(server, fx, refs, {"d2": "d2"})
