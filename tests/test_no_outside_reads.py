"""A fresh clone works on its own: no code path reads beside the repository (e.g. a ``shared`` sibling folder).

1. Dynamic: a tiny-model ``d2serve merge`` + ``d2serve verify`` (every built-in task, bundled data) runs in a
   child Python with an audit hook recording every ``open`` / ``os.listdir`` / ``os.scandir`` path; none may lie
   under the repository's parent directory but outside the repository.
2. Static: no file of the code, tests, benchmarks, Makefile or CI names the old sibling folder or its variable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIBLING = "../" + "shared"  # spelled in two parts so the static check below does not find this file
OLD_VAR = "D2SERVE_" + "SHARED_DIR"

_CHILD = r'''
import json, os, sys

seen, popen = [], []


def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir"):
        p = args[0] if args else None
        if isinstance(p, (str, bytes, os.PathLike)):
            seen.append(os.path.abspath(os.fsdecode(p)))
    elif event == "subprocess.Popen":
        popen.append(str(args[1]))


sys.addaudithook(hook)
import d2serve
from d2serve.cli import app

codes = []
for argv in json.loads(sys.argv[1]):
    try:
        app(argv, prog_name="d2serve")
    except SystemExit as e:
        codes.append(e.code)
out = {"codes": codes, "seen": sorted(set(seen)), "popen": popen, "package": d2serve.__file__}
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
'''


def _under(p: str, root: Path) -> bool:
    return os.path.commonpath([p, str(root)]) == str(root)


def test_merge_and_verify_read_nothing_beside_the_repository(tmp_path, tiny_llama_dir, tiny_d2lora_adapter):
    merged, report = tmp_path / "merged", tmp_path / "report"
    runs = [
        ["merge", "--base", str(tiny_llama_dir), "--adapter", str(tiny_d2lora_adapter), "--out", str(merged)],
        ["verify", "--base", str(tiny_llama_dir), "--adapter", str(tiny_d2lora_adapter), "--merged", str(merged),
         "--report", str(report), "--tasks", "all", "--limit", "2", "--windows", "1", "--window-len", "32",
         "--max-new-tokens", "8", "--no-base"],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("D2SERVE_DATA_DIR", OLD_VAR)}
    env |= {"PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script, out = tmp_path / "child.py", tmp_path / "opened.json"
    script.write_text(_CHILD)
    r = subprocess.run([sys.executable, str(script), json.dumps(runs), str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["codes"] == [0, 0], r.stderr[-3000:]
    assert Path(res["package"]).resolve().parent == REPO / "d2serve"  # the child ran this checkout's code
    # nothing escaped the audit hook into a child process, except building the merge's C kernel (the system
    # compiler reads d2serve/data/kernels/merge_fused.c of this checkout and its system headers; d2serve.merge_fused)
    from d2serve.merge_fused import C_FLAGS

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    src = str(REPO / "d2serve" / "data" / "kernels" / "merge_fused.c")
    for argv in res["popen"]:
        if argv == str(["lscpu"]):  # older joblib (loky, via lm-eval's scikit-learn) counts physical cores: /sys only
            continue
        assert argv == str([cc, "--version"]) or (argv.startswith(str([cc, *C_FLAGS, "-o"])[:-1])
                                                   and argv.endswith(str([src, "-lm"])[1:])), argv
    seen = res["seen"]
    beside = [p for p in seen if _under(p, REPO.parent) and not _under(p, REPO)]
    assert beside == [], f"read beside the repository: {beside[:20]}"
    assert not [p for p in seen if "shared" in Path(p).parts and not _under(p, Path(sys.prefix))]
    # the hook works and verify read the bundled samples of this checkout (not some other data folder)
    bundled = REPO / "d2serve" / "data" / "eval"
    for rel in ("ARC-Easy/ARC-Easy-Test.jsonl", "piqa/valid-labels.lst", "openbookqa/test.tsv", "text/wiki.test.raw"):
        assert str(bundled / rel) in seen, rel
    rep = json.loads((report / "report.json").read_text())
    assert rep["inputs"]["data_dir"] == str(bundled) and rep["inputs"]["data_source"].startswith("bundled sample")
    assert [t["n"] for t in rep["tasks"]["per_task"]] == [2] * 6


def test_no_file_names_the_sibling_folder_or_its_variable():
    roots = [REPO / "d2serve", REPO / "tests", REPO / "bench", REPO / ".ci", REPO / "Makefile"]
    files = [f for r in roots for f in ([r] if r.is_file() else r.rglob("*"))
             if f.is_file() and "__pycache__" not in f.parts]
    assert len(files) > 50 and Path(__file__) in files
    hits = [str(f.relative_to(REPO)) for f in files
            if SIBLING.encode() in (b := f.read_bytes()) or OLD_VAR.encode() in b]
    assert hits == []
