"""Gradient-check cases and fixtures of the building blocks (minivlmoe/ops/), reading order.

Each ``*_cases(rng)`` returns the small float64 :class:`~minivlmoe.gradcheck.GradcheckCase`
list that ``python -m minivlmoe gradcheck`` reports; the ``*_case`` builders and fixtures
are shared with the tests and the docs' check blocks, so each is written once.
"""

from __future__ import annotations

import math

import numpy as np

from ..gradcheck import GradcheckCase
from ..ops import (attention, contrastive, cross_entropy, ffn, gelu, l2norm, layernorm, linear,
                   lowrank_linear, patch_embed, segment_attention, softmax, sparse_linear,
                   token_embed)


def _named(names, backward):
    """``(dout, cache) -> {name: grad}`` for a backward returning one gradient per name."""
    return lambda dout, cache: dict(zip(names, backward(dout, cache)))


# ----------------------------------------------------------------------------------------
# sparse_linear


def sparse_linear_cases(rng):
    """One case per kernel path (dense, grouped, per-entry gather, CSR + GEMM)."""
    cases = []
    for name, density, d_in, d_out, group in (("dense path", 1.0, 5, 4, 16),
                                              ("dense path", 0.3, 40, 6, 16),
                                              ("grouped", 0.05, 60, 8, 4),
                                              ("per-entry gather", 0.01, 120, 3, 1),
                                              ("CSR + GEMM", 0.05, 60, 5, 1)):
        params = sparse_linear.init(rng, d_in, d_out, density, dtype=np.float64, group=group)
        cases.append(_linear_case(f"sparse_linear({name}, density={density})", params, rng))
    return cases + pruned_linear_cases()


def _linear_case(name, params, rng):
    """The gradcheck case of ``sparse_linear`` on ``params`` (its bias and a (2, 3, Din)
    input drawn from ``rng``)."""
    d_out, d_in = params["W"].shape
    params["b"] = rng.standard_normal(d_out)
    x = rng.standard_normal((2, 3, d_in))                        # (B, S, Din)
    return GradcheckCase(name, {"x": x, "params": params},
                         lambda a: sparse_linear.forward(a["x"], a["params"]),
                         _named(("x", "params"), sparse_linear.backward))


def pruned_linear_cases():
    """Layers magnitude-pruned by :func:`minivlmoe.compress.prune.prune_weight` (their
    patterns are not init's): unstructured and row-group, on the kernels' paths.  Drawn
    from their own generator, so adding them left every other case's values unchanged."""
    from ..compress.prune import prune_weight

    rng = np.random.default_rng(9)
    cases = []
    for structure, density, d_in, d_out in (("unstructured", 0.3, 20, 6),
                                            ("unstructured", 0.05, 60, 5),
                                            ("row-group", 0.1, 60, 8),
                                            ("row-group", 0.02, 200, 4)):
        params = sparse_linear.init(rng, d_in, d_out, 1.0, dtype=np.float64)
        params["W"] = prune_weight(params["W"], density, structure, group=4)
        cases.append(_linear_case(f"sparse_linear(pruned {structure} {density})", params,
                                  rng))
    return cases


# ----------------------------------------------------------------------------------------
# lowrank_linear and the linear dispatch


def lowrank_params(rng, d_in, d_out, rank, dtype=np.float64):
    """Factored params of a random dense (Dout, Din) weight at ``rank`` and a random bias."""
    dense = sparse_linear.init(rng, d_in, d_out, 1.0, dtype=dtype)
    dense["b"] = rng.standard_normal(d_out).astype(dtype)
    return lowrank_linear.from_dense(dense, rank)


def naive_lowrank_forward(x, A, B, b):
    """``y[n, o] = sum_j B[o, j] sum_i A[j, i] x[n, i] + b[o]``, one product at a time."""
    a, bb = A.toarray(), B.toarray()
    x2 = x.reshape(-1, a.shape[1])
    out = np.zeros((x2.shape[0], bb.shape[0]))
    for n in range(x2.shape[0]):
        h = [sum(a[j, i] * x2[n, i] for i in range(a.shape[1])) for j in range(a.shape[0])]
        for o in range(bb.shape[0]):
            out[n, o] = sum(bb[o, j] * h[j] for j in range(len(h))) + b[o]
    return out.reshape(*x.shape[:-1], bb.shape[0])


def lowrank_linear_cases(rng):
    """Rank 1, an intermediate rank and full rank."""
    cases = []
    for d_in, d_out, rank in ((5, 4, 1), (7, 6, 3), (4, 6, 4)):
        params = lowrank_params(rng, d_in, d_out, rank)
        cases.append(GradcheckCase(
            f"lowrank_linear({d_out}x{d_in}, rank={rank})",
            {"x": rng.standard_normal((2, 3, d_in)), "params": params},
            lambda a: lowrank_linear.forward(a["x"], a["params"]),
            _named(("x", "params"), lowrank_linear.backward)))
    return cases


def linear_cases(rng):
    """The dispatch with each kind of params."""
    dense = sparse_linear.init(rng, 6, 5, 0.5, dtype=np.float64)
    dense["b"] = rng.standard_normal(5)
    return [GradcheckCase(f"linear({kind})",
                          {"x": rng.standard_normal((3, 6)), "params": params},
                          lambda a: linear.forward(a["x"], a["params"]),
                          _named(("x", "params"), linear.backward))
            for kind, params in (("sparse", dense), ("lowrank", lowrank_params(rng, 6, 5, 2)))]


# ----------------------------------------------------------------------------------------
# gelu


def gelu_scalar(v):
    """The tanh-form GELU of one Python float (the definition in minivlmoe/ops/gelu.py),
    for naive loop references."""
    return 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


def gelu_cases(rng):
    """One case with inputs in the curved region (|x| up to ~6)."""
    return [GradcheckCase("gelu", {"x": 2.0 * rng.standard_normal((3, 7))},
                          lambda a: gelu.forward(a["x"]),
                          lambda dout, cache: {"x": gelu.backward(dout, cache)})]


# ----------------------------------------------------------------------------------------
# layernorm


def layernorm_cases(rng):
    """(N, D) and (B, S, D) with non-trivial gamma and beta."""
    cases = []
    for shape in ((4, 6), (2, 3, 5)):
        d = shape[-1]
        params = {"gamma": 1.0 + 0.5 * rng.standard_normal(d),
                  "beta": rng.standard_normal(d)}
        x = 3.0 * rng.standard_normal(shape) + 1.0
        cases.append(GradcheckCase(
            f"layernorm{shape}", {"x": x, "params": params},
            lambda a: layernorm.forward(a["x"], a["params"]),
            _named(("x", "params"), layernorm.backward)))
    return cases


# ----------------------------------------------------------------------------------------
# softmax


def softmax_case(name, x, axis=-1):
    """The softmax of ``x`` along ``axis``; ``-inf`` entries are masked (gradient 0)."""
    return GradcheckCase(name, {"x": x},
                         lambda a: softmax.forward(a["x"], axis=axis),
                         lambda dout, cache: {"x": softmax.backward(dout, cache)})


def softmax_cases(rng):
    """The last axis, a middle axis, and -inf (masked) entries."""
    masked = rng.standard_normal((3, 5))
    masked[0, [1, 3]] = -np.inf                                  # two masked keys
    masked[2] = -np.inf                                          # a fully masked row
    return [softmax_case("softmax(axis=-1)", 2.0 * rng.standard_normal((3, 6)), -1),
            softmax_case("softmax(axis=1)", rng.standard_normal((2, 5, 3)), 1),
            softmax_case("softmax(-inf masked)", masked, -1)]


# ----------------------------------------------------------------------------------------
# cross_entropy


def cross_entropy_case(name, logits, targets):
    """Loss of ``logits`` (..., V); the integer ``targets`` are not differentiable."""
    return GradcheckCase(name, {"logits": logits, "targets": targets},
                         lambda a: cross_entropy.forward(a["logits"], a["targets"]),
                         lambda dout, cache: {"logits": cross_entropy.backward(dout, cache)})


def cross_entropy_cases(rng):
    """With some ignored positions, and with 2 leading axes."""
    targets = rng.integers(0, 7, size=5)
    targets[[1, 3]] = -100
    return [cross_entropy_case("cross_entropy(ignore_index)",
                               2.0 * rng.standard_normal((5, 7)), targets),
            cross_entropy_case("cross_entropy(B, T, V)", rng.standard_normal((2, 3, 4)),
                               rng.integers(0, 4, size=(2, 3)))]


# ----------------------------------------------------------------------------------------
# l2norm


def l2norm_cases(rng):
    """Ordinary rows, and a mix of normalized and clamped rows."""
    x = rng.standard_normal((3, 5))
    mixed = rng.standard_normal((4, 3))
    mixed[1:3] *= 1e-3                                           # norms ~2e-3 < eps = 0.1
    cases = []
    for name, x_, eps in (("l2norm", x, 1e-12), ("l2norm(clamped rows)", mixed, 0.1)):
        cases.append(GradcheckCase(
            name, {"x": x_},
            lambda a, eps=eps: l2norm.forward(a["x"], eps=eps),
            lambda dout, cache: {"x": l2norm.backward(dout, cache)}))
    return cases


# ----------------------------------------------------------------------------------------
# contrastive


def unit_rows(a):
    """Rows of ``a`` (B, D) scaled to unit L2 norm."""
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def contrastive_case(name, img, txt, log_logit_scale, positives=None):
    """InfoNCE of ``img``, ``txt`` (B, D) and ``log_logit_scale`` (); the boolean ``positives``
    (B, B) (from :func:`minivlmoe.ops.contrastive.duplicate_positives`) is held fixed."""
    return GradcheckCase(
        name, {"img": img, "txt": txt, "log_logit_scale": log_logit_scale},
        lambda a: contrastive.forward(a["img"], a["txt"], a["log_logit_scale"], positives),
        _named(("img", "txt", "log_logit_scale"), contrastive.backward))


def contrastive_cases(rng):
    """Identity positives, and duplicate captions."""
    def case(name, positives):
        b = 4
        return contrastive_case(name, unit_rows(rng.standard_normal((b, 3))),
                                unit_rows(rng.standard_normal((b, 3))),
                                np.array(contrastive.LOG_LOGIT_SCALE_INIT - 1.0), positives)

    return [case("contrastive", None),
            case("contrastive(duplicates)",
                 contrastive.duplicate_positives(np.array([7, 3, 7, 5])))]


# ----------------------------------------------------------------------------------------
# patch_embed


def patch_embed_cases(rng):
    """Dense and sparse projection."""
    cases = []
    for density, R, p, Ch, d in ((1.0, 4, 2, 3, 5), (0.3, 6, 3, 2, 4)):
        params = patch_embed.init(rng, R, p, Ch, d, density, dtype=np.float64)
        params["proj"]["b"] = rng.standard_normal(d)
        images = rng.standard_normal((2, R, R, Ch))              # (B, R, R, Ch)
        cases.append(GradcheckCase(
            f"patch_embed(R={R}, patch={p}, density={density})",
            {"images": images, "params": params},
            lambda a, p=p: patch_embed.forward(a["images"], a["params"], p),
            _named(("images", "params"), patch_embed.backward)))
    return cases


# ----------------------------------------------------------------------------------------
# token_embed


def token_embed_cases(rng):
    """One case with repeated ids and T < Tmax (the integer ids are not differentiable)."""
    params = token_embed.init(rng, 5, 6, 3, dtype=np.float64)
    ids = np.array([[1, 3, 1, 1], [0, 3, 4, 1]])                  # (B=2, T=4), repeats
    return [GradcheckCase(
        "token_embed(V=5, Tmax=6, repeated ids)",
        {"ids": ids, "params": params},
        lambda a: token_embed.forward(a["ids"], a["params"]),
        lambda dout, cache: {"params": token_embed.backward(dout, cache)})]


# ----------------------------------------------------------------------------------------
# attention

# The key bias is the one argument a gradient check cannot judge: ``bk`` adds
# ``q[s] . bk / sqrt(Dh)`` to every score of row ``s`` and softmax is invariant to a
# constant shift of a row, so its true gradient is exactly 0.  The analytic value is then
# round-off (~1e-17) and the centered difference is round-off (~1e-10): a *relative* error
# is meaningless.  tests/test_attention.py checks instead that the gradient is ~0 and that
# the output does not depend on ``bk``.
KEY_BIAS_SKIP = {"params.k.b": "true gradient exactly 0: a key bias shifts every score "
                               "of a row equally, softmax ignores it"}

# Finite-difference step: the centered difference's round-off is ~eps |L| / h and matters
# when a whole argument's gradient is tiny next to L (two nearly equal input rows make
# dq ~ |x0 - x1|^2); h = 1e-5 cuts it tenfold, the O(h^2) truncation stays ~1e-8 relative.
ATTENTION_H = 1e-5


def attention_backward_without_key_bias(dout, cache):
    """:func:`minivlmoe.ops.attention.backward` with ``params.k.b`` left out
    (:data:`KEY_BIAS_SKIP` says why)."""
    dx, dparams = attention.backward(dout, cache)
    dparams["k"] = {"W": dparams["k"]["W"]}
    return {"x": dx, "params": dparams}


def attention_case(name, x, params, heads, mask=None):
    """Attention of ``x`` (B, S, D) with ``params``; the key bias is skipped with its reason."""
    return GradcheckCase(name, {"x": x, "params": params},
                         lambda a: attention.forward(a["x"], a["params"], heads, mask),
                         attention_backward_without_key_bias, h=ATTENTION_H,
                         skip=KEY_BIAS_SKIP)


def attention_cases(rng):
    """Full, key-padding (one item fully padded), causal, prefix-causal."""
    B, S, D, H = 2, 5, 6, 2
    valid = np.array([[True, True, True, False, False], [False] * S])   # (B, S)
    masks = {
        "full": None,
        "padding": attention.make_mask(valid),
        "causal": attention.make_mask(S=S, causal=True),
        "prefix=3": attention.make_mask(S=S, causal=True, prefix=3),
    }
    cases = []
    for label, mask in masks.items():
        density = 1.0 if label in ("full", "causal") else 0.4
        params = attention.init(rng, D, H, density, dtype=np.float64)
        for name in attention.PROJECTIONS:
            params[name]["b"] = 0.1 * rng.standard_normal(D)
        x = rng.standard_normal((B, S, D))                       # (B, S, D)
        cases.append(attention_case(f"attention(mask={label}, density={density})",
                                    x, params, H, mask))
    return cases


def sequence_blocks(valid, image, caption):
    """The model's three blocks (minivlmoe/sequence.py) for a sequence of ``image``
    image positions, ``caption`` caption positions and the rest retrieval text, with
    key validity ``valid`` (B, S); image positions must be valid."""
    from ..sequence import Layout, attention_blocks
    layout = Layout(image=image, caption=caption, retrieval=valid.shape[1] - image - caption)
    return attention_blocks(layout, valid)


def segment_attention_case(name, x, params, heads, blocks):
    """Attention by segments of ``x`` (B, S, D); the key bias skipped as for attention."""
    def backward(dout, cache):
        dx, dparams = segment_attention.backward(dout, cache)
        dparams["k"] = {"W": dparams["k"]["W"]}
        return {"x": dx, "params": dparams}
    return GradcheckCase(name, {"x": x, "params": params},
                         lambda a: segment_attention.forward(a["x"], a["params"], heads, blocks),
                         backward, h=ATTENTION_H, skip=KEY_BIAS_SKIP)


def segment_attention_cases(rng):
    """The model's layout [image 2 | caption 3 | retrieval 3] with caption and retrieval
    padding, dense and sparse projections; and one block over all keys (no mask)."""
    B, D, H = 2, 6, 2
    valid = np.array([[1, 1, 1, 1, 0, 1, 1, 0],
                      [1, 1, 1, 0, 0, 1, 0, 0]], dtype=bool)      # (B, S) S = 2 + 3 + 3
    S = valid.shape[1]
    layouts = {"image|caption|retrieval": sequence_blocks(valid, 2, 3),
               "one block": (segment_attention.Block(queries=slice(0, S), keys=slice(0, S),
                                                     mask=None),)}
    cases = []
    for label, blocks in layouts.items():
        for density in (1.0, 0.4):
            params = attention.init(rng, D, H, density, dtype=np.float64)
            for name in attention.PROJECTIONS:
                params[name]["b"] = 0.1 * rng.standard_normal(D)
            x = rng.standard_normal((B, S, D))                   # (B, S, D)
            cases.append(segment_attention_case(
                f"segment_attention({label}, density={density})", x, params, H, blocks))
    return cases


# ----------------------------------------------------------------------------------------
# ffn


def naive_ffn(x, params):
    """The FFN by its definition, one token and one output unit at a time: x (..., D)."""
    w1, b1 = params["fc1"]["W"].toarray(), params["fc1"]["b"]
    w2, b2 = params["fc2"]["W"].toarray(), params["fc2"]["b"]
    flat = x.reshape(-1, x.shape[-1])                            # (N, D)
    out = np.zeros((flat.shape[0], w2.shape[0]))                 # (N, D)
    for n in range(flat.shape[0]):
        h = []
        for f in range(w1.shape[0]):
            a = sum(w1[f, i] * flat[n, i] for i in range(w1.shape[1])) + b1[f]
            h.append(gelu_scalar(a))
        for o in range(w2.shape[0]):
            out[n, o] = sum(w2[o, f] * h[f] for f in range(len(h))) + b2[o]
    return out.reshape(*x.shape[:-1], w2.shape[0])               # (..., D)


def ffn_cases(rng):
    """Dense and sparse weights."""
    cases = []
    for density in (1.0, 0.5):
        params = ffn.init(rng, 5, 7, density, dtype=np.float64)
        params["fc1"]["b"] = rng.standard_normal(7)
        params["fc2"]["b"] = rng.standard_normal(5)
        cases.append(GradcheckCase(
            f"ffn(density={density})",
            {"x": rng.standard_normal((2, 3, 5)), "params": params},
            lambda a: ffn.forward(a["x"], a["params"]),
            _named(("x", "params"), ffn.backward)))
    return cases


# Reading order: (library module, its cases).  minivlmoe.testing.GROUPS extends this list.
GROUPS = [
    ("ops.sparse_linear", sparse_linear_cases),
    ("ops.lowrank_linear", lowrank_linear_cases),
    ("ops.linear", linear_cases),
    ("ops.gelu", gelu_cases),
    ("ops.layernorm", layernorm_cases),
    ("ops.softmax", softmax_cases),
    ("ops.cross_entropy", cross_entropy_cases),
    ("ops.l2norm", l2norm_cases),
    ("ops.contrastive", contrastive_cases),
    ("ops.patch_embed", patch_embed_cases),
    ("ops.token_embed", token_embed_cases),
    ("ops.attention", attention_cases),
    ("ops.segment_attention", segment_attention_cases),
    ("ops.ffn", ffn_cases),
]
