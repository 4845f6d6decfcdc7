"""minivlmoe: a NumPy-only vision-language transformer scaled with sparse Mixture-of-Experts.

Every forward and backward pass is written by hand; every weight matrix is a
``scipy.sparse.csr_array`` with a fixed sparsity pattern. Read the modules in the
order listed in README.md.

Conventions
-----------
Each op module exposes a functional pair::

    out, cache = forward(x, ..., params)      # pure: no state, no hidden randomness
    grads = backward(dout, cache)             # one gradient per differentiable input,
                                              # in argument order; never mutates dout/cache

Parameters are nested dicts whose leaves are ``numpy.ndarray`` or
``scipy.sparse.csr_array``; gradients have exactly the same keys, and a sparse
weight's gradient has exactly the weight's sparsity pattern.

Glossary of axis letters (also docs/notation.md)
------------------------------------------------
B batch, P patches per image, T text tokens, S sequence length, N flattened tokens
(N = B*S), D model width, Din/Dout a linear layer's input/output width, H attention
heads, Dh head width (D/H), F expert hidden width, E experts, K experts per token,
V vocabulary size, X expert slots (capacity per expert), R image height and width in
pixels (R x R), Ch image channels.
"""

__version__ = "0.1.0"
