"""The package's layout: no import cycles among ``xlsr`` modules (imports inside functions counted), and which
parts may import which (the manifest tool no training task)."""

from __future__ import annotations

import ast
from pathlib import Path

XLSR = Path(__file__).resolve().parents[1] / "xlsr"


def module_files(root: Path = XLSR) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module under ``root`` (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that module ``name`` imports anywhere in its file (top level, functions,
    ``TYPE_CHECKING`` blocks): ``from pkg import sub`` counts as ``pkg.sub`` where that is a module, else ``pkg``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
                elif base in modules:
                    found.add(base)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_manifest_tool_and_the_vocabulary_import_no_training_task():
    graph = import_graph()
    for module in ("xlsr.manifest", "xlsr.vocabulary"):
        tasks = sorted(m for m in reachable(graph, module) if m.startswith(("xlsr.pretrain", "xlsr.finetune")))
        assert not tasks, f"{module} imports {tasks}"


def test_the_engine_imports_no_task_and_fine_tuning_nothing_of_pretraining():
    graph = import_graph()
    tasks = ("xlsr.tasks", "xlsr.pretrain", "xlsr.finetune")
    for engine in (m for m in graph if m.startswith(("xlsr.training", "xlsr.data"))):
        found = sorted(m for m in reachable(graph, engine) if m.startswith(tasks))
        assert not found, f"the engine module {engine} imports {found}"
    pretraining = ("xlsr.tasks.pretraining", "xlsr.pretrain")
    for ctc in ("xlsr.tasks.ctc", "xlsr.finetune.config", "xlsr.finetune.data", "xlsr.finetune.labels"):
        found = sorted(m for m in reachable(graph, ctc) if m.startswith(pretraining))
        assert not found, f"the fine-tuning module {ctc} imports {found}"


def test_the_engine_asks_the_loader_not_its_parts():
    """The loop reads a loader's counts and position through its own interface (``total_batches``, ``num_skipped``,
    ``set_epoch``), never its sampler or dataset, so another data source can plug in."""
    for path in sorted((XLSR / "training").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        reached = sorted({node.attr for node in ast.walk(tree)
                          if isinstance(node, ast.Attribute) and node.attr in ("batch_sampler", "dataset", "sampler")})
        assert not reached, f"{path.name} reaches into a loader: {reached}"
