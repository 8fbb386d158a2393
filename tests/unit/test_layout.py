"""The code layout holds: every import in `pipeline/`, `jobs/`, `kit/` and `benchmarks/` runs down the layers
`pipeline/__init__.py` and docs/architecture.md describe (the stages never import one another), no import runs in a
cycle, and no module there or in `tests/` passes 500 lines. Read from the source with `ast`: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# Lowest first. A module may import its own unit and any unit of a lower layer; units of one layer are independent.
LAYERS: list[tuple[str, ...]] = [
    ("pipeline", "pipeline.errors", "pipeline.primitives"),
    ("pipeline.config", "pipeline.store"),
    ("pipeline.models", "pipeline.runtime"),
    ("pipeline.ingest", "pipeline.encode", "pipeline.index", "pipeline.serve"),
    ("pipeline.ops",),
    ("jobs",),
    ("kit",),
    ("benchmarks",),
]
CHECKED = ("pipeline", "jobs", "kit", "benchmarks")
MAX_LINES = 500
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = REPO, folders: tuple[str, ...] = CHECKED) -> dict[str, Path]:
    return {module_name(path, root): path for folder in folders for path in sorted((root / folder).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The first-party modules `path` imports, anywhere in it (a lazy import is a dependency too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` names a.b.c; an attribute import names its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def unit_of(name: str) -> str | None:
    """The layered unit `name` belongs to: the longest one that is it or holds it."""
    candidates = [unit for unit in RANK if name == unit or name.startswith(unit + ".")]
    return max(candidates, key=len) if candidates else None


def graph(root: Path = REPO) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports_of(path, name, set(found)) for name, path in found.items()}


def layering_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for name, targets in sorted(edges.items()):
        unit = unit_of(name)
        for target in sorted(targets):
            other = unit_of(target)
            if unit is None or other is None or unit == other:
                continue
            if RANK[other] >= RANK[unit]:
                how = "a unit of its own layer" if RANK[other] == RANK[unit] else "a higher layer"
                bad.append(f"{name} imports {target} ({other}: {how})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_import_runs_down_the_layers():
    assert layering_violations(graph()) == []


def test_no_import_runs_in_a_cycle():
    assert cycles(graph()) == []


@pytest.mark.parametrize("folder", [*CHECKED, "tests"])
def test_no_module_passes_500_lines(folder):
    long = {
        str(path.relative_to(REPO)): lines
        for path in sorted((REPO / folder).rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_check_sees_a_stage_importing_a_stage_an_upward_import_and_a_cycle(tmp_path):
    """The checks themselves, on a small tree: each kind of fault is found, and a clean tree passes."""
    files = {
        "pipeline/__init__.py": "",
        "pipeline/errors.py": "",
        "pipeline/store/__init__.py": "",
        "pipeline/store/a.py": "from pipeline.errors import X\nfrom . import b\n",
        "pipeline/store/b.py": "def f():\n    from pipeline.store import a\n",
        "pipeline/serve/__init__.py": "",
        "pipeline/serve/app.py": "from pipeline.store.a import Y\nfrom pipeline.index import job\n",
        "pipeline/index/__init__.py": "",
        "pipeline/index/job.py": "import pipeline.store.b\n",
        "pipeline/models/__init__.py": "",
        "pipeline/models/m.py": "from pipeline.ops.nightly import run\n",
        "pipeline/ops/__init__.py": "",
        "pipeline/ops/nightly.py": "from ..serve import app\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = modules(tmp_path, ("pipeline",))
    edges = {name: imports_of(path, name, set(found)) for name, path in found.items()}
    assert edges["pipeline.store.a"] == {"pipeline.errors", "pipeline.store.b"}
    assert edges["pipeline.ops.nightly"] == {"pipeline.serve.app"}
    assert layering_violations(edges) == [
        "pipeline.models.m imports pipeline.ops.nightly (pipeline.ops: a higher layer)",
        "pipeline.serve.app imports pipeline.index.job (pipeline.index: a unit of its own layer)",
    ]
    assert cycles(edges) == [["pipeline.store.a", "pipeline.store.b"]]
    del edges["pipeline.models.m"], edges["pipeline.serve.app"], edges["pipeline.store.b"]
    assert layering_violations(edges) == [] and cycles(edges) == []
