"""The building blocks, each a forward/backward pair derived in docs/ops/ (reading order).

* ``sums`` -- sums and means over one axis as products with a vector of ones.
* ``sparse_linear`` -- ``y = x W^T + b`` with a CSR weight on a fixed pattern.
* ``lowrank_linear`` -- ``y = (x A^T) B^T + b``: a weight as two factors (truncated SVD).
* ``linear`` -- every linear layer: sparse_linear or lowrank_linear by the params' keys.
* ``gelu`` -- the GELU activation (tanh form).
* ``layernorm`` -- layer normalization over the feature axis.
* ``softmax`` -- the stable softmax (masked entries at -inf give exact zeros) and logsumexp.
* ``cross_entropy`` -- fused softmax + cross-entropy with an ignore index.
* ``l2norm`` -- L2 normalization of rows.
* ``contrastive`` -- symmetric image-text InfoNCE with a learnable logit scale.
* ``patch_embed`` -- images to patch tokens, class token and positions.
* ``token_embed`` -- word ids to tokens (scatter-add backward).
* ``attention`` -- multi-head self-attention with padding / causal / prefix-causal masks.
* ``segment_attention`` -- attention by segments: each query block against its keys only.
* ``ffn`` -- the two-layer feed-forward network (each expert is one).
"""
