"""kiln's packages import downwards only, in the order of the lifecycle, and never in a cycle.

Every import of every module counts, function-level and TYPE_CHECKING ones included (parsed with ast,
nothing is imported). A unit is a top-level subpackage or module of kiln; ``kiln`` is the package root
(``kiln/__init__.py``, the public API).
"""

from __future__ import annotations

import ast
from pathlib import Path

import kiln

# Lowest first. A unit may import units of its own rank or below, never above. The engine format sits
# beside convert: the builder writes it and the runtime reads it (its manifest holds a models.config).
LAYERS = [
    ("errors", "version"),
    ("config",),
    ("kernels", "quantization"),
    ("layers",),
    ("models",),
    ("convert", "engine"),
    ("builder",),
    ("runtime",),
    ("serve", "bench", "plan", "flags", "cli"),
    ("kiln",),
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
SOURCE = Path(kiln.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kiln"


def imported_modules(module: str, is_package: bool, source: str) -> set[str]:
    """The kiln modules that the source of ``module`` imports, anywhere in it."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            if base == "kiln":  # from kiln import runtime: the submodule, where it is one
                found.update(f"kiln.{alias.name}" for alias in node.names if alias.name in RANK)
    return {m for m in found if m == "kiln" or m.startswith("kiln.")}


def unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        module = module_name(path)
        imported = imported_modules(module, path.name == "__init__.py", path.read_text())
        graph.setdefault(unit_of(module), set()).update(unit_of(m) for m in imported if unit_of(m) != unit_of(module))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_every_unit_has_a_place_in_the_order():
    assert set(unit_graph()) - set(RANK) == set(), "add new packages to LAYERS"


def test_no_lower_layer_imports_a_higher_one():
    upward = sorted(f"{unit} -> {target}" for unit, targets in unit_graph().items() for target in targets
                    if RANK[target] > RANK[unit])
    assert upward == []


def test_no_import_cycle_between_units():
    assert find_cycle(unit_graph()) is None


def test_the_checks_see_function_level_and_relative_imports():
    source = "if TYPE_CHECKING:\n    import kiln.serve\ndef f():\n    from kiln.runtime import llm\nfrom .registry import x\n"
    assert imported_modules("kiln.models.probe", False, source) == {"kiln.serve", "kiln.runtime", "kiln.models.registry"}
    assert imported_modules("kiln.models", True, "from . import llama") == {"kiln.models"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
