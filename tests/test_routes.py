"""``minivlmoe routes``: its counts are the MoE layers' own, one map entry per patch, the
router entropy in metrics.jsonl, the PNG, and the one-line errors (tiny runs, in-process)."""

import json
import math
import re
import shutil

import numpy as np
import pytest

from minivlmoe import cli, commands, inference, routes, sequence
from minivlmoe.tokenizer import PAD_ID

TINY = ["--preset", "tiny", "--steps", "6", "--eval-every", "3", "--max-objects", "2",
        "--quiet"]            # two objects: captions of different lengths, so padding


@pytest.fixture(scope="module", params=["modality", "shared"])
def run_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"routes-{request.param}")
    assert cli.main(["train", *TINY, "--experts", request.param, "--out", str(out)]) == 0
    return out


def _report(run_dir, **kw):
    ckpt, model_cfg, train_cfg, tokenizer = commands._load_run(str(run_dir))
    test = commands._test_split(ckpt, model_cfg, train_cfg, tokenizer)
    metrics = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    out = routes.report(ckpt.params, model_cfg, test, tokenizer, metrics, pad_id=PAD_ID, **kw)
    out["ids"] = tokenizer.encode(test.captions[:kw.get("batch", 256)], model_cfg.max_text_len,
                                  truncate=True)                      # (B, T)
    return out, model_cfg


def test_counts_add_up_to_the_moe_layers_own_routed_and_load(run_dir):
    out, cfg = _report(run_dir, batch=24)
    assert out["counts"]
    layers = out["stats"]["moe"]
    assert {layer for layer, _ in out["counts"]} == set(layers)
    for (layer, pool), c in out["counts"].items():
        own = layers[layer]["pools"][pool]
        assert c.routed.shape == (3, cfg.num_experts)
        np.testing.assert_array_equal(c.routed.sum(axis=0), own["routed"])
        np.testing.assert_array_equal(c.kept.sum(axis=0), own["load"])
        assert c.dropped_fraction == pytest.approx(own["dropped_fraction"])
        if pool == "image":                        # modality mode: image tokens only
            assert c.routed[1:].sum() == 0 and c.routed[0].sum() > 0
        if pool == "text":
            assert c.routed[0].sum() == 0 and c.routed[1:].sum(axis=1).min() > 0
        if pool == "shared":                       # every kind goes to the one pool
            assert c.routed.sum(axis=1).min() > 0
    # all tokens of a kind: 1+P image tokens per pair, every non-pad text token
    for layer in layers:
        total = sum(c.routed.sum(axis=1) for (lay, _), c in out["counts"].items()
                    if lay == layer)                                  # (3,)
        assert total[0] == 24 * (1 + cfg.num_patches) * cfg.top_k
        ids = out["ids"]                                              # (B, T)
        assert total[1] == (ids[:, 1:] != PAD_ID).sum() * cfg.top_k   # caption inputs
        assert total[2] == (ids != PAD_ID).sum() * cfg.top_k          # retrieval text


def test_pool_counts_against_a_loop_with_drops():
    rng = np.random.default_rng(0)
    kinds = rng.integers(0, 3, size=40)                               # (B*S,)
    tokens = np.sort(rng.choice(40, size=25, replace=False))          # (N_p,)
    experts = np.stack([rng.permutation(5)[:2] for _ in tokens])      # (N_p, K=2)
    kept = rng.random(experts.shape) < 0.7                            # (N_p, K)
    c = routes.pool_counts(inference.PoolRouting(tokens, experts, kept, np.zeros(25)),
                           kinds, 5)
    routed, got = np.zeros((3, 5), int), np.zeros((3, 5), int)
    for n, t in enumerate(tokens):
        for j in range(2):
            routed[kinds[t], experts[n, j]] += 1
            got[kinds[t], experts[n, j]] += kept[n, j]
    np.testing.assert_array_equal(c.routed, routed)
    np.testing.assert_array_equal(c.kept, got)
    assert c.dropped_fraction == pytest.approx(1 - kept.mean())


def test_patch_map_reads_the_patches_of_its_image_row_major():
    layout = sequence.Layout(image=1 + 9, caption=4, retrieval=5)     # P = 9, grid 3
    expert = np.arange(3 * layout.length)                             # (B*S,) token ids
    kept = expert % 2 == 0                                            # (B*S,)
    experts, k = routes.patch_map(expert, kept, layout, 1, 3)
    S = layout.length
    np.testing.assert_array_equal(experts, np.arange(S + 1, S + 10).reshape(3, 3))
    np.testing.assert_array_equal(k, kept[S + 1:S + 10].reshape(3, 3))
    np.testing.assert_array_equal(routes.token_kinds(layout, 2),
                                  np.tile([0] * 10 + [1] * 4 + [2] * 5, 2))


def test_patch_map_has_one_entry_per_patch_and_words_their_expert(run_dir, capsys):
    out, cfg = _report(run_dir, n=3, batch=16)
    grid = cfg.image_size // cfg.patch
    assert len(out["maps"]) == 3
    for b, experts, kept, words, ref in out["maps"]:
        assert experts.shape == kept.shape == (grid, grid)
        assert experts.size == cfg.num_patches
        assert ((experts >= 0) & (experts < cfg.num_experts)).all()
        assert [w for w, _, _ in words] == ["<bos>"] + ref.split()
        S = out["layout"].length
        for p in range(cfg.num_patches):                  # token b*S + 1 + p: patch p
            (r, i), = [(r, i) for r in out["decisions"][out["layer"]].values()
                       for i in np.flatnonzero(r.tokens == b * S + 1 + p)]
            assert experts.flat[p] == r.experts[i, 0] and kept.flat[p] == r.kept[i, 0]
    assert cli.main(["routes", str(run_dir), "--n", "2"]) == 0
    text = capsys.readouterr().out
    rows = [line.strip() for line in text.splitlines()
            if re.fullmatch(r"      [0-9a-z.#]+", line)]
    assert len(rows) == 2 * grid and all(len(r) == grid for r in rows)
    assert "<bos>:" in text and "dropped fraction" in text


def test_metrics_record_the_router_entropy_and_routes_prints_it(run_dir, capsys):
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    cfg = commands._load_run(str(run_dir))[1]
    for r in records:
        pools = r["router_entropy"][next(iter(r["router_entropy"]))]
        assert set(pools) == ({"shared"} if cfg.experts == "shared" else {"image", "text"})
        assert all(0 < v <= math.log(cfg.num_experts) + 1e-6 for v in pools.values())
    assert cli.main(["routes", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert "over training" in text and "note:" not in text
    layer = next(iter(records[-1]["router_entropy"]))
    pool, value = next(iter(records[-1]["router_entropy"][layer].items()))
    assert f"{value:.4f}" in text and f"{layer}/{pool}" in text


def test_a_run_recorded_without_router_entropy_gets_a_note(run_dir, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    lines = [json.loads(line) for line in open(old / "metrics.jsonl")]
    with open(old / "metrics.jsonl", "w") as f:
        for r in lines:
            r.pop("router_entropy")
            f.write(json.dumps(r) + "\n")
    assert cli.main(["routes", str(old)]) == 0
    text = capsys.readouterr().out
    assert f"note: {len(lines)} of {len(lines)} evaluation(s) have no router_entropy" in text
    assert "n/a" in text


def test_png(run_dir, tmp_path, capsys):
    png = tmp_path / "routes.png"
    pytest.importorskip("matplotlib")
    assert cli.main(["routes", str(run_dir), "--n", "2", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"saved {png}" in capsys.readouterr().out


def test_layer_that_is_not_moe_is_one_line(run_dir, capsys):
    assert cli.main(["routes", str(run_dir), "--layer", "7"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minivlmoe: error: layer must be a MoE layer") and err.count("\n") == 1


def test_dense_run_and_missing_run_are_one_line_exit_1(tmp_path, capsys):
    dense = tmp_path / "dense"
    assert cli.main(["train", "--preset", "tiny", "--steps", "2", "--eval-every", "2",
                     "--experts", "dense", "--quiet", "--out", str(dense)]) == 0
    capsys.readouterr()
    assert cli.main(["routes", str(dense)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minivlmoe: error: ") and "has no MoE layer" in err
    assert err.count("\n") == 1
    assert cli.main(["routes", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err == f"minivlmoe: error: run folder not found ({tmp_path / 'nothing'})\n"
