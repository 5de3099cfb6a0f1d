"""The package's layout, read from the code's own imports: no module imports another that imports
it back, however long the way round, and imports only go down the layers that "Where things are"
(docs/development.md) names. A new subpackage must be given its place here (and there) before it passes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "imaging"

# Top to bottom: a module may import from its own layer and any layer below it, never above.
# The shared leaves are modules at the top of the package that every stage uses.
LAYERS: list[tuple[str, set[str]]] = [
    ("command line", {"imaging.cli", "imaging.__main__"}),
    ("explore", {"imaging.explore"}),
    ("service", {"imaging.service"}),
    ("run", {"imaging.run"}),
    ("clouds", {"imaging.clouds"}),
    ("boot", {"imaging.boot"}),
    ("formats", {"imaging.formats"}),
    ("guest", {"imaging.guest"}),
    ("disk", {"imaging.disk"}),
    ("samples", {"imaging.samples"}),
    ("leaves", {"imaging", "imaging.errors", "imaging.config", "imaging.tools", "imaging.records",
                "imaging.progress", "imaging.sparse", "imaging.tables", "imaging.workspace",
                "imaging.detectors"}),
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package ``name`` imports, wherever the import stands (in a function,
    under TYPE_CHECKING): an import made late to dodge a cycle is still a dependency."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                whole = f"{module}.{alias.name}"
                found.add(whole if whole in known else module)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer(name: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if name in members or any(name.startswith(m + ".") for m in members if m != "imaging"):
            return index
    raise LookupError(name)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for name in modules():
        try:
            layer(name)
        except LookupError:
            unplaced.append(name)
    assert not unplaced, f"modules in no layer (add them to LAYERS and to docs/development.md): {unplaced}"


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_imports_go_down_the_layers() -> None:
    upward = [
        f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})"
        for m, deps in sorted(graph().items())
        for d in sorted(deps)
        if layer(d) < layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_the_checks_catch_what_they_should(tmp_path: Path) -> None:
    # The test must be able to fail: a cycle of three and an upward import are both seen.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert (
        layer("imaging.samples.kvm")
        > layer("imaging.disk.files")
        > layer("imaging.guest.access")
        > layer("imaging.run.pipeline")
    )
    assert layer("imaging.errors") == len(LAYERS) - 1
    with pytest.raises(LookupError):
        layer("imaging.newthing.module")
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from imaging.run import pipeline\n    from . import ext\n")
    found = imports("imaging.disk.m", path, {"imaging.run.pipeline", "imaging.disk.ext"})
    assert found == {"imaging.run.pipeline", "imaging.disk.ext"}


def test_the_manual_names_every_subpackage() -> None:
    page = (PACKAGE.parent / "docs" / "development.md").read_text()
    section = page.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    for sub in sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()):
        assert f"`imaging/{sub}/`" in section, sub
