"""Dependencies point one way (STYLE.md, lesson 1), checked on every module's imports,
read with `ast` (an import inside a function counts too):

- `hoomi_protocol` imports nothing of ours; `hoomi_client` only `hoomi_protocol`;
- `storage` only `hoomi_protocol`;
- `server` never `tests` or `bench`, and the hub itself never `server.testing` (the
  real-server harnesses that tests and benchmarks share);
- `bench` never `tests`;
- no module imports a test module (`tests.test_*`): what several tests share lives in a
  helper module (tests/wsclient.py, tests/pg.py, tests/terminal.py, ...), fixtures in
  tests/conftest.py.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.testing.replica import ROOT

OURS = {"hoomi_protocol", "hoomi_client", "storage", "server", "tests", "bench"}
# folder -> the top-level packages of ours it may import (itself included).
ALLOWED = {
    "protocol/hoomi_protocol": {"hoomi_protocol"},
    "client/hoomi_client": {"hoomi_client", "hoomi_protocol"},
    "storage": {"storage", "hoomi_protocol"},
    "server": {"server", "storage", "hoomi_protocol", "hoomi_client"},
    "bench": {"bench", "server", "storage", "hoomi_protocol", "hoomi_client"},
}


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of each absolute import in the file: `import a.b` gives
    "a.b", `from a import b` gives "a.b" (b may be a module or a name in a)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def modules(folder: str) -> list[Path]:
    found = sorted((ROOT / folder).rglob("*.py"))
    assert found, f"no modules under {folder}"
    return found


def test_the_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    code = tmp_path / "m.py"
    code.write_text("import a.b\nfrom c import d, e\nfrom . import f\n"
                    "def g():\n    from tests import test_x\n")
    assert sorted(imported(code)) == [(1, "a.b"), (2, "c.d"), (2, "c.e"), (5, "tests.test_x")]


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_dependencies_point_one_way(folder: str) -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line}: {module}"
             for path in modules(folder) for line, module in imported(path)
             if module.split(".")[0] in OURS - ALLOWED[folder]]
    assert not wrong, f"{folder} may import only {sorted(ALLOWED[folder])} of ours:\n" + \
        "\n".join(wrong)


def test_the_hub_does_not_import_its_test_harnesses() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line}: {module}"
             for path in modules("server") if "testing" not in path.relative_to(ROOT).parts
             for line, module in imported(path)
             if module.startswith("server.testing.")]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_test_module() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line}: {module}"
             for folder in ("tests", "bench") for path in modules(folder)
             for line, module in imported(path)
             if module.startswith("tests.test_")]
    assert not wrong, "move what they share to a helper module:\n" + "\n".join(wrong)
