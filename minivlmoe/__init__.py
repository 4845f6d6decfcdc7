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

Glossary of axis letters (the tables of docs/notation.md)
-------------------------------------------------------------

B        batch: images or captions
R        image height and width in pixels (images are R x R)
Ch       image channels (3)
p        patch side in pixels (the config's patch)
P        patches per image, (R / p)^2
T        text tokens per caption, bos/eos/pad included
Tmax     the longest caption the position table holds (max_text_len)
S        sequence length seen by attention: 1 + P + Tc + Tr in training (1 + P, T or 1 + P + t alone)
Tc       caption segment of the sequence, T - 1 positions (0 when absent)
Tr       retrieval-text segment of the sequence, T positions (0 when absent)
Sq       query positions of one attention block (segment attention)
Sk       key positions of one attention block (segment attention)
N        flattened tokens, N = B * S (rows of the MoE layer and of the linear layers)
U        non-pad token rows, U <= N
D        model width
Din      input width of a linear layer
Dout     output width of a linear layer
Du       input columns a sparse weight uses (at least one row stores them; its compact path)
H        attention heads
Dh       head width, D / H
De       retrieval embedding width (the config's embed_dim)
F        hidden width of a dense or expert feed-forward network
E        experts in one pool
K        experts chosen per token (top-k; the Python argument is k)
X        expert slots: the capacity of one expert
M        filled expert slots of one layer call, M <= E * X
V        vocabulary size
G        row groups of a sparse weight, G = Dout / r
r        rows per row group of a sparse weight
Z        stored entries per row of a sparse weight (its fan-in)
nnz      stored entries of a sparse weight, Dout * Z
b        the rows of one chunk or minibatch, b <= B
n        a count given as an argument (items to shuffle, images to show)
t        tokens decoded so far
h        patch-grid rows, R / p (einops name)
w        patch-grid columns, R / p (einops name)
p1       pixel row inside a patch (einops name)
p2       pixel column inside a patch (einops name)
O        object slots per generated image (max_objects)
o        objects in one group of generated images
Bo       the generated images with o objects
Bh       the test images given a held-out object
Bm       the images with an object in slot m
L        side of the largest object box (the drawing window)
Px       painted pixels
Bn       training pairs (n_train)
Bs       single-object test images (zero-shot probes)
A        values of the probed attribute (the classes of a zero-shot probe)
Pc       prompts per class
Q        queries of a retrieval ranking
Ni       images ranked in retrieval
Nt       texts ranked in retrieval
M_e      filled slots of expert e
N_p      tokens of one expert pool
N_group  tokens of one auxiliary-loss group
Rk       ranks (processes) of an expert-parallel job (minivlmoe/parallel/)
M_own    filled slots of the experts one rank holds (minivlmoe/parallel/)
"""

__version__ = "0.1.0"
