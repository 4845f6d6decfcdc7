"""Compression of trained runs (see docs/compression.md).

Modules, in reading order:

* ``prune`` -- magnitude pruning of sparse weights to new canonical CSR patterns
  (unstructured or row-group), the gradual (cubic) schedule, moments onto a new pattern.
* ``lowrank`` -- each attention / FFN weight replaced by its truncated SVD, with a report.
* ``finetune`` -- a compressed run: convert a run's parameters, write a new run folder,
  fine-tune it with the training loop; its pattern check on load.
* ``curve`` -- the density-quality-speed curve (``compress --sweep``).
* ``upcycle`` -- a dense run's FFN copied into every expert, fresh routers, trained further.
"""
