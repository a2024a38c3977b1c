"""The project's own promises about its docs and CI."""

from __future__ import annotations

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
