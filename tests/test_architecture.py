"""The import graph holds its shape: the stages stand side by side, below runs/cli, above what they share.

Drawn from the code's own imports (ast, nothing is imported): a subpackage counts as one node,
and a module's level is one more than the highest level of what it imports.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "embedforge"
STAGES = {"embedforge.generate", "embedforge.mine", "embedforge.train", "embedforge.evaluate", "embedforge.reindex"}


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.with_suffix("").relative_to(PACKAGE.parent).parts).removesuffix(".__init__")
        modules[name] = path
    packages = [name for name, path in modules.items() if path.name == "__init__.py" and name != "embedforge"]

    def node(name: str) -> str:
        return next((package for package in packages if name == package or name.startswith(package + ".")), name)

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for statement in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(statement, ast.ImportFrom) and statement.module and statement.module.startswith("embedforge"):
                candidates = [f"{statement.module}.{alias.name}" for alias in statement.names] + [statement.module]
                targets.add(next(candidate for candidate in candidates if candidate in modules))
            elif isinstance(statement, ast.Import):
                targets |= {alias.name for alias in statement.names if alias.name in modules}
        graph.setdefault(node(name), set()).update(node(target) for target in targets)
    return {name: targets - {name} for name, targets in graph.items()}


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    found: dict[str, int] = {}

    def level(name: str, path: tuple = ()) -> int:
        assert name not in path, f"import cycle: {' -> '.join(path + (name,))}"
        if name not in found:
            found[name] = 1 + max((level(target, path + (name,)) for target in graph[name]), default=0)
        return found[name]

    for name in graph:
        level(name)
    return found


def test_no_stage_imports_another_and_all_stand_on_one_level():
    graph = import_graph()
    assert STAGES <= set(graph)
    crossing = {(name, target) for name in STAGES for target in graph[name] & STAGES}
    assert not crossing, crossing
    found = levels(graph)
    assert len({found[name] for name in STAGES}) == 1, {name: found[name] for name in STAGES}
    assert found["embedforge.runs"] > found["embedforge.mine"] and found["embedforge.cli"] > found["embedforge.runs"]
    assert max(found.values()) <= 7, found
