"""Your own data (minivlmoe/userdata.py): the .npz format, bad files, and a whole run.

A tiny data set written by the test (8x8 images of a colored square, templated captions
with capitals and punctuation) goes through ``cli.main``: train, eval, caption,
retrieve and resume; every bad file gives one line and exit status 1.
"""

import json
import shutil

import numpy as np
import pytest

from minivlmoe import cli, run_folder, runs, train
from minivlmoe.checkpoint import CheckpointError
from minivlmoe.userdata import DataError, UserData, open_source

COLORS = {"red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230)}


def tiny_arrays(n=30):
    images, captions = np.zeros((n, 8, 8, 3), np.uint8), []
    for i in range(n):
        name = list(COLORS)[i % 3]
        images[i, 2:6, 2:6] = COLORS[name]
        captions.append(f"A {name} square." if i % 2 else f"the {name} block")
    return {"images": images, "captions": np.array(captions)}


def write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


TRAIN = ["--preset", "tiny", "--steps", "6", "--eval-every", "3", "--batch-size", "8",
         "--patch", "4", "--quiet"]


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    data = write(root / "tiny.npz", **tiny_arrays())
    out = root / "run"
    assert cli.main(["train", "--data", data, *TRAIN, "--out", str(out)]) == 0
    return data, out


def test_the_run_records_its_data_and_vocabulary(user_run):
    data, out = user_run
    config = json.loads((out / "config.json").read_text())
    assert config["version"] == runs.DATA_RUN_VERSION
    assert config["data"] == UserData(data).source
    assert config["data"]["test_fraction"] == 0.2 and len(config["data"]["sha256"]) == 64
    assert config["model"]["image_size"] == 8 and config["model"]["patch"] == 4
    # the vocabulary is the training captions' words, lowercased, without punctuation
    assert config["tokenizer"]["words"] == ["a", "block", "blue", "green", "red", "square",
                                            "the"]
    assert config["model"]["vocab_size"] == 11 and config["model"]["max_text_len"] == 5
    assert config["train"]["n_train"] == 24 and config["train"]["n_test"] == 6
    assert [r["step"] for r in run_folder.read_metrics(out)] == [3, 6]
    assert not any(k.startswith(("zs_", "heldout_")) for k in run_folder.read_metrics(out)[-1])


def test_eval_caption_retrieve_on_a_user_run(user_run, tmp_path, capsys):
    data, out = user_run
    assert cli.main(["eval", str(out), "--json", str(tmp_path / "e.json")]) == 0
    text = capsys.readouterr().out
    assert "6 test pairs" in text and "zero-shot  n/a (user data" in text
    assert "held-out   n/a (user data" in text
    results = json.loads((tmp_path / "e.json").read_text())
    assert results["i2t_r1"] == run_folder.read_metrics(out)[-1]["i2t_r1"]
    assert cli.main(["caption", str(out), "--n", "3"]) == 0
    text = capsys.readouterr().out
    assert text.count("generated:") == 3 and "reference: the" in text  # normalized refs
    assert cli.main(["retrieve", str(out), "A RED Square!", "--top", "6"]) == 0
    text, err = capsys.readouterr()
    assert text.count("score") == 6 and "note:" not in err     # punctuation is no word
    test = UserData(data).splits(0).test
    marked = [line for line in text.splitlines() if line[5:6] == "="]
    assert len(marked) == sum(c.lower().strip(".") == "a red square" for c in test.captions)
    assert len(marked) >= 1
    assert cli.main(["plot", str(out)]) == 0                        # text mode: the summary
    text = capsys.readouterr().out
    assert "i2t R@1" in text and "6 steps in history.jsonl (1..6)" in text


def test_resume_on_user_data_equals_the_uninterrupted_run(user_run, tmp_path):
    data, out = user_run
    mcfg, tcfg = runs.preset_configs("tiny", data=UserData(data), patch=4, steps=6,
                                     eval_every=3, batch_size=8)
    train.train(mcfg, tcfg, tmp_path, data=UserData(data), stop_at=4, preset="tiny",
                progress=None)
    assert cli.main(["train", "--out", str(tmp_path), "--resume", "--quiet"]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa
    assert strip(run_folder.read_metrics(tmp_path)) == strip(run_folder.read_metrics(out))


def test_a_moved_or_changed_data_file_is_one_line(user_run, tmp_path, capsys):
    data, out = user_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    moved = tmp_path / "moved.npz"
    shutil.move(data, moved)
    try:
        assert cli.main(["eval", str(run)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("minivlmoe: error: the run's data file is missing")
        assert data in err and err.count("\n") == 1
        assert cli.main(["eval", str(run), "--data", str(moved), "--no-decode"]) == 0
        capsys.readouterr()
        arrays = tiny_arrays()
        arrays["captions"][0] = "a changed caption"
        write(tmp_path / "changed.npz", **arrays)
        assert cli.main(["retrieve", str(run), "a red square", "--data",
                         str(tmp_path / "changed.npz")]) == 1
        err = capsys.readouterr().err
        assert "the data file changed since the run was trained (sha256" in err
        assert err.count("\n") == 1
    finally:
        shutil.move(moved, data)
    with pytest.raises(DataError, match="missing"):
        open_source(UserData(data).source, tmp_path / "nowhere.npz")


def test_data_does_not_apply_to_a_builtin_run(tmp_path, capsys):
    mcfg, tcfg = runs.preset_configs("tiny", steps=1, warmup_steps=0)
    train.train(mcfg, tcfg, tmp_path, progress=None)
    path = write(tmp_path / "d.npz", **tiny_arrays())
    assert cli.main(["eval", str(tmp_path), "--data", path]) == 1
    assert "trained on the built-in world" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path), "--resume", "--data", path]) == 1
    assert "--data does not match" in capsys.readouterr().err


def test_a_file_split_is_used_and_the_seeded_split_is_reproducible(tmp_path):
    arrays = tiny_arrays()
    split = np.array(["train"] * 25 + ["test"] * 5)
    ud = UserData(write(tmp_path / "s.npz", **arrays, split=split,
                        labels=np.arange(30) % 3))
    s = ud.splits(7)
    assert len(s.test) == 5 and s.test.captions == arrays["captions"][25:].tolist()
    assert ud.source["test_fraction"] is None and (ud.labels == np.arange(30) % 3).all()
    ud = UserData(write(tmp_path / "n.npz", **arrays), test_fraction=0.3)
    assert len(ud.splits(0).test) == 9
    assert ud.splits(0).test.captions == ud.splits(0).test.captions
    assert (ud.test_mask(1) != ud.test_mask(0)).any() and ud.test_mask(1).sum() == 9
    assert len(ud.splits(0).train) + len(ud.splits(0).test) == 30


def _bad(name):
    a = tiny_arrays()
    if name == "count":
        a["captions"] = a["captions"][:-1]
    elif name == "shape":
        a["images"] = a["images"][:, :, :7]
    elif name == "gray":
        a["images"] = a["images"][..., 0]
    elif name == "dtype":
        a["images"] = a["images"].astype(np.int64)
    elif name == "nan":
        a["images"] = a["images"] / 255.0
        a["images"][3, 0, 0, 1] = np.nan
    elif name == "range":
        a["images"] = a["images"].astype(np.float32)
    elif name == "empty":
        a["captions"][4] = " ... "
    elif name == "bytes":
        a["captions"] = a["captions"].astype("S")
    elif name == "object":
        a["captions"] = a["captions"].astype(object)
    elif name == "split":
        a["split"] = np.array(["train"] * 28 + ["test", "val"])
    elif name == "few_test":
        a["split"] = np.array(["train"] * 29 + ["test"])
    elif name == "unknown":
        a["caption"] = a.pop("captions")
    elif name == "labels":
        a["labels"] = np.zeros(30)
    return a


BAD = {"count": r"'captions' must have shape \(30,\), one caption per image, got \(29,\)",
       "shape": r"'images' must have shape \(B, R, R, 3\) \(square RGB\), got \(30, 8, 7, 3\)",
       "gray": r"'images' must have shape \(B, R, R, 3\)",
       "dtype": r"'images' must have dtype uint8 .* got int64",
       "nan": r"'images' must be finite, got 1 NaN",
       "range": r"'images' \(float\) must hold values in \[0, 1\], got values in \[0, 230\]",
       "empty": r"captions\[4\] must hold at least one word, got ' \.\.\. '",
       "bytes": r"'captions' must be a str array \(dtype <U..\), got dtype \|S",
       "object": r"'captions' is an object array, which needs pickle and is refused",
       "split": r"'split' must hold only 'train' and 'test', got \['val'\]",
       "few_test": r"the test split must hold at least 2 pairs, got 1 of 30",
       "unknown": r"unknown array\(s\) \['caption'\]",
       "labels": r"'labels' must be a \(30,\) integer array"}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_data_is_one_clear_line(name, tmp_path, capsys):
    path = write(tmp_path / f"{name}.npz", **_bad(name))
    with pytest.raises(DataError, match=BAD[name]) as e:
        UserData(path)
    assert str(e.value).endswith(f"({path})") and isinstance(e.value, ValueError)
    assert cli.main(["train", "--data", path, *TRAIN, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minivlmoe: error: ") and err.count("\n") == 1 and path in err
    assert not (tmp_path / "r").exists()


def test_bad_data_arguments(tmp_path, capsys):
    path = write(tmp_path / "d.npz", **tiny_arrays())
    with pytest.raises(DataError, match="at least 2 pairs, got 0"):
        UserData(path, test_fraction=0.01)
    with pytest.raises(DataError, match="no such data file"):
        UserData(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz file"):
        UserData(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="has a split array"):
        UserData(write(tmp_path / "s.npz", **tiny_arrays(),
                       split=np.array(["train", "test"] * 15)), test_fraction=0.5)
    with pytest.raises(ValueError, match=r"patch must divide the image size 8 of .*, got 3"):
        runs.preset_configs("tiny", data=UserData(path), patch=3)
    with pytest.raises(ValueError, match="model_cfg.image_size must be 8"):
        train.train(*runs.preset_configs("tiny"), data=UserData(path), progress=None)
    for argv, code in ((["--data", path, "--patch", "3"], 2),
                       (["--data", path, "--n-train", "8"], 2),
                       (["--test-fraction", "0.5"], 2),
                       (["--data", path, "--test-fraction", "1.5"], 2)):
        with pytest.raises(SystemExit) as e:
            cli.main(["train", *argv, "--out", str(tmp_path / "r"), "--quiet"])
        assert e.value.code == code
    assert "usage:" in capsys.readouterr().err


def test_default_patch_divides_the_image():
    assert [runs.default_patch(r) for r in (8, 16, 28, 32, 7, 1)] == [4, 8, 7, 8, 1, 1]
    assert runs.default_patch(16, 4) == 4


def test_builtin_runs_stay_version_2(tmp_path):
    mcfg, tcfg = runs.preset_configs("tiny")
    config = runs.run_config(mcfg, tcfg, runs.builtin_tokenizer(), "tiny")
    assert config["version"] == 2 and "data" not in config
    assert runs.parse_run_config(config)[0] == mcfg
    with pytest.raises(ValueError, match="version 2 must not have a 'data' entry"):
        runs.parse_run_config({**config, "data": {}})
    with pytest.raises(ValueError, match="version 3 must have a 'data' entry"):
        runs.parse_run_config({**config, "version": 3})


def test_metrics_compare_captions_in_normalized_form():
    from minivlmoe.evaluate import caption_keys, captioning

    keys = caption_keys(["A red square.", "a red square", "the red block"])
    assert keys[0] == keys[1] != keys[2]
    assert captioning(["a red square", "a blue"], ["A Red square!", "a blue square"]) \
        ["caption_exact"] == 0.5


def test_train_accepts_a_pair_of_datasets(tmp_path, capsys):
    from minivlmoe.data import ImageCaptionDataset

    a = tiny_arrays()
    pair = (ImageCaptionDataset(a["images"][:24], a["captions"][:24].tolist()),
            ImageCaptionDataset(a["images"][24:], a["captions"][24:].tolist()))
    mcfg, tcfg = runs.preset_configs("tiny", data=pair, steps=4, eval_every=2, batch_size=8)
    assert (mcfg.image_size, mcfg.patch, tcfg.n_train, tcfg.n_test) == (8, 4, 24, 6)
    whole = train.train(mcfg, tcfg, tmp_path / "a", data=pair, progress=None)
    train.train(mcfg, tcfg, tmp_path / "b", data=pair, stop_at=3, progress=None)
    resumed = train.train(mcfg, tcfg, tmp_path / "b", data=pair, resume=True, progress=None)
    assert resumed.history == whole.history[3:]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["data"]["kind"] == "memory" and len(config["data"]["sha256"]) == 64
    other = (pair[0], ImageCaptionDataset(a["images"][24:], ["a red square"] * 6))
    with pytest.raises(CheckpointError, match="data.sha256"):  # other data: refused
        train.train(mcfg, tcfg, tmp_path / "b", data=other, resume=True, progress=None)
    assert cli.main(["eval", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "trained on datasets passed to train.train" in err and err.count("\n") == 1
    with pytest.raises(TypeError, match="data must be None, a minivlmoe.userdata.UserData"):
        train.train(mcfg, tcfg, data=pair[0], progress=None)


def _write_folder(folder, arrays, split=None):
    from PIL import Image

    folder.mkdir()
    lines = ["# file\tcaption"]
    for i, (image, caption) in enumerate(zip(arrays["images"], arrays["captions"])):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        lines.append(f"{i:03d}.png\t{caption}" + (f"\t{split[i]}" if split else ""))
    (folder / "captions.tsv").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    return str(folder)


def test_a_folder_of_png_files_with_captions_tsv(tmp_path, capsys):
    pytest.importorskip("PIL", reason="the folder form needs Pillow (optional extra)")
    arrays = tiny_arrays()
    folder = _write_folder(tmp_path / "pics", arrays)
    ud = UserData(folder)
    assert ud.source["kind"] == "folder" and (ud.images == arrays["images"]).all()
    npz = UserData(write(tmp_path / "same.npz", **arrays))
    assert ud.splits(0).test.captions == npz.splits(0).test.captions
    out = tmp_path / "run"
    assert cli.main(["train", "--data", folder, *TRAIN, "--out", str(out)]) == 0
    assert cli.main(["eval", str(out), "--no-decode"]) == 0
    capsys.readouterr()
    (tmp_path / "pics" / "007.png").write_bytes((tmp_path / "pics" / "008.png").read_bytes())
    assert cli.main(["eval", str(out)]) == 1                   # one image changed
    assert "the data file changed" in capsys.readouterr().err
    split = ["test" if i < 4 else "train" for i in range(30)]
    assert len(UserData(_write_folder(tmp_path / "s", arrays, split)).splits(0).test) == 4
    (tmp_path / "s" / "captions.tsv").write_text("000.png\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1 of captions.tsv must be 'file<TAB>caption'"):
        UserData(tmp_path / "s")
    (tmp_path / "s" / "captions.tsv").write_text("000.png\ta\n001.pngx\tb\n", encoding="utf-8")
    with pytest.raises(DataError, match="image '001.pngx' cannot be read"):
        UserData(tmp_path / "s")


def test_a_folder_without_pillow_is_one_line(tmp_path, monkeypatch):
    import sys

    (tmp_path / "captions.tsv").write_text("a.png\ta caption\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "PIL", None)                # import PIL fails
    with pytest.raises(DataError, match=r"needs Pillow, which is not installed .*\.\[images\]"):
        UserData(tmp_path)
