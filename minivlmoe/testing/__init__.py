"""The test registry: gradient-check cases, gradcheck-only wrappers and fixtures (reading order).

* ``ops`` -- cases and fixtures of the building blocks (minivlmoe/ops/), e.g. the attention
  backward without the key bias, ``unit_rows``, the naive FFN.
* ``moe`` -- cases and fixtures of the MoE layer (minivlmoe/moe/): separated logits,
  orthonormal routers, inputs for given logits, separated layer inputs, the naive pool.
* ``model`` -- the whole-model cases and fixtures (tiny configs and params, directional cases).

Library modules end at their backward; what only a test, a docs check or the
``python -m minivlmoe gradcheck`` report needs lives here.  :data:`GROUPS` is the one
ordered list that the report and the tests iterate: ``(library module, cases(rng))``.
"""

from __future__ import annotations

from . import model, moe, ops

GROUPS = [
    *ops.GROUPS,
    *moe.GROUPS,
    ("model", model.gradcheck_cases),
]


def all_cases(rng, only=None):
    """Every registered case in reading order (those whose op name contains ``only``).

    A generator: each group's cases are built from ``rng`` when the group is reached, so
    a caller that checks each case before asking for the next draws from ``rng`` in the
    same order as the report.
    """
    for _, cases in GROUPS:
        for case in cases(rng):
            if only is None or only in case.op:
                yield case
