"""Training on Rk ranks: data parallelism for the dense part, expert parallelism for the
MoE layers, the same losses and gradients as one process on the global batch.

Every rank runs the same training loop (minivlmoe/train.py) on the same global batch
(same seeds, same data stream) and keeps a full replica of the parameters and of the
AdamW state; :meth:`ExpertParallel.loss_and_grads` (the loop's step function) takes
its share of the batch, rows ``[b_r, b_{r+1})`` (numpy.array_split of the B pairs),
and returns the gradient of the *global* loss::

    embed, attention, dense FFNs, heads      on my b_r pairs (data parallel)
    MoE layers                               parallel/ep_moe.py (tokens by all-to-all)
    contrastive  img, txt (b_r, De) --Allgather--> (B, De);  InfoNCE over all B pairs
                 on every rank (all B^2 pairs couple); backward: my rows of dimg, dtxt;
                 d log_logit_scale from rank 0 only (every rank computed the same one)
    caption      CE_global = sum_r count_r CE_r / count   (count: non-pad targets)
                 backward: CE_r's gradient scaled by count_r / count
    aux          already global inside each MoE layer (parallel/ep_aux.py)
    gradients    one Allreduce (sum) of the whole flattened gradient tree: replicated
                 weights sum their contributions; each expert's gradient comes from its
                 owner (the other ranks send zeros)

so every rank then takes the same AdamW step (same global gradient norm and clipping)
and the replicas stay equal.  Keeping every expert on every rank costs memory and the
expert part of that Allreduce; it keeps the checkpoint, the evaluation and the resume
exactly those of one process (rank 0 writes and evaluates, docs/parallel.md).

The MoE layers of minivlmoe/tower.py are switched to the expert-parallel layer for
the duration of one step by :func:`experts_over` (the tower calls ``moe_layer.forward``
and ``moe_layer.backward`` through its module attribute); nothing else changes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from .. import sequence, tower
from ..ops import contrastive, cross_entropy, l2norm, linear
from ..moe import aux_losses
from ..timing import NULL_TIMER
from ..tree import flatten, unflatten, with_values, zeros_like
from . import ep_moe


class _TowerMoE:
    """Stands in for the moe_layer module inside tower.py: the same two calls."""

    def __init__(self, comm):
        self.comm = comm
        self.calls = 0

    def forward(self, x, params, config, modality=None, *, rng=None, train=False,
                all_losses=True):
        """ep_moe.forward; ``all_losses`` is accepted and every aux loss is computed
        (their global statistics come from one Allreduce of per-expert sums anyway)."""
        self.calls += 1
        return ep_moe.forward(x, params, config, self.comm, modality, rng=rng, train=train)

    def backward(self, dy, cache, daux_total=1.0):
        return ep_moe.backward(dy, cache, daux_total)


@contextlib.contextmanager
def experts_over(comm):
    """Inside the block, tower.py's MoE layers are expert-parallel over ``comm``; yields
    the stand-in, whose ``calls`` count the MoE layer calls."""
    saved = tower.moe_layer
    tower.moe_layer = layer = _TowerMoE(comm)
    try:
        yield layer
    finally:
        tower.moe_layer = saved


def shares(batch, size):
    """(Rk+1,) bounds of each rank's pairs: rank r holds ``[bounds[r], bounds[r+1])``."""
    if batch < size:
        raise ValueError(f"batch_size must be at least the number of ranks ({size}: "
                         f"every rank needs one pair), got {batch}")
    return np.concatenate([[0], np.cumsum([len(a) for a in
                                           np.array_split(np.arange(batch), size)])])


def allreduce_tree(grads, comm):
    """Sum a gradient tree over ranks with one Allreduce (sparse leaves: their data)."""
    flat = flatten(grads)
    leaves = [(v.data if isinstance(v, sp.csr_array) else np.asarray(v)) for v in flat.values()]
    buf = np.concatenate([a.ravel() for a in leaves])            # (nparams,) every gradient
    total = comm.allreduce_sum(buf, tag="allreduce")             # (nparams,)
    out, at = {}, 0
    for (path, leaf), a in zip(flat.items(), leaves):
        part = total[at:at + a.size].reshape(a.shape)            # the leaf's shape
        at += a.size
        out[path] = with_values(leaf, part) if isinstance(leaf, sp.csr_array) else part
    return unflatten(out)


class Heads(NamedTuple):
    """Caches of the two task losses, for this rank's b_r pairs.

    Fields
    ------
    rows : (b0, b1), my pairs among the B.   layout : the sequence layout.
    img_proj, img_norm, txt_proj, txt_norm : my rows' head caches (or None).
    contrastive : the InfoNCE cache over all B pairs (or None).
    txt_last : (b_r,) the pooled retrieval-text position of my pairs.
    lm_head, caption : my rows' captioning caches (or None).
    count : non-pad caption targets of the whole batch.
    """

    rows: tuple
    layout: object
    img_proj: object
    img_norm: object
    txt_proj: object
    txt_norm: object
    contrastive: object
    txt_last: np.ndarray | None
    lm_head: object
    caption: object
    count: int


def heads_forward(h, params, cfg, ids_r, pad_id, positives, layout, comm, counts):
    """The contrastive and caption losses of the global batch from my rows of ``h``
    (b_r, S, D): ``({"contrastive", "caption"}, Heads)``, equal on every rank."""
    b = h.shape[0]
    b0 = int(counts[:comm.rank].sum())
    losses = {"contrastive": 0.0, "caption": 0.0}
    c_ip = c_in = c_tp = c_tn = c_con = txt_last = c_lm = c_ce = None
    count = 0
    if cfg.contrastive_weight > 0:
        txt_last = sequence.last_valid(ids_r != pad_id)            # (b,)
        txt_pool = h[np.arange(b), layout.retrieval_slice.start + txt_last]  # (b, D) eos
        img_z, c_ip = linear.forward(h[:, 0], params["img_proj"])  # (b, De) final cls
        img_emb, c_in = l2norm.forward(img_z)                      # (b, De)
        txt_z, c_tp = linear.forward(txt_pool, params["txt_proj"])  # (b, De)
        txt_emb, c_tn = l2norm.forward(txt_z)                      # (b, De)
        img_all = comm.allgather_rows(img_emb, counts, tag="heads")  # (B, De)
        txt_all = comm.allgather_rows(txt_emb, counts, tag="heads")  # (B, De)
        losses["contrastive"], c_con = contrastive.forward(
            img_all, txt_all, params["log_logit_scale"], positives)
    if cfg.caption_weight > 0:
        logits, c_lm = linear.forward(h[:, layout.caption_slice],
                                      params["lm_head"])           # (b, T-1, V)
        ce_r, c_ce = cross_entropy.forward(logits, ids_r[:, 1:], pad_id)
        sums = comm.allreduce_sum(np.array([ce_r * c_ce.count, c_ce.count],
                                           dtype=np.float64), tag="heads")  # (2,)
        count = int(round(sums[1]))
        losses["caption"] = float(sums[0] / count) if count else 0.0
    return losses, Heads(rows=(b0, b0 + b), layout=layout, img_proj=c_ip, img_norm=c_in,
                         txt_proj=c_tp, txt_norm=c_tn, contrastive=c_con, txt_last=txt_last,
                         lm_head=c_lm, caption=c_ce, count=count)


def heads_backward(cache, cfg, comm, shape):
    """My part of the task losses' gradient: ``dh`` (b_r, S, D) and the head grads
    (this rank's contributions, to be summed over ranks)."""
    (b0, b1), layout = cache.rows, cache.layout
    b = b1 - b0
    grads = {}
    dh = np.zeros((b,) + tuple(shape[1:]), dtype=cfg.np_dtype)     # (b, S, D)
    if cache.caption is not None:
        # caption = sum_r count_r CE_r / count  ->  dCE_r = count_r / count
        scale = cfg.caption_weight * (cache.caption.count / cache.count if cache.count else 0.0)
        dlogits = cross_entropy.backward(scale, cache.caption)     # (b, T-1, V)
        dh_cap, grads["lm_head"] = linear.backward(dlogits, cache.lm_head)
        dh[:, layout.caption_slice] = dh_cap                       # (b, T-1, D)
    if cache.contrastive is not None:
        dimg_all, dtxt_all, dscale = contrastive.backward(
            cfg.contrastive_weight, cache.contrastive)             # (B, De) x2, ()
        # every rank computed the same d log_logit_scale: rank 0's alone enters the sum
        grads["log_logit_scale"] = dscale if comm.rank == 0 else np.zeros_like(dscale)
        dtxt_z = l2norm.backward(dtxt_all[b0:b1], cache.txt_norm)  # (b, De) my rows
        dtxt_pool, grads["txt_proj"] = linear.backward(dtxt_z, cache.txt_proj)
        dimg_z = l2norm.backward(dimg_all[b0:b1], cache.img_norm)  # (b, De) my rows
        dimg_pool, grads["img_proj"] = linear.backward(dimg_z, cache.img_proj)
        dh[np.arange(b), layout.retrieval_slice.start + cache.txt_last] += dtxt_pool  # (b, D)
        dh[:, 0] += dimg_pool                                      # (b, D) cls rows
    return dh, grads



class ExpertParallel:
    """What train.train needs to run as one of Rk ranks.

    Attributes
    ----------
    comm : parallel.comm.Comm.   writer : True on rank 0 (it writes and evaluates).
    started : True once :meth:`loss_and_grads` ran (see :func:`run_guarded`).
    """

    def __init__(self, comm):
        self.comm = comm
        self.writer = comm.rank == 0
        self.started = False                  # True once a step entered a collective

    def check(self, model_cfg, train_cfg):
        """The problem that stops a run on these ranks before it starts, or None (the
        same on every rank, so only rank 0 needs to say it)."""
        size = self.comm.size
        if model_cfg.experts != "dense" and model_cfg.num_experts % size:
            return (f"--expert-parallel: num_experts must be divisible by the number of "
                    f"ranks ({size}: each rank holds num_experts / ranks experts of every "
                    f"pool), got "
                    f"num_experts={model_cfg.num_experts}")
        if train_cfg.batch_size < size:
            return (f"--expert-parallel: batch_size must be at least the number of ranks "
                    f"({size}: every rank needs one pair), got {train_cfg.batch_size}")
        return None

    def loss_and_grads(self, params, cfg, images, ids, *, pad_id, keys=None, rng=None,
                       train=True, all_losses=True, timer=NULL_TIMER):
        """model.loss_and_grads of the global batch (images, ids, keys: all B pairs),
        computed on this rank's share; every rank returns the same losses, the same
        (global) gradients and the same MoE statistics.  ``all_losses`` as in
        model.loss_and_grads (the parallel layer computes every aux loss regardless)."""
        comm = self.comm
        self.started = True
        images = sequence.check_images(cfg, images)
        ids, pad_id = sequence.check_ids(cfg, ids, pad_id, min_len=2)
        bounds = shares(ids.shape[0], comm.size)
        b0, b1 = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
        counts = np.diff(bounds)                                   # (Rk,) pairs per rank
        positives = None if keys is None else contrastive.duplicate_positives(
            np.asarray(keys))                                      # (B, B) global
        img_r, ids_r = images[b0:b1], ids[b0:b1]                   # my pairs
        use_cap, use_ret = cfg.caption_weight > 0, cfg.contrastive_weight > 0

        # ---- forward: embed and tower on my pairs, MoE layers expert-parallel
        with timer.section("embed"):
            seq, c_embed = sequence.embed(
                params, cfg, img_r, ids_r[:, :-1] if use_cap else None,
                ids_r if use_ret else None, pad_id, ids_r[:, 1:] != pad_id)  # (b, S, D)
        layout = seq.layout
        with experts_over(comm) as layer:
            h, aux_total, stats, c_tower = tower.forward(
                seq.x, seq.blocks, seq.modality, seq.rows, params, cfg, rng=rng,
                train=train, all_losses=all_losses, timer=timer)   # (b, S, D)
        if layer.calls == 0 and any(kind != "ffn" for kind, _ in cfg.layer_kinds()):
            raise RuntimeError("tower.py did not call its MoE layers through the moe_layer "
                               "module attribute, so they ran on this rank's tokens alone "
                               "(parallel/ep_train.py: experts_over)")
        with timer.section("losses"):
            losses, c_heads = heads_forward(h, params, cfg, ids_r, pad_id, positives, layout,
                                            comm, counts)
        losses["aux"] = float(aux_total)
        losses["total"] = (cfg.contrastive_weight * losses["contrastive"]
                           + cfg.caption_weight * losses["caption"] + losses["aux"])
        for name in aux_losses.AUX_LOSSES:
            losses[f"aux_{name}"] = float(sum(s["losses"][name] for s in stats.values()))

        # ---- backward: model.backward's call list on my pairs
        with timer.section("losses"):
            dh, grads = heads_backward(c_heads, cfg, comm, c_tower.shape)  # (b, S, D)
        with experts_over(comm):
            dx, grads["blocks"], grads["ln_f"] = tower.backward(dh, c_tower, 1.0,
                                                                timer=timer)  # (b, S, D)
        with timer.section("embed"):
            grads["patch"], grads["text"] = sequence.embed_backward(dx, c_embed)
        for name in ("img_proj", "txt_proj", "log_logit_scale", "lm_head"):
            if name not in grads:
                grads[name] = zeros_like(params[name])
        grads = allreduce_tree({name: grads[name] for name in params}, comm)
        tokens = comm.allreduce_sum(np.array([seq.rows.size], dtype=np.int64), tag="stats")
        stats = {"moe": stats, "temperature": float(np.exp(-params["log_logit_scale"])),
                 "logit_scale": float(np.exp(params["log_logit_scale"])),
                 "tokens": int(tokens[0])}
        return losses, grads, stats


GRACE_S = 30.0   # how long a rank waits for rank 0 to end the job (run_guarded)


def run_guarded(parallel, fn, grace=GRACE_S):
    """Run ``fn()`` on this rank of ``parallel`` (an ExpertParallel); a failure on any
    rank ends the whole job, with one line.

    A failure prints ``minivlmoe: error: rank r of Rk: <what>`` on stderr (or the
    ``cli.fail`` line of a non-zero return) and calls ``MPI_Abort``: not a timeout,
    because the other ranks may be blocked inside a collective, and Abort is the one
    call that ends them at once (mpich adds its own ``Abort(1) on node r`` notice).

    Failures that every rank meets alike -- the checks before the first step (same
    arguments, same files) and a divergence (every rank has the same losses) -- are
    said by rank 0 alone: the other ranks wait up to ``grace`` seconds for rank 0's
    Abort, and only if it does not come say their own line and abort.  Ranks other
    than 0 print nothing else: their stdout and stderr go to os.devnull.
    """
    from .._checks import error_line
    from ..divergence import TrainingDiverged

    comm = parallel.comm
    if comm.rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    line, alike = None, False
    try:
        code = fn()
    except SystemExit as e:                   # argparse usage errors (printed by rank 0)
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:                # noqa: BLE001 - any failure ends every rank
        code = 1
        line = f"minivlmoe: error: rank {comm.rank} of {comm.size}: {error_line(e)}"
        alike = isinstance(e, TrainingDiverged)
    if not code:
        return 0
    alike = alike or (line is None and not parallel.started)
    if comm.rank != 0 and alike:
        comm.wait_for_abort(grace)            # rank 0 failed alike and ends the job
        line = line or (f"minivlmoe: error: rank {comm.rank} of {comm.size}: failed "
                        f"before the first step (exit status {code}) but rank 0 did not")
    if line is not None:
        print(line, file=sys.__stderr__, flush=True)
    sys.__stderr__.flush()
    comm.abort(code)
    return code
