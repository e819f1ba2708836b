"""d2serve's vLLM plugin against the installed vLLM: every patch point where compat.py says it is, upstream
sources unchanged, steps aside on an unknown vLLM, and its re-implemented/wrapped methods on mocked layers.

These tests need vLLM importable but start no engine; ``scripts/check_vllm_compat.sh VENV`` runs them against
another vLLM release (e.g. the CUDA ``vllm`` 0.33 wheel, which imports on a CPU machine).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.vllm  # vllm is pinned: a missing vllm fails these tests instead of skipping them

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "d2serve" / "vllm_plugin" / "patches.py"
PATCH_MODULES = (PATCHES, REPO / "d2serve" / "vllm_plugin" / "logits.py")  # every plugin module that patches vLLM


@pytest.fixture(scope="module")
def v():
    """The vLLM objects the plugin uses, with the plugin's patches installed in this test process."""
    import vllm

    from d2serve.vllm_plugin import compat, patches

    assert compat.problems(vllm.__version__) == []
    patches.install()
    return compat.load()


def test_installed_vllm_sources_match_a_checked_release():
    """Fails when the upstream source of any patched method changes: re-read it, then record the new hash."""
    import vllm

    from d2serve.vllm_plugin import compat

    found = compat.fingerprint()
    assert vllm.__version__ in compat.CHECKED, f"vLLM {vllm.__version__} was never checked; fingerprint: {found}"
    assert found == compat.CHECKED[vllm.__version__], {k: v for k, v in found.items()
                                                       if compat.CHECKED[vllm.__version__][k] != v}
    assert compat.problems(vllm.__version__) == []


def test_patches_touch_vllm_only_through_compat():
    """No vLLM import in the plugin's modules but compat.py, and every ``Class.method = ...`` the patching modules
    assign is a listed PatchPoint (together they assign exactly the PatchPoints)."""
    from d2serve.vllm_plugin import compat

    for module in sorted(PATCHES.parent.glob("*.py")):
        if module.name == "compat.py":
            continue
        imports = [n for n in ast.walk(ast.parse(module.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        vllm_imports = [ast.unparse(n) for n in imports
                        if any(a.name.split(".")[0] == "vllm" for a in getattr(n, "names", []))
                        or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "vllm")]
        assert vllm_imports == [], (module.name, vllm_imports)
    tree = ast.Module(body=[n for f in PATCH_MODULES for n in ast.parse(f.read_text()).body], type_ignores=[])
    assigned = {f"{t.value.id}.{t.attr}" for n in ast.walk(tree) if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                and t.value.id in compat.IMPORTS}
    assert assigned == {p.key for p in compat.PATCH_POINTS}
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "_v"}
    assert used <= set(compat.IMPORTS), used - set(compat.IMPORTS)
    for p in compat.PATCH_POINTS:
        assert p.how in ("wrapped", "re-implemented")


def test_changed_upstream_source_is_named_and_blocks_install(monkeypatch):
    import vllm

    from d2serve.vllm_plugin import compat

    table = dict(compat.CHECKED[vllm.__version__])
    table["BaseLinearLayerWithLoRA._apply_sync"] = ("0" * 16, table["BaseLinearLayerWithLoRA._apply_sync"][1])
    monkeypatch.setattr(compat, "CHECKED", {vllm.__version__: table})
    found = compat.problems(vllm.__version__)
    assert len(found) == 1 and "BaseLinearLayerWithLoRA._apply_sync" in found[0], found
    monkeypatch.setitem(compat.ATTRIBUTES_READ, "LoRAModelManager", ("lora_slots", "no_such_attribute"))
    assert any("'no_such_attribute'" in p for p in compat.problems(vllm.__version__))
    assert compat.series("0.33.0") == "0.33" and compat.series("0.32.1.dev3+gabc") == "0.32"
    assert compat.series("0.40.0") is None and compat.series("unknown") is None


_STEP_ASIDE = r"""
import json, sys
import vllm
vllm.__version__ = "0.40.0"
from vllm.lora.peft_helper import PEFTHelper
orig_validate, orig_from_dir = PEFTHelper._validate_features, PEFTHelper.from_local_dir
import d2serve.vllm_plugin as plugin
from vllm.plugins import load_general_plugins
load_general_plugins()   # what vLLM runs in every process it starts: calls d2serve's register()
plugin.register()        # idempotent: no second warning
helper = PEFTHelper.from_local_dir(sys.argv[1], 512)
print(json.dumps({"stepped_aside": plugin.stepped_aside,
                  "unpatched": PEFTHelper._validate_features is orig_validate
                               and PEFTHelper.from_local_dir == orig_from_dir,
                  "errors": helper._validate_features()}))
"""


def test_unsupported_vllm_version_steps_aside_and_vllm_refuses_the_folder(tiny_llama_dir, tiny_d2lora_adapter,
                                                                          tmp_path):
    """vLLM faked to 0.40.0: register() logs one warning and patches nothing, so vLLM keeps working as shipped,
    and a d2serve-folded D2-LoRA folder is refused by vLLM's own DoRA check (never served as a plain LoRA)."""
    from d2serve.export.vllm_lora import export_vllm_lora
    from d2serve.vllm_plugin import compat

    folder = tmp_path / "vl"
    export_vllm_lora(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, out=folder)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    res = subprocess.run([sys.executable, "-c", _STEP_ASIDE, str(folder)], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert "vLLM 0.40.0 is not a supported release" in out["stepped_aside"], out
    assert out["unpatched"], out
    assert compat.DORA_REFUSAL in out["errors"], out
    assert res.stderr.count("d2serve's vLLM plugin is not active") == 1, res.stderr[-3000:]


# --------------------------------------------------------------------------- mocked layers, real plugin code


def _linear_layer(v, width: int, slots: int):
    """A BaseLinearLayerWithLoRA instance without vLLM's constructor (no distributed state): just the
    attributes the plugin reads."""
    layer = v.BaseLinearLayerWithLoRA.__new__(v.BaseLinearLayerWithLoRA)
    torch.nn.Module.__init__(layer)
    layer.output_slices, layer.tp_size, layer.n_slices = (width,), 1, 1
    layer.d2_scale_stacked = torch.ones(slots + 1, width)
    layer.reset_lora = lambda index: None
    return layer


def test_apply_sync_reimplementation_scales_base_rows_per_token_slot(v):
    """y = s[slot(token)] * (x W0^T) + b + LoRA(x), with s = 1 for tokens without an adapter (index -1)."""
    g = torch.Generator().manual_seed(0)
    tokens, n_in, n_out = 7, 6, 5
    w0, lora_w = torch.randn(n_out, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
    bias, x = torch.randn(n_out, generator=g), torch.randn(tokens, n_in, generator=g)
    s = torch.rand(3, n_out, generator=g) + 0.5
    s[-1] = 1.0
    idx = torch.tensor([0, 1, -1, 1, 0, -1, 1])
    quant = SimpleNamespace(apply=lambda layer, inp, b: (inp @ w0.T) if b is None else pytest.fail("bias passed"))
    layer = SimpleNamespace(_get_quant_method=lambda: quant, base_layer=object(), d2_scale_stacked=s,
                            punica_wrapper=SimpleNamespace(token_lora_indices=idx),
                            _apply_lora_to_output=lambda inp, out: out + inp @ lora_w.T)
    y = v.BaseLinearLayerWithLoRA._apply_sync(layer, x, bias)
    xd, s64 = x.double(), s.double()
    ref = s64[idx] * (xd @ w0.double().T) + bias.double() + xd @ lora_w.double().T
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=0)
    assert not torch.allclose(y.double(), xd @ w0.double().T + bias.double() + xd @ lora_w.double().T, atol=1e-2)
    y_padded = v.BaseLinearLayerWithLoRA._apply_sync(layer, torch.cat([x, x[:2]]), bias)  # graph padding: s = 1
    pad_ref = xd[:2] @ w0.double().T + bias.double() + xd[:2] @ lora_w.double().T
    assert torch.allclose(y_padded[tokens:].double(), pad_ref, atol=1e-5, rtol=0)


def test_scale_rows_follow_the_slot_through_eviction_and_reactivation(v):
    """LRU-style reuse of a slot: activate 1 and 2, evict 1, activate 3 into slot 0, evict 2, re-activate 1 into
    slot 1; each slot's row is the s of the adapter now in it, a plain LoRA's row is ones, the -1 row stays 1."""
    name, width, slots = "model.layers.0.mlp.down_proj", 4, 2
    layer = _linear_layer(v, width, slots)
    g = torch.Generator().manual_seed(1)
    scales = {i: torch.rand(width, generator=g) + 0.5 for i in (1, 3)}
    adapters = {1: SimpleNamespace(id=1, d2_scales={name: scales[1]}), 2: SimpleNamespace(id=2),  # 2: plain LoRA
                3: SimpleNamespace(id=3, d2_scales={name: scales[3]})}
    mgr = SimpleNamespace(_active_adapters={}, lora_index_to_id=[None] * slots, _registered_adapters=adapters,
                          modules={name: layer}, packed_modules={}, lora_slots=slots, is_pooling_model=False,
                          supports_mm=False, _get_lora_layer_weights=lambda lora, module_name: None)
    mgr._deactivate_adapter = functools.partial(v.LoRAModelManager._deactivate_adapter, mgr)

    def rows():
        return [layer.d2_scale_stacked[i].clone() for i in range(slots + 1)]

    layer.d2_scale_stacked[:slots].fill_(7.0)  # stale values every activation must overwrite
    assert v.LoRAModelManager.activate_adapter(mgr, 1) and v.LoRAModelManager.activate_adapter(mgr, 2)
    r = rows()
    assert torch.equal(r[0], scales[1]) and torch.equal(r[1], torch.ones(width)) and torch.equal(r[2], torch.ones(width))
    layer.d2_scale_stacked[1].fill_(7.0)
    assert v.LoRAModelManager.deactivate_adapter(mgr, 1) and v.LoRAModelManager.activate_adapter(mgr, 3)
    assert mgr.lora_index_to_id == [3, 2]
    assert torch.equal(layer.d2_scale_stacked[0], scales[3])
    assert v.LoRAModelManager.deactivate_adapter(mgr, 2) and v.LoRAModelManager.activate_adapter(mgr, 1)
    r = rows()
    assert mgr.lora_index_to_id == [3, 1]
    assert torch.equal(r[0], scales[3]) and torch.equal(r[1], scales[1]) and torch.equal(r[2], torch.ones(width))
    assert not v.LoRAModelManager.activate_adapter(mgr, 1)  # already active: nothing changes
