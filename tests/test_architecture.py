"""Import directions between the packages (docs/architecture.md): the library imports no entry
point, training never imports the server, and first-party modules import no cycle. Every import
counts, including the lazy ones inside functions."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nanochat_jax", "train", "serve", "bench")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The first-party modules `name` imports (`from pkg import mod` names the module when it is one)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # a name inside a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: _imports(name) for name in MODULES}
FORBIDDEN = {"nanochat_jax": ("train", "serve", "bench"), "train": ("serve",), "serve": ("train",)}


@pytest.mark.parametrize("source", sorted(FORBIDDEN))
def test_import_directions(source):
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if m.split(".")[0] == source
                 for t in ts if t.split(".")[0] in FORBIDDEN[source])
    assert not bad, bad


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_parser_sees_lazy_imports():
    assert "nanochat_jax.scheduler" in GRAPH["nanochat_jax.checkpoint"]  # load_engine's import is inside it
    assert "nanochat_jax.engine" in GRAPH["nanochat_jax.scheduler"]


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, cycles
