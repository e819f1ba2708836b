"""Conformance matrix (issue 9): every real adapter on every supported architecture merges exactly, or is refused by name.

Cells are (architecture x adapter feature). Adapters are built with PEFT itself (random non-zero lora_B; DoRA
magnitudes perturbed away from ||W0||) or with d2serve's random D2-LoRA adapters. Oracles:

* PEFT adapters: PEFT's unmerged model, ``PeftModel.from_pretrained`` on the float32 base;
* D2-LoRA adapters: d2serve's unmerged forward (``load_unmerged_model``, d2serve/layers.py).

A cell expected to merge must exit 0 and the merged checkpoint, read by transformers in float32, must give
logits within ``ATOL`` of the oracle, while the base differs from the oracle by more than ``MARGIN`` (so the
check cannot pass vacuously). A cell expected to be refused must raise an ``InputError`` whose message names
the offending tensor/field, and leave no output behind. Expected values are what d2serve SHOULD do, not what
it does today; docs/compatibility.md is the user-facing copy of this matrix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from archs import ARCHS, Bases, copy_checkpoint, edit_config, load_model, logits
from d2serve.errors import InputError
from d2serve.merge import merge

ATOL = 1e-4  # float32 logits, merged vs unmerged oracle
MARGIN = 1e-2  # the base must differ from the oracle by more than this (100 x ATOL)
EXACT = "exact"


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> Bases:
    """Tiny random checkpoints of every architecture, built on first use and shared by the session."""
    return Bases(tmp_path_factory.mktemp("conformance_bases"))


# ------------------------------------------------------------------------------------------- adapters


def peft_adapter(bases: Bases, arch: str, out: Path, seed: int = 7, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter saved by PEFT, with every trainable tensor random and non-trivial.

    lora_B (zero at PEFT's default init) is redrawn N(0, 0.1); DoRA magnitudes are scaled by (1 + 0.1 N(0,1))
    so they differ from ||W0 + dW||; modules_to_save copies get N(0, 0.1) added.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=10, init_lora_weights=False, **lora_kwargs)
    pm = get_peft_model(bases.model(arch), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_(0, 0.1)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            elif "modules_to_save" in n:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(out)
    return out


def peft_oracle(bases: Bases, arch: str, adapter: Path) -> torch.Tensor:
    """PEFT's unmerged float32 logits of ``adapter`` applied to the base of ``arch``."""
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(bases.model(arch), str(adapter), is_trainable=False).eval())


def d2lora_oracle(bases: Bases, arch: str, adapter: Path) -> torch.Tensor:
    """d2serve's unmerged D2-LoRA forward (float32) on the base of ``arch``."""
    from d2serve.models import load_unmerged_model

    return logits(load_unmerged_model(bases.dir(arch), adapter))


def _targets(arch) -> list[str]:
    return list(arch.attn)


# feature -> (PEFT LoraConfig kwargs built from the Arch, or "d2lora..." for a D2-LoRA adapter)
FEATURES = {
    "lora": lambda a: dict(target_modules=_targets(a)),
    "dora": lambda a: dict(target_modules=_targets(a), use_dora=True),
    "rslora": lambda a: dict(target_modules=_targets(a), use_rslora=True),
    "rank_alpha_pattern": lambda a: dict(target_modules=_targets(a), rank_pattern={a.attn[0]: 2},
                                         alpha_pattern={a.attn[-1]: 3}),
    "all_linear": lambda a: dict(target_modules="all-linear"),
    "regex_targets": lambda a: dict(target_modules=rf".*\.1\.({re.escape(a.q)}|{re.escape(a.v)})"),
    "layers_to_transform": lambda a: dict(target_modules=[a.q, a.v], layers_to_transform=[1]),
    "exclude_modules": lambda a: dict(target_modules=[a.q, a.v],
                                      exclude_modules=[f"{a.layer_prefix.format(i=0)}.{a.v}"]),
    "modules_to_save_embed": lambda a: dict(target_modules=[a.q], modules_to_save=[a.embed]),
    "modules_to_save_lm_head": lambda a: dict(target_modules=[a.q], modules_to_save=["lm_head"]),
    "lm_head_lora": lambda a: dict(target_modules=[a.q, "lm_head"]),
    "dora_lm_head": lambda a: dict(target_modules=[a.q, "lm_head"], use_dora=True),
    "embedding_lora": lambda a: dict(target_modules=[a.embed, a.q]),
    "embedding_dora": lambda a: dict(target_modules=[a.embed, a.q], use_dora=True),
    "lora_bias": lambda a: dict(target_modules=[a.q, a.v], lora_bias=True),
    "trainable_tokens": lambda a: dict(target_modules=[a.q], trainable_token_indices=[3, 5, 7]),
    "moe_target_parameters": lambda a: dict(target_modules=[a.q], target_parameters=["mlp.experts.gate_up_proj"]),
    "d2lora": "d2lora",
    "d2lora_lm_head": "d2lora_lm_head",
}

_EMBED_PATH = {"wte": "transformer.wte", "embed_tokens": "model.embed_tokens"}


def expected(arch_name: str, feature: str):
    """The RIGHT outcome of a cell: EXACT, or a regex the refusal message must match (naming the tensor/field)."""
    arch = ARCHS[arch_name]
    if feature == "embedding_dora":  # PEFT's DoRA on nn.Embedding: not merged; the module and the reason are named
        return rf"(?s)method dora is merged on linear and conv1d layers only.*{re.escape(_EMBED_PATH[arch.embed])} " \
               r"\(an embedding layer"
    if feature == "lora_bias":  # PEFT lora_bias adds a bias the base layer does not have
        return r"lora_bias|lora_B\.bias"
    if feature == "trainable_tokens":  # PEFT TrainableTokens (sparse embedding rows): not merged by d2serve
        return r"trainable_token"
    if feature == "moe_target_parameters":  # LoRA on 3-D expert parameters (PEFT ParamWrapper): not nn.Linear
        return r"target_parameters|mlp\.experts\.lora_A"
    return EXACT


FULL = [f for f in FEATURES if f != "moe_target_parameters"]
CORE = ["lora", "dora", "rslora", "rank_alpha_pattern", "all_linear", "regex_targets", "layers_to_transform",
        "exclude_modules", "modules_to_save_embed", "lm_head_lora", "d2lora"]
CELLS_BY_ARCH = {
    "llama": FULL,
    "llama_tied": FULL,
    "qwen2_tied": CORE + ["modules_to_save_lm_head", "dora_lm_head", "d2lora_lm_head"],
    "mistral": CORE,
    "gemma_tied": CORE + ["modules_to_save_lm_head", "embedding_lora", "d2lora_lm_head"],
    "phi3": CORE,
    "gpt2_tied": [f for f in CORE if f != "d2lora"] + ["modules_to_save_lm_head", "embedding_lora"],  # no D2-LoRA
    "qwen2_moe": CORE + ["moe_target_parameters"],
}
CELLS = [(a, f) for a, fs in CELLS_BY_ARCH.items() for f in fs]


def make_adapter(bases: Bases, arch_name: str, feature: str, out: Path) -> tuple[Path, callable]:
    """Build the cell's adapter; return it and its oracle function."""
    from d2serve.adapters.synthetic import random_adapter

    arch = ARCHS[arch_name]
    spec = FEATURES[feature]
    if spec == "d2lora":
        return random_adapter(bases.dir(arch_name), out, target_modules=arch.d2lora_targets, std=0.2, seed=3,
                              lora_alpha=6.0, tau=0.7), d2lora_oracle
    if spec == "d2lora_lm_head":
        return random_adapter(bases.dir(arch_name), out, target_modules=(arch.q, "lm_head"), std=0.2, seed=4,
                              lora_alpha=6.0, tau=0.7), d2lora_oracle
    return peft_adapter(bases, arch_name, out, **spec(arch)), peft_oracle


def assert_exact(bases: Bases, arch: str, adapter: Path, oracle_fn, merged: Path) -> None:
    """Merged (transformers float32) vs oracle within ATOL; base vs oracle beyond MARGIN."""
    oracle = oracle_fn(bases, arch, adapter)
    base = logits(bases.model(arch))
    got = logits(load_model(merged))
    gap = float((base - oracle).abs().max())
    diff = float((got - oracle).abs().max())
    assert torch.isfinite(got).all() and torch.isfinite(oracle).all()
    assert gap > MARGIN, f"the adapter barely changes the logits ({gap:.3g}); the cell would be vacuous"
    assert diff < ATOL, f"merged vs unmerged oracle: max abs logit diff {diff:.3g} (base vs oracle {gap:.3g})"


def assert_refused(call, pattern: str, out: Path) -> None:
    """``call()`` raises an InputError matching ``pattern`` and leaves no output (nor a temp dir) behind."""
    with pytest.raises(InputError, match=pattern):
        call()
    assert not out.exists(), f"{out} was written by a refused merge"
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp dir left behind"


# ------------------------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize(("arch", "feature"), CELLS, ids=[f"{a}-{f}" for a, f in CELLS])
def test_cell(bases, tmp_path, arch, feature):
    exp = expected(arch, feature)
    adapter, oracle_fn = make_adapter(bases, arch, feature, tmp_path / "adapter")
    out = tmp_path / "merged"
    if exp == EXACT:
        res = merge(base=bases.dir(arch), adapter=adapter, out=out, dtype="float32")
        assert res.manifest["output_dtype"] == "float32"
        assert_exact(bases, arch, adapter, oracle_fn, out)
    else:
        assert_refused(lambda: merge(base=bases.dir(arch), adapter=adapter, out=out, dtype="float32"), exp, out)


# ------------------------------------------------------------------------------------------- known faults (issue 9)


def test_config_without_tie_key_is_untied_llama(bases, tmp_path):
    """A Llama config with no ``tie_word_embeddings`` key is untied (LlamaConfig's default), not tied."""
    base = copy_checkpoint(bases.dir("llama"), tmp_path / "base")
    edit_config(base, tie_word_embeddings=None)
    assert load_model(base).config.tie_word_embeddings is False
    ad = peft_adapter(bases, "llama", tmp_path / "ad", target_modules=["q_proj", "lm_head"],
                      modules_to_save=["embed_tokens"])
    merge(base=base, adapter=ad, out=tmp_path / "m", dtype="float32")
    assert_exact(bases, "llama", ad, peft_oracle, tmp_path / "m")


def test_gpt2_conv1d_with_fan_in_fan_out_false_in_config(bases, tmp_path):
    """GPT-2 attn.c_proj (square Conv1D, weight stored (in, out)) with ``fan_in_fan_out: false`` in the config.

    PEFT forces fan_in_fan_out for Conv1D whatever the config says; the merge must use the base's layout
    (the transpose of the delta), else a square layer merges silently wrong.
    """
    ad = peft_adapter(bases, "gpt2_tied", tmp_path / "ad", target_modules=["attn.c_proj"])
    cfg_path = ad / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fan_in_fan_out"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    merge(base=bases.dir("gpt2_tied"), adapter=ad, out=tmp_path / "m", dtype="float32")
    assert_exact(bases, "gpt2_tied", ad, peft_oracle, tmp_path / "m")


def _with_tensor_edit(src: Path, dst: Path, fn) -> Path:
    base = copy_checkpoint(src, dst)
    t = load_file(str(base / "model.safetensors"))
    fn(t)
    save_file(t, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


def test_float16_overflow_of_an_untouched_tensor_is_refused(bases, tmp_path):
    """A float32 base whose (non-adapted) final norm holds 1e5: a float16 merge would write inf; refuse by name."""
    def big_norm(t):
        t["model.norm.weight"][3] = 1e5

    base = _with_tensor_edit(bases.dir("llama"), tmp_path / "base", big_norm)
    ad = peft_adapter(bases, "llama", tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "m"
    assert_refused(lambda: merge(base=base, adapter=ad, out=out, dtype="float16"),
                   r"(?s)(model\.norm\.weight.*float16|float16.*model\.norm\.weight)", out)
    merge(base=base, adapter=ad, out=tmp_path / "ok", dtype="bfloat16")  # representable: merges


def test_base_missing_a_non_adapted_tensor_is_refused(bases, tmp_path):
    """A base without a tensor the architecture needs (not adapted) is refused by name, before any output."""
    def drop(t):
        del t["model.layers.1.post_attention_layernorm.weight"]

    base = _with_tensor_edit(bases.dir("llama"), tmp_path / "base", drop)
    ad = peft_adapter(bases, "llama", tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "m"
    assert_refused(lambda: merge(base=base, adapter=ad, out=out, dtype="float32"),
                   re.escape("model.layers.1.post_attention_layernorm.weight"), out)


def test_peft_dir_with_two_adapters_is_refused(bases, tmp_path):
    """PEFT's save_pretrained of two adapters writes the second into a sub-directory: which one to merge is
    ambiguous, so the directory is refused naming the other adapter (pass its sub-directory instead)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(bases.model("llama"), LoraConfig(r=4, lora_alpha=10, target_modules=["q_proj"],
                                                         init_lora_weights=False))
    pm.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    assert (tmp_path / "ad" / "second" / "adapter_config.json").is_file()
    out = tmp_path / "m"
    assert_refused(lambda: merge(base=bases.dir("llama"), adapter=tmp_path / "ad", out=out), r"second", out)


@pytest.mark.parametrize(("arch", "feature"), [("llama_tied", "modules_to_save_lm_head"),
                                               ("gemma_tied", "embedding_lora"), ("qwen2_moe", "all_linear")])
def test_weight_check_agrees_with_the_merge(bases, tmp_path, arch, feature):
    """verify's weight check (float64 recomputation, tie semantics from tie_plan) passes on cells made exact for
    issue 9, with no tensor reported changed or missing, and the merged file's tie matches the plan."""
    from d2serve.adapters.io import load_adapter
    from d2serve.verify.weights import check_weights

    ad, _ = make_adapter(bases, arch, feature, tmp_path / "ad")
    res = merge(base=bases.dir(arch), adapter=ad, out=tmp_path / "m", dtype="float32")
    rep = check_weights(str(bases.dir(arch)), load_adapter(ad), str(tmp_path / "m"))
    assert rep.layers and all(e.passed for e in rep.layers)
    assert rep.untouched_changed == [] and rep.missing_in_merged == []
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert res.manifest["untied_embeddings"] is ARCHS[arch].tied
    assert cfg.get("tie_word_embeddings", False) is False
    if ARCHS[arch].tied:  # untied: lm_head stored beside the embedding
        t = load_file(str(tmp_path / "m" / "model.safetensors"))
        emb = load_file(str(bases.dir(arch) / "model.safetensors"))["model.embed_tokens.weight"]
        if feature == "modules_to_save_lm_head":  # lm_head = the saved copy, embedding unchanged
            assert torch.equal(t["model.embed_tokens.weight"], emb) and not torch.equal(t["lm_head.weight"], emb)
        else:  # embedding LoRA: lm_head = the original embedding, embedding merged
            assert torch.equal(t["lm_head.weight"], emb) and not torch.equal(t["model.embed_tokens.weight"], emb)


def test_d2lora_modules_to_save_lm_head_on_tied_base_unmerged_agrees(bases, tmp_path):
    """D2-LoRA with ``modules_to_save=["lm_head"]`` on a tied base: d2serve's unmerged model (the oracle of
    D2-LoRA cells) unties like PEFT (saved lm_head for the output, original embedding for the input), and the
    merge equals it."""
    from d2serve.adapters.synthetic import random_adapter

    ad = random_adapter(bases.dir("llama_tied"), tmp_path / "ad", target_modules=("q_proj",), std=0.2, seed=5,
                        lora_alpha=6.0, tau=0.7)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (ad / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    t = load_file(str(ad / "adapter_model.safetensors"))
    emb = load_file(str(bases.dir("llama_tied") / "model.safetensors"))["model.embed_tokens.weight"]
    head = emb + 0.1 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(2))
    t["base_model.model.lm_head.modules_to_save.default.weight"] = head
    save_file(t, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})

    from d2serve.models import load_unmerged_model

    unmerged = load_unmerged_model(bases.dir("llama_tied"), ad)
    assert torch.equal(unmerged.get_output_embeddings().weight, head)
    assert torch.equal(unmerged.get_input_embeddings().weight, emb)
    merge(base=bases.dir("llama_tied"), adapter=ad, out=tmp_path / "m", dtype="float32")
    assert_exact(bases, "llama_tied", ad, d2lora_oracle, tmp_path / "m")


# ------------------------------------------------------------------------------------------- the CLI


def _cli(*args):
    from typer.testing import CliRunner

    from d2serve.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_exact_cells_exit_0(bases, tmp_path):
    for arch, feature in [("qwen2_tied", "lm_head_lora"), ("phi3", "dora")]:
        ad, oracle_fn = make_adapter(bases, arch, feature, tmp_path / f"{arch}-ad")
        out = tmp_path / f"{arch}-m"
        r = _cli("merge", "--base", bases.dir(arch), "--adapter", ad, "--out", out, "--dtype", "float32")
        assert r.exit_code == 0, r.output
        assert_exact(bases, arch, ad, oracle_fn, out)


def test_cli_refusals_exit_2_and_write_nothing(bases, tmp_path):
    ad = peft_adapter(bases, "llama", tmp_path / "emb", **FEATURES["embedding_dora"](ARCHS["llama"]))
    out = tmp_path / "m1"
    r = _cli("merge", "--base", bases.dir("llama"), "--adapter", ad, "--out", out)
    assert r.exit_code == 2, r.output
    assert "model.embed_tokens" in r.output and not out.exists()

    def big_norm(t):
        t["model.norm.weight"][0] = 1e5

    base = _with_tensor_edit(bases.dir("llama"), tmp_path / "big", big_norm)
    ad = peft_adapter(bases, "llama", tmp_path / "qv", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "m2"
    r = _cli("merge", "--base", base, "--adapter", ad, "--out", out, "--dtype", "float16")
    assert r.exit_code == 2, r.output
    assert "model.norm.weight" in r.output and not out.exists()
