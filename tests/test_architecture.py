"""The house's seams, checked on the source: import layers without cycles, model names only in backbones/,
short functions. See docs/ARCHITECTURE.md for the layers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "dp2osr"

# Lowest layer first; a module may import its own layer and the layers below, never one above.
LAYERS = [
    ("math", lambda m: m.startswith("dp2osr.math")),
    (
        "base",
        lambda m: (
            m.split(".")[1]
            in {
                "config",
                "runtime",
                "errors",
                "images",
                "paths",
                "prompts",
                "plots",
                "metrics",
                "mdtext",
                "tables",
                "progress",
            }
        ),
    ),
    ("backbones", lambda m: m.startswith("dp2osr.backbones")),
    ("engine", lambda m: m.startswith("dp2osr.engine")),
    ("stages", lambda m: True),  # the STAGES below and their helpers (eval_folders, eval_pools)
    ("cli", lambda m: m in {"dp2osr.cli", "dp2osr.__main__"}),
]
STAGES = {
    "degrade",
    "upscale",
    "sample",
    "score",
    "pair",
    "train",
    "evaluate",
    "curve",
    "report",
    "quickstart",
    "demo",
}
MODEL_NAME_TEST = re.compile(
    r"""(==|!=|startswith\(|endswith\(|\bin\s*[(\[{])\s*["'](sd2|flux|embedded|sd2-tiny|flux-tiny)["']"""
    r"""|\.(kind|name)\s*(==|!=)\s*["']"""
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """dp2osr modules imported anywhere in the file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in modules and m != name}


def _layer_of(module: str) -> int:
    """The index in LAYERS of a module (stages: every top-level module not in another layer)."""
    for i in (5, 0, 1, 2, 3):
        if LAYERS[i][1](module):
            return i
    return 4


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_no_import_cycles(graph):
    cycles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in done:
                visit(nxt, stack, done)
        stack.pop()
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [], done)
    assert not cycles, f"import cycles: {cycles}"


def test_imports_go_down_the_layers(graph):
    """math < base < backbones < engine < stages < cli; stages never import the CLI."""
    bad = [
        f"{m} ({LAYERS[_layer_of(m)][0]}) imports {d} ({LAYERS[_layer_of(d)][0]})"
        for m, deps in graph.items()
        for d in deps
        if m != "dp2osr" and _layer_of(d) > _layer_of(m)  # the package may re-export lazily
    ]
    assert not bad, "\n".join(bad)
    assert STAGES <= {m.split(".")[1] for m in graph if m.count(".") == 1}, "a stage module is missing"


def test_no_model_name_tests_outside_backbones():
    hits = [
        f"{path.relative_to(SRC)}:{i}: {line.strip()}"
        for path in SRC.rglob("*.py")
        if "backbones" not in path.relative_to(SRC).parts
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if MODEL_NAME_TEST.search(line)
    ]
    assert not hits, "model-family tests belong in backbones/ (read a trait instead):\n" + "\n".join(hits)


def test_no_function_longer_than_80_lines():
    long = [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, "\n".join(long)


def test_the_checks_catch_what_they_look_for():
    """The name pattern and the cycle search find planted offenders (so a pass means something)."""
    assert MODEL_NAME_TEST.search('if cfg.backbone == "embedded":')
    assert MODEL_NAME_TEST.search("dtype = 'bf16' if name.startswith('flux') else 'fp16'")
    assert MODEL_NAME_TEST.search('if bb.kind == "sd2"')
    assert not MODEL_NAME_TEST.search("if bb.uses_negative_prompt:")
    assert _layer_of("dp2osr.math.loss") < _layer_of("dp2osr.engine.trainer") < _layer_of("dp2osr.train")
    assert _layer_of("dp2osr.train") < _layer_of("dp2osr.cli")
    assert (
        _layer_of("dp2osr.metrics.build") == _layer_of("dp2osr.metrics") == _layer_of("dp2osr.runtime")
    )  # a base package
