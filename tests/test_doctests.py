"""Every module's docstring examples run as tests (as diskcache's do)."""

from __future__ import annotations

import doctest
import importlib

import pytest

from tests.conftest import ROOT

MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in (ROOT / "llamastream").rglob("*.py")
    if path.name != "__main__.py"  # running it starts the command line
)


def _examples(name: str) -> list[doctest.DocTest]:
    tests = doctest.DocTestFinder().find(importlib.import_module(name), name)
    return [t for t in tests if t.examples]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in _examples(name):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_the_examples_are_found() -> None:
    assert sum(len(t.examples) for name in MODULES for t in _examples(name)) >= 30
