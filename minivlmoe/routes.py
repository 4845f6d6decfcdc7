"""Routing you can look at: where a trained model sends its tokens (``minivlmoe routes``).

What is shown (all from one eval-mode forward of the training sequence on the first
``batch`` test pairs, :func:`minivlmoe.inference.route`, so the counts are those of the
``experts`` statistics of an evaluation)
------------------------------------------------------------------------------------
* **counts** -- per MoE layer and pool, the (3, E) table of assignments per token kind
  and expert: ``image`` (the class token and the patches), ``caption`` (the caption
  input tokens ``bos w1 ...``) and ``retrieval`` (the retrieval text); all K choices of
  a token count, before capacity (they sum to the pool's ``routed``), and ``kept``
  counts the ones that got a slot (they sum to its ``load``); the pool's dropped fraction.
* **patch maps** -- for a few test images, the top-1 expert of every patch of one MoE
  layer (``.`` where that assignment was dropped), and the caption's words with their
  top-1 experts: LIMoE's figures of modality-specific and semantic experts.
* **over training** -- per evaluation in metrics.jsonl, the test load-balance loss and
  the mean router entropy per layer and pool (``router_entropy``; runs recorded before
  it existed show n/a and a note).

:func:`render_png` draws the same as heatmaps, image/expert-map pairs with coloured
words, and curves (needs matplotlib).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


KINDS = ("image", "caption", "retrieval")     # token kinds: the sequence's segments
EXPERT_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"


class PoolCounts(NamedTuple):
    """Counts of one pool of one MoE layer.

    Fields
    ------
    routed : (3, E) int, assignments per (token kind, expert) before capacity.
    kept : (3, E) int, the ones that got a slot.
    dropped_fraction : float, dropped / all assignments of the pool (0 if it had none).
    """

    routed: np.ndarray
    kept: np.ndarray
    dropped_fraction: float


def token_kinds(layout, batch):
    """(B*S,) int kind of every flat token ``b*S + s``: 0 image, 1 caption, 2 retrieval."""
    kinds = np.empty(layout.length, dtype=np.int64)                    # (S,)
    kinds[layout.image_slice] = 0
    kinds[layout.caption_slice] = 1
    kinds[layout.retrieval_slice] = 2
    return np.tile(kinds, batch)                                       # (B*S,) '(b s)'


def pool_counts(routing, kinds, num_experts):
    """:class:`PoolCounts` of one :class:`minivlmoe.inference.PoolRouting`."""
    kind = np.broadcast_to(kinds[routing.tokens][:, None], routing.experts.shape)  # (N_p, K)
    cell = kind * num_experts + routing.experts                        # (N_p, K) flat (kind, e)
    size = len(KINDS) * num_experts
    routed = np.bincount(cell.ravel(), minlength=size).reshape(len(KINDS), num_experts)
    kept = np.bincount(cell[routing.kept], minlength=size).reshape(len(KINDS), num_experts)
    total = routing.kept.size
    return PoolCounts(routed=routed, kept=kept,
                      dropped_fraction=float(1.0 - routing.kept.sum() / total) if total else 0.0)


def top1_of_tokens(pools, n_tokens):
    """Per flat token, the top-1 expert, whether it was kept, and its pool's name.

    Returns ``expert`` (B*S,) int (-1: not routed, e.g. padding), ``kept`` (B*S,) bool
    and ``pool`` (B*S,) object (None: not routed) for one layer's ``{pool: PoolRouting}``.
    """
    expert = np.full(n_tokens, -1, dtype=np.int64)                     # (B*S,)
    kept = np.zeros(n_tokens, dtype=bool)                              # (B*S,)
    pool = np.full(n_tokens, None, dtype=object)                       # (B*S,)
    for name, r in pools.items():
        expert[r.tokens] = r.experts[:, 0]
        kept[r.tokens] = r.kept[:, 0]
        pool[r.tokens] = name
    return expert, kept, pool


def patch_map(expert, kept, layout, b, grid):
    """(grid, grid) top-1 expert of each patch of image ``b`` and (grid, grid) kept flags;
    patches in row-major order (minivlmoe/ops/patch_embed.py), the class token left out."""
    start = b * layout.length + 1                                      # patch 0 of image b
    flat = slice(start, start + grid * grid)
    return expert[flat].reshape(grid, grid), kept[flat].reshape(grid, grid)  # (grid, grid) x2


def caption_routes(expert, kept, layout, ids, b, tokenizer):
    """The caption input tokens of pair ``b`` that were routed: list of (word, expert,
    kept), ``bos w1 ... w_last`` (the caption segment holds ``ids[:, :-1]``)."""
    out = []
    for t in range(layout.caption):
        n = b * layout.length + layout.caption_slice.start + t
        if expert[n] >= 0:
            out.append((tokenizer.vocab[int(ids[b, t])], int(expert[n]), bool(kept[n])))
    return out


def expert_char(e, kept=True):
    """One character for expert ``e`` (0-9, a-z; ``#`` beyond), ``.`` when dropped."""
    if not kept:
        return "."
    return EXPERT_CHARS[e] if e < len(EXPERT_CHARS) else "#"


def curves(metrics):
    """(steps, load_balance, entropy {"layer/pool": list}, missing) from metrics.jsonl
    records; an evaluation without ``router_entropy`` gives None there, and ``missing``
    counts those evaluations."""
    steps = [r.get("step") for r in metrics]
    balance = [r.get("test_aux_load_balance") for r in metrics]
    names = []
    for r in metrics:
        for layer, pools in (r.get("router_entropy") or {}).items():
            names += [f"{layer}/{p}" for p in pools if f"{layer}/{p}" not in names]
    entropy = {name: [] for name in names}
    missing = 0
    for r in metrics:
        rec = r.get("router_entropy")
        missing += rec is None
        for name in names:
            layer, pool = name.split("/")
            entropy[name].append(((rec or {}).get(layer) or {}).get(pool))
    return steps, balance, entropy, missing


def _fmt(value, width=8, digits=4):
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def format_counts(layer, pool, counts):
    """Text table of one pool's :class:`PoolCounts` (experts as rows)."""
    e = counts.routed.shape[1]
    lines = [f"{layer} pool {pool}: assignments per expert and token kind (before capacity), "
             f"kept = got a slot",
             f"  {'expert':<7}" + "".join(f"{k:>10}" for k in KINDS) + f"{'routed':>10}"
             f"{'kept':>8}"]
    for i in range(e):
        lines.append(f"  e{i:<6}" + "".join(f"{c:>10}" for c in counts.routed[:, i])
                     + f"{counts.routed[:, i].sum():>10}{counts.kept[:, i].sum():>8}")
    lines.append(f"  {'total':<7}" + "".join(f"{c:>10}" for c in counts.routed.sum(axis=1))
                 + f"{counts.routed.sum():>10}{counts.kept.sum():>8}")
    lines.append(f"  dropped fraction {counts.dropped_fraction:.3f}")
    return lines


def format_curves(metrics, num_experts):
    """Text table of the load-balance loss and the router entropy per evaluation."""
    steps, balance, entropy, missing = curves(metrics)
    if not steps:
        return ["over training: metrics.jsonl has no evaluation yet"]
    lines = [f"over training (metrics.jsonl, the test batch of each evaluation): load-balance "
             f"loss summed over the MoE pools, mean router entropy per layer/pool in nats "
             f"(uniform over E={num_experts}: {np.log(num_experts):.3f})",
             f"  {'step':>6}{'load_bal':>10}" + "".join(f"{n:>16}" for n in entropy)]
    for i, step in enumerate(steps):
        lines.append(f"  {step:>6}{_fmt(balance[i], 10)}"
                     + "".join(_fmt(entropy[n][i], 16) for n in entropy))
    if missing:
        lines.append(f"  note: {missing} of {len(steps)} evaluation(s) have no router_entropy "
                     f"(recorded before minivlmoe recorded it): shown as n/a")
    return lines


def render_png(path, *, counts, maps, metrics, images, num_experts, layer, dpi=110):
    """Heatmaps, patch maps with coloured caption words, and the curves, in one PNG.

    ``counts``: {(layer, pool): PoolCounts}; ``maps``: list of (image index, (grid, grid)
    experts, (grid, grid) kept, [(word, expert, kept)], reference caption); ``images``: the
    test images (B, R, R, Ch) in [0, 1]; ``metrics``: metrics.jsonl records.  Raises
    ImportError without matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colors = [plt.get_cmap("tab20" if num_experts > 10 else "tab10")(i % 20)
              for i in range(num_experts)]
    cols = max(3, len(counts) + 1)
    rows = 1 + len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for j, ((lay, pool), c) in enumerate(counts.items()):
        ax = axes[0, j]
        ax.axis("on")
        ax.imshow(c.routed, cmap="Blues", aspect="auto")
        for (k, e), v in np.ndenumerate(c.routed):
            ax.text(e, k, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 * max(1, c.routed.max()) else "black")
        ax.set_xticks(range(num_experts), [f"e{e}" for e in range(num_experts)], fontsize=7)
        ax.set_yticks(range(len(KINDS)), KINDS, fontsize=7)
        ax.set_title(f"{lay} {pool}: dropped {c.dropped_fraction:.3f}", fontsize=8)
    ax = axes[0, cols - 1]
    steps, balance, entropy, missing = curves(metrics)
    if steps:
        ax.axis("on")
        for name, values in entropy.items():
            pts = [(s, v) for s, v in zip(steps, values) if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=f"H {name}")
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("router entropy (nats)", fontsize=7)
        ax.tick_params(labelsize=6)
        twin = ax.twinx()
        pts = [(s, v) for s, v in zip(steps, balance) if v is not None]
        if pts:
            twin.plot(*zip(*pts), color="black", ls="--", lw=1, label="load balance")
        twin.tick_params(labelsize=6)
        ax.legend(fontsize=5, loc="upper right")
        twin.legend(fontsize=5, loc="lower right")
        ax.set_title("over training" + (" (no entropy recorded)" if missing == len(steps)
                                        else ""), fontsize=8)
    cmap = ListedColormap(colors)
    for i, (b, experts, kept, words, ref) in enumerate(maps, start=1):
        axes[i, 0].imshow(np.clip(images[b], 0, 1), interpolation="nearest")
        axes[i, 0].set_title(f"test image {b}", fontsize=7)
        shown = np.ma.masked_where(~kept | (experts < 0), experts)
        axes[i, 1].imshow(shown, cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5,
                          interpolation="nearest")
        for (r, c), e in np.ndenumerate(experts):
            axes[i, 1].text(c, r, expert_char(e, kept[r, c]), ha="center", va="center",
                            fontsize=7)
        axes[i, 1].set_title(f"{layer}: top-1 expert per patch", fontsize=7)
        ax = axes[i, 2]
        x, y = 0.0, 0.8
        for word, e, k in words:
            if x + 0.03 * (len(word) + 1) > 1.0:
                x, y = 0.0, y - 0.2
            ax.text(x, y, word, fontsize=8, family="monospace", transform=ax.transAxes,
                    bbox=dict(facecolor=colors[e] if k else "lightgrey", edgecolor="none",
                              pad=1.0, alpha=0.8))
            x += 0.03 * (len(word) + 1)
        ax.set_title(f"caption words by expert ({layer})", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def report(params, cfg, test, tokenizer, metrics, *, layer=None, n=4, batch=256,
           pad_id=0):
    """Everything ``minivlmoe routes`` prints and draws, for a model and its test split.

    Parameters
    ----------
    params, cfg : the model (it must have a MoE layer: ValueError otherwise).
    test : the run's test ImageCaptionDataset.   tokenizer : the run's Tokenizer.
    metrics : the run's metrics.jsonl records (for the curves).
    layer : int, the block index of the layer of the patch maps (None: the first MoE layer).
    n : test images with patch maps.   batch : test pairs routed (the first ``batch``).
    pad_id : the padding id.

    Returns
    -------
    dict with "lines" (the text output), "counts" {(layer, pool): PoolCounts}, "maps"
    (render_png's list), "stats" (the model's statistics of the same forward), "layer"
    (the chosen "blocks.i"), "decisions", "layout" (sequence.Layout) and "images".
    """
    from . import inference
    from .evaluate import caption_keys

    moe_layers = [i for i, (kind, _) in enumerate(cfg.layer_kinds()) if kind == "moe"]
    if not moe_layers:
        raise ValueError(f"the model has no MoE layer (experts={cfg.experts!r}, "
                         f"layers={cfg.layers}): nothing is routed")
    if layer is None:
        layer = moe_layers[0]
    if layer not in moe_layers:
        raise ValueError(f"layer must be a MoE layer, one of {moe_layers}, got {layer}")
    count = min(batch, len(test))
    images = test.images[:count].astype(cfg.dtype, copy=False)         # (B, R, R, Ch)
    ids = tokenizer.encode(test.captions[:count], cfg.max_text_len, truncate=True)  # (B, T)
    layout, decisions, stats = inference.route(params, cfg, images, ids, pad_id=pad_id,
                                               keys=caption_keys(test.captions[:count]))
    kinds = token_kinds(layout, count)                                 # (B*S,)
    e = cfg.num_experts
    lines = [f"routing of the first {count} test pairs (eval mode, one forward of the "
             f"training sequence): {cfg.experts} mode, E={e} per pool, top-{cfg.top_k}, "
             f"capacity factor {cfg.capacity_factor}", ""]
    counts = {}
    for name, pools in decisions.items():
        for pool, routing in pools.items():
            counts[(name, pool)] = pool_counts(routing, kinds, e)
            lines += format_counts(name, pool, counts[(name, pool)]) + [""]
    chosen = f"blocks.{layer}"
    expert, kept, _ = top1_of_tokens(decisions[chosen], count * layout.length)
    grid = cfg.image_size // cfg.patch
    lines.append(f"{chosen}: top-1 expert per patch ({grid}x{grid}, '.' = dropped) and the "
                 f"caption's words as word:expert (':.' = dropped)")
    maps = []
    for b in range(min(n, count)):
        pm, pk = patch_map(expert, kept, layout, b, grid)
        words = caption_routes(expert, kept, layout, ids, b, tokenizer)
        cls = expert_char(int(expert[b * layout.length]), bool(kept[b * layout.length]))
        lines.append(f"[{b:>3}] {test.captions[b]}   (class token: {cls})")
        lines += ["      " + "".join(expert_char(int(x), bool(k)) for x, k in zip(r, kr))
                  for r, kr in zip(pm, pk)]
        lines.append("      " + " ".join(f"{w}:{expert_char(x, k) if k else '.'}"
                                         for w, x, k in words))
        maps.append((b, pm, pk, words, test.captions[b]))
    lines += [""] + format_curves(metrics, e)
    return {"lines": lines, "counts": counts, "maps": maps, "stats": stats, "layer": chosen,
            "decisions": decisions, "layout": layout, "images": test.images[:count]}
