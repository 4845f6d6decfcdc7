"""The docs cannot drift: their code runs, and every file and module they name exists.

The ```python code blocks of every page under docs/ run in order in one namespace (a page
is one script); a block whose opening fence is ```python no-run is shown but not
executed.  In docs/**/*.md and README.md every relative link target, every repository
path (``minivlmoe/...py``, ``docs/...md``, ``tests/...py``, ``benchmarks/...py``) and
every dotted name ``minivlmoe.x.y`` (a module, then attributes) must exist, and a file
named without its folder must be the only file of that name in the repository.
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


# ----------------------------------------------------------------------------- references

ROOT = DOCS.parent
REFERENCE_PAGES = PAGES + [ROOT / "README.md"]
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:minivlmoe|docs|tests|benchmarks)/[\w/.-]*?\.(?:py|md))\b")
MODULE = re.compile(r"(?<![\w/.-])minivlmoe(?:\.[A-Za-z_]\w*)+")
BARE_FILE = re.compile(r"(?<![\w/.-])([A-Za-z_][\w-]*\.(?:py|md))\b")
REPO_FILES = sorted(p.relative_to(ROOT) for p in ROOT.rglob("*")
                    if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts
                    and not any(part.endswith(".egg-info") for part in p.parts))


def _page_id(page):
    return str(page.relative_to(ROOT))


def _resolves(dotted):
    """Import the longest module prefix of ``dotted``, then look up the rest as attributes."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", REFERENCE_PAGES, ids=_page_id)
def test_relative_links_exist(page):
    text = page.read_text(encoding="utf-8")
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue                                          # a URL or an anchor on the page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{_page_id(page)} links to missing files: {missing}"


@pytest.mark.parametrize("page", REFERENCE_PAGES, ids=_page_id)
def test_repository_paths_exist(page):
    text = page.read_text(encoding="utf-8")
    missing = sorted({p for p in REPO_PATH.findall(text) if not (ROOT / p).exists()})
    assert not missing, f"{_page_id(page)} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", REFERENCE_PAGES, ids=_page_id)
def test_module_names_import(page):
    text = page.read_text(encoding="utf-8")
    broken = sorted({name.rstrip(".") for name in MODULE.findall(text)
                     if not _resolves(name.rstrip("."))})
    assert not broken, f"{_page_id(page)} names modules or attributes that do not exist: {broken}"


@pytest.mark.parametrize("page", REFERENCE_PAGES, ids=_page_id)
def test_bare_file_names_are_unambiguous(page):
    """A file named without its folder (``moe_layer.py``) must be the only file of that name."""
    text = page.read_text(encoding="utf-8")
    bad = {}
    for name in set(BARE_FILE.findall(text)):
        matches = [str(p) for p in REPO_FILES if p.name == name]
        if len(matches) != 1:
            bad[name] = matches or "no such file"
    assert not bad, (f"{_page_id(page)} names files without their folder that are missing or "
                     f"ambiguous (write the full path): {bad}")


# ----------------------------------------------------------------------------- the README

LINE_COUNT_COMMAND = "wc -l minivlmoe/*.py minivlmoe/*/*.py"
TABLE_ROW = re.compile(r"^\| (\d+) \| `(minivlmoe/[\w/]+\.py)` \| (\d+) \| (.+) \|$", re.M)


def _reading_order():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reading order", 1)[1].split("\n## ", 1)[0]
    return section, [(int(n), path, int(lines)) for n, path, lines, _ in TABLE_ROW.findall(section)]


def _library_modules():
    """The files ``wc -l minivlmoe/*.py minivlmoe/*/*.py`` counts."""
    package = ROOT / "minivlmoe"
    return sorted(str(p.relative_to(ROOT)) for p in [*package.glob("*.py"),
                                                      *package.glob("*/*.py")])


def test_readme_reading_order_lists_every_module_with_its_line_count():
    section, rows = _reading_order()
    assert LINE_COUNT_COMMAND in section, "the README must say how its line counts are made"
    assert [n for n, _, _ in rows] == list(range(1, len(rows) + 1)), "rows numbered 1, 2, ..."
    listed = [path for _, path, _ in rows]
    assert len(set(listed)) == len(listed), "a module is listed twice"
    assert sorted(listed) == _library_modules(), (
        f"not listed: {sorted(set(_library_modules()) - set(listed))}, "
        f"listed but missing: {sorted(set(listed) - set(_library_modules()))}")
    stale = {path: (lines, (ROOT / path).read_bytes().count(b"\n"))
             for _, path, lines in rows if (ROOT / path).read_bytes().count(b"\n") != lines}
    assert not stale, f"README line counts (listed, actual) are stale: {stale}"


def test_package_docstrings_list_their_modules_in_the_readme_order():
    import importlib

    _, rows = _reading_order()
    order = [path for _, path, _ in rows]
    for init in sorted((ROOT / "minivlmoe").glob("*/__init__.py")):
        package = init.parent
        doc = importlib.import_module(f"minivlmoe.{package.name}").__doc__
        listed = re.findall(r"^\* ``(\w+)`` -- ", doc, re.M)
        modules = sorted(p.stem for p in package.glob("*.py") if p.name != "__init__.py")
        assert sorted(listed) == modules, f"{init.relative_to(ROOT)} lists {listed}, has {modules}"
        in_readme = [pathlib.PurePosixPath(p).stem for p in order if pathlib.PurePosixPath(p).parent.name == package.name
                     and pathlib.PurePosixPath(p).name != "__init__.py"]
        assert listed == in_readme, (f"{init.relative_to(ROOT)} and README.md list the modules "
                                     f"in different orders: {listed} vs {in_readme}")
