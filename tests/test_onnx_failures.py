"""ONNX exports that fail or are killed: a clean exit 2 naming the architecture and step; no builder outlives d2serve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.onnx


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "d2serve.cli", *map(str, args)]


class _DataDependent(torch.nn.Module):
    """A 'causal LM' whose forward branches on tensor values: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"vocab_size": 11, "architectures": ["DataDependentForCausalLM"],
                                       "max_position_embeddings": 64})()
        self.emb = torch.nn.Embedding(11, 4)
        self.head = torch.nn.Linear(4, 11)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        h = self.emb(input_ids)
        if h.sum() > 0:  # data-dependent control flow
            h = h * 2
        return type("Out", (), {"logits": self.head(h)})()


def test_untraceable_model_raises_input_error_naming_architecture_and_step(tmp_path):
    from d2serve.errors import InputError
    from d2serve.export.onnx_plain import export_plain

    with pytest.raises(InputError) as ei:
        export_plain(_DataDependent().eval(), tmp_path)
    msg = str(ei.value)
    assert msg.startswith("DataDependentForCausalLM: the plain ONNX export failed in torch.export"), msg
    assert "\n" not in msg and "nothing was written" in msg
    assert list(tmp_path.iterdir()) == []


def _tiny_phi3_longrope(out: Path) -> Path:
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    tok = make_tiny_tokenizer()
    head_dim = 16
    cfg = Phi3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, original_max_position_embeddings=64,
        rope_scaling={"rope_type": "longrope", "type": "longrope", "short_factor": [1.0] * (head_dim // 2),
                      "long_factor": [2.0] * (head_dim // 2)},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_phi3_longrope_plain_export_exits_2_and_leaves_nothing(tmp_path):
    merged = _tiny_phi3_longrope(tmp_path / "phi3")
    out = tmp_path / "onnx"
    r = subprocess.run(_cli("export", "onnx", "--merged", merged, "--out", out, "--target", "plain"),
                       capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"})
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "Phi3ForCausalLM: the plain ONNX export failed in torch.export" in err, err[-2000:]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx.")]


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, cmdline) of the live children of ``pid`` (zombies excluded)."""
    kids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, ValueError):
            continue
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux-only")
def test_builder_dies_with_a_sigkilled_parent(tiny_llama_dir, tmp_path):
    from d2serve.outdir import clean_stale

    out = tmp_path / "genai"
    parent = subprocess.Popen(_cli("export", "onnx", "--merged", tiny_llama_dir, "--out", out, "--target", "genai"),
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    builder = None
    t0 = time.monotonic()
    try:
        while builder is None:
            assert parent.poll() is None, f"export exited ({parent.returncode}) before the builder was seen"
            assert time.monotonic() - t0 < 300, "the builder never started"
            builder = next((p for p, cmd in _children(parent.pid) if "onnxruntime_genai.models.builder" in cmd), None)
            time.sleep(0.05)
        assert _alive(builder)
        parent.send_signal(signal.SIGKILL)  # no Python cleanup runs in the parent
        parent.wait(timeout=10)
        t1 = time.monotonic()
        while _alive(builder) and time.monotonic() - t1 < 5:
            time.sleep(0.05)
        assert not _alive(builder), f"builder {builder} still running 5 s after its parent was killed"
    finally:
        if parent.poll() is None:
            parent.kill()
        if builder is not None and _alive(builder):
            os.kill(builder, signal.SIGKILL)
    assert not out.exists()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".genai.")]
    assert left, "the killed run's temporary output should be there to clean"
    assert sorted(clean_stale(out)) == sorted(left)  # the next run on the same out removes it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".genai.")]


def _tiny_gemma_head_dim_12(out: Path) -> Path:
    """A tiny random Gemma (hidden 48, 4 heads of head_dim 12): transformers runs it, ORT's GQA kernel cannot."""
    from transformers import GemmaConfig, GemmaForCausalLM, GenerationConfig

    tok = make_tiny_tokenizer()
    cfg = GemmaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GemmaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_genai_head_dim_not_multiple_of_8_exits_2_up_front_and_leaves_nothing(tmp_path):
    """head_dim 12: refused before the builder runs (exit 2, architecture, head_dim and requirement named)."""
    merged = _tiny_gemma_head_dim_12(tmp_path / "gemma")
    out = tmp_path / "onnx"
    t0 = time.perf_counter()
    r = subprocess.run(_cli("export", "onnx", "--merged", merged, "--out", out, "--target", "genai"),
                       capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"})
    err = " ".join(r.stderr.split())
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "GemmaForCausalLM has head_dim 12" in err and "multiple of 8" in err, err[-2000:]
    assert "building the ORT-GenAI decoder" not in r.stdout + r.stderr  # refused before the builder
    assert time.perf_counter() - t0 < 120
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".onnx.")]


def test_genai_head_dim_12_really_fails_in_onnxruntime(tmp_path, monkeypatch):
    """The limit is ORT's, not d2serve's: with the up-front check bypassed, the built decoder fails in ONNX Runtime
    ("head_size must be a multiple of 8") and the failed export leaves nothing behind."""
    from d2serve.export import onnx_genai
    from d2serve.export.onnx import export_onnx

    merged = _tiny_gemma_head_dim_12(tmp_path / "gemma")
    out = tmp_path / "onnx"
    monkeypatch.setattr(onnx_genai, "check_genai_limits", lambda config, where: None)
    with pytest.raises(Exception, match="multiple of 8"):
        export_onnx(merged=merged, out=out, target="genai", max_new_tokens=8)
    assert not out.exists()


def test_check_genai_limits_head_dim_rule():
    """head_dim from the config, else hidden_size // num_attention_heads; multiples of 8 pass."""
    from d2serve.export.onnx_files import OnnxExportError
    from d2serve.export.onnx_genai import check_genai_limits

    check_genai_limits({"hidden_size": 64, "num_attention_heads": 4, "model_type": "llama"}, "m")  # 16
    check_genai_limits({"hidden_size": 48, "num_attention_heads": 4, "head_dim": 16}, "m")
    with pytest.raises(OnnxExportError, match=r"m: LlamaForCausalLM has head_dim 12; .*multiple of 8"):
        check_genai_limits({"hidden_size": 48, "num_attention_heads": 4, "architectures": ["LlamaForCausalLM"]}, "m")
