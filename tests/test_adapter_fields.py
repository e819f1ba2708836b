"""Every adapter-config field is honoured exactly (checked against PEFT) or refused by name; several adapters;
the base fingerprint in the manifest; a zero row of W0.

Accepted cases compare d2serve's merged checkpoint with PEFT itself: weights with PEFT's merge_and_unload
(float32, 1e-6) and logits with PEFT's unmerged model (float32, 1e-4), and count the tensors that changed so a
merge that drops a layer (or adapts one too many) cannot pass. Refused cases pin the message (field + reason)
and check that nothing is written and no input changes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from d2serve.adapters.config import FIELDS, IGNORED, IMPLEMENTED, REFUSED, AdapterConfigError, parse_config
from d2serve.adapters.io import AdapterError
from d2serve.adapters.methods import MergeMathError
from d2serve.adapters.synthetic import random_adapter
from d2serve.merge import MANIFEST_NAME, WrongBaseError, merge
from d2serve.models import load_hf_model

from test_bad_inputs import expect_refused

WEIGHTS_ATOL = 1e-6
LOGITS_ATOL = 1e-4
IDS = torch.randint(0, 290, (2, 9), generator=torch.Generator().manual_seed(4))


def peft_adapter(base: Path, out: Path, *, seed: int = 7, **kw) -> Path:
    """A PEFT LoRA/DoRA adapter on the tiny Llama with random, non-zero factors, saved by PEFT itself."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    pm = get_peft_model(load_hf_model(base), LoraConfig(r=4, lora_alpha=10, init_lora_weights=False, **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.1)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


def edit_config(adapter: Path, **changes) -> None:
    p = adapter / "adapter_config.json"
    p.write_text(json.dumps(json.loads(p.read_text()) | changes))


def assert_merges_like_peft(base: Path, adapter: Path, out: Path, n_changed: int, n_saved: int = 0) -> dict:
    """d2serve's merge vs PEFT: weights vs merge_and_unload, logits vs the unmerged PEFT model; returns the manifest.

    ``n_changed`` tensors differ from the base, ``n_saved`` of them replaced by ``modules_to_save``.
    """
    from peft import PeftModel

    res = merge(base=base, adapter=adapter, out=out, dtype="float32")
    ours = load_file(str(out / "model.safetensors"))
    orig = load_file(str(base / "model.safetensors"))
    unmerged = PeftModel.from_pretrained(load_hf_model(base), str(adapter)).eval()
    with torch.no_grad():
        ref_logits = unmerged(IDS).logits
        merged_logits = load_hf_model(out)(IDS).logits
    ref = unmerged.merge_and_unload().state_dict()
    changed = []
    for k, v in ours.items():
        diff = float((v - ref[k]).abs().max())
        assert diff <= WEIGHTS_ATOL, (k, diff)
        if not torch.equal(v, orig[k]):
            changed.append(k)
    assert len(changed) == n_changed, changed
    diff = float((merged_logits - ref_logits).abs().max())
    assert diff <= LOGITS_ATOL, diff
    assert res.manifest["num_layers_merged"] == n_changed - n_saved
    return res.manifest


# ---- the table of fields ---------------------------------------------------------------------------------


def test_every_field_of_the_installed_peft_lora_config_is_decided():
    """A PEFT upgrade that adds a field fails here until the field is put in FIELDS (implemented/ignored/refused)."""
    from peft import LoraConfig

    names = {f.name for f in dataclasses.fields(LoraConfig)}
    assert names - set(FIELDS) == set()
    assert {r.kind for r in FIELDS.values()} == {IMPLEMENTED, IGNORED, REFUSED}
    for name, rule in FIELDS.items():
        assert rule.reason, name


def test_peft_default_config_is_accepted_and_its_inert_fields_listed():
    """PEFT's own serialisation of a default LoraConfig: every field at its default is accepted."""
    from peft import LoraConfig

    raw = json.loads(json.dumps(LoraConfig(r=4, target_modules=["q_proj"]).to_dict(), default=sorted))
    cfg = parse_config(raw)
    assert cfg.method == "lora" and cfg.target_modules == ("q_proj",)
    assert {"lora_dropout", "init_lora_weights", "megatron_config", "use_qalora"} <= set(cfg.ignored_fields)
    assert not {"r", "lora_alpha", "target_modules"} & set(cfg.ignored_fields)


SELECTIONS = [  # (config fields, number of modules PEFT selects on the tiny Llama)
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}, 2),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}, 2),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1], "layers_pattern": ["h", "layers"]}, 4),
    ({"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": "blocks"}, 0),
    ({"target_modules": ["model.layers.0.self_attn.q_proj", "k_proj"], "layers_to_transform": [1]}, 2),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": []}, 4),
    ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.0.self_attn.v_proj"]}, 3),
    ({"target_modules": ["q_proj", "v_proj", "proj"], "exclude_modules": ["v_proj", "o_proj"]}, 2),
    ({"target_modules": r".*\.(q|v|down)_proj", "exclude_modules": r".*layers\.0\.self_attn\.v_proj"}, 5),
    ({"target_modules": r".*(q_proj|lm_head|embed_tokens)", "modules_to_save": ["lm_head"]}, 3),
    ({"target_modules": ["self_attn", "q_proj", "up_proj"], "modules_to_save": ["self_attn"]}, 2),
]


@pytest.mark.parametrize("kw,n", SELECTIONS, ids=range(len(SELECTIONS)))
def test_module_selection_is_peft_check_target_module_exists(tiny_llama_dir, kw, n):
    """AdapterConfig.targets against PEFT's own function on every module name of the tiny Llama."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [n for n, _ in load_hf_model(tiny_llama_dir).named_modules() if n]
    peft_cfg = LoraConfig(r=2, **kw)
    ours = parse_config({"peft_type": "LORA", "r": 2, "lora_alpha": 8, **kw})
    expected = [m for m in names if check_target_module_exists(peft_cfg, m) is True
                or isinstance(check_target_module_exists(peft_cfg, m), re.Match)]
    assert [m for m in names if ours.targets(m)] == expected
    assert len(expected) == n


ACCEPTED = {  # name: (PEFT LoraConfig kwargs, tensors changed in the merged checkpoint[, of them modules_to_save])
    "layers_to_transform": ({"layers_to_transform": [1]}, 2),
    "layers_to_transform_int_with_pattern": ({"layers_to_transform": 0, "layers_pattern": "layers"}, 2),
    "exclude_modules_list": ({"exclude_modules": ["model.layers.0.self_attn.v_proj"]}, 3),
    "exclude_modules_regex": ({"exclude_modules": r".*layers\.1\.self_attn\.q_proj"}, 3),
    "regex_target_with_exclude": ({"target_modules": r".*\.(q|v|down)_proj", "exclude_modules": ["down_proj"]}, 4),
    "modules_to_save_excluded_from_targets": (
        {"target_modules": r".*(q_proj|lm_head)", "modules_to_save": ["lm_head"]}, 3, 1),
    "dora_layers_to_transform": ({"use_dora": True, "layers_to_transform": [0]}, 2),
    "rslora_exclude_rank_pattern": (
        {"use_rslora": True, "exclude_modules": ["model.layers.1.self_attn.v_proj"], "rank_pattern": {"q_proj": 2},
         "alpha_pattern": {"layers.0.self_attn.v_proj": 3}}, 3),
    "inert_fields_non_default": ({"lora_dropout": 0.2, "inference_mode": True, "task_type": "CAUSAL_LM"}, 4),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_fields_merge_exactly_like_peft(tiny_llama_dir, tmp_path, case):
    kw, *counts = ACCEPTED[case]
    ad = peft_adapter(tiny_llama_dir, tmp_path / "ad", **kw)
    manifest = assert_merges_like_peft(tiny_llama_dir, ad, tmp_path / "m", *counts)
    assert manifest["base_fingerprint"]["status"] == "absent" and manifest["stacked_on"] is None


def test_fan_in_fan_out_true_on_linear_is_ignored_like_peft(tiny_llama_dir, tmp_path):
    """PEFT resets fan_in_fan_out to false on nn.Linear; a config saying true must merge the same."""
    ad = peft_adapter(tiny_llama_dir, tmp_path / "ad")
    edit_config(ad, fan_in_fan_out=True, init_lora_weights="gaussian", eva_config=None)
    manifest = assert_merges_like_peft(tiny_llama_dir, ad, tmp_path / "m", 4)
    assert {"fan_in_fan_out", "init_lora_weights"} <= set(manifest["ignored_config_fields"])


REFUSED_CASES = {  # config edit -> (field, words of the reason)
    "pissa": ({"init_lora_weights": "pissa"}, "init_lora_weights", "rewrites the base weight"),
    "pissa_niter": ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights", "rewrites the base weight"),
    "olora": ({"init_lora_weights": "olora"}, "init_lora_weights", "rewrites the base weight"),
    "loftq": ({"init_lora_weights": "loftq"}, "init_lora_weights", "quantised base"),
    "mica": ({"init_lora_weights": "mica"}, "init_lora_weights", "variant layer"),
    "lora_bias": ({"lora_bias": True}, "lora_bias", "bias on lora_B"),
    "qalora": ({"use_qalora": True}, "use_qalora", "group-pooled inputs"),
    "trainable_tokens": ({"trainable_token_indices": [1, 2]}, "trainable_token_indices", "embedding rows"),
    "alora": ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens", "only after the invocation"),
    "arrow": ({"arrow_config": {"top_k": 2}}, "arrow_config", "Arrow routing"),
    "velora": ({"velora_config": {"num_groups": 2}}, "velora_config", "LoRA variant"),
    "kasa": ({"kasa_config": {}}, "kasa_config", "LoRA variant"),
    "bdlora": ({"use_bdlora": {"nblocks": 2}}, "use_bdlora", "LoRA variant"),
    "layer_replication": ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication", "duplicates decoder layers"),
    "target_parameters": ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters", "nn.Parameters"),
    "megatron": ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config", "Megatron"),
    "unknown_new_field": ({"lora_future_scale": 2.0}, "lora_future_scale", "not known to d2serve"),
    "all_linear": ({"target_modules": "all-linear"}, "target_modules", "explicit list of module names"),
    "layers_pattern_without_indices": ({"layers_pattern": "layers", "layers_to_transform": None},
                                       "layers_pattern", "'layers_to_transform' is not"),
    "tau_in_a_peft_file": ({"tau": 0.5}, "tau", "peft_type D2LORA"),
}


@pytest.fixture(scope="module")
def qv_adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    return peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("qv") / "ad")


@pytest.mark.parametrize("case", list(REFUSED_CASES))
def test_refused_fields_name_field_and_reason(tiny_llama_dir, qv_adapter, tmp_path, case):
    edit, field, reason = REFUSED_CASES[case]
    ad = tmp_path / "ad"
    ad.mkdir()
    for p in qv_adapter.iterdir():
        (ad / p.name).write_bytes(p.read_bytes())
    edit_config(ad, **edit)
    expect_refused(tiny_llama_dir, ad, tmp_path / "out", AdapterConfigError,
                   rf"adapter_config\.json.*field '{field}'.*{re.escape(reason)}")


def test_unknown_field_at_unset_value_is_accepted_and_listed(tiny_llama_dir, qv_adapter, tmp_path):
    ad = tmp_path / "ad"
    ad.mkdir()
    for p in qv_adapter.iterdir():
        (ad / p.name).write_bytes(p.read_bytes())
    edit_config(ad, lora_future_config=None, use_future_trick=False)
    manifest = assert_merges_like_peft(tiny_llama_dir, ad, tmp_path / "m", 4)
    assert {"lora_future_config", "use_future_trick"} <= set(manifest["ignored_config_fields"])


def test_stored_bias_tensors_are_refused_by_the_bias_field(tiny_llama_dir, qv_adapter, tmp_path):
    ad = tmp_path / "ad"
    ad.mkdir()
    for p in qv_adapter.iterdir():
        (ad / p.name).write_bytes(p.read_bytes())
    edit_config(ad, bias="lora_only")
    t = load_file(str(ad / "adapter_model.safetensors"))
    t["base_model.model.model.layers.0.self_attn.q_proj.bias"] = torch.randn(64)
    save_file(t, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    expect_refused(tiny_llama_dir, ad, tmp_path / "out", AdapterError,
                   r"q_proj\.bias' is a trained bias \(field 'bias' is 'lora_only'\)")


def test_bias_all_without_bias_tensors_merges_like_peft(tiny_llama_dir, tmp_path):
    ad = peft_adapter(tiny_llama_dir, tmp_path / "ad", bias="all")  # the tiny Llama has no biases to train
    assert_merges_like_peft(tiny_llama_dir, ad, tmp_path / "m", 4)


def test_d2lora_honours_layers_to_transform_and_exclude(tiny_llama_dir, tmp_path):
    """D2LORA files take the same selection fields; the merged model equals d2serve's unmerged forward."""
    from d2serve.models import load_unmerged_model

    full = random_adapter(tiny_llama_dir, tmp_path / "full", target_modules=("q_proj", "v_proj"), std=0.2, seed=2)
    ad = tmp_path / "ad"
    ad.mkdir()
    cfg = json.loads((full / "adapter_config.json").read_text())
    cfg |= {"layers_to_transform": [1], "exclude_modules": ["v_proj"]}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(str(full / "adapter_model.safetensors"))
    keep = {k: v for k, v in t.items() if ".layers.1.self_attn.q_proj." in k}
    save_file(keep, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    res = merge(base=tiny_llama_dir, adapter=ad, out=tmp_path / "m", dtype="float32")
    assert list(res.manifest["layers"]) == ["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        diff = (load_hf_model(tmp_path / "m")(IDS).logits - load_unmerged_model(tiny_llama_dir, ad)(IDS).logits)
    assert float(diff.abs().max()) <= LOGITS_ATOL
    cfg["layers_to_transform"] = [0, 1]  # now layer 0's q_proj is selected but has no tensors: refused
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    expect_refused(tiny_llama_dir, ad, tmp_path / "out2", AdapterError,
                   r"1 received no adapter tensors.*model\.layers\.0\.self_attn\.q_proj")


# ---- several adapters ---------------------------------------------------------------------------------------


def test_cli_refuses_a_repeated_adapter_option(tiny_llama_dir, qv_adapter, tmp_path):
    from d2serve.cli import app

    res = CliRunner().invoke(app, ["merge", "--base", str(tiny_llama_dir), "--adapter", str(qv_adapter),
                                   "--adapter", str(qv_adapter), "--out", str(tmp_path / "m")])
    assert res.exit_code == 2, res.output
    assert "--adapter was given 2 times" in " ".join(res.output.split()).replace("│ ", "").replace(" │", "")
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def merged_once(tiny_llama_dir, qv_adapter, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged_once") / "m"
    merge(base=tiny_llama_dir, adapter=qv_adapter, out=out, dtype="float32")
    return out


@pytest.mark.parametrize("method", ["d2lora", "dora"])
def test_norm_reading_method_without_fingerprint_on_a_merged_base_is_refused(merged_once, tmp_path, method):
    ad = random_adapter(merged_once, tmp_path / "ad", method=method, std=0.2, with_magnitude=False)
    expect_refused(merged_once, ad, tmp_path / "out", WrongBaseError,
                   rf"is itself a d2serve merge output.*method {method} takes row norms.*8 of 8 adapter layers"
                   r".*order of the merges")


def test_plain_lora_on_a_merged_base_is_allowed_and_recorded(merged_once, tmp_path):
    ad = peft_adapter(merged_once, tmp_path / "ad2", seed=9, target_modules=["k_proj", "q_proj"])
    manifest = assert_merges_like_peft(merged_once, ad, tmp_path / "m2", 4)
    assert manifest["stacked_on"]["method"] == "lora" and "merges commute" in manifest["stacked_on"]["why_allowed"]
    assert json.loads((tmp_path / "m2" / MANIFEST_NAME).read_text())["stacked_on"] == manifest["stacked_on"]


def test_d2lora_fingerprint_decides_on_a_merged_base(tiny_llama_dir, merged_once, tmp_path):
    trained_on_original = random_adapter(tiny_llama_dir, tmp_path / "orig", std=0.2, seed=1)
    expect_refused(merged_once, trained_on_original, tmp_path / "out", WrongBaseError, r"different base model")
    trained_on_merged = random_adapter(merged_once, tmp_path / "on_merged", std=0.2, seed=1)
    res = merge(base=merged_once, adapter=trained_on_merged, out=tmp_path / "m", dtype="float32")
    assert res.manifest["stacked_on"]["why_allowed"] == "fingerprint matched on every layer"
    assert res.manifest["base_fingerprint"]["status"] == "matched"


# ---- base fingerprint in the manifest; zero rows of W0 --------------------------------------------------------


def test_manifest_says_whether_the_fingerprint_was_checked(tiny_llama_dir, qv_adapter, tmp_path):
    with_fp = random_adapter(tiny_llama_dir, tmp_path / "fp", std=0.2, seed=3)
    fp = merge(base=tiny_llama_dir, adapter=with_fp, out=tmp_path / "m1").manifest["base_fingerprint"]
    assert fp["status"] == "matched" and fp["checked"] and fp["layers_checked"] == 8 and fp["layers_without"] == 0
    assert 0 <= fp["max_rel_row_diff"] < 1e-6  # the fingerprint was computed from this very base
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_bytes((with_fp / "adapter_config.json").read_bytes())
    t = load_file(str(with_fp / "adapter_model.safetensors"))
    t.pop("base_model.model.model.layers.0.self_attn.k_proj.d2_magnitude")
    save_file(t, str(partial / "adapter_model.safetensors"), metadata={"format": "pt"})
    fp = merge(base=tiny_llama_dir, adapter=partial, out=tmp_path / "m2").manifest["base_fingerprint"]
    assert fp["status"] == "partial" and fp["layers_checked"] == 7 and fp["layers_without"] == 1
    no_fp = random_adapter(tiny_llama_dir, tmp_path / "nofp", std=0.2, with_magnitude=False)
    fp = merge(base=tiny_llama_dir, adapter=no_fp, out=tmp_path / "m3").manifest["base_fingerprint"]
    assert fp["status"] == "absent" and not fp["checked"] and fp["supported"]
    fp = merge(base=tiny_llama_dir, adapter=qv_adapter, out=tmp_path / "m4").manifest["base_fingerprint"]
    assert fp["status"] == "absent" and not fp["supported"] and fp["key"] is None


def _base_with_zero_row(src: Path, out: Path, module: str, row: int) -> Path:
    out.mkdir()
    for p in src.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    t = load_file(str(out / "model.safetensors"))
    t[f"{module}.weight"][row].zero_()
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_zero_row_of_w0_is_refused_naming_module_and_row(tiny_llama_dir, tmp_path, monkeypatch):
    import d2serve.merge_blocks as merge_mod

    mod = "model.layers.1.self_attn.o_proj"
    base = _base_with_zero_row(tiny_llama_dir, tmp_path / "base", mod, 37)
    with_fp = random_adapter(base, tmp_path / "fp", std=0.2)  # its fingerprint row 37 is 0
    expect_refused(base, with_fp, tmp_path / "out", AdapterError,
                   rf"module {re.escape(mod)}: d2_magnitude row 37 is 0 .*zero row of the training base's W0")
    no_fp = random_adapter(base, tmp_path / "nofp", std=0.2, with_magnitude=False)
    monkeypatch.setattr(merge_mod, "ROW_BLOCK_ELEMENTS", 64 * 8)  # 8 rows per block: row 37 is in the 5th block
    expect_refused(base, no_fp, tmp_path / "out", MergeMathError,
                   rf"{re.escape(mod)}: 1 output row\(s\) of W0 have zero norm \(first row 37\)")


def test_the_format_doc_lists_every_field_with_its_decision():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "adapter-format.md").read_text()
    for name, rule in FIELDS.items():
        assert re.search(rf"^\| `{name}` \| [A-Z/0-9]+ \| {rule.kind}", doc, re.M), name
