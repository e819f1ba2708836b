"""``verify`` as plan -> measure -> report stages over one settings dataclass (issue 22 item 5)."""

from __future__ import annotations

import pytest

from d2serve.errors import InputError
from d2serve.verify import api as verify_api
from d2serve.verify.api import VerifySettings, measure_weights, plan, report


def test_settings_take_exactly_verify_s_options(tiny_llama_dir, tiny_d2lora_adapter):
    with pytest.raises(TypeError, match="lmit"):
        VerifySettings(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, merged=tiny_llama_dir, report_dir=None,
                       lmit=3)
    s = VerifySettings(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, merged=tiny_llama_dir, report_dir=None)
    assert (s.limit, s.engine, s.merged_compute_dtype) == (verify_api.DEFAULT_LIMIT, "hf", "float32")


def test_plan_refuses_bad_settings_before_any_model(tiny_llama_dir, tiny_d2lora_adapter, monkeypatch):
    import d2serve.models as models

    monkeypatch.setattr(models, "unmerged_model", lambda *a, **k: pytest.fail("a model was built"))
    common = dict(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, merged=tiny_llama_dir, report_dir=None)
    with pytest.raises(InputError, match=r"^limit must be >= 0, got -2$"):
        plan(VerifySettings(**common, limit=-2))
    with pytest.raises(InputError, match=r"max_new_tokens 2 < min_content_tokens_per_prompt"):
        plan(VerifySettings(**common, max_new_tokens=2))


def test_stages_open_each_checkpoint_once_and_fill_one_report(tiny_llama_dir, tiny_d2lora_adapter, tmp_path,
                                                              monkeypatch):
    from d2serve.merge import merge

    merged = merge(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, out=tmp_path / "m", dtype="float32").out
    from d2serve.checkpoint import Checkpoint

    opened = []
    real_init = Checkpoint.__init__

    def counting(self, path, *a, **k):  # every Checkpoint anyone builds, in any module
        opened.append(str(path))
        real_init(self, path, *a, **k)

    monkeypatch.setattr(Checkpoint, "__init__", counting)
    p = plan(VerifySettings(base=tiny_llama_dir, adapter=tiny_d2lora_adapter, merged=merged, report_dir=None,
                            tasks="", wikitext=False))
    assert sorted(opened) == sorted([str(tiny_llama_dir), str(merged)])  # the base once, the merged once
    assert p.runtime.name == "hf" and p.names == () and p.data["inputs"]["method"] == "d2lora"
    measure_weights(p)
    assert p.data["weights"]["layers"] and "weights_s" in p.timings
    rep = report(p)
    assert rep.passed and rep.data is p.data and rep.data["timings_s"] is p.timings
    assert len(opened) == 2, opened  # no stage opened a checkpoint again
