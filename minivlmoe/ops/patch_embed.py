"""Patch embedding (ViT): cut images into patches, project them, add a class token and positions.

Math
----
For images ``images`` (B, R, R, Ch) and a patch side ``p`` that divides ``R``, the image
is cut into ``P = (R/p)²`` non-overlapping p x p patches, in row-major order of the
patch grid, each flattened to ``p*p*Ch`` numbers (einops pattern)::

    patches = rearrange(images, 'b (h p1) (w p2) c -> b (h w) (p1 p2 c)')   # (B, P, p*p*Ch)

Each patch is projected by a sparse linear layer (``proj``, weight (D, p*p*Ch)); a
learned class token ``cls`` (D,) is put in front and a learned position table ``pos``
(1+P, D) is added::

    z = patches W^T + b                                  # (B, P, D)
    tokens[:, 0]  = cls + pos[0]                         # (B, D)
    tokens[:, 1:] = z + pos[1:]                          # (B, P, D)

Backward (derived in docs/ops/patch_embed.md), for ``dtokens`` (B, 1+P, D)::

    dpos = sum_b dtokens[b]                              # (1+P, D)  pos broadcast over B
    dcls = sum_b dtokens[b, 0]                           # (D,)      cls broadcast over B
    dpatches, dproj = sparse_linear.backward(dtokens[:, 1:])
    dimages = merge_patches(dpatches)                    # the inverse rearrange

Cutting into patches only moves numbers around (a permutation of the entries), so
its backward is the inverse permutation, :func:`merge_patches`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import linear, sparse_linear
from .._checks import (check_array, check_cache, check_dtype, check_grad, check_int,
                       check_params, check_same_dtype, check_shape)


def _check_patch(patch, image_size):
    """Require an int ``patch`` >= 1 that divides ``image_size``."""
    patch = check_int("patch", patch, 1)
    if image_size % patch:
        raise ValueError(f"patch must divide the image size R={image_size}, got patch={patch}")
    return patch


def extract_patches(images, patch):
    """Cut square images into non-overlapping ``patch`` x ``patch`` patches, flattened.

    'b (h p1) (w p2) c -> b (h w) (p1 p2 c)', done by two reshapes and one transpose.

    Parameters
    ----------
    images : (B, R, R, Ch) array (any dtype).
    patch : int, the patch side; must divide R.

    Returns
    -------
    patches : (B, P, patch*patch*Ch) with P = (R/patch)², patches in row-major grid order.
    """
    check_array("images", images, ndim=4, axes="(B, R, R, Ch)", dtype_kind=None,
                finite=False)
    B, R, R2, Ch = images.shape
    if R != R2:
        raise ValueError(f"images must be square (B, R, R, Ch), got shape {images.shape}")
    patch = _check_patch(patch, R)
    g = R // patch                                                 # patches per side
    x = images.reshape(B, g, patch, g, patch, Ch)                  # (B, h, p1, w, p2, Ch)
    x = x.transpose(0, 1, 3, 2, 4, 5)                              # (B, h, w, p1, p2, Ch)
    return x.reshape(B, g * g, patch * patch * Ch)                 # (B, P, p*p*Ch) copy


def merge_patches(patches, patch):
    """Inverse of :func:`extract_patches`: put flattened patches back into square images.

    'b (h w) (p1 p2 c) -> b (h p1) (w p2) c' with h = w = sqrt(P).

    Parameters
    ----------
    patches : (B, P, patch*patch*Ch) array; P must be a perfect square.
    patch : int, the patch side.

    Returns
    -------
    images : (B, R, R, Ch) with R = patch * sqrt(P).
    """
    check_array("patches", patches, ndim=3, axes="(B, P, patch*patch*Ch)", dtype_kind=None,
                finite=False)
    patch = check_int("patch", patch, 1)
    B, P, flat = patches.shape
    g = int(round(np.sqrt(P)))
    if g * g != P:
        raise ValueError(f"patches must hold a square grid: P must be a perfect square, got P={P}")
    if flat % (patch * patch):
        raise ValueError(f"patches' last axis must be patch*patch*Ch with patch={patch}, "
                         f"got {flat}")
    Ch = flat // (patch * patch)
    x = patches.reshape(B, g, g, patch, patch, Ch)                 # (B, h, w, p1, p2, Ch)
    x = x.transpose(0, 1, 3, 2, 4, 5)                              # (B, h, p1, w, p2, Ch)
    return x.reshape(B, g * patch, g * patch, Ch)                  # (B, R, R, Ch) copy


def init(rng, image_size, patch, channels, d, density=1.0, dtype=np.float32):
    """Create ``{"proj": sparse linear (D, patch*patch*Ch), "cls": (D,), "pos": (1+P, D)}``.

    ``cls`` and ``pos`` are drawn from N(0, 0.02²) (as in BERT/ViT); ``proj`` is a
    :func:`minivlmoe.ops.sparse_linear.init` layer at the given density.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    image_size = check_int("image_size", image_size, 1)
    patch = _check_patch(patch, image_size)
    channels = check_int("channels", channels, 1)
    d = check_int("d", d, 1)
    dtype = check_dtype("dtype", dtype)
    P = (image_size // patch) ** 2
    proj = sparse_linear.init(rng, patch * patch * channels, d, density, dtype)
    cls = (0.02 * rng.standard_normal(d)).astype(dtype)            # (D,)
    pos = (0.02 * rng.standard_normal((1 + P, d))).astype(dtype)   # (1+P, D)
    return {"proj": proj, "cls": cls, "pos": pos}


class Cache(NamedTuple):
    """What backward needs.

    Fields
    ------
    lin : linear cache (sparse_linear or lowrank_linear) of the projection (holds the patches, feature-major).
    patch : int, the patch side (to merge the patch gradients back into images).
    """

    lin: sparse_linear.Cache
    patch: int


def forward(images, params, patch):
    """Embed images as a class token followed by one token per patch.

    Parameters
    ----------
    images : (B, R, R, Ch) float32 or float64.
    params : {"proj": sparse linear params (D, patch*patch*Ch), "cls": (D,), "pos": (1+P, D)},
        same dtype as ``images``.
    patch : int, the patch side; must divide R.

    Returns
    -------
    tokens : (B, 1+P, D); ``tokens[:, 0]`` is the class token.
    cache : Cache (fields ``lin``, ``patch``).
    """
    check_array("images", images, ndim=4, axes="(B, R, R, Ch)")
    check_params("params", params, ("proj", "cls", "pos"))
    (D, d_in), _, _ = linear.check("params['proj']", params["proj"])  # W or A B
    cls, pos = params["cls"], params["pos"]
    check_array("params['cls']", cls, ndim=1, axes="(D,)")
    check_shape("params['cls']", cls, (D,), "(D,)")
    check_same_dtype("params['cls']", cls, "images", images)
    check_array("params['pos']", pos, ndim=2, axes="(1+P, D)")
    check_same_dtype("params['pos']", pos, "images", images)
    patches = extract_patches(images, patch)                       # (B, P, p*p*Ch)
    B, P, flat = patches.shape
    if flat != d_in:
        raise ValueError(f"images must have Ch = Din / patch² = {d_in}/{patch * patch} "
                         f"channels for params['proj'] (Din={d_in}) and patch={patch}, "
                         f"got Ch={images.shape[3]}")
    check_shape("params['pos']", pos, (1 + P, D), "(1+P, D)")
    z, lin = linear.forward(patches, params["proj"])               # (B, P, D)
    tokens = np.empty((B, 1 + P, D), dtype=images.dtype)           # (B, 1+P, D)
    tokens[:, 0] = cls                                             # (B, D) broadcast over B
    tokens[:, 1:] = z                                              # (B, P, D)
    tokens += pos                                                  # (B, 1+P, D) broadcast over B
    return tokens, Cache(lin=lin, patch=patch)


def backward(dtokens, cache):
    """Gradients of :func:`forward`.

    Parameters
    ----------
    dtokens : (B, 1+P, D) upstream gradient.
    cache : Cache from :func:`forward`.

    Returns
    -------
    dimages : (B, R, R, Ch)
    dparams : {"proj": {"W": csr_array with W's pattern, "b": (D,)}, "cls": (D,), "pos": (1+P, D)}
    """
    check_cache(cache, Cache)
    (B, P), D, dtype = linear.output(cache.lin)
    check_grad("dtokens", dtokens, (B, 1 + P, D), dtype)
    lin, patch = cache
    # tokens += pos  (pos broadcast over B)  ->  sum over B
    dpos = dtokens.sum(axis=0)                                     # (1+P, D)
    # tokens[:, 0] = cls  (broadcast over B)
    dcls = dtokens[:, 0].sum(axis=0)                               # (D,)
    # tokens[:, 1:] = z
    dz = dtokens[:, 1:]                                            # (B, P, D) view
    # z = proj(patches)
    dpatches, dproj = linear.backward(dz, lin)                     # (B, P, p*p*Ch)
    # patches = extract_patches(images)  ->  the inverse rearrange
    dimages = merge_patches(dpatches, patch)                       # (B, R, R, Ch)
    return dimages, {"proj": dproj, "cls": dcls, "pos": dpos}
