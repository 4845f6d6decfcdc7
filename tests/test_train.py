"""Training loop, evaluation driver, resume: tests/test_train.py.

The end-to-end tests use the "tiny" preset with fewer steps (a run takes well under a
second); the data-order and evaluation helpers are checked against naive loops.
"""

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minivlmoe import (checkpoint, evaluate, metrics, run_checkpoint, run_folder, runs, timing,
                       train)
from minivlmoe.scenes import parse_caption

from conftest import same_trees, without_time


def tiny(steps=12, eval_every=6, **overrides):
    experts = overrides.pop("experts", None)
    dtype = overrides.pop("dtype", None)
    return runs.preset_configs("tiny", experts=experts, dtype=dtype, steps=steps,
                                eval_every=eval_every, **overrides)


# ----------------------------------------------------------------------------- data order

@given(n=st.integers(2, 40), batch=st.integers(1, 40), seed=st.integers(0, 2**16),
       before=st.integers(0, 30), after=st.integers(1, 30))
def test_batch_stream_resumes_exactly(n, batch, seed, before, after):
    batch = min(batch, n)
    stream = train.BatchStream(n, batch, np.random.default_rng(seed))
    for _ in range(before):
        stream.next()
    state = json.loads(json.dumps(stream.state()))        # as stored in a checkpoint
    expected = [stream.next() for _ in range(after)]
    resumed = train.BatchStream.from_state(n, batch, state)
    got = [resumed.next() for _ in range(after)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))


@given(n=st.integers(2, 40), batch=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_batch_stream_matches_naive_epochs(n, batch, seed):
    """Naive reference: per epoch one permutation, full batches in order, tail dropped."""
    batch = min(batch, n)
    per_epoch = n // batch
    stream = train.BatchStream(n, batch, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    for _ in range(3):
        order = rng.permutation(n)
        for j in range(per_epoch):
            idx = stream.next()
            assert len(idx) == batch
            assert list(idx) == [order[j * batch + i] for i in range(batch)]


def test_batch_stream_epochs_are_passes_of_the_one_shuffler():
    """Each epoch of the stream is one drop_last pass of data.minibatch_indices."""
    from minivlmoe.data import minibatch_indices

    stream = train.BatchStream(10, 3, np.random.default_rng(4))
    rng = np.random.default_rng(4)
    for _ in range(3):
        for expected in minibatch_indices(10, 3, rng, drop_last=True):
            assert np.array_equal(stream.next(), expected)


def test_batch_stream_refuses_a_position_between_batches():
    state = train.BatchStream(10, 3, np.random.default_rng(0)).state()
    with pytest.raises(ValueError, match="pos must be a multiple of batch_size=3, got 4"):
        train.BatchStream.from_state(10, 3, {**state, "pos": 4})


def test_section_timer_charges_innermost_section(monkeypatch):
    clock = iter([0.0, 2.0, 5.0, 6.0])                 # outer in, inner in, inner out, outer out
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    timer = timing.SectionTimer()
    with timer.section("outer"):
        with timer.section("inner"):
            pass
    assert timer.seconds == {"outer": 3.0, "inner": 3.0}


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 1), ("lr", 0.0),
                                          ("eval_every", -1), ("max_objects", 4),
                                          ("noise", 0.9), ("warmup_steps", 10**6)])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        runs.TrainConfig(**{"steps": 100, field: value})


def test_preset_configs_names_and_overrides():
    assert set(runs.PRESETS) == {"tiny", "default", "large", "scaling"}
    mcfg, tcfg = runs.preset_configs("tiny", experts="dense", dtype="float64", steps=7)
    assert (mcfg.experts, mcfg.dtype, tcfg.steps) == ("dense", "float64", 7)
    with pytest.raises(ValueError, match="preset"):
        runs.preset_configs("huge")
    with pytest.raises(ValueError, match="experts"):
        runs.preset_configs("tiny", experts="sparse")


def test_run_config_round_trip():
    mcfg, tcfg = tiny()
    tok = runs.builtin_tokenizer()
    d = json.loads(json.dumps(runs.run_config(mcfg, tcfg, tok, "tiny")))
    assert runs.parse_run_config(d) == (mcfg, tcfg, tok)
    with pytest.raises(ValueError, match="run config"):
        runs.parse_run_config({"format": "something else"})


# ----------------------------------------------------------------------------- evaluation

def test_caption_keys_identify_equal_texts():
    keys = evaluate.caption_keys(["a b", "c", "a b", "d", "c"])
    assert keys[0] == keys[2] and keys[1] == keys[4]
    assert len(set(keys.tolist())) == 3


@given(seed=st.integers(0, 2**16), n=st.integers(3, 12))
def test_retrieval_heldout_queries_match_naive_loop(seed, n):
    """Held-out recall: held-out images (or captions) are the queries, the whole split
    is searched, a result is correct when its caption text equals the query's."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, 4))
    txt = rng.standard_normal((n, 4))
    keys = rng.integers(0, 3, n)                          # many duplicate captions
    held = rng.random(n) < 0.5
    held[0] = True
    out = evaluate.retrieval(img, txt, keys, held)
    sim = img @ txt.T
    for direction, mat in (("i2t", sim), ("t2i", sim.T)):
        hits = []
        for q in range(n):
            if not held[q]:
                continue
            good = [keys[j] == keys[q] for j in range(n)]
            best_good = max(mat[q, j] for j in range(n) if good[j])
            # pessimistic ties: a wrong item scoring >= the best right one ranks ahead
            ahead = sum(1 for j in range(n) if not good[j] and mat[q, j] >= best_good)
            hits.append(ahead == 0)
        assert out[f"heldout_{direction}_r1"] == pytest.approx(np.mean(hits))
    full = metrics.retrieval_recall(sim, keys, keys)
    assert out["i2t_r1"] == pytest.approx(full["i2t_r1"])


def test_zero_shot_prompts_are_grammar_captions_naming_the_value():
    for attribute in evaluate.ZERO_SHOT_ATTRIBUTES:
        values, prompts = evaluate.zero_shot_prompts(attribute)
        assert len(values) == len(prompts)
        assert len({len(p) for p in prompts}) == 1        # same ensemble size per class
        for value, group in zip(values, prompts):
            for prompt in group:
                (size, color, shape), = parse_caption(prompt).objects
                assert value == {"size": size, "color": color, "shape": shape}[attribute]


def test_evaluate_user_data_without_records():
    """A user's dataset has no records and no held-out flags: those metrics are left out."""
    from minivlmoe import model
    from minivlmoe.data import ImageCaptionDataset

    mcfg, _ = tiny()
    params = model.init(np.random.default_rng(0), mcfg)
    rng = np.random.default_rng(1)
    data = ImageCaptionDataset(rng.random((6, 32, 32, 3), dtype=np.float32),
                               ["a red circle", "a blue square", "a red circle",
                                "a big green cross", "a cyan triangle", "a cyan triangle"])
    out = evaluate.evaluate(params, mcfg, data, runs.builtin_tokenizer())
    for key in ("i2t_r1", "t2i_r5", "caption_exact", "bleu4", "test_total", "experts"):
        assert key in out
    assert not any(k.startswith(("zs_", "heldout_")) for k in out)
    json.dumps(out, allow_nan=False)                      # JSON-able


def test_captioning_metrics():
    out = evaluate.captioning(["a b c d", "a b"], ["a b c d", "a c"],
                              heldout=np.array([False, True]))
    assert out["caption_exact"] == 0.5 and out["heldout_caption_exact"] == 0.0
    assert 0.0 <= out["bleu4"] <= 1.0


# ----------------------------------------------------------------------------- training

def test_tiny_preset_trains_and_its_loss_falls(tmp_path):
    mcfg, tcfg = runs.preset_configs("tiny", n_train=16, batch_size=16, eval_every=0,
                                      steps=40, warmup_steps=4)
    result = train.train(mcfg, tcfg, tmp_path, progress=None)
    first, last = result.history[0]["total"], result.history[-1]["total"]
    assert last < first / 3, (first, last)
    records = run_folder.read_metrics(tmp_path)
    assert len(records) == 1
    for key in ("step", "elapsed_s", "i2t_r1", "t2i_r1", "caption_exact", "bleu4", "total",
                "contrastive", "caption", "aux", "test_total", "zs_color", "experts"):
        assert key in records[0], key
    assert json.loads((tmp_path / "config.json").read_text())["model"] == mcfg.to_dict()
    assert (tmp_path / "ckpt.npz").exists()


def test_progress_line_and_eval_lines(tmp_path, capsys):
    import sys

    mcfg, tcfg = tiny(steps=4, eval_every=2)
    train.train(mcfg, tcfg, None, progress=sys.stderr)
    err = capsys.readouterr().err
    assert "step     1/4" in err and "tok/s" in err and "ETA" in err
    assert err.count("eval @ step") == 2


def test_same_seed_gives_identical_metrics(tmp_path):
    mcfg, tcfg = tiny()
    a = train.train(mcfg, tcfg, tmp_path / "a", progress=None)
    b = train.train(mcfg, tcfg, tmp_path / "b", progress=None)
    assert a.history == b.history
    assert without_time(run_folder.read_metrics(tmp_path / "a")) == \
        without_time(run_folder.read_metrics(tmp_path / "b"))
    c = train.train(mcfg, dataclasses.replace(tcfg, seed=1), None, progress=None)
    assert c.history != a.history


@pytest.mark.parametrize("dtype, experts, stop", [("float32", "modality", 5),
                                                  ("float64", "shared", 6),
                                                  ("float32", "dense", 9)])
def test_resume_equals_uninterrupted_run(tmp_path, dtype, experts, stop):
    """Stop (between or at evaluations), resume from the checkpoint: same losses, same
    metrics and bit-identical parameters as the uninterrupted run."""
    mcfg, tcfg = tiny(steps=12, eval_every=6, dtype=dtype, experts=experts,
                      batch_size=8, n_train=20)               # epochs end mid-run
    full = train.train(mcfg, tcfg, tmp_path / "full", progress=None)
    part = train.train(mcfg, tcfg, tmp_path / "part", stop_at=stop, progress=None)
    assert part.stopped and part.step == stop
    rest = train.train(mcfg, tcfg, tmp_path / "part", resume=True, progress=None)
    assert not rest.stopped and rest.step == 12
    assert part.history + rest.history == full.history
    assert without_time(run_folder.read_metrics(tmp_path / "part")) == \
        without_time(run_folder.read_metrics(tmp_path / "full"))
    same_trees(rest.params, full.params)
    same_trees(rest.opt_state, full.opt_state)


def test_resume_drops_metrics_written_after_the_checkpoint(tmp_path):
    mcfg, tcfg = tiny(steps=8, eval_every=4)
    train.train(mcfg, tcfg, tmp_path, stop_at=4, progress=None)
    with open(tmp_path / "metrics.jsonl", "a") as f:       # as if the crash came later
        f.write(json.dumps({"step": 6, "i2t_r1": 0.0}) + "\n")
    train.train(mcfg, tcfg, tmp_path, resume=True, progress=None)
    assert [r["step"] for r in run_folder.read_metrics(tmp_path)] == [4, 8]


def test_resume_refuses_other_config_and_damaged_checkpoint(tmp_path):
    mcfg, tcfg = tiny(steps=6, eval_every=3)
    train.train(mcfg, tcfg, tmp_path, stop_at=3, progress=None)
    with pytest.raises(checkpoint.CheckpointError, match="train.lr"):
        train.train(mcfg, dataclasses.replace(tcfg, lr=1e-4), tmp_path, resume=True,
                    progress=None)
    path = tmp_path / "ckpt.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(checkpoint.CheckpointError, match="ckpt.npz"):
        train.train(mcfg, tcfg, tmp_path, resume=True, progress=None)
    with pytest.raises(ValueError, match="out_dir"):
        train.train(mcfg, tcfg, None, resume=True)


def test_train_rejects_bad_arguments():
    mcfg, tcfg = tiny()
    with pytest.raises(TypeError, match="train_cfg"):
        train.train(mcfg, {"steps": 3}, None)
    with pytest.raises(TypeError, match="model_cfg"):
        train.train(tcfg, tcfg, None)
    with pytest.raises(ValueError, match="stop_at"):
        train.train(mcfg, tcfg, None, stop_at=tcfg.steps + 1)
    with pytest.raises(TypeError, match="resume must be a bool"):
        train.train(mcfg, tcfg, None, resume="no")
    with pytest.raises(TypeError, match="decode_eval must be a bool"):
        train.train(mcfg, tcfg, None, decode_eval=1)


def test_load_checkpoint_checks_params_against_the_config(tmp_path):
    mcfg, tcfg = tiny(steps=2, eval_every=0)
    result = train.train(mcfg, tcfg, tmp_path, progress=None)
    ckpt, m2, t2, tok = run_checkpoint.load_checkpoint(tmp_path / "ckpt.npz")
    assert (m2, t2) == (mcfg, tcfg)
    same_trees(ckpt.params, result.params)
    # a checkpoint whose params do not fit its config is refused with one clear line
    bad = dict(result.params, ln_f={"gamma": result.params["ln_f"]["gamma"][:-1],
                                    "beta": result.params["ln_f"]["beta"]})
    checkpoint.save(tmp_path / "bad.npz", params=bad, opt_state=ckpt.opt_state, step=2,
                    config=ckpt.config, rng_state=ckpt.rng_state, extra=ckpt.extra)
    with pytest.raises(checkpoint.CheckpointError, match="ln_f.gamma"):
        run_checkpoint.load_checkpoint(tmp_path / "bad.npz")
