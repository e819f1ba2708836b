"""The embedded SmolLM2 base: a complete, ordinary HF checkpoint that answers a factual question."""

from __future__ import annotations

import json

import pytest
import torch

from d2serve.checkpoint import Checkpoint
from d2serve.models import load_hf_model, load_tokenizer


@pytest.mark.real
def test_smollm2_checkpoint_is_complete_and_answers(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True and cfg["dtype"] == "bfloat16"
    ckpt = Checkpoint(smollm2_dir)
    assert ckpt.dtype == torch.bfloat16 and "lm_head.weight" not in ckpt.tensors and len(ckpt.tensors) == 272
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (smollm2_dir / f).is_file(), f
    tok = load_tokenizer(smollm2_dir)
    model = load_hf_model(smollm2_dir, torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=None)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
