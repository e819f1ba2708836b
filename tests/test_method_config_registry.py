"""Each method's config knowledge lives on its registry entry (issue 22 item 4).

d2serve/adapters/config.py (validation, the table of fields, JSON) and d2serve/adapters/synthetic.py (random
adapters) ask the entry (d2serve.adapters.methods.Method: ``required_fields``, ``strict_fields``,
``config_fields``, ``check_config``, ``config_values``, ``synthetic_config``, ``pairs``, ``synthetic_vectors``) and
name no method. Proven two ways: no string in those modules names anything method-specific, and a new method
registered in a test (a VeRA-like toy with its own required field and vector) is validated, serialised, loaded and
synthesised with no change to either module.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import d2serve
from d2serve.adapters import methods as methods_mod
from d2serve.adapters.config import FIELDS, AdapterConfigError, field_rules, parse_config
from d2serve.adapters.methods import METHODS, Method, lora_delta, lora_merge, lora_merged

PKG = Path(d2serve.__file__).parent


def _method_specific_names() -> set[str]:
    """Every string that names a method or something only some methods have."""
    names: set[str] = set()
    for m in METHODS.values():
        names |= {m.name, m.peft_type, m.format_label, *m.config_fields, *m.factor_names, *m.file_keys}
        names |= {x for x in (m.selector, m.tau_key, m.fingerprint_key) if x}
        names |= set(m.required_fields) - {"r", "lora_alpha", "target_modules"}
    return names


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant of a module that is not a docstring."""
    tree = ast.parse(path.read_text(), str(path))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


@pytest.mark.parametrize("module", ["adapters/config.py", "adapters/synthetic.py"])
def test_config_and_synthetic_name_no_method(module):
    """Rule: no string constant outside docstrings equals, or contains as a quoted word, a method name, a
    peft_type, a format label, a selector, a method's own config field, factor or per-layer key."""
    names = _method_specific_names()
    assert {"d2lora", "dora", "lora", "D2LORA", "LORA", "use_dora", "tau", "magnitude_axis", "lora_A_plus",
            "lora_magnitude_vector", "d2_magnitude"} <= names  # the rule covers what the code used to spell
    bad = [(line, v) for line, v in _code_strings(PKG / module)
           if v in names or any(f"'{n}'" in v or f"{n} (" in v for n in names)]
    assert bad == [], f"{module} names method-specific things: {bad}"


def test_the_table_of_fields_is_the_registry_s():
    """The method rows of FIELDS come from the entries, with the formats and decisions the table had."""
    assert FIELDS["tau"].formats == ("D2LORA",) and FIELDS["magnitude_axis"].formats == ("D2LORA",)
    assert FIELDS["use_dora"].formats == ("LORA",) and FIELDS["use_dora"].off == (None, False)
    assert FIELDS["r"].formats == ("D2LORA", "LORA") and FIELDS["lora_dropout"].formats == ("LORA",)
    assert FIELDS["peft_type"].reason == "selects the format: 'D2LORA' (d2serve format v1) or 'LORA' (PEFT)"
    assert field_rules() == FIELDS


# the adapter_config.json each method wrote before the move (key order included): byte-identical JSON
_SHARED = {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"], "use_rslora": False, "rank_pattern": {},
           "alpha_pattern": {}, "modules_to_save": None, "base_model_name_or_path": None}
EXPECTED_JSON = {
    "d2lora": {"peft_type": "D2LORA", **_SHARED, "tau": 0.5, "magnitude_axis": "out"},
    "lora": {"peft_type": "LORA", **_SHARED, "use_dora": False},
    "dora": {"peft_type": "LORA", **_SHARED, "use_dora": True},
}


@pytest.mark.parametrize("method", sorted(EXPECTED_JSON))
def test_config_json_is_unchanged_and_round_trips(method):
    raw = {"peft_type": EXPECTED_JSON[method]["peft_type"], "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    raw |= {"d2lora": {"tau": 0.5}, "lora": {}, "dora": {"use_dora": True}}[method]
    cfg = parse_config(raw)
    assert cfg.method == method
    text = json.dumps(cfg.to_json_dict(), indent=2)
    assert text == json.dumps(EXPECTED_JSON[method], indent=2)
    again = parse_config(json.loads(text))
    assert again.to_json_dict() == cfg.to_json_dict() and again.method == method


# ---- a new method is one registry entry ---------------------------------------------------------------------


def _toy_problems(raw: dict) -> list[str]:
    seed = raw.get("toy_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        return [f"field 'toy_seed' must be an integer, got {seed!r}"]
    return []


TOY = Method(
    "toyvera", "TOYVERA", (("vera_A", "vera_B"),), lora_delta, lora_merged, lora_merge,
    vectors=("toy_lambda",), file_keys={"vera_A": "vera_A", "vera_B": "vera_B", "toy_lambda": "toy_lambda"},
    config_fields={"toy_seed": "the seed of the shared random projections"}, format_label="a toy format",
    strict_fields=True, required_fields=("r", "lora_alpha", "toy_seed", "target_modules"),
    check_config=_toy_problems, config_values=lambda raw: {"toy_seed": int(raw["toy_seed"])},
    synthetic_config=lambda settings: {"toy_seed": 11},
    synthetic_vectors=lambda norms, gen: {"toy_lambda": norms.float() * 0 + 0.5},
)


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(METHODS, "toyvera", TOY)
    assert methods_mod.METHODS["toyvera"] is TOY
    return TOY


def test_a_new_method_is_validated_and_serialised_through_its_entry(toy_registered):
    base = {"peft_type": "TOYVERA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    with pytest.raises(AdapterConfigError, match=r"missing required field 'toy_seed'"):
        parse_config(base)
    with pytest.raises(AdapterConfigError, match=r"field 'toy_seed' must be an integer, got 'x'"):
        parse_config(base | {"toy_seed": "x"})
    with pytest.raises(AdapterConfigError) as e:  # a strict format: an unknown key is refused, the allowed listed
        parse_config(base | {"toy_seed": 3, "tau": 0.5})
    assert "field 'tau' = 0.5 is not known to d2serve for peft_type TOYVERA (a field of peft_type D2LORA)" in str(e.value)
    assert "'toy_seed'" in str(e.value).split("allowed:")[1]
    with pytest.raises(AdapterConfigError, match=r"expected 'D2LORA' \(d2serve format v1\) or 'TOYVERA' \(a toy "
                                                 r"format\) or 'LORA' \(PEFT\)"):
        parse_config({"peft_type": "VERA"})
    cfg = parse_config(base | {"toy_seed": 3})
    assert cfg.method == "toyvera" and cfg.field_value("toy_seed") == 3 and cfg.tau is None
    assert cfg.to_json_dict()["toy_seed"] == 3
    assert parse_config(cfg.to_json_dict()).to_json_dict() == cfg.to_json_dict()
    # the shared formats keep refusing it
    with pytest.raises(AdapterConfigError, match=r"field 'toy_seed' = 3 is not known to d2serve for peft_type D2LORA"):
        parse_config({"peft_type": "D2LORA", "r": 4, "lora_alpha": 8, "tau": 0.5, "target_modules": ["q"], "toy_seed": 3})


def test_a_new_method_is_synthesised_and_loaded_through_its_entry(toy_registered, tiny_llama_dir, tmp_path):
    from d2serve.adapters.io import load_adapter
    from d2serve.adapters.synthetic import random_adapter

    out = random_adapter(tiny_llama_dir, tmp_path / "toy", method="toyvera", r=3, target_modules=("q_proj",), seed=1)
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["peft_type"] == "TOYVERA" and raw["toy_seed"] == 11 and "tau" not in raw and "use_dora" not in raw
    adp = load_adapter(out)
    assert adp.method == "toyvera" and adp.layers
    for module, f in adp.layers.items():
        out_f, in_f = f.tensors["vera_B"].shape[0], f.tensors["vera_A"].shape[1]
        assert f.tensors["vera_A"].shape == (3, in_f) and f.tensors["vera_B"].shape == (out_f, 3)
        assert f.tensors["toy_lambda"].shape == (out_f,) and bool((f.tensors["toy_lambda"] == 0.5).all())
        assert f.tensors["vera_A"].std() > 0.01, module  # random, not an identity init


def test_the_builtin_methods_synthesise_the_tensors_they_did(tiny_llama_dir, tmp_path):
    """The draw order of the random factors is the registry's pair order (A then B of each branch): the same
    tensors as before the move, for a fixed seed; DoRA's magnitude is the base row norm, perturbed."""
    import torch

    from d2serve.adapters.io import base_weight_name, load_adapter
    from d2serve.adapters.methods import row_norm
    from d2serve.adapters.synthetic import random_adapter
    from d2serve.checkpoint import Checkpoint

    ck = Checkpoint(tiny_llama_dir)
    for method, names in (("d2lora", ("lora_A_plus", "lora_B_plus", "lora_A_minus", "lora_B_minus")),
                          ("dora", ("lora_A", "lora_B")), ("lora", ("lora_A", "lora_B"))):
        adp = load_adapter(random_adapter(tiny_llama_dir, tmp_path / method, method=method, r=2,
                                          target_modules=("q_proj",), std=0.05, seed=3))
        module = sorted(adp.layers)[0]
        f = adp.layers[module]
        gen = torch.Generator().manual_seed(3)
        out_f, in_f = f.tensors[names[1]].shape[0], f.tensors[names[0]].shape[1]
        for i, n in enumerate(names):  # the first module's factors are the generator's first draws, in order
            want = torch.randn(*((2, in_f) if i % 2 == 0 else (out_f, 2)), generator=gen) * 0.05
            assert torch.equal(f.tensors[n], want), (method, n)
        norms = row_norm(ck.get_tensor(base_weight_name(module, ck)).double()).float()
        if method == "dora":
            want = norms * (1 + 0.1 * torch.randn(out_f, generator=gen)).abs()
            assert torch.equal(f.tensors["lora_magnitude_vector"], want)
        if method == "d2lora":
            assert torch.equal(f.magnitude, norms)
