"""Expert parallelism over MPI (minivlmoe/parallel/): agreement with one process.

The checks run under ``mpiexec -n R`` in subprocesses (minivlmoe/parallel/agreement.py
groups many per launch, each launch costs about a second); their figures are printed
(``pytest -s``) and carried in every assertion message.  Skipped without the ``mpi``
extra (mpi4py and an ``mpiexec``), except the checks that the core never needs it.
"""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240


def _mpiexec():
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("mpiexec", path=path)


def _env():
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


needs_mpi = pytest.mark.skipif(
    _mpiexec() is None
    or subprocess.run([sys.executable, "-c", "import mpi4py"], capture_output=True).returncode,
    reason="the mpi extra is not installed (pip install -e '.[mpi]': mpi4py, mpich)")


def _launch(ranks, *args):
    """``mpiexec -n ranks python args...``; returns the CompletedProcess (text)."""
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


def _report(proc):
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"


def _max_error(proc):
    found = re.findall(r"max relative error (\S+)", proc.stdout)
    assert found, _report(proc)
    return float(found[-1])


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_layer_equals_one_process(ranks):
    """Output, input gradient, every parameter gradient and every aux loss within 1e-12
    relative in float64; the same plan on every rank; counts that add up."""
    proc = _launch(ranks, "-m", "minivlmoe.parallel.agreement", "layer")
    print(proc.stdout)
    assert proc.returncode == 0, _report(proc)
    assert "FAILED" not in proc.stdout, _report(proc)
    assert proc.stdout.count("plan/counts ok") == 19, _report(proc)
    # the cases reach ranks that hold no token for some expert (and one with no token)
    assert "rank 0 has no token" in proc.stdout, _report(proc)
    idle = [int(v) for v in re.findall(r"idle \(rank, expert\) (\d+)", proc.stdout)]
    assert len(idle) == 19 and sum(v > 0 for v in idle) >= 5, _report(proc)
    assert _max_error(proc) <= 1e-12, _report(proc)


@needs_mpi
def test_training_equals_one_process_and_resumes_across(tmp_path):
    """Tiny preset, float64, 2 ranks: the losses of 4 steps; an R-rank checkpoint
    resumed in one process and a 1-process one resumed on 2 ranks."""
    proc = _launch(2, "-m", "minivlmoe.parallel.agreement", "train", str(tmp_path))
    print(proc.stdout)
    assert proc.returncode == 0, _report(proc)
    assert proc.stdout.count("train Rk=2") == 3, _report(proc)
    assert _max_error(proc) <= 1e-12, _report(proc)


@needs_mpi
def test_a_failing_rank_ends_every_rank_with_one_line(tmp_path):
    proc = _launch(2, "-m", "minivlmoe.parallel.agreement", "fail", str(tmp_path / "run"))
    assert proc.returncode != 0, _report(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("minivlmoe:")]
    assert errors == ["minivlmoe: error: rank 1 of 2: ValueError: a failure injected on "
                      "purpose at step 2"], _report(proc)


@needs_mpi
def test_cli_train_expert_parallel_writes_one_run(tmp_path):
    from minivlmoe import runs
    from minivlmoe.run_folder import CKPT_NAME, HISTORY_NAME
    from minivlmoe.train import train

    out = tmp_path / "run"
    proc = _launch(2, "-m", "minivlmoe", "train", "--expert-parallel", "--preset", "tiny",
                   "--dtype", "float64", "--steps", "2", "--eval-every", "0", "--quiet",
                   "--out", str(out))
    assert proc.returncode == 0, _report(proc)
    assert proc.stdout.count("metrics: ") == 1, _report(proc)      # rank 0 alone prints
    assert (out / CKPT_NAME).is_file()
    import json
    got = [json.loads(line) for line in (out / HISTORY_NAME).read_text().splitlines()]
    model_cfg, train_cfg = runs.preset_configs("tiny", dtype="float64", steps=2,
                                               eval_every=0)
    want = train(model_cfg, train_cfg, None, progress=None).history
    for g, w in zip(got, want, strict=True):
        for key in ("total", "contrastive", "caption", "aux", "grad_norm"):
            assert np.isclose(g[key], w[key], rtol=1e-12, atol=0), (key, g[key], w[key])


@needs_mpi
def test_cli_refuses_experts_that_do_not_divide_over_the_ranks(tmp_path):
    proc = _launch(4, "-m", "minivlmoe", "train", "--expert-parallel", "--preset", "tiny",
                   "--steps", "2", "--out", str(tmp_path / "run"))
    assert proc.returncode == 1, _report(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("minivlmoe:")]
    assert errors == ["minivlmoe: error: --expert-parallel: num_experts must be divisible "
                      "by the number of ranks (4: each rank holds num_experts / ranks "
                      "experts of every pool), got num_experts=2"], _report(proc)
    assert not (tmp_path / "run").exists()


def test_core_never_imports_mpi4py():
    code = ("import sys, minivlmoe, minivlmoe.cli, minivlmoe.commands, minivlmoe.train, "
            "minivlmoe.model, minivlmoe.parallel.ep_moe, minivlmoe.parallel.ep_train; "
            "print('mpi4py' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.stdout.strip() == "False", _report(proc)


def test_cli_without_the_extra_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['mpi4py'] = None; from minivlmoe.cli import main; "
            f"sys.exit(main(['train', '--expert-parallel', '--preset', 'tiny', '--out', "
            f"{str(tmp_path / 'run')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1, _report(proc)
    assert proc.stderr.strip().splitlines() == [
        "minivlmoe: error: --expert-parallel: expert parallelism needs mpi4py and an MPI "
        "library: pip install -e '.[mpi]' (mpi4py, mpich)"], _report(proc)
