"""Every hook is documented (in its docstring and in docs/plugins.md) and tested."""

import inspect
from pathlib import Path

from tornado_app import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def hook_names():
    return [
        name for name, value in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(value, "tornado_app_spec")
    ]


def test_there_are_hooks():
    assert hook_names() == ["register_agents", "register_tools"]


def test_every_hook_has_a_docstring_and_a_section_in_the_docs():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    for name in hook_names():
        assert len(inspect.getdoc(getattr(hookspecs, name)) or "") > 100, name
        assert f"### `{name}(" in docs, name


def test_every_hook_is_exercised_by_a_test():
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name)
    for name in hook_names():
        assert f"def {name}(" in tests or f"{name}" in (ROOT / "tests" / "helpers.py").read_text(), name
