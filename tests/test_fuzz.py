"""Fuzz the public entry points with bad arguments (issue 11, items 5 and 6).

For every row of ``TABLE`` -- (name, function, builder of valid arguments, argument names)
-- hypothesis draws the sizes of one valid call; then each listed argument in turn is
replaced by every mutation :func:`mutations` makes of it (wrong rank, wrong dtype, NaN/inf,
empty, None, mismatched shape, wrong type, ...).  Each call must either succeed (the
mutation happened to be valid; then a finite input gives a finite result) or raise
``ValueError``/``TypeError`` whose message names the mutated argument.  Adding a function
is one line of ``TABLE`` (and a builder if its arguments are new).
"""

from __future__ import annotations

import ast
import numbers

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from minivlmoe import inference, metrics, model, model_config, world
from minivlmoe.data import ImageCaptionDataset, minibatch_indices, to_uint8
from minivlmoe.moe import aux_losses, dispatch, experts, moe_config, moe_layer, router
from minivlmoe.ops import (attention, contrastive, cross_entropy, ffn, gelu, l2norm,
                           layernorm, patch_embed, softmax, sparse_linear, token_embed)
from minivlmoe.testing.model import tiny_batch, tiny_config, tiny_params
from minivlmoe.tokenizer import Tokenizer

ALLOWED = (ValueError, TypeError)  # CheckpointError is a ValueError
# Mutations that break a relation between arguments (sizes, dtypes that must agree): the
# error may name either side, e.g. "params['gamma'] must have shape (D,) = (4,)" for x.
# Mutations that are never valid: a flag that is not a bool, a NaN/inf/float16/complex/
# object array where floats are expected.  These must raise.  (A NaN parameter may be
# accepted only by a call that never reads it, e.g. an idle expert: its result is finite.)
NEVER_VALID_FLOAT = ("nan", "inf", "dtype float16", "dtype complex128", "dtype object")


def never_valid(valid_value, label, backward=False):
    """True when the mutation ``label`` of ``valid_value`` must be refused.  A backward
    does not scan its upstream gradient (hot path): NaN in, NaN out, is allowed there."""
    if isinstance(valid_value, (bool, np.bool_)):
        return True
    if isinstance(valid_value, np.ndarray) and valid_value.dtype.kind == "f":
        return label in NEVER_VALID_FLOAT[backward * 2:]
    return False


RELATIONAL = ("empty", "rank-1", "shape-1", "shape+1", "one short", "int+1000",
              "dtype float32", "dtype float64")


# ----------------------------------------------------------------------------- mutations

def _leaf_paths(tree, prefix=()):
    """Paths to the array / csr leaves of a params dict, in key order."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_paths(value, prefix + (key,))
        else:
            yield prefix + (key,)


def _replace(tree, path, value):
    """A copy of the dict ``tree`` with the leaf at ``path`` replaced (others shared)."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _with_nan(a):
    if sp.issparse(a):
        a = a.copy()
        a.data[...] = np.nan if a.nnz else a.data
        return a
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        b = a.copy()
        b.reshape(-1)[:1] = np.nan
        return b
    return None


def _array_mutations(x):
    out = [("None", None), ("str", "x"), ("list", x.tolist()), ("rank+1", x[None])]
    if x.ndim:
        out.append(("rank-1", x[0] if x.shape[0] else x.reshape(x.shape[1:] + (0,))[..., 0]))
        out.append(("empty", x[:0]))
        last = x.shape[-1]
        out.append(("shape-1", x[..., :-1] if last > 1 else x[..., :0]))
        out.append(("shape+1", np.concatenate([x, x[..., :1]], axis=-1) if last
                    else np.zeros(x.shape[:-1] + (1,), x.dtype)))
    for dt in (np.int64, np.bool_, object, np.complex128, np.float16, np.float32, np.float64):
        if x.dtype != dt:
            out.append((f"dtype {np.dtype(dt)}", x.astype(dt)))
    if x.dtype.kind == "f" and x.size:
        for label, v in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf)):
            b = x.copy()
            b.reshape(-1)[:1] = v
            out.append((label, b))
    if x.dtype.kind in "iu" and x.size:
        wide = x.astype(np.int64)
        out += [("int+1000", wide + 1000), ("int-1000", wide - 1000)]
    if x.dtype == np.bool_ and x.size:
        out.append(("all False", np.zeros_like(x)))
    return out


def _dict_mutations(d):
    out = [("None", None), ("str", "x"), ("list", list(d.values())), ("empty dict", {})]
    if d:
        first = next(iter(d))
        out.append(("drop key", {k: v for k, v in d.items() if k != first}))
        out.append((f"key None at {(first,)}", {**d, first: None}))
        paths = list(_leaf_paths(d)) if all(isinstance(k, str) for k in d) else []
        for path in paths[:1] + paths[-1:]:
            leaf = _get(d, path)
            for label, bad in (("leaf NaN", _with_nan(leaf)), ("leaf None", None),
                               ("leaf str", "x")):
                if label == "leaf NaN" and bad is None:
                    continue
                out.append((f"{label} at {path}", _replace(d, path, bad)))
            if isinstance(leaf, np.ndarray) and leaf.ndim:
                out.append((f"leaf rank+1 at {path}", _replace(d, path, leaf[None])))
                out.append((f"leaf float16 at {path}", _replace(d, path, leaf.astype(np.float16))))
            if sp.issparse(leaf):
                out.append((f"leaf dense at {path}", _replace(d, path, leaf.toarray())))
    return out


def mutations(value):
    """(label, bad value) pairs derived from one valid argument ``value``."""
    if isinstance(value, (bool, np.bool_)):
        return [("None", None), ("str", "no"), ("int 1", 1), ("int 0", 0), ("float", 1.0)]
    if isinstance(value, numbers.Integral):
        return [("None", None), ("str", "3"), ("float", value + 0.5), ("bool", True),
                ("negative", -1 - int(value)), ("array", np.array([value]))]
    if isinstance(value, numbers.Real) and not isinstance(value, np.ndarray):
        return [("None", None), ("str", "0.1"), ("nan", float("nan")), ("inf", float("inf")),
                ("negative", -1.0 - float(value)), ("bool", True), ("complex", 1j)]
    if isinstance(value, np.ndarray):
        return _array_mutations(value)
    if sp.issparse(value):
        return [("None", None), ("dense", value.toarray()), ("nan", _with_nan(value))]
    if isinstance(value, dict):
        return _dict_mutations(value)
    if isinstance(value, str):
        return [("None", None), ("int", 5), ("empty", ""), ("long", "word " * 5000),
                ("list", [value])]
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        out = [("None", None), ("str", "a caption"), ("int", 5), ("empty", type(value)()),
               ("list of int", [1] * len(value)), ("list of None", [None] * len(value)),
               ("one short", value[:-1]), ("long item", [("word " * 5000)] + list(value[1:])),
               ("array", np.asarray(value, dtype=object))]
        if value and isinstance(value[0], (list, tuple)):
            out.append(("nested int", [[1, 2]] * len(value)))
            out.append(("nested list", [[["a"]]] * len(value)))
        return out
    if isinstance(value, np.random.Generator):
        return [("None", None), ("int", 5), ("RandomState", np.random.RandomState(0))]
    return [("None", None), ("str", "x"), ("int", 5), ("object", object())]


# ----------------------------------------------------------------------------- builders
# Each builder takes (rng, a, b) -- a generator and two small sizes hypothesis draws --
# and returns the keyword arguments of one valid call.

def _lin(rng, d_in, d_out, density=1.0):
    return sparse_linear.init(rng, d_in, d_out, density, np.float64)


def b_sparse_linear(rng, a, b):
    return dict(x=rng.standard_normal((a, 3)), params=_lin(rng, 3, b + 1, 0.5 if a > 2 else 1.0))


def b_x(rng, a, b):
    return dict(x=rng.standard_normal((a, b + 1)))


def b_layernorm(rng, a, b):
    return dict(x=rng.standard_normal((a, b + 1)), params=layernorm.init(b + 1, np.float64),
                eps=1e-5)


def b_softmax(rng, a, b):
    return dict(x=rng.standard_normal((a, b + 1)), axis=-1)


def b_logsumexp(rng, a, b):
    return dict(x=rng.standard_normal((a, b + 1)), axis=-1, keepdims=False)


def b_cross_entropy(rng, a, b):
    return dict(logits=rng.standard_normal((a, b + 2)),
                targets=rng.integers(0, b + 2, size=a), ignore_index=-100)


def b_l2norm(rng, a, b):
    return dict(x=rng.standard_normal((a, b + 1)), eps=1e-12)


def b_contrastive(rng, a, b):
    return dict(img=rng.standard_normal((a, b + 1)), txt=rng.standard_normal((a, b + 1)),
                log_logit_scale=np.array(1.0), positives=np.eye(a, dtype=bool))


def b_duplicate_positives(rng, a, b):
    return dict(keys=rng.integers(0, 3, size=a))


def b_patch_embed(rng, a, b):
    return dict(images=rng.random((a, 4, 4, 2)),
                params=patch_embed.init(rng, 4, 2, 2, b + 1, 1.0, np.float64), patch=2)


def b_extract_patches(rng, a, b):
    return dict(images=rng.integers(0, 256, size=(a, 4, 4, 2), dtype=np.uint8), patch=2)


def b_token_embed(rng, a, b):
    return dict(ids=rng.integers(0, 5, size=(a, b + 1)),
                params=token_embed.init(rng, 5, 4, 3, np.float64))


def b_attention(rng, a, b):
    return dict(x=rng.standard_normal((a, 3, 4)),
                params=attention.init(rng, 4, 2, 1.0, np.float64),
                heads=2, mask=attention.make_mask(np.ones((a, 3), dtype=bool)))


def b_make_mask(rng, a, b):
    return dict(valid=np.ones((a, b + 1), dtype=bool), S=b + 1, causal=True, prefix=1)


def b_ffn(rng, a, b):
    return dict(x=rng.standard_normal((a, 3)), params=ffn.init(rng, 3, b + 1, 1.0, np.float64))


def b_router(rng, a, b):
    return dict(x=rng.standard_normal((a, 3)), params=router.init(rng, 3, b + 1, 1.0, np.float64),
                k=1, renormalize=True, noise=rng.standard_normal((a, b + 1)))


def b_capacity(rng, a, b):
    return dict(num_tokens=a, num_experts=b + 1, k=1, capacity_factor=1.25)


def b_priority_order(rng, a, b):
    return dict(top1_probs=rng.random(a), bpr=True)


def _experts(rng, n, e, k):
    return np.argsort(rng.random((n, e)), axis=1)[:, :k]


def b_make_plan(rng, a, b):
    e = b + 1
    return dict(experts=_experts(rng, a, e, min(2, e)), num_experts=e, capacity=a,
                order=rng.permutation(a))


def _plan(rng, a, b):
    e = b + 1
    return dispatch.make_plan(_experts(rng, a, e, 1), e, a, np.arange(a))


def b_dispatch(rng, a, b):
    return dict(x=rng.standard_normal((a, 3)), plan=_plan(rng, a, b))


def b_combine(rng, a, b):
    plan = _plan(rng, a, b)
    return dict(ys=rng.standard_normal((plan.num_slots, 3)), gates=rng.random((a, 1)),
                plan=plan)


def b_experts(rng, a, b):
    plan = _plan(rng, a, b)
    return dict(xs=rng.standard_normal((plan.num_slots, 3)), offsets=plan.offsets,
                params=experts.init(rng, 3, 2, b + 1, 1.0, np.float64))


def _probs(rng, a, b):
    p = rng.random((a, b + 1)) + 0.1
    return p / p.sum(axis=1, keepdims=True)


def b_load_balance(rng, a, b):
    probs = _probs(rng, a, b)
    assign = aux_losses.top_k_indicator(_experts(rng, a, b + 1, 1), b + 1).astype(bool)
    return dict(probs=probs, assign=assign, k=1)


def b_probs(rng, a, b):
    return dict(probs=_probs(rng, a, b))


def b_z_loss(rng, a, b):
    return dict(logits=rng.standard_normal((a, b + 1)))


def b_entropy_global(rng, a, b):
    return dict(probs=_probs(rng, a, b), tau=0.5)


def b_top_k_indicator(rng, a, b):
    return dict(experts=_experts(rng, a, b + 1, 1), num_experts=b + 1)


def _moe_config(mode="shared"):
    return moe_config.MoEConfig(num_experts=2, k=1, capacity_factor=None, noise_std=0.1,
                               mode=mode)


def b_moe_layer(rng, a, b):
    config = _moe_config("modality" if b > 1 else "shared")
    return dict(x=rng.standard_normal((a, 3)),
                params=moe_layer.init(rng, 3, 2, config, 1.0, np.float64), config=config,
                modality=rng.integers(0, 2, size=a), rng=np.random.default_rng(0), train=True)


def b_moe_config(rng, a, b):
    return dict(num_experts=b + 1, k=1, capacity_factor=1.25, renormalize=False, bpr=False,
                noise_std=0.0, mode="shared", min_experts=2,
                aux_weights={"load_balance": 0.01})


def b_init_sparse_linear(rng, a, b):
    return dict(rng=rng, d_in=a, d_out=b + 1, density=1.0, dtype=np.float32, group=1)


def b_init_layernorm(rng, a, b):
    return dict(d=a, dtype=np.float64)


def b_init_token_embed(rng, a, b):
    return dict(rng=rng, vocab=a + 1, max_len=b + 1, d=2, dtype=np.float32)


def b_init_ffn(rng, a, b):
    return dict(rng=rng, d=a, hidden=b + 1, density=1.0, dtype=np.float32)


def b_init_moe(rng, a, b):
    return dict(rng=rng, d=a, hidden=b + 1, config=_moe_config(), density=1.0,
                dtype=np.float32)


_CFG = {}


def _tiny(experts_mode):
    if experts_mode not in _CFG:
        cfg = tiny_config(experts_mode)
        _CFG[experts_mode] = (cfg, tiny_params(np.random.default_rng(0), cfg))
    return _CFG[experts_mode]


def b_model(rng, a, b):
    cfg, params = _tiny("modality" if b > 1 else "shared")
    images, ids = tiny_batch(rng, cfg, B=a + 1)
    return dict(params=params, cfg=cfg, images=images, ids=ids, pad_id=0,
                keys=np.arange(a + 1), rng=np.random.default_rng(0), train=False)


def b_model_init(rng, a, b):
    return dict(rng=rng, cfg=_tiny("modality" if b > 1 else "shared")[0])


def b_encode_images(rng, a, b):
    cfg, params = _tiny("modality" if b > 1 else "shared")
    return dict(params=params, cfg=cfg, images=tiny_batch(rng, cfg, B=a)[0], batch_size=2)


def b_encode_texts(rng, a, b):
    cfg, params = _tiny("modality" if b > 1 else "shared")
    return dict(params=params, cfg=cfg, ids=tiny_batch(rng, cfg, B=a)[1], pad_id=0,
                batch_size=2)


def b_greedy(rng, a, b):
    cfg, params = _tiny("modality" if b > 1 else "shared")
    return dict(params=params, cfg=cfg, images=tiny_batch(rng, cfg, B=a)[0], bos_id=1,
                eos_id=2, pad_id=0, max_len=3, batch_size=2)


def b_model_config(rng, a, b):
    return dict(image_size=4, patch=2, channels=2, vocab_size=7, max_text_len=5, width=8,
                heads=2, layers=2, experts="shared", num_experts=2, top_k=1, bpr=False,
                renormalize=False, capacity_factor=1.25, density=1.0, dtype="float64")


def b_dataset(rng, a, b):
    return dict(images=rng.random((a, 4, 4, 3)), captions=["a red circle"] * a,
                heldout=np.zeros(a, dtype=bool))


def b_astype(rng, a, b):
    return dict(dtype=np.float64)


def b_world_sample(rng, a, b):
    return dict(n=a, rng=rng, split="test")


def b_from_dict(rng, a, b):
    return dict(d=_TOK.to_dict())


def b_config_from_dict(rng, a, b):
    return dict(d=b_model_config(rng, a, b))


def b_minibatch(rng, a, b):
    return dict(n=a, batch_size=b, rng=rng, drop_last=False)


def b_make_splits(rng, a, b):
    return dict(seed=a, n_train=b + 1, n_test=a, image_size=16, max_objects=2, noise=0.1,
                heldout=(("red", "circle"),), heldout_fraction=0.5)


_TOK = Tokenizer(["a", "red", "circle", "small"])


def b_decode(rng, a, b):
    return dict(ids=rng.integers(0, _TOK.vocab_size, size=a))


def b_decode_batch(rng, a, b):
    return dict(ids=rng.integers(0, _TOK.vocab_size, size=(a, b + 1)))


def b_encode(rng, a, b):
    return dict(captions=["a red circle"] * a, max_len=8, truncate=False)


def b_from_captions(rng, a, b):
    return dict(captions=["a red circle"] * a, min_count=1)


def b_tokenizer(rng, a, b):
    return dict(words=["a", "red", "circle"][:b + 1])


def b_recall(rng, a, b):
    return dict(sim=rng.standard_normal((a, b + 1)), img_keys=np.arange(a),
                txt_keys=np.arange(b + 1), ks=(1, 2))


def b_bleu(rng, a, b):
    return dict(hypotheses=[["a", "red", "circle", "x", "y"]] * a,
                references=[["a", "red", "circle", "x", "y"]] * a)


def b_exact(rng, a, b):
    return dict(hyps=[["a", "red"]] * a, refs=[["a", "red"]] * a)


def b_zero_shot(rng, a, b):
    return dict(sim=rng.standard_normal((a, b + 1)), labels=rng.integers(0, b + 1, size=a))


def _bw(forward, builder, grad_name, pick=lambda out: (out[0], out[-1])):
    """Builder of ``backward(grad, cache)`` from a forward and its builder: grad = ones."""
    def build(rng, a, b):
        y, cache = pick(forward(**builder(rng, a, b)))
        return {grad_name: np.ones_like(y) if isinstance(y, np.ndarray) else 1.0,
                "cache": cache}
    return build


# backward(grad, cache) of each op: (name, backward, forward, forward builder, grad name)
BACKWARDS = [
    ("sparse_linear", sparse_linear.backward, sparse_linear.forward, b_sparse_linear, "dy"),
    ("gelu", gelu.backward, gelu.forward, b_x, "dout"),
    ("layernorm", layernorm.backward, layernorm.forward, b_layernorm, "dy"),
    ("softmax", softmax.backward, softmax.forward, b_softmax, "dp"),
    ("cross_entropy", cross_entropy.backward, cross_entropy.forward, b_cross_entropy, "dloss"),
    ("l2norm", l2norm.backward, l2norm.forward, b_l2norm, "dy"),
    ("contrastive", contrastive.backward, contrastive.forward, b_contrastive, "dloss"),
    ("patch_embed", patch_embed.backward, patch_embed.forward, b_patch_embed, "dtokens"),
    ("token_embed", token_embed.backward, token_embed.forward, b_token_embed, "dx"),
    ("attention", attention.backward, attention.forward, b_attention, "dy"),
    ("ffn", ffn.backward, ffn.forward, b_ffn, "dy"),
    ("dispatch.dispatch", dispatch.dispatch_backward, dispatch.dispatch_forward, b_dispatch,
     "dxs"),
    ("dispatch.combine", dispatch.combine_backward, dispatch.combine_forward, b_combine, "dy"),
    ("experts", experts.backward, experts.forward, b_experts, "dys"),
    ("aux_losses.load_balance", aux_losses.load_balance_backward,
     aux_losses.load_balance_forward, b_load_balance, "dloss"),
    ("aux_losses.importance", aux_losses.importance_backward, aux_losses.importance_forward,
     b_probs, "dloss"),
    ("aux_losses.z_loss", aux_losses.z_loss_backward, aux_losses.z_loss_forward, b_z_loss,
     "dloss"),
    ("aux_losses.entropy_local", aux_losses.entropy_local_backward,
     aux_losses.entropy_local_forward, b_probs, "dloss"),
    ("aux_losses.entropy_global", aux_losses.entropy_global_backward,
     aux_losses.entropy_global_forward, b_entropy_global, "dloss"),
]


# (name, function, builder, argument names to mutate).  One line per function.
TABLE = [
    ("sparse_linear.forward", sparse_linear.forward, b_sparse_linear, ("x", "params")),
    ("sparse_linear.init", sparse_linear.init, b_init_sparse_linear,
     ("rng", "d_in", "d_out", "density", "dtype", "group")),
    ("gelu.forward", gelu.forward, b_x, ("x",)),
    ("layernorm.forward", layernorm.forward, b_layernorm, ("x", "params", "eps")),
    ("layernorm.init", layernorm.init, b_init_layernorm, ("d", "dtype")),
    ("softmax.forward", softmax.forward, b_softmax, ("x", "axis")),
    ("softmax.logsumexp", softmax.logsumexp, b_logsumexp, ("x", "axis", "keepdims")),
    ("cross_entropy.forward", cross_entropy.forward, b_cross_entropy,
     ("logits", "targets", "ignore_index")),
    ("l2norm.forward", l2norm.forward, b_l2norm, ("x", "eps")),
    ("contrastive.forward", contrastive.forward, b_contrastive,
     ("img", "txt", "log_logit_scale", "positives")),
    ("contrastive.duplicate_positives", contrastive.duplicate_positives, b_duplicate_positives,
     ("keys",)),
    ("patch_embed.forward", patch_embed.forward, b_patch_embed, ("images", "params", "patch")),
    ("patch_embed.extract_patches", patch_embed.extract_patches, b_extract_patches,
     ("images", "patch")),
    ("token_embed.forward", token_embed.forward, b_token_embed, ("ids", "params")),
    ("patch_embed.init", patch_embed.init,
     lambda rng, a, b: dict(rng=rng, image_size=4, patch=2, channels=a, d=b, density=1.0,
                            dtype=np.float32),
     ("rng", "image_size", "patch", "channels", "d", "density", "dtype")),
    ("token_embed.init", token_embed.init, b_init_token_embed,
     ("rng", "vocab", "max_len", "d", "dtype")),
    ("attention.forward", attention.forward, b_attention, ("x", "params", "heads", "mask")),
    ("attention.init", attention.init,
     lambda rng, a, b: dict(rng=rng, d=4, heads=2, density=1.0, dtype=np.float32),
     ("rng", "d", "heads", "density", "dtype")),
    ("attention.make_mask", attention.make_mask, b_make_mask, ("valid", "S", "causal", "prefix")),
    ("ffn.forward", ffn.forward, b_ffn, ("x", "params")),
    ("ffn.init", ffn.init, b_init_ffn, ("rng", "d", "hidden", "density", "dtype")),
    ("router.forward", router.forward, b_router, ("x", "params", "k", "renormalize", "noise")),
    ("router.init", router.init,
     lambda rng, a, b: dict(rng=rng, d=a, num_experts=b, density=1.0, dtype=np.float32),
     ("rng", "d", "num_experts", "density", "dtype")),
    ("dispatch.capacity", dispatch.capacity, b_capacity,
     ("num_tokens", "num_experts", "k", "capacity_factor")),
    ("dispatch.priority_order", dispatch.priority_order, b_priority_order, ("top1_probs", "bpr")),
    ("dispatch.make_plan", dispatch.make_plan, b_make_plan,
     ("experts", "num_experts", "capacity", "order")),
    ("dispatch.dispatch_forward", dispatch.dispatch_forward, b_dispatch, ("x", "plan")),
    ("dispatch.combine_forward", dispatch.combine_forward, b_combine, ("ys", "gates", "plan")),
    ("experts.forward", experts.forward, b_experts, ("xs", "offsets", "params")),
    ("experts.init", experts.init,
     lambda rng, a, b: dict(rng=rng, d=a, hidden=b, num_experts=2, density=1.0,
                            dtype=np.float32),
     ("rng", "d", "hidden", "num_experts", "density", "dtype")),
    ("aux_losses.top_k_indicator", aux_losses.top_k_indicator, b_top_k_indicator,
     ("experts", "num_experts")),
    ("aux_losses.load_balance_forward", aux_losses.load_balance_forward, b_load_balance,
     ("probs", "assign", "k")),
    ("aux_losses.importance_forward", aux_losses.importance_forward, b_probs, ("probs",)),
    ("aux_losses.z_loss_forward", aux_losses.z_loss_forward, b_z_loss, ("logits",)),
    ("aux_losses.entropy_local_forward", aux_losses.entropy_local_forward, b_probs, ("probs",)),
    ("aux_losses.entropy_global_forward", aux_losses.entropy_global_forward, b_entropy_global,
     ("probs", "tau")),
    ("moe_layer.forward", moe_layer.forward, b_moe_layer,
     ("x", "params", "config", "modality", "rng", "train")),
    ("moe_config.MoEConfig", moe_config.MoEConfig, b_moe_config,
     ("num_experts", "k", "capacity_factor", "renormalize", "bpr", "noise_std", "mode",
      "min_experts", "aux_weights")),
    ("moe_layer.init", moe_layer.init, b_init_moe,
     ("rng", "d", "hidden", "config", "density", "dtype")),
    ("model.forward", model.forward, b_model,
     ("params", "cfg", "images", "ids", "pad_id", "keys", "rng", "train")),
    ("model.loss_and_grads", model.loss_and_grads, b_model,
     ("params", "cfg", "images", "ids", "pad_id", "keys", "train")),
    ("model.init", model.init, b_model_init, ("rng", "cfg")),
    ("inference.encode_images", inference.encode_images, b_encode_images,
     ("params", "cfg", "images", "batch_size")),
    ("inference.encode_texts", inference.encode_texts, b_encode_texts,
     ("params", "cfg", "ids", "pad_id", "batch_size")),
    ("inference.greedy_decode", inference.greedy_decode, b_greedy,
     ("params", "cfg", "images", "bos_id", "eos_id", "pad_id", "max_len")),
    ("model_config.ModelConfig.from_dict", model_config.ModelConfig.from_dict, b_config_from_dict, ("d",)),
    ("model_config.ModelConfig", model_config.ModelConfig, b_model_config,
     ("image_size", "patch", "channels", "vocab_size", "max_text_len", "width", "heads",
      "layers", "experts", "num_experts", "top_k", "bpr", "renormalize", "capacity_factor",
      "density", "dtype")),
    ("ImageCaptionDataset", ImageCaptionDataset, b_dataset, ("images", "captions", "heldout")),
    ("ImageCaptionDataset.astype",
     ImageCaptionDataset(np.zeros((2, 2, 2, 3)), ["a", "b"]).astype, b_astype, ("dtype",)),
    ("World.sample", world.World(image_size=16).sample, b_world_sample, ("n", "rng", "split")),
    ("data.minibatch_indices", lambda **kw: list(minibatch_indices(**kw)), b_minibatch,
     ("n", "batch_size", "rng", "drop_last")),
    ("data.to_uint8", to_uint8, lambda rng, a, b: dict(images=rng.random((a, 2, 2, 3))),
     ("images",)),
    ("world.make_splits", world.make_splits, b_make_splits,
     ("seed", "n_train", "n_test", "image_size", "max_objects", "noise", "heldout",
      "heldout_fraction")),
    ("Tokenizer", Tokenizer, b_tokenizer, ("words",)),
    ("Tokenizer.from_dict", Tokenizer.from_dict, b_from_dict, ("d",)),
    ("Tokenizer.from_captions", Tokenizer.from_captions, b_from_captions,
     ("captions", "min_count")),
    ("Tokenizer.encode", _TOK.encode, b_encode, ("captions", "max_len", "truncate")),
    ("Tokenizer.decode", _TOK.decode, b_decode, ("ids",)),
    ("Tokenizer.decode_batch", _TOK.decode_batch, b_decode_batch, ("ids",)),
    ("metrics.retrieval_recall", metrics.retrieval_recall, b_recall,
     ("sim", "img_keys", "txt_keys", "ks")),
    ("metrics.bleu4", metrics.bleu4, b_bleu, ("hypotheses", "references")),
    ("metrics.exact_match", metrics.exact_match, b_exact, ("hyps", "refs")),
    ("metrics.zero_shot_accuracy", metrics.zero_shot_accuracy, b_zero_shot, ("sim", "labels")),
    ("router.backward", router.backward,
     _bw(router.forward, b_router, "dgates", lambda out: (out[0].gates, out[1])),
     ("dgates", "cache")),
    ("moe_layer.backward", moe_layer.backward, _bw(moe_layer.forward, b_moe_layer, "dy"),
     ("dy", "cache")),
    ("model.backward", model.backward, _bw(model.forward, b_model, "dtotal",
                                           lambda out: (1.0, out[-1])), ("dtotal", "cache")),
] + [(f"{name}.backward", bwd, _bw(fwd, builder, grad), (grad, "cache"))
     for name, bwd, fwd, builder, grad in BACKWARDS]


# ----------------------------------------------------------------------------- the check

def _finite(value):
    """False if ``value`` (an output, possibly nested) holds a NaN or inf float."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind != "f" or bool(np.all(np.isfinite(value)))
    if isinstance(value, float):
        return bool(np.isfinite(value))
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _inputs_finite(kwargs):
    return all(_finite(v) and not (sp.issparse(v) and not _finite(v.data))
               for v in kwargs.values()) and all(
        _finite(_get(v, p)) for v in kwargs.values() if isinstance(v, dict)
        and all(isinstance(k, str) for k in v) for p in _leaf_paths(v)
        if not sp.issparse(_get(v, p)) and not isinstance(_get(v, p), dict))


def _primary(out):
    """The value output of a ``(out, cache)`` pair; the whole result otherwise."""
    if isinstance(out, tuple) and not hasattr(out, "_fields") and len(out) == 2:
        return out[0]
    return out


def run_row(row, rng, a, b):
    """Call ``row``'s function once per (argument, mutation); return the failures."""
    name, fn, builder, arg_names = row
    failures = []
    calls = 0
    for arg in arg_names:
        valid = builder(rng, a, b)
        for label, bad in mutations(valid[arg]):
            kwargs = dict(valid)
            kwargs[arg] = bad
            calls += 1
            try:
                with np.errstate(all="ignore"):
                    out = fn(**kwargs)
            except ALLOWED as e:
                names = valid if label in RELATIONAL else (arg,)
                if " at (" in label:  # a leaf of a dict: its key may be named instead
                    names = (arg, str(ast.literal_eval(label.split(" at ")[1])[-1]))
                if not any(n in str(e) for n in names):
                    failures.append(f"{name}({arg}={label}): {type(e).__name__} does not "
                                    f"name {arg!r}: {e}")
                elif len(str(e)) > 1000:
                    failures.append(f"{name}({arg}={label}): message of {len(str(e))} chars")
            except Exception as e:  # noqa: BLE001 -- the point of the test
                failures.append(f"{name}({arg}={label}): {type(e).__name__}: {e}")
            else:
                if never_valid(valid[arg], label, name.endswith(".backward")):
                    failures.append(f"{name}({arg}={label}): accepted, must be refused")
                elif label.startswith("leaf NaN") and not _finite(_primary(out)):
                    failures.append(f"{name}({arg}={label}): a NaN parameter gave a "
                                    f"non-finite result instead of an error")
                elif _inputs_finite(kwargs) and not _finite(_primary(out)):
                    failures.append(f"{name}({arg}={label}): non-finite result from finite "
                                    f"input")
    return failures, calls


def combinations():
    """The (function, argument, mutation) triples the test covers, at fixed sizes."""
    rng = np.random.default_rng(0)
    return [(row[0], arg, label) for row in TABLE for arg in row[3]
            for label, _ in mutations(row[2](rng, 3, 2)[arg])]


@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
@given(seed=st.integers(0, 2**32 - 1), a=st.integers(1, 4), b=st.integers(1, 3))
def test_bad_arguments_raise_clear_errors(row, seed, a, b):
    failures, _ = run_row(row, np.random.default_rng(seed), a, b)
    assert not failures, "\n".join(failures)


def test_valid_calls_succeed():
    """The builders make valid calls (otherwise every mutation 'fails' for free)."""
    rng = np.random.default_rng(1)
    for name, fn, builder, _ in TABLE:
        out = fn(**builder(rng, 3, 2))
        assert _finite(_primary(out)), name


def test_table_covers_every_mutation_kind():
    combos = combinations()
    assert len(combos) > 1000
    labels = {label for _, _, label in combos}
    for kind in ("None", "rank+1", "dtype int64", "dtype bool", "dtype object",
                 "dtype complex128", "dtype float16", "nan", "inf", "empty", "shape+1", "str"):
        assert kind in labels, kind


# ----------------------------------------------------------------------------- named cases
# The silently wrong results issue 11 found, each refused by name.

def test_make_plan_refuses_an_order_that_is_not_a_permutation():
    experts_ = np.array([[0], [1], [0]])
    for order in (np.array([0, 0, 1]), np.array([0, 1, 3]), np.array([0, 1]),
                  np.array([2, 1, -1])):
        with pytest.raises(ValueError, match="order must be a permutation of the 3 tokens"):
            dispatch.make_plan(experts_, 2, 3, order)
    plan = dispatch.make_plan(experts_, 2, 3, np.array([2, 0, 1]))
    assert sorted(plan.slot_token.tolist()) == [0, 1, 2]


def test_make_plan_refuses_a_token_that_picks_an_expert_twice():
    with pytest.raises(ValueError, match=r"experts must hold K distinct experts per token, "
                                         r"got row 1 = \[2, 2\]"):
        dispatch.make_plan(np.array([[0, 1], [2, 2]]), 3, 2, np.arange(2))


def test_experts_forward_refuses_bad_offsets(rng):
    params = experts.init(rng, 3, 2, 2, 1.0, np.float64)
    xs = rng.standard_normal((4, 3))
    experts.forward(xs, np.array([0, 1, 4]), params)
    for offsets in (np.array([0, 5, 4]), np.array([0, 3, 1, 4]), np.array([1, 2, 4]),
                    np.array([0, 2, 3]), np.array([4])):
        with pytest.raises(ValueError, match="offsets must be non-decreasing from 0"):
            experts.forward(xs, offsets, params)
    with pytest.raises(TypeError, match="offsets must have an integer dtype"):
        experts.forward(xs, np.array([0.0, 1.0, 4.0]), params)


def test_sparse_linear_refuses_nan_in_the_weight(rng):
    for density in (1.0, 0.5, 0.05):
        params = sparse_linear.init(rng, 40, 16, density, np.float64)
        params["W"].data[3] = np.nan
        with pytest.raises(ValueError, match=r"params\['W'\].data must be finite"):
            sparse_linear.forward(rng.standard_normal((2, 40)), params)


@pytest.mark.parametrize("flag", ["no", None, 1, 0.0])
def test_flags_must_be_bool(rng, flag):
    x = rng.standard_normal((4, 3))
    with pytest.raises(TypeError, match="renormalize must be a bool"):
        router.forward(x, router.init(rng, 3, 2, 1.0, np.float64), 1, renormalize=flag)
    config = _moe_config()
    params = moe_layer.init(rng, 3, 2, config, 1.0, np.float64)
    with pytest.raises(TypeError, match="train must be a bool"):
        moe_layer.forward(x, params, config, rng=rng, train=flag)
    with pytest.raises(TypeError, match="bpr must be a bool"):
        dispatch.priority_order(np.ones(3), flag)
    with pytest.raises(TypeError, match="truncate must be a bool"):
        _TOK.encode(["a"], truncate=flag)
    with pytest.raises(TypeError, match="keepdims must be a bool"):
        softmax.logsumexp(x, keepdims=flag)
    router.forward(x, router.init(rng, 3, 2, 1.0, np.float64), 1, renormalize=np.bool_(False))


@pytest.mark.parametrize("init", [
    lambda dt: sparse_linear.init(np.random.default_rng(0), 2, 2, 1.0, dt),
    lambda dt: layernorm.init(2, dt),
    lambda dt: token_embed.init(np.random.default_rng(0), 3, 2, 2, dt),
    lambda dt: patch_embed.init(np.random.default_rng(0), 4, 2, 1, 2, 1.0, dt),
    lambda dt: moe_layer.init(np.random.default_rng(0), 2, 2, _moe_config(), 1.0, dt),
    lambda dt: ImageCaptionDataset(np.zeros((1, 2, 2, 3)), ["a"]).astype(dt),
])
def test_init_refuses_dtype_none(init):
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got None"):
        init(None)


def test_model_config_needs_room_for_the_special_tokens():
    kw = b_model_config(None, 1, 1)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[4, inf\], got 3"):
        model_config.ModelConfig(**{**kw, "vocab_size": 3})
    model_config.ModelConfig(**{**kw, "vocab_size": 4})
    with pytest.raises(ValueError, match="dtype must be one of"):
        model_config.ModelConfig(**{**kw, "dtype": None})


def test_decode_refuses_floats():
    with pytest.raises(TypeError, match="ids must have an integer dtype, got float64"):
        _TOK.decode([1.5, 2.0])
    assert _TOK.decode([1, 4, 2]) == "a"


def test_layernorm_params_none_names_the_argument(rng):
    with pytest.raises(TypeError, match="params must be a dict with keys"):
        layernorm.forward(rng.standard_normal((2, 3)), None)


def test_long_values_are_shortened_in_messages():
    long = "word " * 20000
    for call in (lambda: _TOK.encode([long], 8), lambda: moe_config.MoEConfig(2, mode=long),
                 lambda: metrics.retrieval_recall(np.eye(2), [0, 1], [0, 1], ks=[long])):
        with pytest.raises(ValueError) as info:
            call()
        assert len(str(info.value)) < 600, len(str(info.value))
    from minivlmoe._checks import shorten
    assert shorten("x" * 10) == "x" * 10
    assert shorten("x" * 1000).startswith("x" * 200 + "... (1000 characters)")
