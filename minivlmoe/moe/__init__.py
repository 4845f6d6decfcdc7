"""The sparse Mixture-of-Experts layer, derived in docs/moe/ (reading order).

* ``router`` -- the softmax router: logits, top-k, both gate conventions, noise.
* ``dispatch`` -- capacity, priorities (BPR), sparse dispatch and combine matrices.
* ``experts`` -- E FFNs over their compact token blocks.
* ``aux_losses`` -- load balance, importance, z-loss, LIMoE entropies.
* ``moe_config`` -- the layer's configuration (MoEConfig) and the gate convention.
* ``moe_layer`` -- the layer: router -> dispatch -> experts -> combine, modality pools.
"""
