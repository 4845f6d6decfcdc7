"""Expert parallelism over MPI (optional extra ``mpi``: mpi4py and mpich), reading order.

* ``comm`` -- the mpi4py wrapper: Allgather, Alltoallv, Allreduce, with byte counters.
* ``ep_aux`` -- the auxiliary losses of a pool over the global batch from reduced sums.
* ``ep_moe`` -- the expert-parallel MoE layer: global plan, all-to-all, owned experts.
* ``ep_train`` -- training on Rk ranks: the global loss's gradients, one Allreduce.
* ``agreement`` -- the checks against one process (run under mpiexec by the tests).

Nothing here imports mpi4py at import time except :func:`comm.world`; the core package
never imports this package.  docs/parallel.md derives the data flow and message sizes.
"""
