"""Every bad input gets a clear error naming the file/tensor/field, writes nothing and leaves the inputs untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2serve.adapters.config import AdapterConfigError
from d2serve.adapters.io import AdapterError
from d2serve.adapters.methods import MergeMathError
from d2serve.adapters.synthetic import random_adapter
from d2serve.checkpoint import CheckpointError
from d2serve.merge import WrongBaseError, merge

from conftest import make_tiny_llama

W = "adapter_model.safetensors"
P = "base_model.model.model.layers.0.self_attn.q_proj"


def tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def adapter(tiny_llama_dir, tmp_path) -> Path:
    return random_adapter(tiny_llama_dir, tmp_path / "adapter", std=0.2, seed=11)


def edit_tensors(adapter: Path, fn) -> None:
    t = load_file(str(adapter / W))
    fn(t)
    save_file(t, str(adapter / W), metadata={"format": "pt"})


def edit_config(adapter: Path, fn) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    fn(cfg)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def expect_refused(base: Path, adapter: Path, out: Path, exc, match: str, **kw) -> None:
    """The merge raises ``exc`` matching ``match``, leaves no output or temp dir, and changes no input."""
    before = (tree_hash(base), tree_hash(adapter))
    with pytest.raises(exc, match="(?s)" + match):
        merge(base=base, adapter=adapter, out=out, **kw)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp dir left
    assert (tree_hash(base), tree_hash(adapter)) == before


@pytest.mark.parametrize("field", ["r", "lora_alpha", "tau", "target_modules"])
def test_missing_config_field(tiny_llama_dir, adapter, tmp_path, field):
    edit_config(adapter, lambda c: c.pop(field))
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", AdapterConfigError,
                   rf"adapter_config.json.*missing required field '{field}'")


def test_unknown_and_mistyped_config_fields_are_all_listed(tiny_llama_dir, adapter, tmp_path):
    def bad(c):
        c["lora_alhpa"] = 3
        c["r"] = "4"
        c["tau"] = float("nan")

    edit_config(adapter, bad)
    with pytest.raises(AdapterConfigError) as e:
        merge(base=tiny_llama_dir, adapter=adapter, out=tmp_path / "out")
    msg = str(e.value)
    assert "lora_alhpa" in msg and "field 'r' must be an integer" in msg and "'tau' must be finite" in msg


def test_adapter_tensors_matching_no_base_module(tiny_llama_dir, adapter, tmp_path):
    def rename(t):
        for k in [k for k in t if ".layers.1.self_attn.q_proj." in k]:
            t[k.replace(".layers.1.self_attn.q_proj.", ".layers.1.self_attn.qq_proj.")] = t.pop(k)

    edit_tensors(adapter, rename)
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", AdapterError,
                   r"matched 7 of 8 adapter layers.*layers\.1\.self_attn\.qq_proj \(nearest base module: "
                   r"model\.layers\.1\.self_attn\.q_proj\)")


def test_target_receiving_no_tensor(tiny_llama_dir, adapter, tmp_path):
    edit_tensors(adapter, lambda t: [t.pop(k) for k in list(t) if ".layers.1.self_attn.o_proj." in k])
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", AdapterError,
                   r"matches 8 base modules but 1 received no adapter tensors.*layers\.1\.self_attn\.o_proj")


def test_missing_minus_branch(tiny_llama_dir, adapter, tmp_path):
    edit_tensors(adapter, lambda t: [t.pop(f"{P}.lora_A_minus.weight"), t.pop(f"{P}.lora_B_minus.weight")])
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", AdapterError,
                   r"layers\.0\.self_attn\.q_proj: missing \['lora_A_minus', 'lora_B_minus'\] \(the minus branch\)")


def test_shape_mismatch_names_expected_and_got(tiny_llama_dir, adapter, tmp_path):
    def widen(t):
        for branch in ("plus", "minus"):
            t[f"{P}.lora_A_{branch}.weight"] = torch.randn(4, 65)

    edit_tensors(adapter, widen)
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", AdapterError,
                   r"q_proj\.lora_A_plus has shape \(4, 65\).*expected \(4, 64\) and \(64, 4\) for base module "
                   r"model\.layers\.0\.self_attn\.q_proj")


def test_nan_in_adapter(tiny_llama_dir, adapter, tmp_path):
    edit_tensors(adapter, lambda t: t[f"{P}.lora_B_plus.weight"].__setitem__((0, 0), float("nan")))
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", AdapterError,
                   rf"tensor {P}\.lora_B_plus\.weight has 1 NaN/Inf")


def _base_copy(tiny_llama_dir: Path, tmp_path: Path, fn) -> Path:
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    t = load_file(str(base / "model.safetensors"))
    fn(t)
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


def test_inf_in_merged_result(tiny_llama_dir, tmp_path):
    base = _base_copy(tiny_llama_dir, tmp_path, lambda t: t["model.layers.1.self_attn.v_proj.weight"].__setitem__((3, 3), float("inf")))
    ad = random_adapter(base, tmp_path / "ad", std=0.2, with_magnitude=False)
    expect_refused(base, ad, tmp_path / "out", MergeMathError, r"layers\.1\.self_attn\.v_proj.*NaN/Inf")


def test_zero_norm_row(tiny_llama_dir, tmp_path):
    base = _base_copy(tiny_llama_dir, tmp_path, lambda t: t["model.layers.0.self_attn.k_proj.weight"][5].zero_())
    ad = random_adapter(base, tmp_path / "ad", std=0.2, with_magnitude=False)
    edit_tensors(ad, lambda t: [t[f"base_model.model.model.layers.0.self_attn.k_proj.lora_B_{b}.weight"][5].zero_()
                                for b in ("plus", "minus")])
    expect_refused(base, ad, tmp_path / "out", MergeMathError, r"k_proj: 1 output row.*zero norm \(first row 5\)")


def test_fp16_overflow_on_cast(tiny_llama_dir, tmp_path):
    base = _base_copy(tiny_llama_dir, tmp_path, lambda t: t["model.layers.0.self_attn.o_proj.weight"].mul_(1e6))
    ad = random_adapter(base, tmp_path / "ad", std=0.2)
    expect_refused(base, ad, tmp_path / "out", MergeMathError, r"o_proj\.weight overflows torch\.float16", dtype="float16")


def test_wrong_base_detected_by_magnitude(tiny_llama_dir, adapter, tmp_path):
    other = make_tiny_llama(tmp_path / "other_base", seed=123)  # same shapes, other weights
    expect_refused(other, adapter, tmp_path / "out", WrongBaseError, r"d2_magnitude.*different base model")


def test_truncated_adapter_file(tiny_llama_dir, adapter, tmp_path):
    data = (adapter / W).read_bytes()
    (adapter / W).write_bytes(data[: len(data) // 2])
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", CheckpointError, r"adapter_model\.safetensors: truncated")


def test_non_safetensors_file(tiny_llama_dir, adapter, tmp_path):
    (adapter / W).write_text("this is not a tensor file at all, just text" * 10)
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", CheckpointError, r"not a safetensors file")


def test_truncated_base_shard(tiny_llama_dir, adapter, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:-1000])
    expect_refused(base, adapter, tmp_path / "out", CheckpointError, r"model\.safetensors: truncated")


def test_pickle_adapter_is_never_unpickled(tiny_llama_dir, adapter, tmp_path, monkeypatch):
    torch.save(load_file(str(adapter / W)), adapter / "adapter_model.bin")
    (adapter / W).unlink()

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", CheckpointError,
                   r"only pickle weights \['adapter_model\.bin'\].*never unpickles")


def test_non_empty_output_needs_overwrite(tiny_llama_dir, adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="replaced only with overwrite"):
        merge(base=tiny_llama_dir, adapter=adapter, out=out)
    assert (out / "keep.txt").read_text() == "user data"
    merge(base=tiny_llama_dir, adapter=adapter, out=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_output_inside_an_input_is_refused(tiny_llama_dir, adapter):
    with pytest.raises(ValueError, match="overlaps the input"):
        merge(base=tiny_llama_dir, adapter=adapter, out=tiny_llama_dir / "merged")


def test_cli_exit_code_2_and_message(tiny_llama_dir, adapter, tmp_path):
    from typer.testing import CliRunner

    from d2serve.cli import app

    edit_config(adapter, lambda c: c.pop("tau"))
    res = CliRunner().invoke(app, ["merge", "--base", str(tiny_llama_dir), "--adapter", str(adapter),
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "missing required field 'tau'" in res.output
    assert not (tmp_path / "out").exists()


def _rewrite_header(path: Path, fn) -> None:
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.__setitem__("model.layers.0.self_attn.q_proj.weight", 5), r"malformed header entry for tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'"),
    (lambda h: h["model.layers.0.mlp.down_proj.weight"].__setitem__("shape", [-64, -96]), r"malformed header entry"),
    (lambda h: h["model.layers.0.mlp.up_proj.weight"].__setitem__("data_offsets", h["model.layers.0.mlp.gate_proj.weight"]["data_offsets"]), r"overlaps the previous tensor"),
], ids=["entry-not-object", "negative-shape", "overlapping-ranges"])
def test_malformed_base_header(tiny_llama_dir, adapter, tmp_path, edit, match):
    base = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, base)
    _rewrite_header(base / "model.safetensors", edit)
    expect_refused(base, adapter, tmp_path / "out", CheckpointError, match)


def test_duplicated_tensor_across_shards_and_bad_index(tiny_llama_dir, adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(base, max_shard_size="100KB")
    shards = sorted(base.glob("model-*.safetensors"))
    first = load_file(str(shards[0]))
    last = load_file(str(shards[-1]))
    name = next(iter(last))
    first[name] = torch.zeros_like(last[name])
    save_file(first, str(shards[0]), metadata={"format": "pt"})
    expect_refused(base, adapter, tmp_path / "out", CheckpointError, rf"tensor {name} is stored in both")
    (base / "model.safetensors.index.json").write_text('{"weight_map": {"a": 5}}')
    expect_refused(base, adapter, tmp_path / "out", CheckpointError, r"'weight_map' must map tensor names")


def test_invalid_pattern_regex_and_unselected_layers(tiny_llama_dir, adapter, tmp_path):
    edit_config(adapter, lambda c: c.__setitem__("rank_pattern", {"q_proj(": 4}))
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", AdapterConfigError, r"rank_pattern' key 'q_proj\(' is not a valid regex")
    edit_config(adapter, lambda c: (c.__setitem__("rank_pattern", {}), c.__setitem__("target_modules", ["q_proj"])))
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", AdapterError, r"6 adapter layers are not selected by target_modules")


def test_one_dimensional_factor(tiny_llama_dir, adapter, tmp_path):
    edit_tensors(adapter, lambda t: t.__setitem__(f"{P}.lora_A_plus.weight", t[f"{P}.lora_A_plus.weight"].reshape(-1)))
    expect_refused(tiny_llama_dir, adapter, tmp_path / "out", AdapterError, r"factors must be 2-D matrices, got lora_A_plus \(256,\)")


def test_bf16_stored_fingerprint_is_not_a_false_wrong_base(tiny_llama_dir, adapter, tmp_path):
    edit_tensors(adapter, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    merge(base=tiny_llama_dir, adapter=adapter, out=tmp_path / "out")


def test_output_path_that_is_a_file_or_a_symlink_loop(tiny_llama_dir, adapter, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a directory"):
        merge(base=tiny_llama_dir, adapter=adapter, out=f, overwrite=True)
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    with pytest.raises(ValueError, match="cannot resolve the output path"):
        merge(base=tiny_llama_dir, adapter=adapter, out=tmp_path / "loopA")


def test_diverging_training_writes_nothing(tiny_llama_dir, tmp_path):
    from d2serve.train import TrainSettings, train

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Question: is fire cold?", "answer": " no"}) + "\n")
    with pytest.raises(FloatingPointError, match="training diverged"):
        train(base=tiny_llama_dir, out=tmp_path / "ad", data=data,
              settings=TrainSettings(r=2, max_steps=3, batch_size=1, lr=1e30, max_length=16, chat_template=False))
    assert not (tmp_path / "ad").exists()
    with pytest.raises(ValueError, match=r"lr=inf"):
        train(base=tiny_llama_dir, out=tmp_path / "ad", data=data, settings=TrainSettings(lr=float("inf")))
    data.write_text(json.dumps({"prompt": "", "answer": ""}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl: record 1: field 'answer' is empty"):
        train(base=tiny_llama_dir, out=tmp_path / "ad", data=data, settings=TrainSettings(r=2, max_steps=1))


def test_non_utf8_training_data_names_the_file(tmp_path):
    from d2serve.train import read_records

    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"prompt": "caf\xe9", "answer": " yes"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl: not UTF-8 text"):
        read_records(p)
