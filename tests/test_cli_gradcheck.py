"""`python -m minivlmoe gradcheck`: every op listed, exit status follows the rows."""

import ast
import importlib
import pathlib
import pkgutil

import numpy as np

import minivlmoe
from minivlmoe import cli, testing
from minivlmoe.gradcheck import is_differentiable
from minivlmoe.ops import gelu
from minivlmoe.tree import flatten

PACKAGE = pathlib.Path(minivlmoe.__file__).parent


def _defines(path, predicate):
    """Names of the top-level functions of the module file ``path`` that satisfy ``predicate``."""
    tree = ast.parse(path.read_text())
    return [node.name for node in tree.body
            if isinstance(node, ast.FunctionDef) and predicate(node.name)]


def _is_backward(name):
    return name == "backward" or name.endswith("_backward")


def test_every_module_with_a_backward_has_registry_cases():
    """Each module of minivlmoe.ops and minivlmoe.moe that defines a backward (``backward``
    or ``*_backward``) is a registry group, and the registry has no other op group."""
    with_backward = set()
    for package in ("ops", "moe"):
        for info in pkgutil.iter_modules([str(PACKAGE / package)]):
            if _defines(PACKAGE / package / f"{info.name}.py", _is_backward):
                with_backward.add(f"{package}.{info.name}")
    names = [name for name, _ in testing.GROUPS]
    assert len(names) == len(set(names))
    assert {name for name in names if name.startswith(("ops.", "moe."))} == with_backward
    for name in names:                                   # each group names a library module
        module = importlib.import_module(f"minivlmoe.{name}")
        assert any(_is_backward(n) for n in dir(module)), name
    rng = np.random.default_rng(0)
    for name, cases in testing.GROUPS:                   # and has at least one case
        assert cases(rng), name


def _imports_the_checker(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[-1]
            if module == "gradcheck" or any(a.name == "gradcheck" for a in node.names):
                return True
        if isinstance(node, ast.Import) and any(a.name.endswith(".gradcheck")
                                                for a in node.names):
            return True
    return False


def test_no_library_module_outside_the_registry_defines_gradcheck_cases():
    """Library modules end at their backward: no ``gradcheck_cases`` outside
    minivlmoe/testing/, and only the registry and the CLI's commands import the gradient
    checker."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("testing/"):
            continue
        if _defines(path, lambda name: name == "gradcheck_cases"):
            offenders.append(f"{rel} defines gradcheck_cases")
        if rel != "commands.py" and _imports_the_checker(path):
            offenders.append(f"{rel} imports the gradient checker")
    assert offenders == []


def _report_rows(out, ops):
    """(op, argument, result) of each row of a report whose op is one of ``ops``."""
    rows = []
    for line in out.splitlines():
        if line.endswith((" pass", " FAIL")) or " skip (" in line:
            op = max((op for op in ops if line.startswith(op + " ")), key=len)
            result = "skip" if " skip (" in line else line.split()[-1]
            rows.append((op, line[len(op):].split()[0], result))
    return rows


def test_report_has_a_row_per_case_and_differentiable_argument_and_exits_zero(capsys):
    assert cli.main(["gradcheck", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    want = [(case.op, path) for case in testing.all_cases(np.random.default_rng(3))
            for path, leaf in flatten(case.inputs).items() if is_differentiable(leaf)]
    rows = _report_rows(out, {op for op, _ in want})
    assert sorted((op, arg) for op, arg, _ in rows) == sorted(want)
    assert list(dict.fromkeys(row[0] for row in rows)) == list(dict.fromkeys(op for op, _ in want))
    assert all(result in ("pass", "skip") for _, _, result in rows)
    assert sum(result == "pass" for _, _, result in rows) >= 213    # as many as before skips
    assert {"model(experts=dense)", "model(experts=shared)", "model(experts=modality)"} <= {
        op for op, _, _ in rows}
    assert "all rows passed" in out


def test_skipped_arguments_are_rows_that_do_not_fail(capsys):
    assert cli.main(["gradcheck", "--only", "attention(mask=full"]) == 0
    out = capsys.readouterr().out
    skips = [line for line in out.splitlines() if " skip (" in line]
    assert len(skips) == 1 and "params.k.b" in skips[0]
    assert skips[0].endswith(f"skip ({testing.ops.KEY_BIAS_SKIP['params.k.b']})")
    assert "all rows passed" in out and "1 argument(s) skipped" in out


def test_a_wrong_backward_fails_the_report(capsys, monkeypatch):
    right = gelu.backward
    monkeypatch.setattr(gelu, "backward", lambda dout, cache: 1.01 * right(dout, cache))
    assert cli.main(["gradcheck", "--only", "gelu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "row(s) FAILED" in out


def test_only_filter_and_seed_are_deterministic(capsys):
    cli.main(["gradcheck", "--only", "layernorm", "--seed", "7"])
    first = capsys.readouterr().out
    cli.main(["gradcheck", "--only", "layernorm", "--seed", "7"])
    assert capsys.readouterr().out == first
    rows = [line for line in first.splitlines() if line.endswith(" pass")]
    assert rows and all(line.startswith("layernorm") for line in rows)


def test_only_matching_nothing_is_an_error(capsys):
    assert cli.main(["gradcheck", "--only", "xyz"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "minivlmoe: error: --only 'xyz' matches no gradcheck case\n"
