"""The message-passing layer: a thin wrapper over an mpi4py communicator.

Expert parallelism needs four collectives and a way to stop (docs/parallel.md derives
where each is used)::

    allgather_rows(a)        every rank's (n_r, ...) rows, concatenated in rank order
    alltoallv(a, send, recv) rows a[...] split by destination: send[q] rows to rank q,
                             recv[p] rows back from rank p (counts known on both sides)
    allreduce_sum(a)         the element-wise sum over ranks, on every rank
    allgather_counts(n)      (Rk,) one int per rank
    abort(), wait_for_abort  end every rank at once when one fails (ep_train.run_guarded)

Every call counts the bytes this rank sends to *other* ranks (a message to itself is a
local copy) and the seconds spent inside MPI, by a ``tag`` the caller names ("plan",
"dispatch", "combine", "allreduce", ...), so the benchmark can report the volume and
the share of time in communication (:attr:`Comm.bytes_sent`, :attr:`Comm.seconds`).

``mpi4py`` is imported only by :func:`world`: the core package never imports it, and
the tests skip without it (``pip install -e '.[mpi]'``).  Byte counts are those of the
buffers handed to MPI; the wire protocol adds its own small headers.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np


def world():
    """The :class:`Comm` of ``MPI.COMM_WORLD`` (imports mpi4py)."""
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise ImportError("expert parallelism needs mpi4py and an MPI library: "
                          "pip install -e '.[mpi]' (mpi4py, mpich)") from e
    return Comm(MPI.COMM_WORLD)


class Comm:
    """An mpi4py communicator with byte and time counters.

    Parameters
    ----------
    mpi_comm : an ``mpi4py.MPI.Comm`` (e.g. ``MPI.COMM_WORLD``).

    Attributes
    ----------
    rank, size : this process's rank r and the number of ranks Rk.
    bytes_sent : dict tag -> bytes this rank sent to other ranks.
    seconds : dict tag -> seconds spent in the collectives of that tag.
    """

    def __init__(self, mpi_comm):
        self.mpi = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.bytes_sent = defaultdict(int)
        self.seconds = defaultdict(float)

    def reset_counters(self):
        self.bytes_sent.clear()
        self.seconds.clear()

    def _timed(self, tag, fn):
        t0 = time.perf_counter()
        out = fn()
        self.seconds[tag] += time.perf_counter() - t0
        return out

    def allgather_counts(self, n, tag="plan"):
        """(Rk,) int64: the ``n`` of every rank, in rank order."""
        send = np.array([n], dtype=np.int64)                     # (1,)
        recv = np.empty(self.size, dtype=np.int64)               # (Rk,)
        self._timed(tag, lambda: self.mpi.Allgather(send, recv))
        self.bytes_sent[tag] += send.nbytes * (self.size - 1)
        return recv

    def allgather_rows(self, a, counts, tag="plan"):
        """Concatenate every rank's ``a`` (n_r, ...) along axis 0, in rank order.

        ``counts`` (Rk,) are the n_r of all ranks (:meth:`allgather_counts`), so no
        extra message is needed for the sizes.  Returns (sum n_r, ...).
        """
        a = np.ascontiguousarray(a)
        row = int(np.prod(a.shape[1:], dtype=np.int64))          # elements per row
        out = np.empty((int(counts.sum()),) + a.shape[1:], dtype=a.dtype)  # (N, ...)
        sizes = counts * row                                     # (Rk,) elements per rank
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]])    # (Rk,)
        self._timed(tag, lambda: self.mpi.Allgatherv(
            a, [out, (sizes, displs)]))
        self.bytes_sent[tag] += a.nbytes * (self.size - 1)
        return out

    def alltoallv(self, a, send_counts, recv_counts, tag):
        """Exchange rows: the rows of ``a`` (M_send, ...) go ``send_counts[q]`` to rank
        q in rank order; returns (sum recv_counts, ...) with ``recv_counts[p]`` rows
        from rank p in rank order.  Both count arrays are (Rk,) int and known to the
        caller (every rank holds the global routing plan)."""
        a = np.ascontiguousarray(a)
        row = int(np.prod(a.shape[1:], dtype=np.int64))          # elements per row
        out = np.empty((int(recv_counts.sum()),) + a.shape[1:], dtype=a.dtype)  # (rows_in, ...)
        s_sizes = np.asarray(send_counts, dtype=np.int64) * row  # (Rk,)
        r_sizes = np.asarray(recv_counts, dtype=np.int64) * row  # (Rk,)
        s_displs = np.concatenate([[0], np.cumsum(s_sizes)[:-1]])  # (Rk,)
        r_displs = np.concatenate([[0], np.cumsum(r_sizes)[:-1]])  # (Rk,)
        self._timed(tag, lambda: self.mpi.Alltoallv(
            [a, (s_sizes, s_displs)], [out, (r_sizes, r_displs)]))
        self.bytes_sent[tag] += int(s_sizes.sum() - s_sizes[self.rank]) * a.itemsize
        return out

    def allreduce_sum(self, a, tag="allreduce"):
        """The element-wise sum over ranks of ``a`` (any shape), on every rank.

        Bytes counted as a ring all-reduce sends them: ``2 (Rk-1)/Rk`` times the buffer.
        """
        a = np.ascontiguousarray(a)
        out = np.empty_like(a)
        self._timed(tag, lambda: self.mpi.Allreduce(a, out))
        self.bytes_sent[tag] += int(round(2 * (self.size - 1) / self.size * a.nbytes))
        return out

    def barrier(self):
        self.mpi.Barrier()

    def wait_for_abort(self, seconds):
        """Wait up to ``seconds`` in a barrier no healthy rank will enter: the job ends
        (another rank's Abort) before it completes.  Returns when the time is up."""
        request = self.mpi.Ibarrier()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not request.Test():
            time.sleep(0.02)

    def abort(self, code=1):
        """End every rank of the job (``MPI_Abort``): no rank is left waiting."""
        self.mpi.Abort(code)
