"""Checkpoints: bit-exact round trips, atomic writes, and refusal of damaged files."""

import json
import os
import zipfile

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe import checkpoint, optim
from minivlmoe.ops import sparse_linear
from minivlmoe.checkpoint import CheckpointError
from minivlmoe.rng_state import restore_rng
from minivlmoe.tree import flatten

CONFIG = {"model": {"width": 8, "experts": "modality", "moe_layers": [1, 3]}, "lr": 1e-3,
          "seed": 3}


def make_run(seed, dtype=np.float64, index_dtype=np.int32, density=0.5):
    """Params (sparse, dense, 0-d leaves) and an optimizer state after two steps."""
    rng = np.random.default_rng(seed)
    lin = sparse_linear.init(rng, 6, 4, density, dtype=dtype)
    lin["W"].indices = lin["W"].indices.astype(index_dtype)
    lin["W"].indptr = lin["W"].indptr.astype(index_dtype)
    params = {"enc": {"lin": lin}, "head": {"W": rng.standard_normal((3, 4)).astype(dtype)},
              "log_logit_scale": np.asarray(0.25, dtype=dtype)}
    state = optim.init_state(params)
    cfg = optim.AdamWConfig(lr=0.01, warmup_steps=1, total_steps=10)
    for _ in range(2):
        optim.step(params, random_grads(params, rng), state, cfg)
    return params, state, rng


def random_grads(params, rng):
    def one(w):
        if isinstance(w, sp.csr_array):
            g = sp.csr_array((rng.standard_normal(w.nnz).astype(w.dtype), w.indices, w.indptr),
                             shape=w.shape)
            g.indices, g.indptr = w.indices, w.indptr
            return g
        return np.asarray(rng.standard_normal(w.shape), dtype=w.dtype)
    return {k: random_grads(v, rng) if isinstance(v, dict) else one(v) for k, v in params.items()}


def assert_identical(a, b):
    """Same keys, leaf types, dtypes, shapes and bytes (csr: data, indices, indptr, flag)."""
    fa, fb = flatten(a), flatten(b)
    assert list(fa) == list(fb)
    for path in fa:
        x, y = fa[path], fb[path]
        assert type(x) is type(y), path
        if isinstance(x, sp.csr_array):
            assert x.shape == y.shape and x.has_canonical_format == y.has_canonical_format, path
            for part in ("data", "indices", "indptr"):
                u, v = getattr(x, part), getattr(y, part)
                assert (u.dtype, u.shape, u.tobytes()) == (v.dtype, v.shape, v.tobytes()), path
        elif isinstance(x, np.ndarray):
            assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes()), path
            assert y.flags.c_contiguous and y.flags.writeable, path
        else:
            assert x == y, path


def save_run(path, seed=0, **kwargs):
    params, state, rng = make_run(seed, **kwargs)
    checkpoint.save(path, params=params, opt_state=state, step=2, config=CONFIG,
                    rng_state=rng.bit_generator.state, extra={"i2t_r1": 0.5})
    return params, state, rng


def rewrite(path, mutate):
    """Rewrite a checkpoint as a *valid* zip after ``mutate(arrays, manifest)``.

    The zip's own CRCs are then correct, so only the manifest checks can catch the change.
    """
    with zipfile.ZipFile(path) as zf:
        arrays = {name[:-4]: np.lib.format.read_array(zf.open(name), allow_pickle=True)
                  for name in zf.namelist()}
    manifest = json.loads(arrays.pop("__manifest__").tobytes())
    mutate(arrays, manifest)
    text = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, __manifest__=text, **arrays)


# ------------------------------------------------------------------------ round trips

@given(seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       index_dtype=st.sampled_from([np.int32, np.int64]), density=st.sampled_from([0.2, 1.0]))
def test_round_trip_is_bit_exact(tmp_path_factory, seed, dtype, index_dtype, density):
    path = tmp_path_factory.mktemp("ckpt") / "run.npz"
    params, state, rng = make_run(seed, dtype, index_dtype, density)
    rng_state = {"data": rng.bit_generator.state,
                 "init": np.random.default_rng(seed + 1).bit_generator.state}
    extra = {"metrics": [0.25, 1], "note": "é"}
    checkpoint.save(path, params=params, opt_state=state, step=7, config=CONFIG,
                    rng_state=rng_state, extra=extra)
    ck = checkpoint.load(path, expected_config=CONFIG)
    assert_identical(ck.params, params)
    assert_identical(ck.opt_state, state)
    assert (ck.step, ck.config, ck.extra, ck.rng_state) == (7, CONFIG, extra, rng_state)
    assert isinstance(ck.opt_state["step"], int) and ck.opt_state["step"] == 2
    restored = restore_rng(ck.rng_state["data"])
    assert restored.random(5).tobytes() == rng.random(5).tobytes()


def test_same_state_gives_same_bytes_and_numpy_can_read_it(tmp_path):
    save_run(tmp_path / "a.npz")
    save_run(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        assert "__manifest__" in npz.files and "params/enc.lin.W:indices" in npz.files


def test_resume_continues_bit_for_bit(tmp_path):
    """Two more optimizer steps after a save/load equal two more steps without it."""
    cfg = optim.AdamWConfig(lr=0.01, warmup_steps=1, total_steps=10)
    for dtype in (np.float32, np.float64):
        params, state, rng = make_run(0, dtype)
        checkpoint.save(tmp_path / "r.npz", params=params, opt_state=state, step=2,
                        config=CONFIG, rng_state=rng.bit_generator.state)
        ck = checkpoint.load(tmp_path / "r.npz")
        rng2 = restore_rng(ck.rng_state)
        for _ in range(2):
            optim.step(params, random_grads(params, rng), state, cfg)
            optim.step(ck.params, random_grads(ck.params, rng2), ck.opt_state, cfg)
        assert_identical(ck.params, params)
        assert_identical(ck.opt_state, state)


def test_config_json_normalization(tmp_path):
    params, state, rng = make_run(0)
    checkpoint.save(tmp_path / "c.npz", params=params, opt_state=state, step=0,
                    config={"shape": (2, 3), "lr": np.float64(0.5)}, rng_state={})
    ck = checkpoint.load(tmp_path / "c.npz", expected_config={"shape": [2, 3], "lr": 0.5})
    assert ck.config == {"shape": [2, 3], "lr": 0.5} and ck.extra is None


def test_empty_subtree_round_trips(tmp_path):
    params = {"a": {}, "b": np.arange(3.0)}
    checkpoint.save(tmp_path / "e.npz", params=params, opt_state={}, step=0, config={},
                    rng_state={})
    ck = checkpoint.load(tmp_path / "e.npz")
    assert ck.params["a"] == {} and ck.opt_state == {}
    assert ck.params["b"].tobytes() == params["b"].tobytes()


# --------------------------------------------------------------------- atomic writes

def _boom_mid_write(file, arrays):
    file.write(b"PK\x03\x04 half a checkpoint")
    raise OSError("No space left on device")


@pytest.mark.parametrize("target, replacement", [
    ("_write_npz", _boom_mid_write),
    ("os.fsync", None),
    ("os.replace", None),
])
def test_failed_write_keeps_old_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch,
                                                               target, replacement):
    path = tmp_path / "run.npz"
    save_run(path, seed=1)
    old = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("simulated failure")

    owner = checkpoint.os if target.startswith("os.") else checkpoint
    monkeypatch.setattr(owner, target.split(".")[-1], replacement or fail)
    with pytest.raises(OSError):
        save_run(path, seed=2)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["run.npz"]
    assert_identical(checkpoint.load(path).params, make_run(1)[0])


def test_failed_first_write_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_write_npz", _boom_mid_write)
    with pytest.raises(OSError, match="No space"):
        save_run(tmp_path / "new.npz")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------- damaged files

def load_error(path, **kwargs):
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path, **kwargs)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path}: ") and "\n" not in message
    assert info.value.__traceback__ is not None and info.value.__suppress_context__
    return message


@pytest.mark.parametrize("keep", [0, 1, 3, 40, 0.5, 0.9, -22, -1])
def test_truncated_file_is_refused(tmp_path, keep):
    path = tmp_path / "run.npz"
    save_run(path)
    data = path.read_bytes()
    cut = int(keep * len(data)) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:cut])
    message = load_error(path)
    assert any(w in message for w in ("empty", "truncated", "zip signature", "corrupted"))


@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_bit_flip_is_refused_or_harmless(tmp_path_factory, where, bit):
    """A flipped bit either raises CheckpointError or changes nothing that is loaded
    (e.g. it hit a zip timestamp): never a silently different model."""
    path = tmp_path_factory.mktemp("flip") / "run.npz"
    params, state, _ = save_run(path)
    data = bytearray(path.read_bytes())
    data[int(where * len(data))] ^= 1 << bit
    path.write_bytes(bytes(data))
    try:
        ck = checkpoint.load(path)
    except CheckpointError as e:
        assert str(e).startswith(f"checkpoint {path}: ")
        return
    assert_identical(ck.params, params)
    assert_identical(ck.opt_state, state)
    assert (ck.step, ck.config) == (2, CONFIG)


def test_bit_flip_sweep(tmp_path):
    """The same property over every 17th byte of the file (~500 flips, under a second)."""
    path = tmp_path / "run.npz"
    params, state, _ = save_run(path)
    data = path.read_bytes()
    refused = 0
    for i in range(0, len(data), 17):
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        path.write_bytes(bytes(flipped))
        try:
            ck = checkpoint.load(path)
        except CheckpointError:
            refused += 1
            continue
        assert_identical(ck.params, params)
        assert_identical(ck.opt_state, state)
    assert refused > 0.6 * (len(data) // 17)


def test_bit_flip_in_weights_is_refused(tmp_path):
    path = tmp_path / "run.npz"
    params, _, _ = save_run(path)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(params["head"]["W"].tobytes())
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))
    assert "params/head.W" in load_error(path)


def test_checksum_mismatch_is_refused(tmp_path):
    path = tmp_path / "run.npz"
    save_run(path)

    def nudge(arrays, manifest):
        arrays["params/head.W"][0, 0] = np.nextafter(arrays["params/head.W"][0, 0], 9.0)
    rewrite(path, nudge)
    assert "'params/head.W' fails its sha256 checksum" in load_error(path)


def test_pickled_object_array_is_refused(tmp_path):
    path = tmp_path / "run.npz"
    save_run(path)
    rewrite(path, lambda arrays, m: arrays.update({"params/head.W": np.array([{"x": 1}])}))
    assert "pickled" in load_error(path)


@pytest.mark.parametrize("mutate, match", [
    (lambda a, m: a.pop("opt_state/m.head.W"), r"missing array\(s\) \['opt_state/m\.head\.W'\]"),
    (lambda a, m: a.update(stowaway=np.zeros(2)), r"unexpected array\(s\).*'stowaway'"),
    (lambda a, m: a.update({"params/head.W": a["params/head.W"][:2]}),
     r"'params/head\.W' has shape \(2, 4\), the manifest says \(3, 4\)"),
    (lambda a, m: a.update({"params/head.W": a["params/head.W"].astype(np.float32)}),
     r"'params/head\.W' has dtype <f4, the manifest says <f8"),
    (lambda a, m: m.update(version=2), r"unknown format version 2 .*reads version 1"),
    (lambda a, m: m.update(format="something-else"), "does not declare format"),
    (lambda a, m: m.pop("config"), "malformed manifest: 'config'"),
    (lambda a, m: m.update(step=-1), r"malformed manifest: 'step' must be >= 0 .*got -1"),
    (lambda a, m: m["trees"]["params"][0].update(kind="tensor"), "unknown leaf kind 'tensor'"),
    (lambda a, m: m["trees"].pop("opt_state"), "no record list for 'opt_state'"),
    (lambda a, m: m["trees"]["params"][0].pop("arrays"), "bad leaf record"),
])
def test_inconsistent_contents_are_refused(tmp_path, mutate, match):
    path = tmp_path / "run.npz"
    save_run(path)
    rewrite(path, mutate)
    assert_matches(load_error(path), match)


def assert_matches(message, pattern):
    import re
    assert re.search(pattern, message), message


def _forge(arrays, manifest, name, value):
    """Replace an array and fix its manifest entry, so only the deeper checks can object."""
    arrays[name] = value
    manifest["arrays"][name] = {"shape": list(value.shape), "dtype": value.dtype.str,
                                "sha256": checkpoint._sha256(value)}


def test_invalid_sparse_pattern_is_refused(tmp_path):
    path = tmp_path / "run.npz"
    save_run(path, density=0.5)
    name = "params/enc.lin.W:indices"
    rewrite(path, lambda a, m: _forge(a, m, name, a[name][::-1].copy()))
    assert "'params/enc.lin.W' is recorded as canonical" in load_error(path)
    save_run(path, density=0.5)
    name = "params/enc.lin.W:indptr"
    rewrite(path, lambda a, m: _forge(a, m, name, a[name] * 2))
    assert "'params/enc.lin.W' is not a valid CSR array" in load_error(path)


def test_manifest_problems(tmp_path):
    path = tmp_path / "run.npz"
    save_run(path)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(path, "w") as zf:
        for n, raw in members.items():
            if n != "__manifest__.npy":
                zf.writestr(n, raw)
    assert "no '__manifest__' array" in load_error(path)
    np.savez(path, __manifest__=np.frombuffer(b"{not json", dtype=np.uint8))
    assert "manifest is not valid JSON" in load_error(path)
    np.savez(path, __manifest__=np.zeros(3))
    assert "must be a 1-d uint8 array" in load_error(path)


def test_wrong_config_names_the_differing_keys(tmp_path):
    path = tmp_path / "run.npz"
    save_run(path)
    other = {"model": {"width": 16, "experts": "modality", "moe_layers": [1, 3]}, "lr": 1e-3,
             "steps": 5}
    message = load_error(path, expected_config=other)
    assert "model.width (saved 8, expected 16)" in message
    assert "seed (not in expected_config)" in message
    assert "steps (missing from the checkpoint)" in message
    assert "lr" not in message.split("differing keys:")[1]
    assert "(saved 3, expected 3.0)" in load_error(path, expected_config={**CONFIG, "seed": 3.0})


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    assert "no zip signature" in load_error(text)
    npy = tmp_path / "array.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    assert "no zip signature" in load_error(npy)
    assert "cannot be read" in load_error(tmp_path / "missing.npz")
    assert "cannot be read" in load_error(tmp_path)
    (tmp_path / "empty.npz").write_bytes(b"")
    assert "the file is empty" in load_error(tmp_path / "empty.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 50)
    assert "truncated or corrupted zip archive" in load_error(tmp_path / "junk.npz")


# --------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("change, error, match", [
    (dict(step=-1), ValueError, "step must be an int >= 0, got -1"),
    (dict(step=1.0), ValueError, "step must be an int"),
    (dict(config=[1]), TypeError, "config must be a dict, got list"),
    (dict(config={"f": {1, 2}}), TypeError, "config must be JSON-serializable"),
    (dict(config={"lr": float("nan")}), TypeError, "config must be JSON-serializable"),
    (dict(rng_state=None), TypeError, "rng_state must be a dict"),
    (dict(extra=object()), TypeError, "extra must be JSON-serializable"),
    (dict(params={"x": np.array(["a"], dtype=object)}), TypeError,
     r"params/x must be a bool, integer or float array, got dtype object"),
    (dict(params={"x": [1.0]}), TypeError, "params/x must be an ndarray, a csr_array"),
    (dict(params={1: np.zeros(2)}), TypeError, "params keys must be str"),
    (dict(params=np.zeros(2)), TypeError, "params must be a dict"),
    (dict(opt_state={"a.b": np.zeros(1), "a": {"b": np.zeros(1)}}), ValueError,
     "two leaves map to the array name 'opt_state/a.b'"),
])
def test_save_rejects_bad_arguments_before_writing(tmp_path, change, error, match):
    args = dict(params={"W": np.eye(2)}, opt_state={}, step=0, config={}, rng_state={}) | change
    with pytest.raises(error, match=match):
        checkpoint.save(tmp_path / "x.npz", **args)
    assert os.listdir(tmp_path) == []


def test_load_rejects_bad_expected_config(tmp_path):
    save_run(tmp_path / "r.npz")
    with pytest.raises(TypeError, match="expected_config must be a dict or None, got list"):
        checkpoint.load(tmp_path / "r.npz", expected_config=[1])


def test_restore_rng_errors():
    state = np.random.default_rng(0).bit_generator.state
    with pytest.raises(TypeError, match="rng_state must be a dict, got list"):
        restore_rng([state])
    with pytest.raises(ValueError, match=r"rng_state\['bit_generator'\] must be one of"):
        restore_rng({**state, "bit_generator": "Dice"})
    with pytest.raises(ValueError, match="rng_state is not a valid PCG64 state"):
        restore_rng({**state, "state": {"state": 1}})
    for name in ("PCG64", "Philox", "SFC64", "MT19937"):
        g = np.random.Generator(getattr(np.random, name)(5))
        g.random(3)
        s = json.loads(json.dumps(g.bit_generator.state, default=checkpoint.json_default))
        assert restore_rng(s).random() == g.random()
