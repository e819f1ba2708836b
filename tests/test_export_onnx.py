"""ONNX export (issue #5): plain logits graph and ORT-GenAI decoder, validated against transformers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.onnx

import onnx  # noqa: E402  (pinned: a missing package must fail, not skip)
import onnxruntime as ort  # noqa: E402


def _hf(path: Path):
    """Independent reference: transformers float32, loaded directly (not through d2serve)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True).eval()


def _hf_logits(model, ids, mask, pos) -> np.ndarray:
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(pos), use_cache=False,
        ).logits.numpy()


def _run(folder: Path, ids, mask=None, pos=None) -> np.ndarray:
    """Plain ONNX Runtime session (no d2serve helper), loaded by absolute path."""
    mask = np.ones_like(ids) if mask is None else mask
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int64) if pos is None else pos
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": mask, "position_ids": pos})[0]


@pytest.fixture(scope="module")
def plain_tied(tiny_llama_tied_dir, tmp_path_factory):
    """A plain export of the tiny tied-embedding Llama (through the API)."""
    from d2serve.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("plain") / "onnx"
    rep = export_onnx(merged=tiny_llama_tied_dir, out=out, target="plain")
    return out, rep


# ---------------------------------------------------------------- plain target


def test_plain_parity_at_all_shapes_and_left_padding(plain_tied, tiny_llama_tied_dir):
    out, rep = plain_tied
    assert rep.passed, rep.failures
    names = [c["name"] for c in rep.parity["cases"]]
    assert names == ["1x1", "1x17", "3x5", "2x64", "left_pad_11_6"]
    for c in rep.parity["cases"]:
        assert c["max_abs_logit_diff"] <= 1e-3 and c["top1_agreement"] == 1.0, c
    # dynamic axes are symbolic in the graph (traced at 2x8, run here at other sizes)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for inp in proto.graph.input:
        assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"], inp.name

    # independent checks: our own ORT session vs our own transformers model
    hf = _hf(tiny_llama_tied_dir)
    rng = np.random.default_rng(7)
    for b, s in [(1, 1), (1, 17), (3, 5), (2, 64), (4, 3)]:
        ids = rng.integers(0, hf.config.vocab_size, (b, s), dtype=np.int64)
        pos = np.broadcast_to(np.arange(s), (b, s)).astype(np.int64)
        got, ref = _run(out, ids), _hf_logits(hf, ids, np.ones_like(ids), pos)
        assert got.shape == (b, s, hf.config.vocab_size)
        np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    # left padding: a padded row gives the same logits as the same tokens unpadded
    short = rng.integers(0, hf.config.vocab_size, (1, 5), dtype=np.int64)
    long = rng.integers(0, hf.config.vocab_size, (1, 9), dtype=np.int64)
    ids = np.concatenate([np.concatenate([np.zeros((1, 4), np.int64), short], 1), long])
    mask = np.array([[0] * 4 + [1] * 5, [1] * 9], np.int64)
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    got = _run(out, ids, mask, pos)
    np.testing.assert_allclose(got[0, 4:], _run(out, short)[0], atol=1e-3, rtol=0)
    np.testing.assert_allclose(got[1], _run(out, long)[0], atol=1e-3, rtol=0)
    np.testing.assert_allclose(got[0, 4:], _hf_logits(hf, short, np.ones_like(short), pos[:1, 4:])[0], atol=1e-3)


def test_plain_tied_embedding_stored_once(plain_tied, tiny_llama_tied_dir):
    out, rep = plain_tied
    assert rep.tied_embeddings is True
    hf = _hf(tiny_llama_tied_dir)
    emb = hf.get_input_embeddings().weight.detach().numpy()
    torch_bytes = sum(p.numel() * 4 for p in {id(p): p for p in hf.parameters()}.values())
    proto = onnx.load(str(out / "model.onnx"))  # with external data
    arrays = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer]
    copies = sum(1 for a in arrays if a.shape in (emb.shape, emb.shape[::-1]) and
                 (np.array_equal(a, emb) or np.array_equal(a.T, emb)))
    assert copies == 1
    init_bytes = sum(a.nbytes for a in arrays)
    assert init_bytes <= 1.05 * torch_bytes, (init_bytes, torch_bytes)
    assert rep.sizes["embedding_copies"] == 1 and rep.sizes["initializer_ratio"] <= 1.05


def test_dedupe_initializers_merges_a_duplicated_embedding():
    """An exporter that wrote the tied matrix twice: the duplicate is removed and outputs are unchanged."""
    import onnx_ir as ir

    from d2serve.export.onnx_files import dedupe_initializers

    w = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    ids = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [None])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 40])
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["emb", "ids"], ["h"]),
         onnx.helper.make_node("Transpose", ["head"], ["headT"], perm=[1, 0]),
         onnx.helper.make_node("MatMul", ["h", "headT"], ["y"])],
        "g", [ids], [y],
        [onnx.numpy_helper.from_array(w, "emb"), onnx.numpy_helper.from_array(w.copy(), "head")],
    )
    proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    x = np.array([1, 5, 39], np.int64)
    before = ort.InferenceSession(proto.SerializeToString()).run(None, {"ids": x})[0]
    model = ir.serde.deserialize_model(proto)
    assert dedupe_initializers(model) == 1
    proto2 = ir.serde.serialize_model(model)
    assert len(proto2.graph.initializer) == 1
    after = ort.InferenceSession(proto2.SerializeToString()).run(None, {"ids": x})[0]
    np.testing.assert_array_equal(before, after)


def test_plain_manifest_lists_every_file_with_sha256(plain_tied):
    import hashlib

    out, rep = plain_tied
    man = json.loads((out / "d2serve_export.json").read_text())
    assert man["format"] == "d2serve-onnx-export" and man["passed"] is True and man["failures"] == []
    assert man["target"] == "plain" and man["precision"] == "fp32"
    assert man["tolerances"]["max_abs_logit_diff"] == 5e-3 and man["tolerances"]["max_initializer_ratio"] == 1.05
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "d2serve_export.json")
    assert sorted(f["path"] for f in man["files"]) == on_disk
    assert {"model.onnx", "model.onnx.data", "config.json", "tokenizer.json"} <= set(on_disk)
    for f in man["files"]:
        data = (out / f["path"]).read_bytes()
        assert f["size_bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert man["total_size_bytes"] == sum(f["size_bytes"] for f in man["files"])
    assert man["export_s"] > 0 and man["decode_tokens_per_s"] is None
    assert not list(out.parent.glob(".onnx.*")), "temporary directory left behind"


def test_plain_folder_moved_opens_from_another_cwd(plain_tied, tmp_path, monkeypatch):
    out, _ = plain_tied
    ids = np.array([[3, 14, 15, 92, 65]], np.int64)
    expected = _run(out, ids)
    moved = tmp_path / "elsewhere" / "exported"
    shutil.copytree(out, tmp_path / "copy")
    shutil.move(tmp_path / "copy", moved)
    other = tmp_path / "unrelated_cwd"
    other.mkdir()
    monkeypatch.chdir(other)
    np.testing.assert_array_equal(_run(moved, ids), expected)
    # also through a relative path from the new cwd
    rel = Path(os.path.relpath(moved / "model.onnx", other))
    sess = ort.InferenceSession(str(rel), providers=["CPUExecutionProvider"])
    pos = np.arange(5)[None].astype(np.int64)
    got = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": pos})[0]
    np.testing.assert_array_equal(got, expected)


def test_missing_external_data_is_named(plain_tied, tmp_path):
    from d2serve.export.onnx_files import OnnxExportError, ort_session

    out, _ = plain_tied
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model.onnx.data").unlink()
    with pytest.raises(OnnxExportError, match=r"external data file 'model.onnx.data' is missing"):
        ort_session(broken / "model.onnx")


def test_injected_parity_failure_exits_1_and_keeps_report(tiny_llama_dir, tmp_path, monkeypatch):
    """Perturb the exported weights before validation: the CLI exits 1 and the manifest says passed=false."""
    from typer.testing import CliRunner

    from d2serve.cli import app
    from d2serve.export import onnx_plain

    real_export = onnx_plain.export_plain

    def perturbed(model, out_dir):
        info = real_export(model, out_dir)
        data = out_dir / "model.onnx.data"
        arr = np.fromfile(data, dtype=np.float32)
        arr[: arr.size // 2] += 0.5  # corrupt the first half of the stored weights
        arr.tofile(data)
        return info

    monkeypatch.setattr(onnx_plain, "export_plain", perturbed)
    out = tmp_path / "bad"
    res = CliRunner().invoke(app, ["export", "onnx", "--merged", str(tiny_llama_dir), "--out", str(out), "--target", "plain"])
    assert res.exit_code == 1, res.output
    man = json.loads((out / "d2serve_export.json").read_text())
    assert man["passed"] is False
    assert any("max abs logit diff" in f for f in man["failures"])
    assert man["parity"]["max_abs_logit_diff"] > 5e-3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target", "plain", "--precision", "int4"], "not supported for target 'plain'"),
        (["--target", "tflite"], "expected one of genai, plain"),
    ],
)
def test_usage_errors_exit_2(tiny_llama_dir, tmp_path, args, message):
    from typer.testing import CliRunner

    from d2serve.cli import app

    out = tmp_path / "o"
    res = CliRunner().invoke(app, ["export", "onnx", "--merged", str(tiny_llama_dir), "--out", str(out), *args])
    assert res.exit_code == 2 and message in res.output.replace("\n", " "), res.output
    assert not out.exists()


def test_bad_inputs_exit_2(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from d2serve.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["export", "onnx", "--merged", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not found" in res.output
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    res = runner.invoke(app, ["export", "onnx", "--merged", str(tiny_llama_dir), "--out", str(full), "--target", "plain"])
    assert res.exit_code == 2 and "replaced only with overwrite" in res.output.replace("\n", " ")
    assert (full / "keep.txt").read_text() == "x"


# ---------------------------------------------------------------- genai target


def _og_greedy(folder: Path, ids: list[int], n: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray([ids], np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def test_genai_fp32_tiny_tied_identical_greedy_tokens(tiny_llama_tied_dir, tmp_path, monkeypatch):
    """CLI genai export of the tied tiny model: shared embeddings (from the checkpoint), identical greedy tokens."""
    from typer.testing import CliRunner
    from transformers import AutoTokenizer

    from d2serve.cli import app

    out = tmp_path / "genai"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nTo be, or not to be,\n")
    res = CliRunner().invoke(app, [
        "export", "onnx", "--merged", str(tiny_llama_tied_dir), "--out", str(out), "--target", "genai",
        "--prompts", str(prompts), "--max-new-tokens", "16",
    ])
    assert res.exit_code == 0, res.output
    man = json.loads((out / "d2serve_export.json").read_text())
    assert man["passed"] is True and man["parity"]["all_identical"] is True
    assert [r["prompt"] for r in man["parity"]["prompts"]] == ["The capital of France is", "To be, or not to be,"]
    for r in man["parity"]["prompts"]:
        assert r["onnx_tokens"] == r["reference_tokens"] and len(r["reference_tokens"]) == 16
    assert man["tied_embeddings"] is True and "shared_embeddings=true" in man["parity"]["builder_args"]
    assert man["sizes"]["embedding_copies"] == 1 and man["sizes"]["initializer_ratio"] <= 1.05
    assert man["decode_tokens_per_s"] > 0
    assert {"model.onnx", "model.onnx.data", "genai_config.json"} <= {f["path"] for f in man["files"]}

    # independent check on a prompt not in the set, from another cwd after moving the folder
    moved = tmp_path / "moved" / "g"
    shutil.move(out, moved)
    monkeypatch.chdir(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_tied_dir))
    ids = tok("Question: is fire cold? Answer:")["input_ids"]
    hf = _hf(tiny_llama_tied_dir)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, pad_token_id=tok.eos_token_id)
    ref_new = ref[0, len(ids):].tolist()
    assert len(ref_new) > 0 and _og_greedy(moved, ids, 12)[: len(ref_new)] == ref_new

    from d2serve.export.onnx_files import OnnxExportError
    from d2serve.export.onnx_genai import open_genai_model

    (moved / "model.onnx.data").unlink()
    with pytest.raises(OnnxExportError, match="model.onnx.data' is missing"):
        open_genai_model(moved)


@pytest.mark.real
def test_genai_fp32_smollm2_identical_greedy_tokens(smollm2_dir, tmp_path):
    from d2serve.export.onnx import export_onnx

    prompts = ["The capital of France is", "Question: What is 12 plus 7? Answer:"]
    rep = export_onnx(
        merged=smollm2_dir, out=tmp_path / "smol", target="genai", precision="fp32", prompts=prompts,
        max_new_tokens=16,
    )
    assert rep.passed, rep.failures
    assert rep.parity["all_identical"] is True and rep.parity["top1_agreement"] == 1.0
    assert rep.parity["max_abs_logit_diff"] < 1e-2
    assert rep.tied_embeddings is True and rep.sizes["embedding_copies"] == 1
    assert rep.sizes["initializer_ratio"] <= 1.05
    assert rep.decode_tokens_per_s > 1
