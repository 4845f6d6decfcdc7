"""Gradient-check cases and fixtures of the MoE layer (minivlmoe/moe/), reading order.

Routing is discontinuous at ties (top-k choice, capacity priorities), so the fixtures
build inputs *by construction* far from every tie: :func:`separated_logits` spaces each
token's logits, :func:`orthonormal_router` and :func:`inputs_for_logits` make a router hit
them exactly, and :func:`separated_inputs` does it for every pool of a whole layer.
"""

from __future__ import annotations

import math

import numpy as np

from ..gradcheck import GradcheckCase
from ..moe import aux_losses, dispatch, experts, moe_config, moe_layer, router
from ..ops import softmax
from ..tree import csr_on_pattern
from .ops import naive_ffn


# ----------------------------------------------------------------------------------------
# router: inputs with well-separated routing decisions


def separated_logits(rng, n, num_experts, spacing=0.5, dtype=np.float64):
    """Logits (N, E) whose routing is far from every discontinuity.

    In each row, consecutive sorted logits differ by at least ``spacing`` (so no top-k
    choice flips under a perturbation much smaller than ``spacing``), and the gap
    between a row's best and second-best logit is ``spacing * (1 + r/N)`` for a
    random rank ``r`` distinct per token, so the top-1 probabilities (the Batch
    Priority Routing priorities) of different tokens differ too.  Each row is shifted
    by a random offset and its order of experts is a random permutation.
    """
    rank = rng.permutation(n)                                    # (N,) distinct
    first_gap = spacing * (1.0 + rank / max(n, 1))               # (N,)
    steps = np.arange(num_experts - 1) * spacing                 # (E-1,)
    levels = np.concatenate([np.zeros((n, 1)),
                             -(first_gap[:, None] + steps[None, :])], axis=1)  # (N, E)
    levels += rng.uniform(-1.0, 1.0, size=(n, 1))                # (N, E) random row shift
    perm = np.argsort(rng.random((n, num_experts)), axis=1)      # (N, E) random permutation
    logits = np.empty((n, num_experts))                          # (N, E)
    np.put_along_axis(logits, perm, levels, axis=1)
    return logits.astype(dtype)


def orthonormal_router(rng, d, num_experts, dtype=np.float64):
    """Dense-pattern router params whose W (E, D) has orthonormal rows (needs D >= E),
    and a random bias; with them :func:`inputs_for_logits` hits any target logits."""
    if d < num_experts:
        raise ValueError(f"d must be >= num_experts={num_experts}, got {d}")
    q, _ = np.linalg.qr(rng.standard_normal((d, num_experts)))  # (D, E) orthonormal columns
    w = q.T                                                      # (E, D) orthonormal rows
    cols = np.tile(np.arange(d), num_experts)                    # (E*D,) every column
    W = csr_on_pattern(w.reshape(-1).astype(dtype), cols.astype(np.int32),
                       np.arange(0, num_experts * d + 1, d, dtype=np.int32), (num_experts, d))
    return {"W": W, "b": (0.3 * rng.standard_normal(num_experts)).astype(dtype)}


def inputs_for_logits(rng, logits, params):
    """Tokens ``x`` (N, D) with ``x W^T + b = logits`` exactly (up to round-off), for a
    router from :func:`orthonormal_router`; the part of ``x`` orthogonal to W's rows
    is random, so ``x`` still looks like generic activations."""
    w = params["W"].toarray()                                    # (E, D)
    n, d = logits.shape[0], w.shape[1]
    free = rng.standard_normal((n, d))                           # (N, D)
    free -= (free @ w.T) @ w                                     # (N, D) orthogonal to rows
    x = (logits - params["b"]) @ w + free                        # (N, D)
    return x.astype(params["b"].dtype)


def router_case(name, x, params, k, renormalize):
    """The checked output is ``[gates, probs, logits]`` (N, K + 2E), so one case
    exercises all three upstream paths of :func:`minivlmoe.moe.router.backward`."""
    e = params["W"].shape[0]

    def fwd(a):
        r, cache = router.forward(a["x"], a["params"], k, renormalize)
        return np.concatenate([r.gates, r.probs, r.logits], axis=1), cache  # (N, K+2E)

    def bwd(dout, cache):
        dg, dp, dl = dout[:, :k], dout[:, k:k + e], dout[:, k + e:]
        return dict(zip(("x", "params"), router.backward(dg, cache, dp, dl)))

    return GradcheckCase(name, {"x": x, "params": params}, fwd, bwd)


def router_cases(rng):
    """One case per (k, gate convention)."""
    cases = []
    n, d, e = 6, 5, 4
    for k, renorm in ((1, False), (2, True), (3, True), (2, False)):
        params = orthonormal_router(rng, d, e)
        x = inputs_for_logits(rng, separated_logits(rng, n, e), params)
        name = "renormalized" if renorm else "raw"
        cases.append(router_case(f"router(k={k}, {name})", x, params, k, renorm))
    return cases


# ----------------------------------------------------------------------------------------
# dispatch


def dispatch_cases(rng):
    """Dispatch and combine on a plan with drops (the plan is fixed)."""
    n, k, e, d = 7, 2, 3, 4
    chosen = np.argsort(rng.random((n, e)), axis=1)[:, :k]       # (N, K) distinct per row
    plan = dispatch.make_plan(chosen, e, dispatch.capacity(n, e, k, 0.8), np.arange(n))
    m = plan.num_slots
    return [
        GradcheckCase("dispatch(x -> Disp^T x)", {"x": rng.standard_normal((n, d))},
                      lambda a: dispatch.dispatch_forward(a["x"], plan),
                      lambda dout, cache: {"x": dispatch.dispatch_backward(dout, cache)}),
        GradcheckCase("combine(Comb Ys)",
                      {"ys": rng.standard_normal((m, d)), "gates": rng.random((n, k))},
                      lambda a: dispatch.combine_forward(a["ys"], a["gates"], plan),
                      lambda dout, cache: dict(zip(("ys", "gates"),
                                                   dispatch.combine_backward(dout, cache)))),
    ]


# ----------------------------------------------------------------------------------------
# experts


def experts_cases(rng):
    """A pool of 3 experts, one of them idle (its gradient must be zero)."""
    params = experts.init(rng, 4, 5, 3, dtype=np.float64)
    for p in params.values():
        p["fc1"]["b"] = rng.standard_normal(5)
        p["fc2"]["b"] = rng.standard_normal(4)
    offsets = np.array([0, 3, 3, 7])
    return [GradcheckCase("experts(E=3, one idle)",
                          {"xs": rng.standard_normal((7, 4)), "params": params},
                          lambda a: experts.forward(a["xs"], offsets, a["params"]),
                          lambda dout, cache: dict(zip(("xs", "params"),
                                                       experts.backward(dout, cache))))]


# ----------------------------------------------------------------------------------------
# aux_losses

ASSIGN_SKIP = {"assign": "0/1 top-k indicator: piecewise constant in the router, "
                         "the loss treats it as a constant"}


def top_k_indicator(probs, k):
    """0/1 (N, E) indicator of the k largest entries per row: the one top-k
    (:func:`router.top_k`) through :func:`aux_losses.top_k_indicator`."""
    return aux_losses.top_k_indicator(router.top_k(probs, k), probs.shape[1], probs.dtype)


def load_balance_case(name, probs, assign, k):
    """Load balance of ``probs`` (N, E); the float indicator ``assign`` is skipped."""
    return GradcheckCase(name, {"probs": probs, "assign": assign},
                         lambda a: aux_losses.load_balance_forward(a["probs"], a["assign"], k),
                         lambda dout, cache: {"probs": aux_losses.load_balance_backward(
                             dout, cache)},
                         skip=ASSIGN_SKIP)


def aux_losses_cases(rng):
    """One case per loss (two for the hinge: active and inactive).  ``probs`` are
    softmax outputs of random logits, checked as free inputs."""
    n_tokens, n_experts, k = 5, 4, 2
    probs, _ = softmax.forward(1.5 * rng.standard_normal((n_tokens, n_experts)))   # (N, E)
    favor_0 = 4.0 * np.eye(n_experts)[0]                                          # (E,)
    peaked, _ = softmax.forward(2.0 * rng.standard_normal((n_tokens, n_experts))
                                + favor_0)                                        # (N, E)
    logits = 3.0 * rng.standard_normal((n_tokens, n_experts))                     # (N, E)
    assign = top_k_indicator(probs, k)                                            # (N, E)
    tau_high = aux_losses.global_threshold(n_experts, n_experts)  # log E > H(pbar): active
    tau_low = aux_losses.global_threshold(1, n_experts)           # 0 <= H(pbar): inactive

    def case(op, inputs, fwd, bwd, key):
        return GradcheckCase(op, inputs, fwd, lambda dout, cache: {key: bwd(dout, cache)})

    return [
        load_balance_case(f"aux_losses.load_balance(k={k})", probs, assign, k),
        case("aux_losses.importance", {"probs": probs},
             lambda a: aux_losses.importance_forward(a["probs"]),
             aux_losses.importance_backward, "probs"),
        case("aux_losses.z_loss", {"logits": logits},
             lambda a: aux_losses.z_loss_forward(a["logits"]),
             aux_losses.z_loss_backward, "logits"),
        case("aux_losses.entropy_local", {"probs": probs},
             lambda a: aux_losses.entropy_local_forward(a["probs"]),
             aux_losses.entropy_local_backward, "probs"),
        case("aux_losses.entropy_global(active)", {"probs": peaked},
             lambda a: aux_losses.entropy_global_forward(a["probs"], tau_high),
             aux_losses.entropy_global_backward, "probs"),
        case("aux_losses.entropy_global(inactive)", {"probs": probs},
             lambda a: aux_losses.entropy_global_forward(a["probs"], tau_low),
             aux_losses.entropy_global_backward, "probs"),
    ]


# ----------------------------------------------------------------------------------------
# moe_layer


def separated_inputs(rng, config, n, d, hidden, modality=None, *, noise_seed=None,
                     spacing=0.5, density=1.0, dtype=np.float64):
    """Tokens and params whose routing is far from every discontinuity.

    Every router gets orthonormal rows (needs D >= E) and ``x`` is solved so that the
    logits each pool routes with are :func:`separated_logits`: consecutive logits
    of a token differ by >= ``spacing`` and the top-1 probabilities (BPR priorities)
    of different tokens differ too.  With ``noise_seed``, the noise that
    ``forward(..., rng=np.random.default_rng(noise_seed), train=True)`` will draw is
    subtracted first, so the *noisy* logits are the separated ones.  Expert biases
    are random (not zero), so their gradients are exercised.

    Returns
    -------
    x : (N, D), params (as :func:`minivlmoe.moe.moe_layer.init`).
    """
    e = config.num_experts
    params = moe_layer.init(rng, d, hidden, config, density, dtype)
    pools = ([(params, np.arange(n))] if config.mode == "shared" else
             [(params[name], np.flatnonzero(modality == m))
              for m, name in enumerate(moe_config.MODALITIES)])
    noise_rng = None if noise_seed is None else np.random.default_rng(noise_seed)
    x = np.empty((n, d), dtype=dtype)                            # (N, D)
    for pool, idx in pools:
        for ffn_params in pool["experts"].values():
            for layer in ffn_params.values():
                layer["b"] = (0.5 * rng.standard_normal(layer["b"].shape)).astype(dtype)
        pool["router"] = orthonormal_router(rng, d, e, dtype)
        logits = separated_logits(rng, len(idx), e, spacing, dtype)  # (N_p, E)
        if noise_rng is not None and len(idx) and config.noise_std > 0:
            logits = logits - router.sample_noise(noise_rng, (len(idx), e),
                                                  config.noise_std, dtype)  # (N_p, E)
        x[idx] = inputs_for_logits(rng, logits, pool["router"])  # (N_p, D)
    return x, params


def moe_layer_case(name, x, params, config, modality=None, noise_seed=None):
    """The checked output is ``[y.ravel(), aux_total]`` (N*D + 1,), so the task path and
    every auxiliary-loss path are checked; with ``noise_seed`` the forward trains
    (router noise drawn from ``np.random.default_rng(noise_seed)``)."""

    def fwd(a):
        rng = None if noise_seed is None else np.random.default_rng(noise_seed)
        y, aux, cache = moe_layer.forward(a["x"], a["params"], config, modality, rng=rng,
                                          train=noise_seed is not None)
        return np.concatenate([y.ravel(), [aux.aux_total]]), cache  # (N*D + 1,)

    def bwd(dout, cache):
        dy = dout[:-1].reshape(cache.shape)                      # (N, D)
        return dict(zip(("x", "params"), moe_layer.backward(dy, cache, dout[-1])))

    return GradcheckCase(name, {"x": x, "params": params}, fwd, bwd)


def naive_pool(x, pool, config):
    """``y[n] = sum_e G[n, e] FFN_e(x[n])`` for one pool, with G from a token-by-token
    router and capacity loop; returns ``(y (N, D), kept (N, K))``."""
    n, e, k = x.shape[0], config.num_experts, config.k
    w, b = pool["router"]["W"].toarray(), pool["router"]["b"]
    top, gates, prio = [], [], []
    for t in range(n):
        logits = w @ x[t] + b
        p = np.exp(logits - logits.max())
        p /= p.sum()
        chosen = sorted(range(e), key=lambda i: (-logits[i], i))[:k]
        total = sum(p[i] for i in chosen) if config.renormalize else 1.0
        top.append(chosen)
        gates.append([p[i] / total for i in chosen])
        prio.append(p[chosen[0]])
    cap = n if config.capacity_factor is None else math.ceil(
        round(config.capacity_factor * k * n / e, 9))
    order = sorted(range(n), key=lambda t: (-prio[t], t)) if config.bpr else range(n)
    queue = [0] * e
    kept = np.zeros((n, k), dtype=bool)                          # (N, K)
    for j in range(k):
        for t in order:
            kept[t, j] = queue[top[t][j]] < cap
            queue[top[t][j]] += 1
    y = np.zeros_like(x)                                         # (N, D)
    for t in range(n):
        for j in range(k):
            if kept[t, j]:
                y[t] += gates[t][j] * naive_ffn(x[t], pool["experts"][f"e{top[t][j]}"])
    return y, kept


def moe_layer_cases(rng):
    """Cases of the whole layer, every auxiliary loss on, router noise on."""
    all_aux = {name: 0.1 for name in aux_losses.AUX_LOSSES}
    settings = [
        ("k=1 raw dropping", dict(num_experts=3, k=1, capacity_factor=0.7, renormalize=False)),
        ("k=2 renorm dropping bpr", dict(num_experts=3, k=2, capacity_factor=0.6, bpr=True)),
        ("k=3 renorm dropless noise", dict(num_experts=4, k=3, capacity_factor=None,
                                           noise_std=0.25)),
        ("k=2 modality pools", dict(num_experts=3, k=2, capacity_factor=0.8, mode="modality")),
    ]
    cases = []
    n, d, hidden = 8, 4, 3
    for label, kwargs in settings:
        config = moe_config.MoEConfig(aux_weights=all_aux, min_experts=3, **kwargs)
        modality = np.array([0, 1, 1, 0, 1, 0, 0, 1])            # (N,)
        x, params = separated_inputs(rng, config, n, d, hidden, modality, noise_seed=5)
        cases.append(moe_layer_case(f"moe({label})", x, params, config, modality,
                                    noise_seed=5))
    return cases


# Reading order: (library module, its cases).  minivlmoe.testing.GROUPS extends this list.
GROUPS = [
    ("moe.router", router_cases),
    ("moe.dispatch", dispatch_cases),
    ("moe.experts", experts_cases),
    ("moe.aux_losses", aux_losses_cases),
    ("moe.moe_layer", moe_layer_cases),
]
