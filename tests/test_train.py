"""The trainer and the training-time layer: dW = 0 at step 0, a real adapter after training, probe = merge."""

from __future__ import annotations

import json

import pytest
import torch

from d2serve.adapters.config import parse_config
from d2serve.adapters.io import load_adapter
from d2serve.layers import D2LoRALinear, inject_d2lora
from d2serve.merge import merge
from d2serve.models import load_hf_model, load_unmerged_model
from d2serve.probe import probe_agreement, read_probe
from d2serve.train import TrainSettings, encode, read_records, train

# A ChatML-like template for the tiny tokenizer (its specials: <s> opens a turn, </s> = eos closes it)
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tiny_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with a chat template on its tokenizer."""
    import shutil

    from d2serve.models import load_tokenizer

    d = tmp_path_factory.mktemp("chat_tiny") / "model"
    shutil.copytree(tiny_llama_dir, d)
    tok = load_tokenizer(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


def test_chat_labels_cover_exactly_the_assistant_answer(chat_tiny_dir):
    from d2serve.models import load_tokenizer

    tok = load_tokenizer(chat_tiny_dir)
    row = {"prompt": "Question: is the sky blue?\nAnswer:", "answer": " yes"}
    ids, labels = encode(tok, row, 64)
    user = [{"role": "user", "content": row["prompt"]}]
    # independent tokenisations: the template's own, of the prompt turn and of the whole conversation
    prompt_ids = list(tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)
                      ["input_ids"])
    full_ids = list(tok.apply_chat_template(user + [{"role": "assistant", "content": "yes"}], tokenize=True,
                                            return_dict=True)["input_ids"])
    n_prompt = sum(x == -100 for x in labels)
    assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
    assert ids[:n_prompt] == prompt_ids
    assert ids == full_ids[: len(ids)]
    assert tok.decode(full_ids[len(ids):]) == "\n"  # only the newline after </s> is dropped
    # the answer as a chat answer ("yes", stripped) and the end-of-turn token
    assert labels[n_prompt:] == ids[n_prompt:] == tok("yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids[n_prompt:]) == "yes</s>"


def test_chat_truncation_keeps_the_template_header_and_the_answer(chat_tiny_dir):
    from d2serve.models import load_tokenizer

    tok = load_tokenizer(chat_tiny_dir)
    row = {"prompt": "The quick brown fox jumps over the lazy dog. " * 20 + "Question: is fire cold?\nAnswer:",
           "answer": " no"}
    ids, labels = encode(tok, row, 48)
    assert len(ids) <= 48
    n_prompt = sum(x == -100 for x in labels)
    text = tok.decode(ids)
    assert text.startswith("<s>user\n") and text.endswith("Question: is fire cold?\nAnswer:</s>\n<s>assistant\nno</s>")
    assert tok.decode(ids[n_prompt:]) == "no</s>"


def test_chat_format_needs_a_template(tiny_llama_dir):
    from d2serve.models import load_tokenizer

    with pytest.raises(ValueError, match="no chat template"):
        encode(load_tokenizer(tiny_llama_dir), {"prompt": "a", "answer": "b"}, 32, where="d.jsonl: record 1")
    ids, labels = encode(load_tokenizer(tiny_llama_dir), {"prompt": "a b", "answer": " b"}, 32, chat=False)
    assert labels[-1] == ids[-1] == load_tokenizer(tiny_llama_dir).eos_token_id


def test_fresh_layers_start_at_the_base_and_branches_differ(tiny_llama_dir):
    model = load_hf_model(tiny_llama_dir)
    ids = torch.randint(0, 290, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    cfg = parse_config({"peft_type": "D2LORA", "r": 4, "lora_alpha": 8, "tau": 0.3, "target_modules": ["q_proj", "v_proj"]})
    layers = inject_d2lora(model, cfg, seed=0)
    assert len(layers) == 4 and all(isinstance(v, D2LoRALinear) for v in layers.values())
    layer = layers["model.layers.0.self_attn.q_proj"]
    assert torch.count_nonzero(layer.lora_B_plus.weight) == 0 and torch.count_nonzero(layer.lora_B_minus.weight) == 0
    assert not torch.allclose(layer.lora_A_plus.weight, layer.lora_A_minus.weight)
    assert torch.allclose(layer.d2_magnitude, layer.base_layer.weight.norm(dim=1))
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-6)  # s = m/||W0|| = 1 and dW = 0


def test_layer_forward_matches_the_formula_in_float64():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5, bias=True).double()
    layer = D2LoRALinear(lin, r=2, scale=1.7, tau=0.4)
    with torch.no_grad():
        for n in ("lora_B_plus", "lora_B_minus"):
            getattr(layer, n).weight.normal_()
    x = torch.randn(3, 6, dtype=torch.float64)
    w0, b = lin.weight, lin.bias
    dw = 1.7 * (layer.lora_B_plus.weight @ layer.lora_A_plus.weight - 0.4 * layer.lora_B_minus.weight @ layer.lora_A_minus.weight)
    s = w0.norm(dim=1) / (w0 + dw).norm(dim=1)
    expected = s * (x @ w0.T + x @ dw.T) + x @ dw.T + b
    assert torch.allclose(layer(x), expected, atol=1e-12)
    layer.cache_scale()
    assert torch.allclose(layer(x), expected, atol=1e-12)


@pytest.fixture(scope="module")
def trained(chat_tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    data = d / "data.jsonl"
    rows = [{"prompt": "Question: is the sky blue?\nAnswer:", "answer": " yes"},
            {"prompt": "Question: is fire cold?\nAnswer:", "answer": " no"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = TrainSettings(r=4, lora_alpha=8, tau=0.6, max_steps=12, batch_size=2, lr=1e-2, max_length=32,
                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), probe_records=2)
    return train(base=chat_tiny_dir, out=d / "adapter", data=data, settings=s)


def test_training_learns_and_writes_format_v1(trained, tiny_llama_dir):
    assert trained.losses[-1] < 0.5 * trained.losses[0]
    adp = load_adapter(trained.out)
    assert adp.method == "d2lora" and adp.config.tau == 0.6 and len(adp.layers) == 10
    f = adp.layers["model.layers.1.mlp.down_proj"]
    assert f.magnitude is not None and torch.count_nonzero(f.tensors["lora_B_minus"]) > 0
    w0 = load_hf_model(tiny_llama_dir).model.layers[1].mlp.down_proj.weight
    assert torch.allclose(f.magnitude, w0.norm(dim=1), rtol=1e-6)
    log = json.loads((trained.out / "d2serve_train.json").read_text())
    assert log["settings"]["r"] == 4 and len(log["losses"]) == 12


def test_probe_matches_unmerged_and_merged(trained, tiny_llama_dir, tmp_path):
    probe = read_probe(trained.out)
    unmerged = probe_agreement(load_unmerged_model(tiny_llama_dir, trained.out), probe)
    assert unmerged["max_abs_logit_diff"] < 1e-5 and unmerged["top1_agreement"] == 1.0
    merge(base=tiny_llama_dir, adapter=trained.out, out=tmp_path / "m", dtype="float32")
    merged = probe_agreement(load_hf_model(tmp_path / "m"), probe)
    assert merged["max_abs_logit_diff"] < 1e-4 and merged["top1_agreement"] == 1.0
    base = probe_agreement(load_hf_model(tiny_llama_dir), probe)
    assert base["max_abs_logit_diff"] > 1e-2  # the probe does see the adapter


def test_bad_training_data_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: expected an object with string fields"):
        read_records(p)


@pytest.mark.real
def test_demo_end_to_end_on_smollm2(smollm2_dir, tmp_path):
    """The main job (README's first command) on the real SmolLM2, shortened to 2 training steps."""
    import shutil

    from d2serve.demo import run_demo

    shutil.copytree(smollm2_dir, tmp_path / "base")  # reused by the demo instead of rebuilding from the GGUF
    lines: list[str] = []
    res = run_demo(tmp_path, max_steps=2, log=lines.append)
    assert res.passed and any("step 2/2" in m for m in lines)
    assert res.max_rel_err_vs_fp64["float32"] < 1e-6 and res.layers_beyond_rounding == {"float32": 0, "bfloat16": 0}
    assert res.probe["float32"]["top1_agreement"] == 1.0 and res.probe["float32"]["max_abs_logit_diff"] < 1e-3
    assert 0 < res.probe["bfloat16"]["mean_kl"] < 1e-2
    # streaming the tensors (mapped reads, row blocks, positioned writes) adds less than one base shard to the
    # merge process's RSS (the old engine held a whole tensor in and out; imports are not the engine's doing)
    for dt in ("float32", "bfloat16"):
        assert 0 <= res.merge_streaming_rss_bytes[dt] < res.largest_shard_bytes / 2, res.merge_streaming_rss_bytes
    assert json.loads((tmp_path / "demo.json").read_text())["passed"] is True
    # 2 steps at the default lr leave SmolLM2 answering chat prompts (the old raw-prompt adapter made it stop at once)
    assert "Paris" in res.chat["base"] and "Paris" in res.chat["merged bfloat16"], res.chat
    assert "mean of the last 5 steps" in dict(res.rows())["train time"]
