"""Run the ```python code blocks of every page under docs/ so the docs cannot drift.

The blocks of one page run in order in one namespace (a page is one script).  A block
whose opening fence is ```python no-run is shown but not executed.
"""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def test_docs_exist():
    assert PAGES, f"no markdown pages under {DOCS}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_code_runs(page):
    text = page.read_text(encoding="utf-8")
    namespace = {"__name__": f"docs.{page.stem}"}
    for i, block in enumerate(FENCE.findall(text)):
        code = compile(block, f"{page.relative_to(DOCS)}[block {i}]", "exec")
        exec(code, namespace)  # noqa: S102 - the docs are our own code
