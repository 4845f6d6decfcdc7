"""Compression of trained runs (see docs/compression.md).

* ``upcycle`` -- a dense run's FFN copied into every expert, fresh routers, trained further.
"""
