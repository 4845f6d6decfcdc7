"""A generator's saved state, restored exactly: :func:`restore_rng`.

A checkpoint stores each ``numpy.random.Generator`` as ``Generator.bit_generator.state``
(a JSON dict naming its bit generator; :func:`minivlmoe.checkpoint.save` writes it into
the manifest).  :func:`restore_rng` rebuilds a generator in exactly that state, or raises
when the dict is not a valid state of one of the bit generators NumPy ships
(``_BIT_GENERATORS``).  :mod:`minivlmoe.train` restores the model's generator and the
data order's with it; :func:`minivlmoe.run_checkpoint.load_checkpoint` checks both.
"""

from __future__ import annotations

import json

import numpy as np

# the manifest's JSON of NumPy values, and the one-line form of an error
from ._checks import error_line
from .checkpoint import json_default

_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")


def restore_rng(rng_state):
    """A ``numpy.random.Generator`` in exactly the state ``rng_state``.

    ``rng_state`` is ``Generator.bit_generator.state`` (a dict naming its bit
    generator, e.g. ``{"bit_generator": "PCG64", "state": {...}, ...}``).
    """
    if not isinstance(rng_state, dict):
        raise TypeError(f"rng_state must be a dict, got {type(rng_state).__name__}")
    name = rng_state.get("bit_generator")
    if name not in _BIT_GENERATORS:
        raise ValueError(f"rng_state['bit_generator'] must be one of "
                         f"{list(_BIT_GENERATORS)}, got {name!r}")
    bit_generator = getattr(np.random, name)()
    try:
        bit_generator.state = rng_state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise ValueError(f"rng_state is not a valid {name} state ({error_line(e)})") from None
    # NumPy converts what it is given (1.5 -> 1, True -> 1): the state read back must be
    # the state given, or the generator would silently draw another sequence
    given, got = (json.dumps(s, default=json_default, sort_keys=True)
                  for s in (rng_state, bit_generator.state))
    if given != got or rng_state.get("has_uint32", 0) not in (0, 1):
        raise ValueError(f"rng_state is not a valid {name} state (a value has the wrong "
                         f"type or range; got {given:.200})")
    return np.random.Generator(bit_generator)
