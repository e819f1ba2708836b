"""The verify report renders as real Markdown tables and a self-contained HTML page, from one block structure."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from d2serve.verify.report import render_markdown, write_report


def _data(acc_base: float, acc_unmerged: float, acc_merged: float) -> dict:
    """A report.json-shaped dict with two adapted layers, one text, one prompt, one task."""
    layer = {"module": "model.layers.0.self_attn.q_proj", "max_err_over_tol": 0.4, "max_abs_err": 1e-8,
             "rel_err": 2e-8, "update_rel_norm": 0.01, "frac_update_lost": 0.0, "passed": True}
    layers = [layer, dict(layer, module="model.layers.1.mlp.down_proj", max_err_over_tol=0.2)]
    return {
        "passed": True, "failures": [], "d2serve_version": "test",
        "inputs": {"base": "b|ase", "adapter": "a", "merged": "m", "method": "d2lora", "n_adapted_layers": 2,
                   "base_dtype": "float32", "merged_dtype": "float32"},
        "settings": {"merged_compute_dtype": "float32", "unmerged_dtype": "float32"},
        "thresholds": {"max_mean_kl": 1e-3},
        "weights": {"n_layers": 2, "n_layers_failed": 0, "max_err_over_tol": 0.4, "merged_dtype": "float32",
                    "max_abs_err": 1e-8, "max_rel_err": 2e-8, "mean_frac_update_lost": 0.0,
                    "max_frac_update_lost": 0.0, "layers": layers,
                    "worst_layers": [x["module"] for x in layers], "untouched_changed": [], "missing_in_merged": []},
        "logits": {"sources": [{"source": "wiki|text", "n_positions": 3, "max_abs_logit_diff": 1e-5, "mean_kl": 1e-9,
                                "max_kl": 2e-9, "top1_agreement": 1.0, "ppl_unmerged": 9.0, "ppl_merged": 9.0,
                                "kl_per_position": [1e-9, 2e-9, 0.0]}], "training_probe": None},
        "generation": {"max_new_tokens": 4, "n_prompts": 1, "n_identical": 1,
                       "prompts": [{"prompt": "a | b\nc", "identical": True, "first_divergence": None,
                                    "text_unmerged": "x|y\nz", "text_merged": "x|y\nz"}]},
        "tasks": {"limit": 40, "per_task": [{"task": "boolq", "n": 40, "acc_base": acc_base,
                                             "acc_unmerged": acc_unmerged, "acc_merged": acc_merged, "gap_pp": 0.0,
                                             "n_flipped": 0, "mcnemar_p": 1.0, "bootstrap_ci_pp": [0.0, 0.0]}],
                  "overall": None},
        "timings_s": {"weights_s": 1.0},
    }


def _md_tables(md: str) -> list[list[list[str]]]:
    """Split Markdown into tables (runs of lines starting with '|'); cells split on unescaped '|'."""
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip())
            assert cells[0] == "" and cells[-1] == "", line
            cur.append([c.strip() for c in cells[1:-1]])
        elif cur:
            tables.append(cur)
            cur = []
    return tables


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "src" in a:
            self.srcs.append(a["src"])
        if "href" in a:
            self.hrefs.append(a["href"])
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def test_markdown_and_html_render_the_same_tables(tmp_path):
    data = _data(0.5, 0.6, 0.6)
    out = write_report(data, tmp_path / "r")
    md = (out / "report.md").read_text()
    tables = _md_tables(md)
    headers = [t[0] for t in tables]
    assert ["layer", "max err/tol", "max abs err", "rel err", "update \\|\\|dW\\|\\|/\\|\\|W0\\|\\|",
            "update lost"] in headers
    assert any("max \\|dlogit\\|" in h for h in headers)
    assert len(tables) == 4  # weights, logits, generation, tasks
    for t in tables:
        assert all(len(row) == len(t[0]) for row in t), t
        assert set(t[1]) == {"---"}
    assert "![Per-layer merge error](layer_error.png)" in md

    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.tags.count("table") == 4 and "pre" not in page.tags
    assert ["layer", "max err/tol", "max abs err", "rel err", "update ||dW||/||W0||", "update lost"] in page.rows
    gen_row = next(r for r in page.rows if r and r[0].startswith("a | b"))
    assert gen_row[3] == "x|y\nz" and len(gen_row) == 5
    assert len(page.srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    assert page.hrefs == []
    html_text = " ".join(page.text)
    for table in tables:  # every Markdown row is an HTML row with the same number of cells
        for row in table[2:]:
            assert any(len(r) == len(row) and r[0].replace("\n", " ") == row[0].replace("\\|", "|")
                       for r in page.rows), row
    assert "raises boolq accuracy from 0.500 to 0.600" in html_text


@pytest.mark.parametrize("accs,expected", [
    ((0.6, 0.5, 0.5), "the adapter lowers boolq accuracy from 0.600 to 0.500 vs the base"),
    ((0.6, 0.6, 0.55), "the adapter lowers boolq accuracy from 0.600 to 0.600 vs the base (unmerged; merged 0.550"),
    ((0.6, 0.6, 0.6), "the adapter leaves boolq accuracy at 0.600"),
])
def test_report_says_when_the_adapter_is_worse_than_the_base(accs, expected):
    md = render_markdown(_data(*accs))
    assert expected in md
    assert ("WORSE THAN BASE" in md) == (min(accs[1:]) < accs[0])
