"""The ONNX Runtime GenAI backend: base and merged arms exported with the ORT-GenAI model builder (fp32, CPU).

The export reuses ``d2serve.export.onnx_genai.build_genai`` (the builder run as a subprocess) into a
temporary directory per arm; generation uses ``og.Generator`` token by token, so TTFT and every
inter-token latency are timed directly. The eval-throughput workload is not run on this backend.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from d2serve.errors import InputError

from ..arms import ArmSpec
from ..timing import now
from ..workloads import GenerationCase, prompt_ids
from .protocol import Backend

ARMS_SUPPORTED = ("base", "merged")


class OnnxGenAIBackend(Backend):
    """Runs base and merged as ORT-GenAI models with identical builder settings."""

    name = "onnx"
    arms_supported = ARMS_SUPPORTED
    supports_eval = False

    def __init__(self, *, dtype, device: str, tokenizer_dir):
        from transformers import AutoTokenizer

        if str(dtype) != "torch.float32":
            raise InputError("the onnx backend exports fp32 models; use dtype float32")
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self.models: dict = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="d2serve-bench-onnx-"))

    def settings(self) -> dict:
        """Backend settings recorded per arm."""
        import importlib.metadata as md

        return {
            "backend": "onnx",
            "dtype": "float32",
            "device": "cpu",
            "onnxruntime_genai": md.version("onnxruntime-genai"),
            "builder_precision": "fp32",
            "execution_provider": "cpu",
        }

    def load(self, spec: ArmSpec) -> dict:
        """Export the arm's checkpoint with the ORT-GenAI builder and open it."""
        from d2serve.export.onnx_genai import build_genai, open_genai_model

        cfg = json.loads((spec.model_dir / "config.json").read_text())
        out = self._tmp / spec.name
        t0 = now()
        info = build_genai(spec.model_dir, out, "fp32", bool(cfg.get("tie_word_embeddings")), self._tmp / f"{spec.name}.log")
        self.models[spec.name] = open_genai_model(out)
        return {"load_s": now() - t0, "export_s": info.get("export_s")}

    def unload(self, arm: str) -> None:
        """Drop an arm's model."""
        self.models.pop(arm, None)

    def close(self) -> None:
        """Delete the temporary exports."""
        self.models.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def prompts(self, case: GenerationCase) -> list[list[int]]:
        """The token ids every arm receives for ``case``."""
        return prompt_ids(self.tokenizer, case.prompt_len, case.batch)

    def generate_once(self, arm: str, case: GenerationCase) -> dict:
        """Greedy generation of exactly ``case.max_new_tokens`` tokens per row (min_length = max_length)."""
        import onnxruntime_genai as og

        model = self.models[arm]
        ids = np.asarray(self.prompts(case), dtype=np.int32)
        total = case.prompt_len + case.max_new_tokens
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=total, min_length=total, do_sample=False, num_beams=1, batch_size=case.batch
        )
        gen = og.Generator(model, params)
        t0 = now()
        gen.append_tokens(ids)
        times = []
        while not gen.is_done():
            gen.generate_next_token()
            gen.get_next_tokens()
            times.append(now())
        return {
            "ttft_s": times[0] - t0,
            "e2e_s": times[-1] - t0,
            "itl_s": [b - a for a, b in zip(times, times[1:])],
            "new_tokens": len(times),
        }

    def kv_cache_check(self, arm: str, case: GenerationCase) -> dict:
        """ORT-GenAI decoders built by the model builder always carry a KV cache (past_key_values inputs)."""
        cfg = json.loads((self._tmp / arm / "genai_config.json").read_text())
        inputs = cfg.get("model", {}).get("decoder", {}).get("inputs", {})
        has = any("past" in str(k) or "past" in str(v) for k, v in inputs.items())
        return {"past_key_values_returned": has, "kv_cache_in_use": has}
