"""minivlmoe against a PyTorch eager peer of the same model: agreement, then speed.

The peer (benchmarks/peer_torch_model.py; its docstring lists what it mirrors) is the
default preset's model written in PyTorch eager and loaded with minivlmoe's own
parameters.  This script

1. checks, in float64, that the two do the same work: one batch through
   ``model.loss_and_grads`` and through the peer (autograd), then one AdamW step on
   each, then ``--check-steps`` training steps of each on the same batches; it prints
   the relative difference of the total loss and of every loss term, the routing
   (tokens routed and kept per expert and pool), the worst relative gradient difference
   over all parameters, the parameters after one step and after the training steps,
   and the MoE layer alone (output and gradients).  It exits with status 1 when one
   exceeds ``--tolerance`` (1e-9 relative) or the routing differs.  A leaf's difference
   is taken relative to its largest value, floored at 1e-3 of the largest over all
   leaves, so that a gradient that is exactly zero in exact arithmetic (the attention
   key bias: its computed gradient is rounding noise on both sides) is not divided by
   its own noise;
2. times, one thread each, float32, the full training step (batch gathering, forward,
   backward, AdamW update) of both on the same batches, for each mode and batch size:
   - interleaved in this process: blocks of ``--steps`` steps, ours and torch
     alternating (the first side alternates too), ``--rounds`` blocks each, medians;
   - each alone in its own process (``--no-alone`` skips it): ``--alone-processes``
     child processes per side, run one after the other with the sides alternating, each
     importing only its own side (ours calls ``minivlmoe.heap.keep_freed_heap()`` first,
     as the command line does, and so does this process; the torch child leaves malloc
     alone), medians over all their blocks;
   and prints ms/step, tokens/s (B (1 + P + T) per step, as benchmarks/train_step.py),
   GFLOP/s and the ratio ours / torch;
3. times the default modality MoE layer alone, forward + backward, at ``--moe-tokens``
   tokens (16, 544, 2080), interleaved, ours (``moe_layer.forward``/``backward``)
   against the peer's layer.

The FLOP count (:func:`step_flops`) counts matrix products only, 2 M N K per product:
the patch projection (forward and weight gradient), per layer the q, k, v, o projections
on all B*S positions, the attention scores ``q k^T`` and the context ``p v`` on the full
(B, H, S, S) grid, the dense FFNs on the U used rows, the routers on U rows and the
experts on the kept tokens, the lm head on the caption rows, the two retrieval
projections and the (B, B) similarity; each product's backward counts twice its forward
(input and weight gradients; the attention's four backward products).  U and the kept
tokens are those of the first batch.  Element-wise work (softmax, layer norm, GELU,
AdamW) is not counted.

Only public entry points of minivlmoe are used (``model.init``, ``model.loss_and_grads``,
``optim.init_state``/``step``/``lr_at``/``decays``, ``moe_layer.init``/``forward``/
``backward``, ``runs.*``, ``train.BatchStream``), so the script keeps working while the
implementation changes.  Torch is a benchmark-only extra: ``pip install -e '.[peer]'``.

Run with one thread (the script sets the thread variables it finds unset):
    OPENBLAS_NUM_THREADS=1 python benchmarks/peer_torch.py
    OPENBLAS_NUM_THREADS=1 python benchmarks/peer_torch.py --check-only
"""

import os
import sys

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)          # this checkout's minivlmoe, installed or not

from minivlmoe import heap, model, optim, runs, train  # noqa: E402
from minivlmoe.moe import moe_layer  # noqa: E402
from minivlmoe.tokenizer import PAD_ID  # noqa: E402

STREAM_SEED = 1                   # the batch order, the same for both sides
IMAGE_SHARE = 17 / 40             # the image's share of a default sequence (1+P of S = 40)


def load_torch():
    """Import torch and the peer (only the processes that run the peer do), one thread."""
    import torch
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:          # already set in this process
        pass
    sys.path.insert(0, HERE)
    import peer_torch_model
    return torch, peer_torch_model


# ----------------------------------------------------------------------------- set-up

class Setup:
    """The configs, the training data (as train_step.py draws it) and the initial params
    of one mode / batch size / dtype."""

    def __init__(self, mode, batch, dtype):
        self.mcfg, tcfg = runs.preset_configs("default", experts=mode, dtype=dtype,
                                              batch_size=batch)
        self.tcfg = runs.TrainConfig(**{**tcfg.to_dict(), "n_train": max(batch, 512),
                                        "n_test": 2})
        tokenizer = runs.builtin_tokenizer()
        data = runs.make_data(self.tcfg, self.mcfg.image_size).train
        self.images = data.images.astype(self.mcfg.dtype)               # (Bn, R, R, Ch)
        self.ids = tokenizer.encode(data.captions, self.mcfg.max_text_len)  # (Bn, T)
        self.keys = train.evaluate.caption_keys(data.captions)         # (Bn,)
        self.batch = batch

    def params(self):
        """Fresh initial params (the same numbers every call)."""
        return model.init(np.random.default_rng(0), self.mcfg)

    def stream(self):
        """A batch stream, the same order every call."""
        return train.BatchStream(len(self.ids), self.batch, np.random.default_rng(STREAM_SEED))

    @property
    def tokens_per_step(self):
        """B (1 + P + T), as benchmarks/train_step.py counts."""
        return self.batch * (1 + self.mcfg.num_patches + self.mcfg.max_text_len)


class Ours:
    """minivlmoe's training step: batch, ``model.loss_and_grads``, ``optim.step``."""

    def __init__(self, setup):
        self.s = setup
        self.params = setup.params()
        self.state = optim.init_state(self.params)
        self.adamw = setup.tcfg.adamw()
        self.stream = setup.stream()
        self.rng = np.random.default_rng(0)

    def step(self):
        s = self.s
        idx = self.stream.next()                                       # (B,)
        images, ids, keys = s.images[idx], s.ids[idx], s.keys[idx]
        losses, grads, _ = model.loss_and_grads(self.params, s.mcfg, images, ids,
                                                pad_id=PAD_ID, keys=keys, rng=self.rng,
                                                train=True, all_losses=False)  # as train.py
        optim.step(self.params, grads, self.state, self.adamw)
        return losses["total"]


class Peer:
    """The torch peer's training step: batch, forward, autograd backward, AdamW."""

    def __init__(self, setup, fused_qkv=True, fused_adamw=True):
        torch, peer = load_torch()
        self.torch, self.s = torch, setup
        dtype = getattr(torch, setup.mcfg.dtype)
        self.model = peer.Model(setup.mcfg, fused_qkv).to(dtype)
        self.names = peer.load_params(self.model, setup.params())
        self.opt = peer.AdamW(self.model, self.names, setup.tcfg.adamw(), fused_adamw)
        self.stream = setup.stream()
        self.images = torch.from_numpy(setup.images)                   # (Bn, R, R, Ch)
        self.ids = torch.from_numpy(setup.ids.astype(np.int64))        # (Bn, T)
        self.keys = torch.from_numpy(setup.keys)                       # (Bn,)

    def step(self):
        idx = self.torch.from_numpy(self.stream.next())                # (B,)
        images, ids, keys = self.images[idx], self.ids[idx], self.keys[idx]
        positives = keys[:, None] == keys[None, :]                     # (B, B)
        self.opt.zero_grad()
        losses, _ = self.model(images, ids, positives, PAD_ID)
        losses["total"].backward()
        self.opt.step()
        return losses["total"]


# ----------------------------------------------------------------------------- FLOPs

def step_flops(mcfg, batch, used_rows, kept):
    """Matrix-product FLOPs of one training step (module docstring says what counts).

    used_rows : U, the non-pad rows.   kept : {block index: tokens the experts processed}.
    """
    B, D, T = batch, mcfg.width, mcfg.max_text_len
    P, V, De, E = mcfg.num_patches, mcfg.vocab_size, mcfg.embed_dim, mcfg.num_experts
    S = 1 + P + (T - 1) + T
    N, U = B * S, used_rows
    fwd_bwd = 3                                   # forward + backward (2x forward)
    flops = 2 * (2 * B * P * mcfg.patch ** 2 * mcfg.channels * D)   # forward + dW only
    for i, (kind, hidden) in enumerate(mcfg.layer_kinds()):
        layer = 4 * 2 * N * D * D                 # q, k, v, o
        layer += 2 * (2 * B * S * S * D)          # scores and context, all heads
        if kind == "moe":
            layer += 2 * U * D * E                # the routers
            layer += 2 * 2 * kept[i] * D * hidden  # the experts' two products
        else:
            layer += 2 * 2 * U * D * hidden       # the dense FFN
        flops += fwd_bwd * layer
    heads = 2 * B * (T - 1) * D * V + 2 * 2 * B * D * De + 2 * B * B * De
    return flops + fwd_bwd * heads


def first_batch_flops(setup):
    """:func:`step_flops` with U and the kept tokens of the stream's first batch."""
    s = setup
    idx = s.stream().next()
    _, _, stats = model.loss_and_grads(s.params(), s.mcfg, s.images[idx], s.ids[idx],
                                       pad_id=PAD_ID, keys=s.keys[idx],
                                       rng=np.random.default_rng(0), train=True)
    kept = {int(name.split(".")[1]): sum(sum(p["load"]) for p in st["pools"].values())
            for name, st in stats["moe"].items()}
    return step_flops(s.mcfg, s.batch, stats["tokens"], kept)


# ----------------------------------------------------------------------------- agreement

def num(v):
    """A float of a float or a 0-d tensor."""
    return float(v.detach()) if hasattr(v, "detach") else float(v)


def rel(a, b):
    """|a - b| / max(|a|, |b|), 0 when both are 0."""
    a, b = num(a), num(b)
    top = max(abs(a), abs(b))
    return 0.0 if top == 0 else abs(a - b) / top


def leaf_errors(ours, theirs):
    """``{path: relative difference}``: max |ours - theirs| over the leaf divided by the
    leaf's max |ours|, floored at 1e-3 of the largest over all leaves (module docstring)."""
    floor = 1e-3 * max(float(np.max(np.abs(v))) for v in ours.values())
    return {p: float(np.max(np.abs(ours[p] - theirs[p])))
            / max(float(np.max(np.abs(ours[p]))), floor) for p in ours}


def report(what, errors, tolerance):
    """Print the worst leaf (and the worst but the attention key biases, whose exact
    gradient is 0); True if the worst is within ``tolerance``."""
    path = max(errors, key=errors.get)
    others = {p: e for p, e in errors.items() if not p.endswith("attn.k.b")}
    other = max(others, key=others.get)
    print(f"  {what}: worst of {len(errors)} leaves {errors[path]:.1e} ({path}); without "
          f"the key biases {others[other]:.1e} ({other}); median "
          f"{np.median(list(errors.values())):.1e}")
    return errors[path] <= tolerance


def dense_tree(tree, peer):
    return {p: peer.dense(v) for p, v in peer.flatten(tree).items()}


def check(mode, batch, tolerance, peer_kw, steps):
    """Float64 agreement of one mode (module docstring, item 1); returns True if it holds."""
    torch, peer = load_torch()
    s = Setup(mode, batch, "float64")
    params = s.params()
    idx = s.stream().next()
    images, ids, keys = s.images[idx], s.ids[idx], s.keys[idx]
    losses, grads, stats = model.loss_and_grads(params, s.mcfg, images, ids, pad_id=PAD_ID,
                                                keys=keys, rng=np.random.default_rng(0),
                                                train=True)
    net = peer.Model(s.mcfg, peer_kw["fused_qkv"]).to(torch.float64)
    names = peer.load_params(net, params)
    keys_t = torch.from_numpy(keys)
    t_losses, t_routing = net(torch.from_numpy(images), torch.from_numpy(ids.astype(np.int64)),
                              keys_t[:, None] == keys_t[None, :], PAD_ID, all_aux=True)
    t_losses["total"].backward()
    ok = True
    print(f"[check] {mode}, batch {batch}, float64: our loss_and_grads vs the torch peer "
          f"(autograd), the same params and batch")
    worst = max(losses, key=lambda k: rel(losses[k], t_losses[k]))
    for name in losses:
        err = rel(losses[name], t_losses[name])
        ok &= err <= tolerance
        print(f"  loss {name:<20} ours {losses[name]: .15e}  torch "
              f"{num(t_losses[name]): .15e}  rel {err:.1e}")
    print(f"  worst loss term: {worst}, rel {rel(losses[worst], t_losses[worst]):.1e}")
    for block, st in stats["moe"].items():
        for pool, ps in st["pools"].items():
            same = (ps["routed"] == t_routing[block][pool]["routed"]
                    and ps["load"] == t_routing[block][pool]["load"])
            ok &= same
            print(f"  routing {block} {pool:<5} routed {ps['routed']} kept {ps['load']} "
                  f"(capacity {ps['capacity']}): {'the same' if same else 'DIFFERENT'} in torch "
                  f"(routed {t_routing[block][pool]['routed']}, kept "
                  f"{t_routing[block][pool]['load']})")
    g_ours = dense_tree(grads, peer)
    g_err = leaf_errors(g_ours, peer.grads_by_path(net, names))
    ok &= report("gradients", g_err, tolerance)
    # one AdamW step on each side
    optim.step(params, grads, optim.init_state(params), s.tcfg.adamw())
    peer.AdamW(net, names, s.tcfg.adamw(), peer_kw["fused_adamw"]).step()
    p_err = leaf_errors(dense_tree(params, peer), peer.params_by_path(net, names))
    ok &= report("params after one AdamW step", p_err, tolerance)
    # a few training steps of each side on the same stream: schedule, moments, routing
    ours, theirs = Ours(s), Peer(s, **peer_kw)
    loss_err = max(rel(ours.step(), theirs.step()) for _ in range(steps))
    ok &= loss_err <= tolerance
    print(f"  {steps} training steps on the same batches: worst total-loss difference "
          f"{loss_err:.1e}")
    p_err = leaf_errors(dense_tree(ours.params, peer), peer.params_by_path(theirs.model,
                                                                         theirs.names))
    ok &= report(f"params after {steps} steps", p_err, tolerance)
    ok &= check_moe_layer(torch, peer, 544, tolerance)
    print(f"  {'OK' if ok else 'FAILED'}: every difference <= {tolerance:g}"
          if ok else f"  FAILED: a difference above {tolerance:g} (or a routing difference)")
    return ok


def moe_inputs(mcfg, n, dtype):
    """Params, x, dy and a shuffled modality split (IMAGE_SHARE image tokens) of n tokens."""
    rng = np.random.default_rng(0)
    mc = mcfg.moe_config()
    params = moe_layer.init(rng, mcfg.width, mcfg.expert_hidden, mc, mcfg.density, dtype)
    x = rng.standard_normal((n, mcfg.width)).astype(dtype)          # (N, D)
    dy = rng.standard_normal((n, mcfg.width)).astype(dtype)         # (N, D)
    n_img = int(round(n * IMAGE_SHARE))
    modality = rng.permutation(np.r_[np.zeros(n_img, np.int64), np.ones(n - n_img, np.int64)])
    return mc, params, x, dy, modality


def check_moe_layer(torch, peer, n, tolerance):
    """The modality MoE layer alone in float64: y, dx and the parameter gradients."""
    mcfg = runs.preset_configs("default", experts="modality", dtype="float64")[0]
    mc, params, x, dy, modality = moe_inputs(mcfg, n, np.float64)
    y, aux, cache = moe_layer.forward(x, params, mc, modality)
    dx, dparams = moe_layer.backward(dy, cache, 1.0)
    layer = peer.moe_layer(mcfg, params, torch.float64)
    names = {peer.torch_name(p): p for p in peer.flatten(params)}
    xt = torch.from_numpy(x).requires_grad_()
    yt, aux_t, _, _ = layer(xt, torch.from_numpy(modality))
    torch.autograd.backward([yt, aux_t], [torch.from_numpy(dy),
                                          torch.ones((), dtype=torch.float64)])
    errs = {"y": leaf_errors({"y": y}, {"y": yt.detach().numpy()})["y"],
            "aux_total": rel(aux.aux_total, aux_t),
            "dx": leaf_errors({"dx": dx}, {"dx": xt.grad.numpy()})["dx"]}
    g_err = leaf_errors(dense_tree(dparams, peer), peer.grads_by_path(layer, names))
    path = max(g_err, key=g_err.get)
    print(f"  MoE layer alone, {n} tokens: y {errs['y']:.1e}, aux_total {errs['aux_total']:.1e}, "
          f"dx {errs['dx']:.1e}, worst parameter gradient {g_err[path]:.1e} ({path})")
    return max(max(errs.values()), g_err[path]) <= tolerance


# ----------------------------------------------------------------------------- timing

def timed_blocks(step, rounds, steps):
    """ms/step of ``rounds`` blocks of ``steps`` steps."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        out.append(1e3 * (time.perf_counter() - t0) / steps)
    return out


def interleaved(setup, rounds, steps, warmup, peer_kw):
    """Median ms/step of ours and of torch, blocks alternating in this process."""
    sides = {"ours": Ours(setup), "torch": Peer(setup, **peer_kw)}
    for side in sides.values():
        for _ in range(warmup):
            side.step()
    times = {name: [] for name in sides}
    for r in range(rounds):
        for name in (("ours", "torch") if r % 2 == 0 else ("torch", "ours")):
            times[name] += timed_blocks(sides[name].step, 1, steps)
    return {name: float(np.median(v)) for name, v in times.items()}


def alone_blocks(side, mode, batch, rounds, steps, warmup, peer_kw):
    """ms/step of the blocks of one side in a child process (module docstring)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_alone", side, "--modes", mode,
           "--batches", str(batch), "--rounds", str(rounds), "--steps", str(steps),
           "--warmup", str(warmup), "--qkv", "fused" if peer_kw["fused_qkv"] else "separate",
           "--adamw", "fused" if peer_kw["fused_adamw"] else "loop"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])["ms"]


def alone(processes, *args):
    """Median ms/step of ours and of torch over ``processes`` child processes each, the
    two sides' processes alternating (one after the other, never at the same time)."""
    blocks = {"ours": [], "torch": []}
    for p in range(processes):
        for side in (("ours", "torch") if p % 2 == 0 else ("torch", "ours")):
            blocks[side] += alone_blocks(side, *args)
    return {side: float(np.median(v)) for side, v in blocks.items()}


def load_average():
    """The machine's 1-, 5- and 15-minute load averages, as a phrase."""
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def peer_options(args):
    """The peer's keyword arguments from the command line."""
    return {"fused_qkv": args.qkv == "fused", "fused_adamw": args.adamw == "fused"}


def alone_child(args):
    """The child of :func:`alone`: build one side only, print its block times as JSON."""
    mode, batch = args.modes.split(",")[0], int(args.batches.split(",")[0])
    if args._alone == "ours":
        heap.keep_freed_heap()                    # as the command line does
    setup = Setup(mode, batch, "float32")
    side = Ours(setup) if args._alone == "ours" else Peer(setup, **peer_options(args))
    for _ in range(args.warmup):
        side.step()
    print(json.dumps({"ms": timed_blocks(side.step, args.rounds, args.steps)}))


def moe_timing(token_counts, rounds):
    """Median ms of the MoE layer's forward + backward, ours vs torch, interleaved."""
    torch, peer = load_torch()
    mcfg = runs.preset_configs("default", experts="modality")[0]
    rows = []
    for n in token_counts:
        mc, params, x, dy, modality = moe_inputs(mcfg, n, np.float32)
        layer = peer.moe_layer(mcfg, params, torch.float32)
        xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
        mod_t, one = torch.from_numpy(modality), torch.ones(())

        def ours():        # the weighted aux losses only, as the peer and training compute
            _, _, cache = moe_layer.forward(x, params, mc, modality, all_losses=False)
            moe_layer.backward(dy, cache, 1.0)

        def theirs():
            x_in = xt.detach().requires_grad_()
            y, aux_total, _, _ = layer(x_in, mod_t)
            torch.autograd.backward([y, aux_total], [dyt, one])
            layer.zero_grad(set_to_none=True)

        inner = max(1, int(4000 // max(n, 200)))  # calls per timed block
        for fn in (ours, theirs):
            fn()
        times = {"ours": [], "torch": []}
        for r in range(rounds):
            for name, fn in ((("ours", ours), ("torch", theirs)) if r % 2 == 0
                             else (("torch", theirs), ("ours", ours))):
                times[name] += timed_blocks(fn, 1, inner)
        rows.append((n, float(np.median(times["ours"])), float(np.median(times["torch"]))))
    return rows


# ----------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="modality,dense", help="modality,dense")
    parser.add_argument("--batches", default="64,16", help="64,16")
    parser.add_argument("--rounds", type=int, default=9, help="timed blocks per side (9)")
    parser.add_argument("--steps", type=int, default=5, help="steps per block (5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (3)")
    parser.add_argument("--moe-tokens", default="16,544,2080", help="16,544,2080; '' skips")
    parser.add_argument("--tolerance", type=float, default=1e-9)
    parser.add_argument("--check-steps", type=int, default=5,
                        help="training steps of each side in the check (5)")
    parser.add_argument("--qkv", choices=("fused", "separate"), default="fused",
                        help="the peer's q, k, v: one product (fused, default) or three")
    parser.add_argument("--adamw", choices=("fused", "loop"), default="fused",
                        help="the peer's torch.optim.AdamW: fused=True (default) or its loop")
    parser.add_argument("--check-only", action="store_true", help="only the float64 check")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 check")
    parser.add_argument("--no-alone", action="store_true", help="skip the alone processes")
    parser.add_argument("--alone-processes", type=int, default=2,
                        help="processes per side for the alone timing, alternating (2)")
    parser.add_argument("--_alone", choices=("ours", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._alone:
        return alone_child(args)
    modes = [m for m in args.modes.split(",") if m]
    batches = [int(b) for b in args.batches.split(",") if b]
    peer_kw = peer_options(args)
    torch, _ = load_torch()
    print(f"torch {torch.__version__}, numpy {np.__version__}, threads: torch "
          f"{torch.get_num_threads()}, OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS')}; peer: q/k/v {args.qkv}, AdamW {args.adamw}; "
          f"{load_average()}")
    ok = True
    if not args.no_check:
        for mode in modes:
            ok &= check(mode, 64, args.tolerance, peer_kw, args.check_steps)
        if args.check_only:
            return 0 if ok else 1
    heap.keep_freed_heap()                        # ours runs as the command line runs it
    print(f"\n[step] default preset, float32, one thread; {args.rounds} blocks of "
          f"{args.steps} steps per side, medians (heap kept in this process and in ours' "
          f"alone process)")
    print("| mode, batch | FLOP/step | ours ms/step | torch ms/step | ratio | ours tok/s "
          "| torch tok/s | ours GFLOP/s | torch GFLOP/s | alone: ours | torch | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        for batch in batches:
            setup = Setup(mode, batch, "float32")
            flops = first_batch_flops(setup)
            ms = interleaved(setup, args.rounds, args.steps, args.warmup, peer_kw)
            cells = [f"{mode}, {batch}", f"{flops / 1e9:.2f} G", f"{ms['ours']:.1f}",
                     f"{ms['torch']:.1f}", f"{ms['ours'] / ms['torch']:.2f}"]
            cells += [f"{setup.tokens_per_step / ms[k] * 1e3:,.0f}" for k in ("ours", "torch")]
            cells += [f"{flops / ms[k] / 1e6:.1f}" for k in ("ours", "torch")]
            if args.no_alone:
                cells += ["-", "-", "-"]
            else:
                a = alone(args.alone_processes, mode, batch, args.rounds, args.steps,
                          args.warmup, peer_kw)
                cells += [f"{a['ours']:.1f}", f"{a['torch']:.1f}",
                          f"{a['ours'] / a['torch']:.2f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
    counts = [int(n) for n in args.moe_tokens.split(",") if n]
    if counts:
        print(f"\n[moe] the default modality MoE layer alone (D=64, F=128, E=4 per pool, "
              f"top-1, capacity 1.25, {IMAGE_SHARE:.3f} image tokens), forward + backward, "
              f"float32, interleaved, {args.rounds} blocks, medians")
        print("| tokens | ours ms | torch ms | ratio |")
        print("|---|---|---|---|")
        for n, ours_ms, torch_ms in moe_timing(counts, args.rounds):
            print(f"| {n} | {ours_ms:.3f} | {torch_ms:.3f} | {ours_ms / torch_ms:.2f} |",
                  flush=True)
    print(f"\n{load_average()} (other work on the machine slows both sides, not always alike)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
