"""The README must stay true: its two commands are the Makefile's, and its SDK example
runs as printed against a live hub."""

from __future__ import annotations

import re

from server.testing.replica import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_starts_with_the_two_make_commands():
    quick = README.split("## Quick start", 1)[1]
    commands = re.findall(r"^make (\w+)", quick.split("```", 2)[1], re.M)
    assert commands == ["run", "test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


async def test_readme_sdk_example_runs_as_printed(cluster):
    block = README.split("<!-- readme-example", 1)[1].split("```python", 1)[1].split("```")[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    (alice, a_tok), (bob, b_tok) = await cluster.user(), await cluster.user()
    h = await cluster.admin.hoomi([alice], [bob])
    assert await namespace["main"](cluster.a.ws, a_tok, b_tok, h) == b"hello bob"


def test_every_configuration_variable_in_the_readme_is_read_by_the_hub():
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", README, re.M))
    source = (ROOT / "server" / "config.py").read_text()
    assert documented and all(f'"{name}"' in source for name in documented)
    read = set(re.findall(r'"((?:HOOMI|DATABASE|REDIS)_[A-Z_]+)"', source))
    assert read <= documented, read - documented


def test_protocol_doc_lists_every_error_and_close_code():
    from hoomi_protocol import CloseCode, ErrorCode

    doc = (ROOT / "docs" / "protocol.md").read_text()
    for code in ErrorCode:
        assert f"| `{code.value}` |" in doc, code
    for close in CloseCode:
        if close != CloseCode.NORMAL:
            assert f"| {int(close)} |" in doc, close


def test_operations_guide_has_the_same_configuration_table():
    def table(text: str) -> str:
        start = text.index("| variable | default | meaning |")
        return text[start:text.index("\n\n", start)]

    assert table((ROOT / "docs" / "operations.md").read_text()) == table(README)
