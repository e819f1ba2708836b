"""The import graph of d2serve: no cycles, and every import goes to the same or a lower layer.

The test walks the AST of every module under ``d2serve/`` and counts every ``import`` / ``from ... import``
of a d2serve module, at module level AND inside functions (a function-level import is still a dependency;
hiding it in a function only delays the cycle). Imports under ``if TYPE_CHECKING:`` are excluded: they are
annotations only and never run. ``from d2serve.pkg import name`` counts as an import of ``d2serve.pkg.name``
when that is a module, else of ``d2serve.pkg``. A module's package ``__init__`` is not counted as a
dependency of importing the module (the package ``__init__`` files import nothing of their package's
lower layers).

Layers (data flows one way: load -> validate -> merge -> verify -> export -> serve -> bench -> commands).
An import may only go to a module of the same or a lower layer; within a layer the graph must stay acyclic.
"""

from __future__ import annotations

import ast
from pathlib import Path

import d2serve

PKG = Path(d2serve.__file__).parent

# layer number -> module prefixes (a module takes the layer of its longest matching prefix)
LAYERS: dict[int, tuple[str, ...]] = {
    0: (  # foundations: no d2serve knowledge beyond errors and small shared helpers
        "d2serve", "d2serve.errors", "d2serve.console", "d2serve.cache", "d2serve.sysinfo", "d2serve.threads",
        "d2serve.extras", "d2serve.childproc", "d2serve.launch_argv", "d2serve.outdir", "d2serve.compare", "d2serve.resolve",
        "d2serve.merge_fused_kernels", "d2serve.verify.stats", "d2serve.verify.plots",
        "d2serve.bench.environment", "d2serve.vllm_plugin.compat", "d2serve.vllm_plugin.logits",
        # the one export manifest name: a constant the checkpoint layer (side files) names too
        "d2serve.export.manifest",
    ),
    1: ("d2serve.adapters", "d2serve.adapters.methods", "d2serve.adapters.config"),  # method registry, configs
    2: ("d2serve.architecture",),  # what transformers builds from a config (knows no checkpoint file)
    3: (  # load: checkpoints and adapters read from disk, matched by name
        "d2serve.checkpoint", "d2serve.merge_io", "d2serve.digests", "d2serve.adapters.io",
        "d2serve.adapters.synthetic", "d2serve.base_models", "d2serve.bench.synthetic_ckpt",
    ),
    4: ("d2serve.fitting", "d2serve.layers", "d2serve.models", "d2serve.probe", "d2serve.export.checks"),  # fit, validate, build models
    5: ("d2serve.merge_fused", "d2serve.merge_blocks", "d2serve.merge"),  # merge
    6: ("d2serve.verify.data", "d2serve.verify.weights", "d2serve.verify.logits", "d2serve.verify.generation",
        "d2serve.verify.tasks", "d2serve.verify.thresholds", "d2serve.verify.report"),  # verify's measurements
    # export (each export proven by running it, hence above verify), and the runtimes under test (transformers,
    # vLLM, ORT-GenAI: one file each, d2serve.runtimes), which run what the exports make
    7: ("d2serve.export", "d2serve.runtimes"),
    8: ("d2serve.verify", "d2serve.verify.api"),  # the verify orchestration (and its package's public names):
    # asks the runtime under test (layer 7)
    9: ("d2serve.serve", "d2serve.vllm_plugin"),  # serve and the runtime plugin
    10: ("d2serve.bench",),  # bench
    11: ("d2serve.inspect", "d2serve.demo", "d2serve.train", "d2serve.cli"),  # commands
}

# (importer, imported) pairs that are known to break the rules, each with the branch/issue that removes it.
# Nothing else may be added here: fix the layering instead.
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()  # none: the last one (export.vllm <-> serve) went with childproc
KNOWN_UP_IMPORTS: set[tuple[str, str]] = KNOWN_CYCLE_EDGES  # none: the runtimes under test sit beside the
# exports they run (layer 7) and verify's orchestration above them (layer 8)


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The d2serve modules ``name`` imports anywhere in its body (functions included), TYPE_CHECKING excluded."""
    tree = ast.parse(path.read_text(), str(path))
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(head + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in mods else base)
    return {m for m in out if m in mods and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _layer(module: str) -> int:
    best, layer = "", None
    for n, prefixes in LAYERS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, layer = p, n
    assert layer is not None, f"{module} has no layer in LAYERS (tests/test_import_layers.py): add it"
    return layer


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_walker_sees_function_level_imports():
    # architecture imports the method registry; checkpoint names keys by the architecture (both now at module
    # level); runtimes.vllm imports the vLLM export inside a function: all three must be seen.
    g = _graph()
    assert "d2serve.adapters.methods" in g["d2serve.architecture"]
    assert "d2serve.architecture" in g["d2serve.checkpoint"]
    assert "d2serve.export.vllm_lora" in g["d2serve.runtimes.vllm"]
    assert len(g) > 80


def test_cycle_detection_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c"]]


def test_no_import_cycles():
    g = _graph()
    for importer, imported in KNOWN_CYCLE_EDGES:
        g[importer].discard(imported)
    assert _cycles(g) == []


def test_imports_go_to_the_same_or_a_lower_layer():
    g = _graph()
    up = sorted(
        (a, b) for a, deps in g.items() for b in deps
        if _layer(b) > _layer(a) and (a, b) not in KNOWN_UP_IMPORTS
    )
    assert up == [], "imports that run up the layers (tests/test_import_layers.py LAYERS): " + ", ".join(
        f"{a} (layer {_layer(a)}) -> {b} (layer {_layer(b)})" for a, b in up)


def test_known_exceptions_still_exist():
    # an allowance whose import is gone must be deleted, so the table stays the truth
    g = _graph()
    stale = sorted((a, b) for a, b in KNOWN_UP_IMPORTS if b not in g.get(a, set()))
    assert stale == []


def test_errors_live_in_the_lowest_layer():
    from d2serve import errors
    from d2serve.adapters.io import AdapterError
    from d2serve.checkpoint import CheckpointError

    assert AdapterError is errors.AdapterError and CheckpointError is errors.CheckpointError
    assert issubclass(AdapterError, errors.InputError) and issubclass(CheckpointError, errors.InputError)
    assert _layer("d2serve.errors") == 0
