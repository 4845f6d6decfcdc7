"""BLAS threads of the command line (minivlmoe/threads.py) and a checkout that holds runs.

The thread count is read from the running BLAS with threadpoolctl (``minivlmoe
--debug-threads`` prints its view); those tests skip when threadpoolctl is missing.
Each entry point runs in a fresh interpreter, so NumPy is not loaded before it starts:
``python -m minivlmoe`` and the console script's function (setup.cfg's
``console_scripts`` line, called the way pip's generated script calls it).
"""

import configparser
import os
import pathlib
import re
import subprocess
import sys

import pytest

from minivlmoe import cli, threads

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHEAP = ["gradcheck", "--only", "gelu"]          # a subcommand that loads NumPy and BLAS


def _console_script():
    """(module, function) of setup.cfg's ``minivlmoe = module:function`` line."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    line = cfg["options.entry_points"]["console_scripts"].strip()
    name, target = (part.strip() for part in line.split("="))
    assert name == "minivlmoe"
    return target.split(":")


def _entry_points():
    module, function = _console_script()
    return {"python -m minivlmoe": [sys.executable, "-m", "minivlmoe"],
            "console script": [sys.executable, "-c",
                               f"import sys; from {module} import {function}; "
                               f"sys.exit({function}())"]}


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in threads.ENV_VARS}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def _blas_threads(command, env, tmp_path):
    """The thread counts the running BLAS libraries report during ``command``."""
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stderr.splitlines() if "blas threads:" in l)  # noqa: E741
    counts = [int(n) for n in re.findall(r"\b(\d+)(?=,|$)", line)]
    assert counts, line
    return counts


@pytest.mark.parametrize("entry", ["python -m minivlmoe", "console script"])
def test_the_cli_runs_one_blas_thread_unless_told_otherwise(entry, tmp_path):
    pytest.importorskip("threadpoolctl", reason="reading the BLAS threads needs threadpoolctl")
    command = _entry_points()[entry]
    assert _blas_threads([*command, "--debug-threads", *CHEAP], _clean_env(),
                         tmp_path) == [1]
    assert _blas_threads([*command, "--threads", "2", "--debug-threads", *CHEAP],
                         _clean_env(), tmp_path) == [2]
    # a thread variable the user set wins over the default; --threads over both
    assert _blas_threads([*command, "--debug-threads", *CHEAP],
                         _clean_env(OPENBLAS_NUM_THREADS="2"), tmp_path) == [2]
    assert _blas_threads([*command, "--threads=1", "--debug-threads", *CHEAP],
                         _clean_env(OPENBLAS_NUM_THREADS="2"), tmp_path) == [1]


def test_cli_module_imports_no_numpy_before_main(tmp_path):
    """The thread variables only work if nothing loads NumPy before cli.main sets them."""
    module, _ = _console_script()
    code = f"import sys, {module}; print('numpy' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_in_process_main_limits_threads_for_the_command_only(capsys):
    """After NumPy is loaded, cli.main uses threadpoolctl for the command's duration."""
    threadpoolctl = pytest.importorskip("threadpoolctl",
                                        reason="the in-process limit needs threadpoolctl")
    before = [p["num_threads"] for p in threadpoolctl.threadpool_info()]
    target = 2 if before != [2] * len(before) else 1
    assert cli.main(["--threads", str(target), "--debug-threads", *CHEAP]) == 0
    err = capsys.readouterr().err
    assert re.search(rf"blas threads: \w+ {target}\b", err), err
    assert [p["num_threads"] for p in threadpoolctl.threadpool_info()] == before


@pytest.mark.parametrize("argv, want", [
    ([], None), (["train"], None), (["--threads", "3", "train"], 3),
    (["--threads=4", "eval", "x"], 4), (["--threads", "2", "--threads", "5", "train"], 5),
    (["train", "--threads", "3"], None),           # after the subcommand: not global
    (["--threads", "0", "train"], None), (["--threads", "x"], None), (["--threads"], None),
    (["--debug-threads", "--threads", "2", "gradcheck"], 2),
])
def test_option_reads_the_global_threads_option_like_argparse(argv, want):
    assert threads.option(argv) == want


def test_choose_order_option_then_user_environment_then_default():
    assert threads.choose(["train"], {}) == 1 == threads.DEFAULT
    assert threads.choose(["train"], {"OMP_NUM_THREADS": "4"}) is None
    assert threads.choose(["train"], {"OPENBLAS_NUM_THREADS": ""}) == 1   # empty: not set
    assert threads.choose(["--threads", "3", "train"], {"MKL_NUM_THREADS": "4"}) == 3


def test_limit_sets_the_environment_before_numpy_loads(monkeypatch):
    monkeypatch.delitem(sys.modules, "numpy")                  # as if not imported yet
    for name in threads.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    with threads.limit(3):
        assert {name: os.environ[name] for name in threads.ENV_VARS} == dict.fromkeys(
            threads.ENV_VARS, "3")
    with threads.limit(None):
        pass
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"


# ----------------------------------------------------------------------------- runs/ in cwd

def test_cli_tests_pass_from_a_checkout_that_already_holds_a_run(tmp_path):
    """The README's `train` leaves runs/default-modality/ in the checkout; the CLI tests
    (the bad-argument cases among them, whose `train` would default to that folder) run
    from such a directory and still pass, because each test runs in its own cwd."""
    checkout = tmp_path / "checkout"
    run = checkout / "runs" / "default-modality"
    assert cli.main(["train", "--preset", "tiny", "--steps", "2", "--quiet",
                     "--out", str(run)]) == 0
    assert (run / "config.json").exists() and (run / "ckpt.npz").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'basetemp'}", str(ROOT / "tests" / "test_cli.py"),
         "-k", "bad_arguments"],
        cwd=checkout, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b1\d passed\b", proc.stdout), proc.stdout[-2000:]
    assert sorted(p.name for p in (checkout / "runs").iterdir()) == ["default-modality"]
