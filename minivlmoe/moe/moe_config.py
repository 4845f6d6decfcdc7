"""The MoE layer's configuration: :class:`MoEConfig` and the gate convention.

One frozen dataclass holds everything a pool of experts needs beyond its weights: the
number of experts E, the experts per token K, the gate convention (raw probabilities
for K = 1, as Switch and V-MoE; renormalized over the K chosen for K >= 2, as GShard
and Mixtral: :func:`resolve_renormalize`), capacity, Batch Priority Routing, router
noise, the auxiliary-loss weights and the pool mode (``"shared"``: LIMoE's one pool;
``"modality"``: VL-MoE's image and text pools, :data:`MODALITIES`).  The layer itself is
:mod:`minivlmoe.moe.moe_layer`; docs/moe/routing.md explains the conventions.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Mapping

from . import aux_losses, router
from .._checks import check_bool, check_choice, check_float, check_int

MODALITIES = ("image", "text")  # modality id 0 and 1
DEFAULT_AUX_WEIGHTS = {"load_balance": 0.01, "importance": 0.0, "z_loss": 0.001,
                       "entropy_local": 0.0, "entropy_global": 0.0}


def _default_aux_weights():
    return dict(DEFAULT_AUX_WEIGHTS)


def resolve_renormalize(renormalize, k, task_blind_top1=False):
    """The gate convention as a bool: ``renormalize`` ("auto", True or False) for top-``k``.

    "auto" is False (raw probabilities, Switch and V-MoE) for k = 1 and True
    (renormalized, GShard and Mixtral) for k >= 2.  k = 1 with True is refused unless
    ``task_blind_top1``: the renormalized top-1 gate is p/p = 1 for every token, so the
    task loss sends exactly zero gradient to the router (docs/moe/routing.md).
    """
    check_bool("task_blind_top1", task_blind_top1)
    if isinstance(renormalize, str):
        if renormalize != "auto":
            raise ValueError(f"renormalize must be 'auto', True or False, got {renormalize!r}")
        renormalize = k >= 2
    renormalize = check_bool("renormalize", renormalize)
    blind = k == 1 and renormalize
    if blind and not task_blind_top1:
        raise ValueError("renormalize=True with k=1 (top_k=1) makes every gate p/p = 1, so "
                         "the router would get no gradient from the task loss; use "
                         "renormalize='auto' or False (raw top-1 gates, Switch/V-MoE), or set "
                         "task_blind_top1=True to keep this task-blind routing on purpose")
    if task_blind_top1 and not blind:
        raise ValueError(f"task_blind_top1=True applies only to k=1 with renormalize=True, "
                         f"got k={k} and renormalize={renormalize}")
    return renormalize


@dataclass(frozen=True)
class MoEConfig:
    """Hyperparameters of one MoE layer (validated on construction).

    Fields
    ------
    num_experts : int >= 1, E experts per pool.
    k : int in [1, E], experts per token (top-k).
    capacity_factor : float > 0, or None for dropless routing; X = ceil(cf K N / E).
    renormalize : "auto" (the default), True or False; stored resolved to a bool.  True:
        gates renormalized over the K chosen experts (GShard, Mixtral); False: raw
        softmax probabilities (Switch, V-MoE).  "auto" follows the literature: raw for
        k = 1, renormalized for k >= 2 (:func:`resolve_renormalize`).  k = 1 with
        renormalize=True is refused (the gate p/p = 1 gives the router no task
        gradient) unless ``task_blind_top1``.
    task_blind_top1 : bool, opt in to k = 1 with renormalize=True: every gate is 1, the
        router learns from the auxiliary losses only -- hash-like, task-blind routing,
        kept for comparison (and for runs trained before "auto" was the default).
    bpr : bool, Batch Priority Routing (V-MoE): tokens with a larger top-1 probability
        claim slots first; otherwise token order.
    noise_std : float >= 0, std of Gaussian noise added to the logits when
        ``train=True`` (V-MoE uses 1/E); never applied at evaluation.
    mode : "shared" (one pool, LIMoE) or "modality" (image and text pools, VL-MoE).
    min_experts : int >= 1, the global entropy threshold is tau = log(min(min_experts, E))
        (log E is the largest entropy E experts can have).
    aux_weights : mapping from names in ``aux_losses.AUX_LOSSES`` to weights >= 0;
        names left out get weight 0.  Stored as a read-only mapping over all names.
    """

    num_experts: int
    k: int = 2
    capacity_factor: float | None = 1.25
    renormalize: bool | str = "auto"
    task_blind_top1: bool = False
    bpr: bool = False
    noise_std: float = 0.0
    mode: str = "shared"
    min_experts: int = 2
    aux_weights: Mapping[str, float] = field(default_factory=_default_aux_weights)

    def __post_init__(self):
        check_int("num_experts", self.num_experts, 1)
        router.check_k(self.k, self.num_experts)
        if self.capacity_factor is not None:
            check_float("capacity_factor", self.capacity_factor, 0.0, low_open=True)
        check_bool("bpr", self.bpr)
        object.__setattr__(self, "renormalize", resolve_renormalize(
            self.renormalize, self.k, self.task_blind_top1))
        object.__setattr__(self, "task_blind_top1", bool(self.task_blind_top1))
        check_float("noise_std", self.noise_std, 0.0)
        check_choice("mode", self.mode, {"shared", "modality"})
        check_int("min_experts", self.min_experts, 1)
        if not isinstance(self.aux_weights, Mapping):
            raise TypeError(f"aux_weights must be a mapping name -> float, "
                            f"got {type(self.aux_weights).__name__}")
        unknown = sorted(set(self.aux_weights) - set(aux_losses.AUX_LOSSES))
        if unknown:
            raise ValueError(f"aux_weights must have keys in {aux_losses.AUX_LOSSES}, "
                             f"got unknown {unknown}")
        weights = {name: check_float(f"aux_weights[{name!r}]",
                                     self.aux_weights.get(name, 0.0), 0.0)
                   for name in aux_losses.AUX_LOSSES}
        object.__setattr__(self, "aux_weights", types.MappingProxyType(weights))

    @property
    def tau(self):
        """The global entropy threshold log(min(min_experts, E))."""
        return aux_losses.global_threshold(min(self.min_experts, self.num_experts),
                                           self.num_experts)
