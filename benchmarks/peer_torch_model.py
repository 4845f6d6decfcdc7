"""minivlmoe's default model, written again in PyTorch eager (benchmarks only).

This is the *peer* that benchmarks/peer_torch.py times against minivlmoe and checks in
float64.  It is written the way a PyTorch user would write it (``nn.Linear`` and
``nn.LayerNorm`` modules, ``F.scaled_dot_product_attention`` with the boolean block mask,
autograd for the backward, ``torch.optim.AdamW``), and it is loaded from minivlmoe's own
parameters (:func:`load_params`: every ``csr_array`` weight becomes ``W.toarray()``).
Torch is never a dependency of minivlmoe; only these two benchmark scripts import it.

What is mirrored (the minivlmoe module each part follows)
---------------------------------------------------------
* sequence (minivlmoe/sequence.py): one sequence per pair, ``[cls + P patches | caption
  input ids[:, :-1] | retrieval text ids]``; the block mask (image rows see the image,
  caption rows the image and the caption up to themselves, retrieval rows the valid
  retrieval text; no query sees a padding key; a caption input whose *target* is padding
  counts as padding); the FFN/MoE sublayers run on the U non-pad rows only, pad rows
  keep the residual.
* embeddings (ops/patch_embed.py, ops/token_embed.py): patches cut
  ``'b (h p1) (w p2) c -> b (h w) (p1 p2 c)'``, projected, ``cls`` in front, positions
  added; tokens ``tok[ids] + pos[:T]``, the table shared by both text segments.
* tower (minivlmoe/tower.py): pre-norm blocks ``x += attn(LN1(x))``, ``x[rows] +=
  F(LN2(x)[rows])``, ``h = LN_f(x)``, layer norm eps 1e-5, GELU in its tanh form, the
  block kinds of ``ModelConfig.layer_kinds()`` (dense FFN widths and the MoE positions).
* attention (ops/attention.py): four D x D projections (``fused=True`` does the q, k, v
  products as one product of the concatenated weights, the same arithmetic), H heads,
  scale 1/sqrt(Dh), softmax over the allowed keys.
* MoE layer (moe/moe_layer.py, router.py, dispatch.py, aux_losses.py), modality mode:
  an image pool and a text pool, each a router ``nn.Linear(D, E)`` and E FFN experts;
  ``p = softmax(logits)``, top-1 by ``argmax`` (ties: the lowest expert), raw gate
  ``g = p[top]``; capacity ``X = ceil(capacity_factor * K * N_pool / E)`` (rounded to 9
  decimals first, as dispatch.capacity); queue positions in token order (or by
  decreasing top-1 probability with BPR), an assignment at position >= X is dropped
  (contributes 0); ``y[n] = g[n] FFN_top[n](x[n])`` for kept tokens.  Auxiliary losses
  per pool, summed over the pools: load balance ``E sum_e f_e P_e`` (f counts before
  capacity, a constant), z-loss ``mean lse^2``, and (``all_aux``) importance
  ``var/mean^2`` and LIMoE's entropies; ``aux = sum of weight * loss`` over the losses
  with a weight > 0.
* heads and losses (minivlmoe/model.py, ops/contrastive.py, ops/cross_entropy.py,
  ops/l2norm.py): the final cls and the retrieval text's last valid token, projected and
  L2-normalized (``max(norm, 1e-12)``); the symmetric InfoNCE with
  ``exp(log_logit_scale)`` and duplicate captions as extra positives (targets uniform
  over them); the caption cross-entropy of ``lm_head(h[:, caption rows])`` against
  ``ids[:, 1:]`` ignoring ``pad_id``; ``total = contrastive_weight * contrastive +
  caption_weight * caption + aux``.
* optimizer (minivlmoe/optim.py): global-norm clipping (one factor ``min(1, max_norm /
  norm)``, the per-leaf norms combined in float64), ``torch.optim.AdamW`` (``fused=True``
  by default, torch's fastest CPU form) with weight decay on the weight matrices and the
  token table only (minivlmoe.optim.decays), and the warmup + cosine schedule of
  ``minivlmoe.optim.lr_at`` through ``LambdaLR``.

Supported configurations: the default preset's, ``experts`` "modality" or "dense", top-1,
no router noise, both objectives on (:func:`check_supported` says what it refuses).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minivlmoe import optim

LN_EPS = 1e-5            # minivlmoe/tower.py
L2_EPS = 1e-12           # minivlmoe/ops/l2norm.py
SEG_IMAGE, SEG_CAPTION, SEG_RETRIEVAL = 0, 1, 2
POOLS = ("image", "text")  # modality 0 and 1 (minivlmoe/moe/moe_config.MODALITIES)
AUX_LOSSES = ("load_balance", "importance", "z_loss", "entropy_local", "entropy_global")


def check_supported(mcfg):
    """Refuse, with the field's name, a ModelConfig this peer does not mirror."""
    wanted = {"experts": ("modality", "dense"), "top_k": (1,), "router_noise": (0.0,),
              "moe_modalities": ("both",), "lowrank": ({},)}
    for name, allowed in wanted.items():
        if getattr(mcfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)} for the torch peer, "
                             f"got {getattr(mcfg, name)!r}")
    if mcfg.caption_weight <= 0 or mcfg.contrastive_weight <= 0:
        raise ValueError(f"caption_weight and contrastive_weight must both be > 0 for the "
                         f"torch peer, got {mcfg.caption_weight} and {mcfg.contrastive_weight}")
    if mcfg.renormalize is True:
        raise ValueError("renormalize must be 'auto' or False (raw top-1 gates) for the "
                         "torch peer, got True")
    return mcfg


def capacity(n, num_experts, k, capacity_factor):
    """Slots per expert, as minivlmoe.moe.dispatch.capacity (None: dropless)."""
    if capacity_factor is None:
        return n
    return int(math.ceil(round(capacity_factor * k * n / num_experts, 9)))


# ----------------------------------------------------------------------------- modules

class FFN(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``: ops/ffn.py (each expert is one)."""

    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):                                     # (n, D) -> (n, D)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head self-attention with a boolean mask: ops/attention.py."""

    def __init__(self, d, heads, fused=True):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask):                               # (B, S, D), (B, 1, S, S)
        B, S, D = x.shape
        H = self.heads
        if self.fused:                                        # one product, three views
            w = torch.cat([self.q.weight, self.k.weight, self.v.weight])  # (3D, D)
            b = torch.cat([self.q.bias, self.k.bias, self.v.bias])        # (3D,)
            q, k, v = F.linear(x, w, b).split(D, dim=-1)     # (B, S, D) each
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)        # (B, S, D) each
        q, k, v = (a.view(B, S, H, D // H).transpose(1, 2) for a in (q, k, v))  # (B, H, S, Dh)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, Dh)
        return self.o(ctx.transpose(1, 2).reshape(B, S, D))  # (B, S, D)


class Pool(nn.Module):
    """One pool of E experts and its router: moe/router.py, dispatch.py, experts.py."""

    def __init__(self, d, hidden, num_experts):
        super().__init__()
        self.router = nn.Linear(d, num_experts)
        self.experts = nn.ModuleDict({f"e{i}": FFN(d, hidden) for i in range(num_experts)})

    def forward(self, x, moe_cfg, all_aux):
        """``(y (n, D), losses {name: 0-d tensor}, routed (E,), load (E,))``."""
        n, d = x.shape
        E = moe_cfg.num_experts
        logits = self.router(x)                               # (n, E)
        probs = logits.softmax(dim=-1)                        # (n, E)
        top = logits.argmax(dim=-1)                           # (n,) first maximum wins
        gate = probs.gather(1, top[:, None])[:, 0]            # (n,) raw top-1 gate
        # capacity: queue positions in priority order, drops at position >= X
        if moe_cfg.bpr:
            order = torch.argsort(-gate.detach(), stable=True)  # (n,) BPR
        else:
            order = torch.arange(n)                           # (n,) token order
        onehot = F.one_hot(top[order], E)                     # (n, E)
        ahead = (onehot.cumsum(0) - onehot).gather(1, top[order][:, None])[:, 0]  # (n,)
        position = torch.empty_like(ahead)
        position[order] = ahead                               # (n,) back to token order
        kept = position < capacity(n, E, moe_cfg.k, moe_cfg.capacity_factor)  # (n,)
        # experts on contiguous blocks: kept tokens sorted by expert (token order inside)
        tok = kept.nonzero()[:, 0]                            # (M,)
        tok = tok[torch.argsort(top[tok], stable=True)]       # (M,) by expert
        routed = torch.bincount(top, minlength=E)             # (E,) before capacity
        load = torch.bincount(top[tok], minlength=E)          # (E,) after
        blocks = x[tok].split(load.tolist())                  # E blocks (M_e, D)
        ys = torch.cat([self.experts[f"e{e}"](xb) for e, xb in enumerate(blocks)
                        if xb.shape[0]])                      # (M, D)
        y = x.new_zeros(n, d).index_add(0, tok, ys * gate[tok, None])  # (n, D) dropped: 0
        # auxiliary losses on the probabilities and logits the router decided with
        losses = {}
        f = routed.to(x.dtype) / (n * moe_cfg.k)              # (E,) a constant
        losses["load_balance"] = E * (f * probs.mean(0)).sum()
        lse = torch.logsumexp(logits, dim=-1)                 # (n,)
        losses["z_loss"] = (lse * lse).mean()
        if all_aux:                                           # the weight-0 ones, for reporting
            tiny = torch.finfo(x.dtype).tiny
            imp = probs.sum(0)                                # (E,)
            losses["importance"] = ((imp - imp.mean()) ** 2).mean() / imp.mean() ** 2
            losses["entropy_local"] = -(probs * probs.clamp_min(tiny).log()).sum(1).mean()
            pbar = probs.mean(0)                              # (E,)
            h_global = -(pbar * pbar.clamp_min(tiny).log()).sum()
            losses["entropy_global"] = F.relu(moe_cfg.tau - h_global)
        return y, losses, routed, load


class MoE(nn.Module):
    """VL-MoE's modality-aware layer: image tokens to the image pool, text tokens to the
    text pool (moe/moe_layer.py, mode "modality")."""

    def __init__(self, d, hidden, moe_cfg):
        super().__init__()
        self.cfg = moe_cfg
        self.image = Pool(d, hidden, moe_cfg.num_experts)
        self.text = Pool(d, hidden, moe_cfg.num_experts)

    def forward(self, x, modality, all_aux=False):
        """``(y (N, D), aux_total, losses, routing)`` for x (N, D), modality (N,) 0/1."""
        y = torch.zeros_like(x)                               # (N, D)
        losses = dict.fromkeys(AUX_LOSSES, x.new_zeros(()))
        routing = {}
        for m, name in enumerate(POOLS):
            idx = (modality == m).nonzero()[:, 0]             # (N_p,) in token order
            if idx.numel() == 0:
                continue
            y_p, losses_p, routed, load = getattr(self, name)(x[idx], self.cfg, all_aux)
            y = y.index_copy(0, idx, y_p)                     # (N, D)
            for key, value in losses_p.items():
                losses[key] = losses[key] + value
            routing[name] = {"routed": routed.tolist(), "load": load.tolist()}
        aux_total = sum(w * losses[key] for key, w in self.cfg.aux_weights.items() if w > 0)
        return y, aux_total, losses, routing


class Block(nn.Module):
    """One pre-norm block (minivlmoe/tower.py)."""

    def __init__(self, mcfg, kind, hidden, fused_qkv):
        super().__init__()
        D = mcfg.width
        self.ln1 = nn.LayerNorm(D, eps=LN_EPS)
        self.attn = Attention(D, mcfg.heads, fused_qkv)
        self.ln2 = nn.LayerNorm(D, eps=LN_EPS)
        if kind == "moe":
            self.moe = MoE(D, hidden, mcfg.moe_config())
        else:
            self.ffn = FFN(D, hidden)
        self.kind = kind

    def forward(self, x, mask, rows, mod_rows, all_aux):
        B, S, D = x.shape
        x = x + self.attn(self.ln1(x), mask)                  # (B, S, D)
        f_in = self.ln2(x).reshape(B * S, D)[rows]            # (U, D) the used rows
        if self.kind == "moe":
            f, aux, losses, routing = self.moe(f_in, mod_rows, all_aux)  # (U, D)
        else:
            f, aux, losses, routing = self.ffn(f_in), 0.0, None, None    # (U, D)
        x = x.reshape(B * S, D).index_add(0, rows, f).reshape(B, S, D)   # pad rows: x
        return x, aux, losses, routing


class PatchEmbed(nn.Module):
    """ops/patch_embed.py: ``proj`` (D, p*p*Ch), ``cls`` (D,), ``pos`` (1+P, D)."""

    def __init__(self, mcfg):
        super().__init__()
        self.patch = mcfg.patch
        P = mcfg.num_patches
        self.proj = nn.Linear(mcfg.patch ** 2 * mcfg.channels, mcfg.width)
        self.cls = nn.Parameter(torch.zeros(mcfg.width))
        self.pos = nn.Parameter(torch.zeros(1 + P, mcfg.width))

    def forward(self, images):                                # (B, R, R, Ch) -> (B, 1+P, D)
        B, R, _, C = images.shape
        p, g = self.patch, R // self.patch
        # 'b (h p1) (w p2) c -> b (h w) (p1 p2 c)'
        patches = (images.reshape(B, g, p, g, p, C).permute(0, 1, 3, 2, 4, 5)
                   .reshape(B, g * g, p * p * C))             # (B, P, p*p*Ch)
        z = self.proj(patches)                                # (B, P, D)
        return torch.cat([self.cls.expand(B, 1, -1), z], dim=1) + self.pos  # (B, 1+P, D)


class TextEmbed(nn.Module):
    """ops/token_embed.py: ``tok`` (V, D), ``pos`` (Tmax, D)."""

    def __init__(self, mcfg):
        super().__init__()
        self.tok = nn.Parameter(torch.zeros(mcfg.vocab_size, mcfg.width))
        self.pos = nn.Parameter(torch.zeros(mcfg.max_text_len, mcfg.width))

    def forward(self, ids):                                   # (B, T) -> (B, T, D)
        return F.embedding(ids, self.tok) + self.pos[:ids.shape[1]]


def block_mask(ids, pad_id, num_image):
    """``(mask (B, S, S), valid (B, S), modality (S,))`` of minivlmoe/sequence.py."""
    B, T = ids.shape
    lengths = (num_image, T - 1, T)                           # image, caption input, retrieval
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))  # (S,)
    pos = torch.cat([torch.arange(n) for n in lengths])       # (S,)
    valid = torch.cat([torch.ones(B, num_image, dtype=torch.bool),
                       ids[:, 1:] != pad_id,                  # input whose target is padding
                       ids != pad_id], dim=1)                 # (B, S)
    sq, sk = seg[:, None], seg[None, :]                       # (S, 1), (1, S)
    causal_ok = (sq != SEG_CAPTION) | (pos[None, :] <= pos[:, None])   # (S, S)
    allowed = ((sq == sk) & causal_ok) | ((sq == SEG_CAPTION) & (sk == SEG_IMAGE))
    return allowed[None] & valid[:, None, :], valid, (seg != SEG_IMAGE).long()


class Model(nn.Module):
    """The VL-MoE model of minivlmoe/model.py (forward only; autograd does the rest)."""

    def __init__(self, mcfg, fused_qkv=True):
        super().__init__()
        check_supported(mcfg)
        self.cfg = mcfg
        D = mcfg.width
        self.patch = PatchEmbed(mcfg)
        self.text = TextEmbed(mcfg)
        self.blocks = nn.ModuleDict({str(i): Block(mcfg, kind, hidden, fused_qkv)
                                     for i, (kind, hidden) in enumerate(mcfg.layer_kinds())})
        self.ln_f = nn.LayerNorm(D, eps=LN_EPS)
        self.img_proj = nn.Linear(D, mcfg.embed_dim)
        self.txt_proj = nn.Linear(D, mcfg.embed_dim)
        self.log_logit_scale = nn.Parameter(torch.zeros(()))
        self.lm_head = nn.Linear(D, mcfg.vocab_size)

    def forward(self, images, ids, positives, pad_id, all_aux=False):
        """Losses of one batch: images (B, R, R, Ch), ids (B, T) int64, positives (B, B)
        bool.  Returns ``(losses {name: 0-d tensor}, routing {block: {pool: counts}})``."""
        cfg = self.cfg
        B, T = ids.shape
        n_img = 1 + cfg.num_patches
        x = torch.cat([self.patch(images), self.text(ids[:, :-1]), self.text(ids)],
                      dim=1)                                  # (B, S, D)
        S, D = x.shape[1], x.shape[2]
        mask, valid, seg_modality = block_mask(ids, pad_id, n_img)
        mask = mask[:, None]                                  # (B, 1, S, S) for the heads
        rows = valid.reshape(-1).nonzero()[:, 0]              # (U,) non-pad tokens
        mod_rows = seg_modality.repeat(B)[rows]               # (U,) 0 image / 1 text
        aux_total = 0.0
        aux = dict.fromkeys(AUX_LOSSES, 0.0)
        routing = {}
        for i, block in self.blocks.items():
            x, aux_i, losses_i, routing_i = block(x, mask, rows, mod_rows, all_aux)
            aux_total = aux_total + aux_i
            if losses_i is not None:
                aux = {k: aux[k] + v for k, v in losses_i.items()}
                routing[f"blocks.{i}"] = routing_i
        h = self.ln_f(x)                                      # (B, S, D)
        # retrieval: final cls and the retrieval text's last valid token
        ret_start = n_img + T - 1
        txt_last = T - 1 - (ids != pad_id).flip(1).int().argmax(dim=1)   # (B,)
        img_emb = F.normalize(self.img_proj(h[:, 0]), dim=-1, eps=L2_EPS)  # (B, De)
        txt_emb = F.normalize(self.txt_proj(h[torch.arange(B), ret_start + txt_last]),
                              dim=-1, eps=L2_EPS)             # (B, De)
        logits = self.log_logit_scale.exp() * (img_emb @ txt_emb.T)  # (B, B)
        pos = positives.to(logits.dtype)                      # (B, B)
        q_row = pos / pos.sum(1, keepdim=True)                # (B, B)
        q_col = pos / pos.sum(0, keepdim=True)                # (B, B)
        ce_row = torch.logsumexp(logits, 1) - (q_row * logits).sum(1)  # (B,)
        ce_col = torch.logsumexp(logits, 0) - (q_col * logits).sum(0)  # (B,)
        contrastive = 0.5 * (ce_row.sum() + ce_col.sum()) / B
        # captioning: the caption rows predict ids[:, 1:]
        cap_logits = self.lm_head(h[:, n_img:ret_start])      # (B, T-1, V)
        caption = F.cross_entropy(cap_logits.reshape(-1, cap_logits.shape[-1]),
                                  ids[:, 1:].reshape(-1), ignore_index=pad_id)
        total = (cfg.contrastive_weight * contrastive + cfg.caption_weight * caption
                 + aux_total)
        losses = {"total": total, "contrastive": contrastive, "caption": caption,
                  "aux": aux_total if torch.is_tensor(aux_total) else total.new_zeros(())}
        losses.update({f"aux_{k}": v if torch.is_tensor(v) else total.new_zeros(())
                       for k, v in aux.items()})
        return losses, routing


# ----------------------------------------------------------------------------- our params

_LEAF_NAMES = {"W": "weight", "b": "bias", "gamma": "weight", "beta": "bias"}


def flatten(tree, prefix=""):
    """``{dotted path: leaf}`` of a minivlmoe parameter tree."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def torch_name(path):
    """The state_dict name of our dotted ``path`` ("blocks.0.attn.q.W" ->
    "blocks.0.attn.q.weight")."""
    head, _, last = path.rpartition(".")
    return f"{head}.{_LEAF_NAMES[last]}" if head and last in _LEAF_NAMES else path


def dense(leaf):
    """A leaf as a dense ndarray (a csr_array weight: ``W.toarray()``)."""
    return leaf.toarray() if hasattr(leaf, "toarray") else np.asarray(leaf)


def load_params(model, params):
    """Copy our parameter tree into ``model`` (same dtype); every leaf must have its
    place.  Returns ``{torch name: our path}``."""
    flat = flatten(params)
    names = {torch_name(p): p for p in flat}
    own = dict(model.named_parameters())
    if names.keys() != own.keys():
        raise ValueError(f"params must have the peer's leaves; missing "
                         f"{sorted(own.keys() - names.keys())}, unexpected "
                         f"{sorted(names.keys() - own.keys())}")
    with torch.no_grad():
        for name, path in names.items():
            value = torch.tensor(dense(flat[path]))
            if value.shape != own[name].shape:
                raise ValueError(f"params[{path!r}] must have shape {tuple(own[name].shape)}, "
                                 f"got {tuple(value.shape)}")
            own[name].copy_(value)
    return names


def grads_by_path(model, names):
    """``{our path: ndarray}`` of the model's ``.grad`` (zeros where none)."""
    own = dict(model.named_parameters())
    return {path: (own[name].grad if own[name].grad is not None
                   else torch.zeros_like(own[name])).detach().numpy()
            for name, path in names.items()}


def params_by_path(model, names):
    """``{our path: ndarray}`` of the model's parameters."""
    own = dict(model.named_parameters())
    return {path: own[name].detach().numpy().copy() for name, path in names.items()}


# ----------------------------------------------------------------------------- optimizer

class AdamW:
    """minivlmoe/optim.py's update in torch: clipping, AdamW, the schedule."""

    def __init__(self, model, names, adamw_cfg, fused=True):
        own = dict(model.named_parameters())
        decay = [own[n] for n, p in names.items() if optim.decays(p)]
        rest = [own[n] for n, p in names.items() if not optim.decays(p)]
        self.params = decay + rest
        self.cfg = adamw_cfg
        # fused: torch's one-kernel AdamW (CPU too); False: its per-parameter loop
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": adamw_cfg.weight_decay},
             {"params": rest, "weight_decay": 0.0}],
            lr=adamw_cfg.lr, betas=adamw_cfg.betas, eps=adamw_cfg.eps, fused=fused)
        # LambdaLR's epoch e is update number e + 1 of minivlmoe.optim.lr_at
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda e: optim.lr_at(e + 1, adamw_cfg) / adamw_cfg.lr)

    def step(self):
        """Clip by the global norm (the per-leaf norms combined in float64; one factor
        ``max_norm / norm`` above the threshold, as minivlmoe.optim), update, advance the
        schedule.  Returns the norm before clipping."""
        grads = [p.grad for p in self.params if p.grad is not None]
        leaf_norms = torch.stack(torch._foreach_norm(grads)).double()   # (leaves,)
        norm = float(torch.linalg.vector_norm(leaf_norms))
        if self.cfg.max_grad_norm is not None and norm > self.cfg.max_grad_norm:
            torch._foreach_mul_(grads, self.cfg.max_grad_norm / norm)
        self.opt.step()
        self.schedule.step()
        return norm

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- MoE alone

def moe_layer(mcfg, pool_params, dtype):
    """The default model's MoE layer alone, loaded from ``moe_layer.init``'s params."""
    layer = MoE(mcfg.width, mcfg.expert_hidden, mcfg.moe_config()).to(dtype)
    load_params(layer, pool_params)
    return layer
