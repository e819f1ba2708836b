"""``d2serve bench serve --endpoint NAME=URL[#MODEL]``: spec parsing, the fairness record from /v1/models,
/version and /metrics (a loopback stub server, fast), the refusal of endpoints whose exposed settings differ, and a
real run (marked vllm) against one `d2serve serve --adapter` server on loopback holding the base and the adapter."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import make_vllm_tiny_llama
from d2serve.bench.comparability import NotComparableError
from d2serve.bench.endpoints import bench_endpoints, compare_endpoints, parse_endpoints, probe_endpoint
from d2serve.bench.online import OnlinePlan
from d2serve.errors import InputError

METRICS = """# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="False",engine="0",""" \
    """gpu_memory_utilization="0.9",num_gpu_blocks="%d"} 1.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7e9
"""


def _stub(models: list[dict], blocks: int = 100, version: str | None = "0.32.0"):
    """A loopback HTTP server answering /v1/models, /version (unless None) and /metrics like vLLM's."""

    class H(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = {"/v1/models": json.dumps({"object": "list", "data": models}),
                    "/metrics": METRICS % blocks}.get(self.path)
            if self.path == "/version" and version:
                body = json.dumps({"version": version})
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write((body or "").encode())

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def test_parse_endpoints():
    arms = parse_endpoints(["base=http://127.0.0.1:8000", "unmerged=http://127.0.0.1:8001/#my-lora"])
    assert [(a.name, a.url, a.model) for a in arms] == [("base", "http://127.0.0.1:8000", None),
                                                        ("unmerged", "http://127.0.0.1:8001", "my-lora")]
    for bad, msg in ((["x"], "NAME=URL"), (["a=http://h:1", "a=http://h:2"], "twice"),
                     (["a=ftp://h:1"], "http"), (["a=http://h:1/v1"], "without /v1"), ([], "no --endpoint")):
        with pytest.raises(InputError, match=msg):
            parse_endpoints(bad)


def test_probe_records_models_version_and_cache_config():
    srv, url = _stub([{"id": "d2serve-base", "root": "/m/base", "parent": None, "max_model_len": 256},
                      {"id": "lora-a", "root": "/m/a", "parent": "d2serve-base"}])  # vLLM's LoRA card: no length
    try:
        with pytest.raises(InputError, match="name the one"):
            probe_endpoint(parse_endpoints([f"x={url}"])[0])
        with pytest.raises(InputError, match="does not serve model 'nope'"):
            probe_endpoint(parse_endpoints([f"x={url}#nope"])[0])
        arm, rec = probe_endpoint(parse_endpoints([f"unmerged={url}#lora-a"])[0])
    finally:
        srv.shutdown()
        srv.server_close()
    assert arm.served_model_name == "lora-a" and rec["max_model_len"] == 256 and rec["vllm_version"] == "0.32.0"
    assert rec["max_model_len_from"] == "parent d2serve-base"
    assert rec["cache_config"] == {"block_size": "16", "cache_dtype": "auto", "enable_prefix_caching": "False",
                                   "gpu_memory_utilization": "0.9", "num_gpu_blocks": "100"}
    assert rec["lora_info"]["max_lora"] == "2" and rec["not_exposed"] == []
    assert [m["id"] for m in rec["models"]] == ["d2serve-base", "lora-a"]
    with pytest.raises(InputError, match="answered nothing"):
        probe_endpoint(parse_endpoints([f"x={url}"])[0])  # stopped: nothing answers


@pytest.mark.extras
def test_endpoints_whose_settings_differ_are_refused_before_any_load(tmp_path):
    """Different KV cache sizes and a missing /version: refused with the difference named (strict); what could
    not be compared is listed."""
    a, ua = _stub([{"id": "m", "max_model_len": 256}], blocks=100)
    b, ub = _stub([{"id": "m", "max_model_len": 256}], blocks=50, version=None)
    try:
        recs = {n: probe_endpoint(parse_endpoints([f"{n}={u}"])[0])[1] for n, u in (("base", ua), ("merged", ub))}
        diffs, unchecked = compare_endpoints(recs)
        assert diffs == ["cache_config.num_gpu_blocks: base=100, merged=50"]
        assert unchecked == ["vllm_version (not exposed by merged)"]
        with pytest.raises(NotComparableError, match="num_gpu_blocks"):
            bench_endpoints(endpoints=[f"base={ua}", f"merged={ub}"], tokenizer=tmp_path, report=tmp_path / "r",
                            plan=OnlinePlan(request_rates=(1.0,), concurrencies=(), num_prompts=2))
    finally:
        a.shutdown()
        b.shutdown()
    assert not (tmp_path / "r").exists()


@pytest.mark.vllm
def test_endpoint_run_against_a_running_d2serve_serve(tmp_path):
    """One `d2serve serve --adapter` on loopback (base + the D2-LoRA served unmerged): two arms on the same
    server (base=URL#d2serve-base, unmerged=URL#d2lora), every request does exactly the planned work, the fairness
    record holds the served names and max_model_len, and the report says what was not checked."""
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.bench.online import Server, free_port

    base = make_vllm_tiny_llama(tmp_path / "base", max_position_embeddings=256)
    adapter = random_adapter(base, tmp_path / "d2", method="d2lora", r=4, lora_alpha=8.0, std=0.1, seed=1,
                             target_modules=("q_proj", "v_proj", "o_proj"))
    import os
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "d2serve.cli", "serve", "--model", str(base), "--host", "127.0.0.1", "--port",
            str(port), "--served-model-name", "d2serve-base", "--adapter", f"d2lora={adapter}", "--dtype", "float32",
            "--max-model-len", "128", "--max-num-seqs", "4", "--enforce-eager"]
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    plan = OnlinePlan(request_rates=(4.0,), concurrencies=(2,), num_prompts=4, input_len=16, output_len=4,
                      repeats=1, warmups=1)
    with Server(argv, env, tmp_path / "server.log") as srv:
        srv.wait_healthy(url, 600)
        res = bench_endpoints(endpoints=[f"base={url}#d2serve-base", f"unmerged={url}#d2lora"], tokenizer=base,
                              report=tmp_path / "rep", plan=plan)
    assert res["status"] == "complete" and res["comparability"]["comparable"], res["comparability"]
    for arm in ("base", "unmerged"):
        st = res["arms"][arm]
        assert st["max_model_len"] == 128 and st["vllm_version"] == res["arms"]["base"]["vllm_version"]
        assert (st["cache_config"] or {}).get("block_size") or "/metrics vllm:cache_config_info" in st["not_exposed"]
        assert {m["id"] for m in st["models"]} == {"d2serve-base", "d2lora"}
        for key in ("rate_4", "concurrency_2"):
            (r,) = res["points"][arm][key]["repeats"]
            assert r["completed"] == 4 and r["failed"] == 0 and r["total_output_tokens"] == 16
    assert any("parallel" in x for x in res["fairness"]["not_checked"])
    md = (tmp_path / "rep" / "online.md").read_text()
    assert "Endpoints (already running" in md and "Not checked" in md and "d2lora" in md
