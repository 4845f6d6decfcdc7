"""Run checkpoints checked for meaning on load (run_checkpoint.load_checkpoint), not only for integrity.

Every bad checkpoint here is written by ``checkpoint.save`` itself, so every checksum is
valid: only the meaning checks can object.  Each must be refused with one line naming
the file and the array or value, by the library and through the CLI.
"""

import math
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minivlmoe import checkpoint, cli, optim, run_checkpoint, run_folder, runs, train
from minivlmoe.checkpoint import CheckpointError
from minivlmoe.ops import contrastive

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, STOP = 6, 3          # a tiny run interrupted at step 3: loss sums and count saved


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    mcfg, tcfg = runs.preset_configs("tiny", steps=STEPS, eval_every=0)
    train.train(mcfg, tcfg, out, stop_at=STOP, preset="tiny", progress=None,
                decode_eval=False)
    return out


def forge(base_run, out, mutate):
    """A copy of the base run whose checkpoint is re-saved after ``mutate(state)``."""
    ck = checkpoint.load(base_run / run_folder.CKPT_NAME)
    state = dict(ck._asdict())
    mutate(state)
    for name in (run_folder.CONFIG_NAME, run_folder.METRICS_NAME):
        shutil.copy(base_run / name, out / name)
    checkpoint.save(out / run_folder.CKPT_NAME, **state)
    return out


def refused(path):
    with pytest.raises(CheckpointError) as info:
        run_checkpoint.load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path}: ") and "\n" not in message, message
    return message


def W(s):
    return s["params"]["blocks"]["0"]["attn"]["q"]["W"]


def set_(tree, keys, value):
    for k in keys[:-1]:
        tree = tree[k]
    tree[keys[-1]] = value


def _nan_sparse(s):
    W(s).data[[3, 70, 900]] = np.nan


def _nan_dense(s):
    s["params"]["text"]["tok"][...] = np.nan


def _inf_bias(s):
    s["params"]["blocks"]["0"]["attn"]["q"]["b"][0] = np.inf


def _v_negative(s):
    s["opt_state"]["v"]["blocks"]["0"]["attn"]["q"]["W"][5] = -1e-6


def _v_inf(s):
    s["opt_state"]["v"]["ln_f"]["gamma"][:2] = np.inf


def _m_nan(s):
    s["opt_state"]["m"]["patch"]["pos"][0, 0] = np.nan


def _logit_scale(value):
    def mutate(s):
        s["params"]["log_logit_scale"][...] = value
    return mutate


def _step(step, opt_step=None):
    def mutate(s):
        s["step"] = step
        s["opt_state"]["step"] = step if opt_step is None else opt_step
    return mutate


def _extra(keys, value):
    def mutate(s):
        set_(s["extra"], keys, value)
    return mutate


def _drop(keys):
    def mutate(s):
        tree = s["extra"]
        for k in keys[:-1]:
            tree = tree[k]
        del tree[keys[-1]]
    return mutate


def _model_rng(keys, value):
    def mutate(s):
        set_(s["rng_state"]["model"], keys, value)
    return mutate


CASES = {
    "nan in a sparse weight's data": (_nan_sparse,
                                      r"params\['blocks.0.attn.q.W'\] has 3 non-finite"),
    "nan in a whole dense weight": (_nan_dense, r"params\['text.tok'\] has 640 non-finite"),
    "inf in a bias": (_inf_bias, r"params\['blocks.0.attn.q.b'\] has 1 non-finite"),
    "negative second moment": (_v_negative,
                               r"opt_state\['v'\]\['blocks.0.attn.q.W'\] has 1 negative"),
    "infinite second moment": (_v_inf, r"opt_state\['v'\]\['ln_f.gamma'\] has 2 non-finite"),
    "nan first moment": (_m_nan, r"opt_state\['m'\]\['patch.pos'\] has 1 non-finite"),
    "logit scale beyond exp's range": (_logit_scale(1000.0),
                                       r"params\['log_logit_scale'\] = 1000 exceeds log"),
    "logit scale out of reach": (_logit_scale(20.0),
                                 r"params\['log_logit_scale'\] = 20 is out of reach"),
    "logit scale far below": (_logit_scale(-20.0),
                              r"params\['log_logit_scale'\] = -20 is out of reach"),
    "step past the run's steps": (_step(STEPS + 1), r"step must be in \[0, train.steps=6\]"),
    "opt_state step a float": (_step(STOP, 3.0), r"opt_state\['step'\] must equal"),
    "opt_state step differs": (_step(STOP, 2), r"opt_state\['step'\] must equal"),
    "position beyond n_train": (_extra(["stream", "pos"], 10**6),
                                r"extra\['stream'\]\['pos'\] must be 48 at step 3"),
    "position negative": (_extra(["stream", "pos"], -16), r"extra\['stream'\]\['pos'\]"),
    "position of another step": (_extra(["stream", "pos"], 32),
                                 r"extra\['stream'\]\['pos'\] must be 48 .* got 32"),
    "position a float": (_extra(["stream", "pos"], 48.0),
                         r"extra\['stream'\]\['pos'\] must be an int, got float 48.0"),
    "position a string": (_extra(["stream", "pos"], "48"), r"extra\['stream'\]\['pos'\]"),
    "position missing": (_drop(["stream", "pos"]), r"extra\['stream'\] has no 'pos'"),
    "epoch rng of an unknown kind": (_extra(["stream", "epoch_rng", "bit_generator"], "Dice"),
                                     r"extra\['stream'\]\['epoch_rng'\] is not a bit-gen"),
    "epoch rng state a float": (_extra(["stream", "epoch_rng", "state", "state"], 1.5),
                                r"extra\['stream'\]\['epoch_rng'\] is not a bit-generator"),
    "model rng state too large": (_model_rng(["state", "inc"], 2**200),
                                  r"rng_state\['model'\] is not a bit-generator state"),
    "model rng flag a bool": (_model_rng(["has_uint32"], True),
                              r"rng_state\['model'\] is not a bit-generator state"),
    "no model rng": (lambda s: s["rng_state"].pop("model"), r"rng_state has no 'model'"),
    "no training state": (lambda s: s.update(extra=None),
                          r"extra \(the training state\) must be a dict, got NoneType"),
    "running sum a string": (_extra(["sums", "total"], "nan"),
                             r"extra\['sums'\]\['total'\] must be a number, got str 'nan'"),
    "running sum a bool": (_extra(["sums", "caption"], True), r"extra\['sums'\]\['caption'\]"),
    "running sum missing a value": (_extra(["sums", "aux"], None), r"extra\['sums'\]\['aux'\]"),
    "count negative": (_extra(["count"], -1), r"extra\['count'\] must be in \[0, step=3\]"),
    "count past the step": (_extra(["count"], 4), r"extra\['count'\] must be in \[0, step=3\]"),
    "count zero with sums": (_extra(["count"], 0), r"extra\['count'\] .* got 0 with 6 sum"),  # total, contrastive, caption, aux, aux_load_balance, aux_z_loss (the weighted aux losses only)
    "count a float": (_extra(["count"], 3.0), r"extra\['count'\] must be an int, got float 3.0"),
    "elapsed negative": (_extra(["elapsed_s"], -1.0), r"extra\['elapsed_s'\] must be a finite"),
    "no loss sums": (_drop(["sums"]), r"extra \(the training state\) has no 'sums'"),
}


def test_the_base_run_loads(base_run):
    ck, _, tcfg, _ = run_checkpoint.load_checkpoint(base_run / run_folder.CKPT_NAME)
    assert ck.step == STOP and ck.extra["count"] == STOP and tcfg.steps == STEPS
    assert ck.extra["stream"]["pos"] == 48 and set(ck.extra["sums"]) >= {"total", "aux"}


@pytest.mark.parametrize("case", list(CASES))
def test_meaningless_checkpoint_is_refused(base_run, tmp_path, case):
    import re

    mutate, pattern = CASES[case]
    run = forge(base_run, tmp_path, mutate)
    message = refused(run / run_folder.CKPT_NAME)
    assert re.search(pattern, message), message


@pytest.mark.parametrize("case", ["nan in a sparse weight's data", "infinite second moment",
                                  "logit scale out of reach", "position of another step",
                                  "running sum a string"])
def test_cli_refuses_it_with_one_line(base_run, tmp_path, capsys, case):
    mutate, pattern = CASES[case]
    run = forge(base_run, tmp_path, mutate)
    for argv in (["eval", str(run), "--no-decode"],
                 ["train", "--out", str(run), "--resume", "--quiet"]):
        assert cli.main(argv) == 1
        out, err = capsys.readouterr()
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("minivlmoe: error: checkpoint "), err
        assert pattern.split(r"\[")[0] in lines[0]
    assert run_folder.read_metrics(run) == run_folder.read_metrics(base_run)   # resume changed nothing


def test_cli_process_prints_no_traceback(base_run, tmp_path):
    run = forge(base_run, tmp_path, _v_inf)
    done = subprocess.run([sys.executable, "-m", "minivlmoe", "eval", str(run)],
                          capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "opt_state['v']['ln_f.gamma'] has 2 non-finite" in done.stderr


def test_the_first_problem_is_named(base_run, tmp_path):
    """Two problems: the message names the first checked (parameters before moments)."""
    run = forge(base_run, tmp_path, lambda s: (_v_inf(s), _inf_bias(s)))
    assert "params['blocks.0.attn.q.b']" in refused(run / run_folder.CKPT_NAME)


# ------------------------------------------------------------- the logit-scale bound

def _ratio(betas):
    b1, b2 = betas
    return (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3), steps=st.integers(1, 60),
       extremal=st.booleans())
def test_adamw_never_moves_a_value_further_than_the_bound(seed, scale, steps, extremal):
    """The bound behind the log_logit_scale check: each update moves a value that is not
    decayed by at most ratio * lr_t, ratio = (1-b1)/sqrt((1-b2)(1-b1^2/b2)); the
    extremal gradients g_t ~ (b2/b1)^t (Cauchy-Schwarz's equality case) come close."""
    cfg = optim.AdamWConfig(lr=0.1, warmup_steps=0, total_steps=steps, min_lr_ratio=1.0,
                            max_grad_norm=None, eps=1e-30)
    rng = np.random.default_rng(seed)
    params = {"log_logit_scale": np.array(0.0)}
    state = optim.init_state(params)
    ratio = _ratio(cfg.betas)
    b1, b2 = cfg.betas
    for t in range(1, steps + 1):
        g = (scale * (b2 / b1) ** t if extremal
             else scale * rng.standard_normal() * rng.choice([1e-3, 1.0, 1e3]))
        before = float(params["log_logit_scale"])
        optim.step(params, {"log_logit_scale": np.array(g)}, state, cfg)
        moved = abs(float(params["log_logit_scale"]) - before)
        assert moved <= ratio * cfg.lr * (1 + 1e-12)
    rt = ((1 - b1) / (1 - b1 ** steps) * math.sqrt((1 - b2 ** steps) / (1 - b2))
          * math.sqrt((1 - (b1 * b1 / b2) ** steps) / (1 - b1 * b1 / b2)))
    if extremal:                                   # the last update reaches R_t
        assert moved >= 0.999 * rt * cfg.lr
    tcfg = runs.TrainConfig(steps=steps, lr=0.1, warmup_steps=0, n_train=64, batch_size=16)
    assert abs(float(params["log_logit_scale"])) <= run_checkpoint._adam_reach(tcfg, steps)


def test_reach_of_the_presets():
    """The documented figures: ratio 7.27 for betas (0.9, 0.999); a real run's bound."""
    assert abs(_ratio((0.9, 0.999)) - 7.2703) < 1e-4
    _, tcfg = runs.preset_configs("default")
    reach = run_checkpoint._adam_reach(tcfg, tcfg.steps)
    assert 32 < reach < 34                       # 1.01 * 7.27 * 3e-3 * 1500 + 0.015
    assert contrastive.LOG_LOGIT_SCALE_INIT + reach < math.log(np.finfo(np.float32).max)


# ------------------------------------------------------------- load's own arguments

@pytest.mark.parametrize("bad, kind", [(None, "NoneType"), (3, "int"), (2.5, "float"),
                                       (["ckpt.npz"], "list")])
def test_load_refuses_a_path_that_is_not_a_path(bad, kind):
    for load in (checkpoint.load, run_checkpoint.load_checkpoint):
        with pytest.raises(TypeError, match=rf"path must be a str, bytes or os.PathLike "
                                            rf"naming a checkpoint file, got {kind}"):
            load(bad)


def test_load_refuses_a_nul_byte_and_a_directory(base_run, tmp_path):
    path = str(base_run / run_folder.CKPT_NAME)
    for load in (checkpoint.load, run_checkpoint.load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(path + "\0")
        message = str(info.value)
        assert "\0" not in message and "\n" not in message
        assert message.startswith(f"checkpoint {path + chr(0)!r}: ") and "NUL byte" in message
        with pytest.raises(CheckpointError, match="cannot be read: it is a directory"):
            load(tmp_path)


def test_load_takes_bytes_and_pathlike(base_run):
    path = base_run / run_folder.CKPT_NAME
    ck = checkpoint.load(path)
    assert run_checkpoint.load_checkpoint(bytes(path))[0].step == ck.step == STOP

    class Bad:
        def __fspath__(self):
            return 5

    with pytest.raises(TypeError, match="got Bad"):
        checkpoint.load(Bad())
    missing = base_run / "nope.npz"
    with pytest.raises(CheckpointError, match=rf"checkpoint {missing}: cannot be read"):
        checkpoint.load(bytes(missing))


def test_a_nan_running_sum_in_a_hand_edited_manifest_is_refused(base_run, tmp_path):
    """save cannot write NaN (strict JSON), but a hand-edited manifest can hold it."""
    import json
    import zipfile

    run = forge(base_run, tmp_path, lambda s: None)
    path = run / run_folder.CKPT_NAME
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    manifest = np.lib.format.read_array(zipfile.ZipFile(path).open("__manifest__.npy"))
    text = json.loads(manifest.tobytes())
    text["extra"]["sums"]["total"] = float("nan")
    raw = np.frombuffer(json.dumps(text).encode(), dtype=np.uint8)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            if name == "__manifest__.npy":
                with zf.open(name, "w") as f:
                    np.lib.format.write_array(f, raw)
            else:
                zf.writestr(name, data)
    assert "extra['sums']['total'] must be finite, got nan" in refused(path)
