"""Runs written before log_temp was renamed log_logit_scale (run format version 1) are
refused with one line naming the version, by every way of loading a run."""

import json

import pytest

from minivlmoe import checkpoint, cli, run_checkpoint, run_folder, runs, train

OLD = (r"run format version 1 is not supported: this minivlmoe reads version 2 "
       r"\(log_temp was renamed log_logit_scale\); retrain the run")


def _renamed_back(tree):
    return {("log_temp" if k == "log_logit_scale" else k): v for k, v in tree.items()}


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A tiny run rewritten as version 1 wrote it: version 1 config, a "log_temp" leaf."""
    out = tmp_path_factory.mktemp("old_run")
    mcfg, tcfg = runs.preset_configs("tiny", steps=2, eval_every=0)
    train.train(mcfg, tcfg, out, preset="tiny", progress=None, decode_eval=False)
    config_path = out / run_folder.CONFIG_NAME
    config = json.loads(config_path.read_text())
    assert config["version"] == runs.RUN_VERSION == 2
    config["version"] = 1
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    ckpt_path = out / run_folder.CKPT_NAME
    ck = checkpoint.load(ckpt_path)
    opt_state = {**ck.opt_state, "m": _renamed_back(ck.opt_state["m"]),
                 "v": _renamed_back(ck.opt_state["v"])}
    checkpoint.save(ckpt_path, params=_renamed_back(ck.params), opt_state=opt_state,
                    step=ck.step, config={**ck.config, "version": 1},
                    rng_state=ck.rng_state, extra=ck.extra)
    return out


def test_parse_run_config_refuses_version_1():
    mcfg, tcfg = runs.preset_configs("tiny")
    config = runs.run_config(mcfg, tcfg, runs.builtin_tokenizer())
    assert config["version"] == 2
    runs.parse_run_config(config)                                  # version 2 is read
    with pytest.raises(ValueError, match=f"^{OLD}$"):
        runs.parse_run_config({**config, "version": 1})
    with pytest.raises(ValueError, match="unknown run config version 4"):
        runs.parse_run_config({**config, "version": 4})    # 3 is a run on its own data


def test_load_checkpoint_refuses_a_version_1_run(old_run):
    with pytest.raises(checkpoint.CheckpointError, match=f"^checkpoint .*ckpt.npz: {OLD}$"):
        run_checkpoint.load_checkpoint(old_run / run_folder.CKPT_NAME)


@pytest.mark.parametrize("argv", [["eval", "{run}"], ["caption", "{run}"],
                                  ["retrieve", "{run}", "a red circle"],
                                  ["train", "--out", "{run}", "--resume", "--quiet"]])
def test_cli_refuses_a_version_1_run_in_one_line(old_run, argv, capsys):
    assert cli.main([a.format(run=old_run) for a in argv]) == 1
    out, err = capsys.readouterr()
    assert err.startswith("minivlmoe: error: ") and err.count("\n") == 1
    assert "run format version 1 is not supported: this minivlmoe reads version 2" in err
    assert "log_temp was renamed log_logit_scale" in err and "Traceback" not in err
