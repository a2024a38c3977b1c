"""The project's own promises about its docs and CI."""

from __future__ import annotations

import ast
import re

from llamastream.config import Settings
from tests.conftest import ROOT


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = next(line.strip() for line in readme.splitlines() if "pytest" in line)
    assert command.startswith("python3 -m venv")
    assert command in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, info in Settings.model_fields.items():
        assert info.description, name
        assert re.search(rf"^\| `{name}` \|", readme, re.M), f"{name} missing from README"


def test_architecture_names_every_module() -> None:
    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for path in (ROOT / "llamastream").rglob("*.py"):
        if path.name == "__init__.py" and path.parent.name != "llamastream":
            continue
        assert f"`{path.relative_to(ROOT)}`" in architecture, path


def _imports() -> dict[str, set[str]]:
    """Each package module → the package modules it imports when it is imported (imports under
    ``if TYPE_CHECKING:`` excluded: they never run)."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "llamastream").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text())
        skipped = {
            id(node)
            for stmt in ast.walk(tree)
            if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)
            for node in ast.walk(stmt)
        }
        found = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m.startswith("llamastream") and m != name}
    # `from llamastream.x import y` imports the package llamastream.x: keep known modules only.
    return {name: {m for m in deps if m in graph} for name, deps in graph.items()}


def test_no_import_circle() -> None:
    graph = _imports()
    graph.pop("llamastream")  # the package's public face imports everything, nothing imports it
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        assert state.get(name) != 1, " → ".join([*path, name])
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])


def test_the_core_never_imports_the_http_layer() -> None:
    for name, deps in _imports().items():
        entry_points = ("llamastream", "llamastream.cli", "llamastream.console")
        if name in entry_points or name.startswith("llamastream.api"):
            continue
        assert not {d for d in deps if d.startswith("llamastream.api")}, name
