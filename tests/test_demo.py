"""The demo pipeline (train through the chat template -> merge -> check -> chat answer) on a tiny chat Llama."""

from __future__ import annotations

import json
import shutil

import torch

from d2serve.demo import CHAT_PROMPT, chat_answer, run_demo
from d2serve.models import load_hf_model, load_tokenizer
from d2serve.verify.tasks import TASKS

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_demo_on_a_tiny_chat_model(tiny_llama_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)  # reused by the demo instead of writing SmolLM2
    tok = load_tokenizer(base)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    lines: list[str] = []
    res = run_demo(tmp_path, max_steps=3, log=lines.append)
    assert res.passed and res.train_steps == 3 and any("step 3/3" in m for m in lines)
    log = json.loads((tmp_path / "adapter" / "d2serve_train.json").read_text())
    assert res.final_loss == sum(log["losses"][-3:]) / 3 and res.first_loss == log["losses"][0]  # mean of last <=5
    rows = dict(res.rows())
    assert "mean of the last 5 steps" in rows["train time"] and "3 steps" in rows["train time"]
    # the chat answer shown is the merged model's own greedy answer through the chat template
    merged = load_hf_model(tmp_path / "merged-bfloat16", torch.float32)
    assert res.chat["prompt"] == CHAT_PROMPT
    assert res.chat["merged bfloat16"] == chat_answer(merged, tok)
    assert res.chat["base"] == chat_answer(load_hf_model(base, torch.float32), tok)
    assert f"{CHAT_PROMPT!r} -> " in rows["chat answer (merged bfloat16)"]
    # the task check: base vs merged accuracy on held-out items, with how often each answers "yes"
    from d2serve.verify.data import resolve_data_dir
    from d2serve.verify.tasks import hf_lm, score_tasks

    assert set(res.tasks) == {"boolq_chat", "arc_easy"}
    direct = score_tasks(hf_lm(merged, tok, 8), ("boolq_chat",), resolve_data_dir(None), 40)["boolq_chat"]
    t = res.tasks["boolq_chat"]
    assert t["n"] == 40 and t["acc_merged"] == direct.acc and t["pred_yes_merged"] == sum(direct.predictions)
    assert t["gold_yes"] == sum(d["label"] for d in TASKS["boolq"].loader(resolve_data_dir(None))[:40])
    assert "boolq_chat accuracy, 40 held-out items" in rows
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["passed"] is True and saved["final_loss_mean_last5"] == res.final_loss and saved["chat"] == res.chat


def test_chat_answer_is_greedy_generation_after_the_generation_prompt(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    tok.chat_template = CHAT_TEMPLATE
    model = load_hf_model(tiny_llama_dir, torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    x = torch.tensor([list(ids)])
    with torch.no_grad():  # independent greedy loop
        for _ in range(5):
            nxt = model(input_ids=x).logits[0, -1].argmax()
            x = torch.cat([x, nxt.view(1, 1)], 1)
            if int(nxt) == tok.eos_token_id:
                break
    expected = tok.decode(x[0, len(ids):], skip_special_tokens=True).strip()
    assert chat_answer(model, tok, "hi", max_new_tokens=5) == expected
