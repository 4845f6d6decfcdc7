"""`python -m minivlmoe gradcheck`: every op listed, exit status follows the rows."""

import importlib
import pkgutil

import minivlmoe
from minivlmoe import cli
from minivlmoe.ops import gelu


def test_every_module_with_gradcheck_cases_is_listed():
    found = set()
    for info in pkgutil.walk_packages(minivlmoe.__path__, "minivlmoe."):
        if info.name == "minivlmoe.__main__":  # importing it would run the CLI
            continue
        module = importlib.import_module(info.name)
        if hasattr(module, "gradcheck_cases"):
            found.add(info.name.removeprefix("minivlmoe."))
    assert found == set(cli.GRADCHECK_MODULES)


def test_report_has_a_row_per_op_and_argument_and_exits_zero(capsys):
    assert cli.main(["gradcheck", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.endswith((" pass", " FAIL"))]
    ops = {row[0].split("(")[0].split(".")[0] for row in rows}
    assert {name.split(".")[-1] for name in cli.GRADCHECK_MODULES} <= ops | {"combine", "dispatch",
                                                                             "moe_layer"}
    assert all(row[-1] == "pass" for row in rows)
    assert {"model(experts=dense)", "model(experts=shared)", "model(experts=modality)"} <= {
        row[0] for row in rows}
    assert "all rows passed" in out


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
