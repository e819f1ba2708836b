"""d2serve export dora / export lora (issue 19): D2-LoRA adapters leave d2serve as standard PEFT adapters.

References are independent of the code under test: the D2-LoRA and DoRA formulas written out here in float64,
PEFT's own unmerged model and merge_and_unload, d2serve's own unmerged D2-LoRA forward (d2serve/layers.py),
lm-eval's HFLM loading the PEFT folder itself, and numpy's SVD.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from d2serve.adapters.config import parse_config
from d2serve.adapters.io import load_adapter, save_adapter
from d2serve.adapters.methods import LayerFactors, d2lora_as_dora, row_norm
from d2serve.adapters.synthetic import random_adapter
from d2serve.checkpoint import sha256_file
from d2serve.cli import app
from d2serve.errors import InputError
from d2serve.export.peft import MANIFEST_NAME, export_dora, export_lora
from d2serve.merge import merge

IDS = torch.randint(3, 290, (2, 13), generator=torch.Generator().manual_seed(4))
ATOL = 1e-4  # float32 logits
MARGIN = 1e-2  # the adapter must move the logits by more than this (the checks cannot pass vacuously)


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _hf(path):
    from d2serve.models import load_hf_model

    return load_hf_model(path, torch.float32)


def _peft(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_hf(base), str(adapter), is_trainable=False).eval()


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _d2_merged_fp64(w0, ap, bp, am, bm, scale, tau):
    """The D2-LoRA merged weight, written out from the paper's formula (float64)."""
    dw = scale * (bp @ ap - tau * bm @ am)
    v = w0 + dw
    return (w0.norm(dim=1) / v.norm(dim=1)).unsqueeze(1) * v + dw


def _dora_merged_fp64(w0, a, b, mag, scaling):
    """PEFT's DoRA merged weight (DoraLinearLayer): diag(m / ||W0 + scaling B A||)(W0 + scaling B A), float64."""
    v = w0 + scaling * (b @ a)
    return (mag / v.norm(dim=1)).unsqueeze(1) * v


# ------------------------------------------------------------------------------------------- the identity


@pytest.mark.parametrize("scaling", [1.5, 0.37])  # the export's PEFT scaling: equal to the source's, or not
def test_identity_is_exact_in_float64(scaling):
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r, scale, tau = 24, 40, 3, 1.5, 0.7
    w0 = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    t = {n: 0.3 * torch.randn(*s, generator=g, dtype=torch.float64) for n, s in
         [("lora_A_plus", (r, in_f)), ("lora_B_plus", (out_f, r)), ("lora_A_minus", (r, in_f)),
          ("lora_B_minus", (out_f, r))]}
    f = LayerFactors("m", t, scale, tau)
    x = d2lora_as_dora(w0, f, scaling, torch.float64, factor_dtype=None)
    assert x.lora_A.shape == (2 * r, in_f) and x.lora_B.shape == (out_f, 2 * r) and x.magnitude.shape == (out_f,)
    ref = _d2_merged_fp64(w0, t["lora_A_plus"], t["lora_B_plus"], t["lora_A_minus"], t["lora_B_minus"], scale, tau)
    got = _dora_merged_fp64(w0, x.lora_A, x.lora_B, x.magnitude, scaling)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-14
    assert float((ref - w0).abs().max()) > 0.1  # not the identity map
    # stored in float32: the magnitudes are taken from the rounded factors, so only the factors' rounding shows
    x32 = d2lora_as_dora(w0, f, scaling, torch.float64, factor_dtype=torch.float32)
    got32 = _dora_merged_fp64(w0, x32.lora_A, x32.lora_B, x32.magnitude.float().double(), scaling)
    assert float((got32 - ref).abs().max() / ref.abs().max()) < 1e-6


# ------------------------------------------------------------------------------------------- export dora


def _patterned_d2_adapter(base: Path, out: Path) -> Path:
    """A random D2-LoRA adapter with rsLoRA, a rank_pattern and an alpha_pattern (ranks 4 / 2, alphas 6 / 3)."""
    from d2serve.adapters.io import base_weight_name, linear_modules
    from d2serve.checkpoint import Checkpoint

    cfg = parse_config({"peft_type": "D2LORA", "r": 4, "lora_alpha": 6.0, "tau": 0.6, "use_rslora": True,
                        "target_modules": ["q_proj", "v_proj", "o_proj"], "rank_pattern": {"v_proj": 2},
                        "alpha_pattern": {"o_proj": 3.0}})
    ckpt = Checkpoint(base)
    g = torch.Generator().manual_seed(9)
    layers = {}
    for m, (o, i) in linear_modules(ckpt).items():
        if not cfg.targets(m):
            continue
        r = cfg.rank_for(m)
        t = {"lora_A_plus": 0.2 * torch.randn(r, i, generator=g), "lora_B_plus": 0.2 * torch.randn(o, r, generator=g),
             "lora_A_minus": 0.2 * torch.randn(r, i, generator=g), "lora_B_minus": 0.2 * torch.randn(o, r, generator=g)}
        mag = row_norm(ckpt.get_tensor(base_weight_name(m, ckpt)).double()).float()
        layers[m] = LayerFactors(m, t, cfg.scale_for(m), cfg.tau, mag)
    return save_adapter(out, cfg, layers)


@pytest.fixture(scope="module")
def d2(tiny_llama_dir, tmp_path_factory):
    """Two D2-LoRA sources (plain; rsLoRA with rank/alpha patterns), their DoRA exports and D2 float32 merges."""
    root = tmp_path_factory.mktemp("export_peft")
    out = {}
    for name, make in (("plain", lambda p: random_adapter(tiny_llama_dir, p, std=0.2, seed=5, tau=0.7)),
                       ("patterned", lambda p: _patterned_d2_adapter(tiny_llama_dir, p))):
        src = make(root / f"{name}-d2")
        out[name] = {"src": src, "dora": root / f"{name}-dora",
                     "manifest": export_dora(base=tiny_llama_dir, adapter=src, out=root / f"{name}-dora"),
                     "merged": merge(base=tiny_llama_dir, adapter=src, out=root / f"{name}-m", dtype="float32").out}
    return out


@pytest.mark.parametrize("name", ["plain", "patterned"])
def test_exported_dora_is_a_peft_dora_adapter_with_the_source_scaling(tiny_llama_dir, d2, name):
    from peft import LoraConfig

    e = d2[name]
    src = load_adapter(e["src"])
    raw = json.loads((e["dora"] / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["use_dora"] is True and raw["r"] == 2 * src.config.r
    assert raw["d2serve_export"]["kind"] == "dora" and raw["d2serve_export"]["source_method"] == "d2lora"
    tensors = load_file(str(e["dora"] / "adapter_model.safetensors"))
    pm = _peft(tiny_llama_dir, e["dora"])
    assert isinstance(pm.peft_config["default"], LoraConfig) and pm.peft_config["default"].use_dora
    for m, f in src.layers.items():
        key = f"base_model.model.{m}"
        a, b, mag = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"], tensors[f"{key}.lora_magnitude_vector"]
        assert a.dtype == torch.float32 and a.shape == (2 * f.rank, f.tensors["lora_A_plus"].shape[1])
        assert b.shape == (f.tensors["lora_B_plus"].shape[0], 2 * f.rank) and mag.shape == (b.shape[0],)
        layer = pm.get_submodule(f"base_model.model.{m}")
        want = src.config.alpha_for(m) / (math.sqrt(f.rank) if src.config.use_rslora else f.rank)
        assert layer.scaling["default"] == pytest.approx(want, rel=1e-12), m  # PEFT's own scaling
        assert layer.r["default"] == 2 * f.rank
    man = json.loads((e["dora"] / MANIFEST_NAME).read_text())
    assert man["source"]["sha256"] == {p.name: sha256_file(p) for p in src.files}
    assert man["base"]["sha256"] == {"model.safetensors": sha256_file(tiny_llama_dir / "model.safetensors")}
    assert set(man["layers"]) == set(src.layers) and 0 < man["max_rel_error"] < 1e-6


@pytest.mark.parametrize("name", ["plain", "patterned"])
def test_peft_unmerged_equals_d2serve_unmerged_and_merge_and_unload_equals_d2serve_merge(tiny_llama_dir, d2, name):
    from d2serve.models import load_unmerged_model

    e = d2[name]
    ours = _logits(load_unmerged_model(tiny_llama_dir, e["src"]))
    pm = _peft(tiny_llama_dir, e["dora"])
    theirs = _logits(pm)
    assert float((_logits(_hf(tiny_llama_dir)) - ours).abs().max()) > MARGIN
    assert float((theirs - ours).abs().max()) < ATOL
    merged = pm.merge_and_unload().state_dict()
    d2m = load_file(str(e["merged"] / "model.safetensors"))
    for m in load_adapter(e["src"]).layers:
        w, ref = merged[f"{m}.weight"].double(), d2m[f"{m}.weight"].double()
        assert float((w - ref).abs().max() / ref.abs().max()) < 1e-6, m


def test_merging_the_exported_dora_gives_the_d2_merge_within_rounding(tiny_llama_dir, d2, tmp_path):
    """d2serve merge of the DoRA export vs of its D2-LoRA source, float32: the measured bound (docs/adapter-format.md):
    every adapted tensor within 2 float32 eps of its largest element (max |diff| / max |W|), most elements bit-equal;
    untouched tensors bit-equal."""
    e = d2["plain"]
    m2 = merge(base=tiny_llama_dir, adapter=e["dora"], out=tmp_path / "m", dtype="float32")
    assert m2.manifest["method"] == "dora"
    a, b = load_file(str(e["merged"] / "model.safetensors")), load_file(str(tmp_path / "m" / "model.safetensors"))
    assert a.keys() == b.keys()
    adapted = {f"{m}.weight" for m in load_adapter(e["src"]).layers}
    worst, n_diff, n = 0.0, 0, 0
    for k in a:
        if k not in adapted:
            assert torch.equal(a[k], b[k]), k
            continue
        x, y = a[k].double(), b[k].double()
        worst = max(worst, float((x - y).abs().max() / x.abs().max()))  # in units of the tensor's largest element
        n_diff += int((x != y).sum())
        n += x.numel()
    print(f"max |diff| / max |W| {worst:.3g}; {n_diff} of {n} elements differ")
    assert worst <= 2 * torch.finfo(torch.float32).eps, worst  # measured 1.04e-07 (0.87 eps)
    assert n_diff / n < 0.75  # measured 46% of the elements differ by a rounding


def test_verify_passes_with_the_exported_dora_and_hflm_scores_equal_the_unmerged_d2(tiny_llama_dir, d2, tmp_path):
    """``d2serve verify --adapter DORA --merged D2-MERGE`` passes; lm-eval's own HFLM(pretrained=base, peft=DORA)
    gives the per-item log-likelihoods of d2serve's unmerged D2-LoRA model and verify's unmerged accuracies."""
    from lm_eval.models.huggingface import HFLM

    from d2serve.models import load_tokenizer, load_unmerged_model
    from d2serve.verify.data import resolve_data_dir
    from d2serve.verify.tasks import hf_lm, score_tasks

    e = d2["plain"]
    tasks = ("boolq", "arc_easy", "piqa")  # bundled tasks: yes/no, 4-way and 2-way multiple choice
    r = _cli("verify", "--base", tiny_llama_dir, "--adapter", e["dora"], "--merged", e["merged"], "--report",
             tmp_path / "r", "--tasks", ",".join(tasks), "--limit", 2, "--windows", 1, "--window-len", 48,
             "--max-new-tokens", 10, "--no-base", "--device", "cpu")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["passed"] and rep["inputs"]["method"] == "dora"
    data = resolve_data_dir(None)
    lm = HFLM(pretrained=str(tiny_llama_dir), peft=str(e["dora"]), batch_size=4, device="cpu", dtype="float32")
    theirs = score_tasks(lm, tasks, data, 2)
    per_task = {t["task"]: t for t in rep["tasks"]["per_task"]}
    for t in tasks:
        assert theirs[t].n == per_task[t]["n"] == 2
        assert theirs[t].acc == pytest.approx(per_task[t]["acc_unmerged"]) == pytest.approx(per_task[t]["acc_merged"])
    # per item, against d2serve's own unmerged D2-LoRA model (an independent implementation of the forward)
    ours = score_tasks(hf_lm(load_unmerged_model(tiny_llama_dir, e["src"]), load_tokenizer(tiny_llama_dir), 4),
                       ("arc_easy", "piqa"), data, 2)
    for t in ("arc_easy", "piqa"):
        np.testing.assert_allclose(np.array(theirs[t].loglikelihoods), np.array(ours[t].loglikelihoods), atol=1e-4)
        assert theirs[t].predictions == ours[t].predictions


def test_export_dora_refusals(tiny_llama_dir, tiny_llama_tied_dir, d2, tmp_path):
    lora = random_adapter(tiny_llama_dir, tmp_path / "lora", method="lora", std=0.1)
    with pytest.raises(InputError, match=r"already a PEFT adapter"):
        export_dora(base=tiny_llama_dir, adapter=lora, out=tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    from d2serve.merge import WrongBaseError

    with pytest.raises(WrongBaseError, match=r"d2_magnitude"):  # same shapes, another base: the merge's own check
        export_dora(base=tiny_llama_tied_dir, adapter=d2["plain"]["src"], out=tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    r = _cli("export", "dora", "--base", tiny_llama_dir, "--adapter", d2["plain"]["src"], "--out", d2["plain"]["dora"])
    assert r.exit_code == 2 and "not empty" in " ".join(r.output.split())  # an export is never replaced silently


def test_inspect_names_what_an_export_came_from(tiny_llama_dir, d2, tmp_path):
    src = d2["plain"]["src"]
    r = _cli("inspect", d2["plain"]["dora"], "--base", tiny_llama_dir)
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "method dora" in flat and "exact PEFT DoRA form" in flat and "d2lora adapter" in flat
    assert str(Path(src).resolve()) in r.output.replace("\n", "")
    from d2serve.inspect import inspect_adapter

    info = inspect_adapter(d2["plain"]["dora"])
    assert info["exported_from"]["source_sha256"]["adapter_model.safetensors"] == sha256_file(
        Path(src) / "adapter_model.safetensors")
    assert inspect_adapter(src)["exported_from"] is None


# ------------------------------------------------------------------------------------------- export lora


def _svd_reference(w0: np.ndarray, w_hat: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(w_hat - w0, full_matrices=False)
    return w0 + (u[:, :k] * s[:k]) @ vt[:k]


BUDGET = 0.001  # the tiny random models are near-tie heavy: 0.05 fails the gate (KL 0.16), 0.005 just fails (top-1 0.945)


def test_export_lora_of_d2lora_matches_its_svd_reconstruction(tiny_llama_dir, d2, tmp_path):
    """PEFT's unmerged model of the plain-LoRA export == the base with each weight replaced by the rank-k truncated
    SVD reconstruction of the D2-LoRA merged weight (numpy, from the formula); ranks and errors as budgeted."""
    from peft import LoraConfig

    e = d2["plain"]
    man = export_lora(base=tiny_llama_dir, adapter=e["src"], out=tmp_path / "lora", max_rel_error=BUDGET,
                      windows=1, prompts=["The capital of France is"])
    assert man["fidelity"]["passed"] and man["kind"] == "lora_svd"
    src = load_adapter(e["src"])
    base_t = load_file(str(tiny_llama_dir / "model.safetensors"))
    model = _hf(tiny_llama_dir)
    sd = model.state_dict()
    ranks = set()
    for m, f in src.layers.items():
        t = {n: v.double() for n, v in f.tensors.items()}
        w0 = base_t[f"{m}.weight"].double()
        w_hat = _d2_merged_fp64(w0, t["lora_A_plus"], t["lora_B_plus"], t["lora_A_minus"], t["lora_B_minus"],
                                f.scale, f.tau)
        layer = man["layers"][m]
        k = layer["rank"]
        ranks.add(k)
        ref = _svd_reference(w0.numpy(), w_hat.numpy(), k)
        err = np.linalg.norm(ref - w_hat.numpy()) / np.linalg.norm(w_hat.numpy())
        assert layer["rel_error"] == pytest.approx(err, rel=1e-3, abs=1e-7) and err <= BUDGET
        if k > 1:  # k is the smallest rank within the budget
            assert np.linalg.norm(_svd_reference(w0.numpy(), w_hat.numpy(), k - 1) - w_hat.numpy()) / \
                np.linalg.norm(w_hat.numpy()) > BUDGET
        sd[f"{m}.weight"].copy_(torch.from_numpy(ref).float())
    assert len(ranks) > 1  # per-layer ranks really differ (rank_pattern used)
    pm = _peft(tiny_llama_dir, tmp_path / "lora")
    assert isinstance(pm.peft_config["default"], LoraConfig) and not pm.peft_config["default"].use_dora
    assert float((_logits(pm) - _logits(model)).abs().max()) < ATOL
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["d2serve_export"]["kind"] == "lora_svd"
    r = _cli("inspect", tmp_path / "lora")
    assert r.exit_code == 0 and "truncated-SVD plain LoRA" in " ".join(r.output.split())


def test_export_lora_of_peft_dora_keeps_the_magnitude(tiny_llama_dir, tmp_path):
    """A PEFT DoRA source at full rank: the plain LoRA reproduces PEFT's DoRA model (magnitude included), whereas
    the DoRA's own lora_A/lora_B alone (what dropping the magnitude leaves) do not."""
    src = random_adapter(tiny_llama_dir, tmp_path / "dora", method="dora", std=0.2, seed=2,
                         target_modules=("q_proj", "v_proj"))
    man = export_lora(base=tiny_llama_dir, adapter=src, out=tmp_path / "lora", rank=64, windows=1,
                      prompts=["The capital of France is"])
    assert man["source"]["method"] == "dora" and man["worst_rel_error"] < 1e-6
    want = _logits(_peft(tiny_llama_dir, src))
    assert float((_logits(_peft(tiny_llama_dir, tmp_path / "lora")) - want).abs().max()) < ATOL
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (tmp_path / "no_mag").mkdir()
    (tmp_path / "no_mag" / "adapter_config.json").write_text(json.dumps(cfg))
    t = {k: v for k, v in load_file(str(src / "adapter_model.safetensors")).items() if "magnitude" not in k}
    from safetensors.torch import save_file

    save_file(t, str(tmp_path / "no_mag" / "adapter_model.safetensors"))
    assert float((_logits(_peft(tiny_llama_dir, tmp_path / "no_mag")) - want).abs().max()) > MARGIN


def test_export_lora_gate_fails_on_a_loose_budget_and_writes_nothing(tiny_llama_dir, d2, tmp_path):
    out = tmp_path / "lora"
    r = _cli("export", "lora", "--base", tiny_llama_dir, "--adapter", d2["plain"]["src"], "--out", out,
             "--max-rel-error", "0.6")
    assert r.exit_code == 1, r.output
    flat = " ".join(r.output.split())
    assert "mean KL" in flat and "nothing was written" in flat
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".lora.")]
    r = _cli("export", "lora", "--base", tiny_llama_dir, "--adapter", d2["plain"]["src"], "--out", out,
             "--rank", "2", "--max-rel-error", "0.1")
    assert r.exit_code == 2 and "not both" in " ".join(r.output.split())
