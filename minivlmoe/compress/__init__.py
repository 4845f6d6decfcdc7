"""Compression of trained runs (see docs/compression.md).

* ``lowrank`` -- each attention / FFN weight replaced by its truncated SVD, with a report.
"""
