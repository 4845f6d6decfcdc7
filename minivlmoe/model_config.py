"""The model's configuration: :class:`ModelConfig`, every hyperparameter, validated.

The expert modes (:data:`EXPERT_MODES`), where the experts go in modality mode
(:data:`MOE_MODALITIES`), the widths that keep the active compute equal across modes,
the MoE positions (:meth:`ModelConfig.layer_kinds`), the MoE layer's own configuration
(:meth:`ModelConfig.moe_config`), the auxiliary-loss weights and the gate convention.
The model that it configures is :mod:`minivlmoe.model` (its docstring explains the
modes); a run stores :meth:`ModelConfig.to_dict` in config.json and every checkpoint.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .moe import aux_losses, moe_config
from ._checks import check_bool, check_choice, check_float, check_int

EXPERT_MODES = ("modality", "shared", "dense")
MOE_MODALITIES = ("both", "image", "text")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Every hyperparameter of the model (validated on construction).

    Fields
    ------
    image_size, patch, channels : images are (R, R, Ch) = (image_size, image_size,
        channels), cut into (image_size / patch)^2 patches.
    vocab_size : V >= 4, including the 4 special tokens.   max_text_len : Tmax, longest caption
        in tokens (bos ... eos), the size of the position table.
    width, heads, layers : D, H, number of blocks.
    mlp_hidden : hidden width of the dense FFNs at non-MoE positions.
    expert_hidden : hidden width F of one expert (None: ``mlp_hidden``); dense FFNs at
        MoE positions get ``expert_hidden * top_k`` so that active compute matches.
    experts : "modality" | "shared" | "dense" (module docstring).
    moe_modalities : "both" | "image" | "text", which modality has experts in
        "modality" mode (the other one: a dense FFN of width ``expert_hidden * top_k``).
    num_experts, top_k : E experts per pool, K experts per token.
    capacity_factor : float > 0, or None for dropless routing.
    moe_every : MoE at layers ``i % moe_every == moe_every - 1``.
    fusion_layers : in "modality" mode the top ``fusion_layers`` layers are dense.
    density : stored fraction of every sparse weight row.
    embed_dim : De, width of the retrieval embeddings.
    load_balance, z_loss, importance, entropy_local, entropy_global : weights of the
        auxiliary MoE losses (minivlmoe/moe/aux_losses.py).
    min_experts : LIMoE's global-entropy threshold log(min(min_experts, E)).
    router_noise : std of the router noise in training (0 = none).
    bpr : Batch Priority Routing.
    renormalize : "auto" (default), True or False: renormalize the top-k gates.  "auto"
        is raw probabilities for top_k = 1 (Switch, V-MoE) and renormalized for
        top_k >= 2 (GShard, Mixtral); stored as given, resolved by
        :func:`minivlmoe.moe.moe_config.resolve_renormalize`.  top_k = 1 with True is
        refused: every gate would be p/p = 1 and the router get no task gradient.
    task_blind_top1 : opt in to top_k = 1 with renormalize=True anyway (hash-like routing
        trained by the auxiliary losses alone, kept for comparison).  :meth:`from_dict`
        sets it for a run saved before the flag existed with top_k 1 and renormalize
        true, so such a run loads as it was trained.
    caption_weight, contrastive_weight : weights of the two objectives (>= 0, not both 0).
    dtype : "float32" or "float64".
    lowrank : {dotted param path of a linear layer (e.g. "blocks.0.attn.q"): rank r >= 1}:
        the layers stored as two factors ``B A`` of rank r (minivlmoe/ops/lowrank_linear.py;
        made by minivlmoe/compress/lowrank.py).  Empty (the default): none; kept out of
        :meth:`to_dict` when empty, so config.json of an unfactored run is unchanged.
    """

    image_size: int = 32
    patch: int = 8
    channels: int = 3
    vocab_size: int
    max_text_len: int
    width: int = 64
    heads: int = 4
    layers: int = 4
    mlp_hidden: int = 128
    expert_hidden: int | None = None
    experts: str = "modality"
    moe_modalities: str = "both"
    num_experts: int = 4
    top_k: int = 1
    capacity_factor: float | None = 1.25
    moe_every: int = 2
    fusion_layers: int = 1
    density: float = 1.0
    embed_dim: int = 64
    load_balance: float = 0.01
    z_loss: float = 0.001
    importance: float = 0.0
    entropy_local: float = 0.0
    entropy_global: float = 0.0
    min_experts: int = 2
    router_noise: float = 0.0
    bpr: bool = False
    renormalize: bool | str = "auto"
    task_blind_top1: bool = False
    caption_weight: float = 1.0
    contrastive_weight: float = 1.0
    dtype: str = "float32"
    lowrank: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name, low in (("image_size", 1), ("patch", 1), ("channels", 1), ("vocab_size", 4),
                          ("max_text_len", 2), ("width", 1), ("heads", 1), ("layers", 1),
                          ("mlp_hidden", 1), ("num_experts", 1), ("moe_every", 1),
                          ("fusion_layers", 0), ("embed_dim", 1), ("min_experts", 1)):
            check_int(name, getattr(self, name), low)
        if self.image_size % self.patch:
            raise ValueError(f"patch must divide image_size={self.image_size}, got {self.patch}")
        if self.width % self.heads:
            raise ValueError(f"heads must divide width={self.width}, got {self.heads}")
        if self.expert_hidden is None:
            object.__setattr__(self, "expert_hidden", self.mlp_hidden)
        check_int("expert_hidden", self.expert_hidden, 1)
        check_choice("experts", self.experts, set(EXPERT_MODES))
        check_choice("moe_modalities", self.moe_modalities, set(MOE_MODALITIES))
        if self.moe_modalities != "both" and self.experts != "modality":
            raise ValueError(f"moe_modalities must be 'both' unless experts='modality', "
                             f"got {self.moe_modalities!r} with experts={self.experts!r}")
        check_int("top_k", self.top_k, 1, self.num_experts)
        if self.capacity_factor is not None:
            check_float("capacity_factor", self.capacity_factor, 0.0, low_open=True)
        check_int("fusion_layers", self.fusion_layers, 0, self.layers)
        check_float("density", self.density, 0.0, 1.0, low_open=True)
        for name in ("load_balance", "z_loss", "importance", "entropy_local",
                     "entropy_global", "router_noise", "caption_weight", "contrastive_weight"):
            check_float(name, getattr(self, name), 0.0)
        if self.caption_weight == 0 and self.contrastive_weight == 0:
            raise ValueError("caption_weight and contrastive_weight must not both be 0, "
                             "got 0 and 0")
        check_bool("bpr", self.bpr)
        if not isinstance(self.renormalize, str):
            object.__setattr__(self, "renormalize", check_bool("renormalize", self.renormalize))
        object.__setattr__(self, "task_blind_top1",
                           check_bool("task_blind_top1", self.task_blind_top1))
        moe_config.resolve_renormalize(self.renormalize, self.top_k, self.task_blind_top1)
        check_choice("dtype", self.dtype, {"float32", "float64"})
        if not isinstance(self.lowrank, dict):
            raise TypeError(f"lowrank must be a dict {{param path: rank}}, got "
                            f"{type(self.lowrank).__name__}")
        for path, rank in self.lowrank.items():
            if not isinstance(path, str) or not path:
                raise TypeError(f"lowrank keys must be dotted param paths (str), got {path!r}")
            check_int(f"lowrank[{path!r}]", rank, 1)
        object.__setattr__(self, "lowrank", dict(sorted(self.lowrank.items())))

    def __hash__(self):
        """Hashable like a frozen dataclass of hashable fields (``lowrank`` as its sorted
        items)."""
        return hash(tuple(tuple(v.items()) if isinstance(v, dict) else v
                          for v in (getattr(self, f.name) for f in dataclasses.fields(self))))

    # derived sizes
    @property
    def num_patches(self):
        """P = (image_size / patch)^2."""
        return (self.image_size // self.patch) ** 2

    @property
    def np_dtype(self):
        return np.dtype(self.dtype)

    def layer_kinds(self):
        """Per layer ``("moe" | "split" | "ffn", hidden width)`` (module docstring, active
        compute); "split" (``moe_modalities`` "image" or "text"): experts of that hidden
        width for one modality, a dense FFN of ``hidden * top_k`` for the other."""
        kinds = []
        for i in range(self.layers):
            moe_position = i % self.moe_every == self.moe_every - 1
            fusion = self.experts == "modality" and i >= self.layers - self.fusion_layers
            if not moe_position:
                kinds.append(("ffn", self.mlp_hidden))
            elif self.experts == "dense" or fusion:
                kinds.append(("ffn", self.expert_hidden * self.top_k))
            else:
                kinds.append(("moe" if self.moe_modalities == "both" else "split",
                              self.expert_hidden))
        return kinds

    def moe_config(self):
        """The :class:`minivlmoe.moe.moe_config.MoEConfig` shared by every MoE layer."""
        return moe_config.MoEConfig(
            num_experts=self.num_experts, k=self.top_k, capacity_factor=self.capacity_factor,
            renormalize=self.renormalize, task_blind_top1=self.task_blind_top1,
            bpr=bool(self.bpr), noise_std=self.router_noise,
            mode=("modality" if self.experts == "modality" and self.moe_modalities == "both"
                  else "shared"),           # a "split" layer's experts are one pool
            min_experts=self.min_experts,
            aux_weights={name: getattr(self, name) for name in
                         ("load_balance", "z_loss", "importance", "entropy_local",
                          "entropy_global")})

    def to_dict(self):
        """A JSON-able dict of every field but ``task_blind_top1`` (and ``lowrank`` when
        it is empty, so an unfactored run writes the config.json it wrote before the field
        existed; :meth:`from_dict` defaults it).  ``task_blind_top1`` is implied:
        it is True exactly when top_k is 1 and renormalize is True (the only configs
        that may set it), so a run with it writes the same dict a run saved before the
        flag existed did, and both load (and resume) alike."""
        d = dataclasses.asdict(self)
        del d["task_blind_top1"]
        if not d["lowrank"]:
            del d["lowrank"]                        # unfactored: as before the field existed
        return d

    @classmethod
    def from_dict(cls, d):
        """Inverse of :meth:`to_dict`; unknown keys are an error.

        A dict without ``task_blind_top1`` that has top_k 1 and renormalize true (a run
        of the task-blind opt-in, or one saved before renormalize="auto" was the
        default, when every preset was top-1 renormalized) gets
        ``task_blind_top1=True``: it loads as it was trained.
        """
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"d has unknown ModelConfig fields {unknown}; known: {sorted(known)}")
        if ("task_blind_top1" not in d and d.get("renormalize") is True
                and d.get("top_k", 1) == 1):
            d = {**d, "task_blind_top1": True}      # implied (to_dict leaves it out)
        return cls(**d)


def check_config(cfg):
    """``cfg`` must be a ModelConfig."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    return cfg
