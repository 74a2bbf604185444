"""How the work is split: MLSL's Distribution, data parallelism only (data parts = ranks).

``Distribution`` is the single-process case, where every collective is the identity and costs nothing.
``MPIDistribution`` runs the collectives on mpi4py's COMM_WORLD. Every wait is bounded by ``timeout_s``,
so a rank that has stopped answering turns into an error (and, through ``stop_all_ranks``, into an
abort of every rank) instead of a hang.
"""
import time

import numpy as np

from ..errors import MinicaffeError


class CommTimeout(MinicaffeError):
    pass


class Distribution:
    """One data part: this process holds the whole batch."""

    rank = 0
    data_parts = 1
    model_parts = 1

    @property
    def size(self):
        return self.data_parts * self.model_parts

    def sum_across_ranks(self, values, what="values"):
        return np.asarray(values, dtype=np.float64)

    def broadcast(self, array, what="values"):
        return array


class MPIDistribution(Distribution):
    def __init__(self, env, timeout_s=300.0):
        self.mpi = env.mpi
        self.world = env.world
        self.rank = env.rank
        self.data_parts = env.size
        self.timeout_s = timeout_s

    # -- non-blocking collectives (the caller completes the request) ---------------------------------
    def start_allreduce(self, buffer):
        """Sums float32 ``buffer`` over the ranks, in place, non-blocking."""
        return self.world.Iallreduce(self.mpi.IN_PLACE, [buffer, self.mpi.FLOAT], self.mpi.SUM)

    def start_allgather(self, payload, gathered):
        """Gathers every rank's ``payload`` bytes into the rows of ``gathered``, non-blocking."""
        return self.world.Iallgather([payload, self.mpi.BYTE], [gathered, self.mpi.BYTE])

    def wait(self, request, what):
        """Completes ``request`` or raises CommTimeout after ``timeout_s``."""
        if request.Test():
            return
        deadline = time.perf_counter() + self.timeout_s
        spins = 0
        while not request.Test():
            spins += 1
            if spins > 2000:
                # Past a short spin, yield the core (and the GIL, for a progress thread).
                if time.perf_counter() > deadline:
                    raise CommTimeout(f"{what}: the other ranks did not answer within {self.timeout_s:g} s")
                time.sleep(50e-6)

    # -- blocking helpers, bounded ------------------------------------------------------------------
    def sum_across_ranks(self, values, what="values"):
        array = np.ascontiguousarray(values, dtype=np.float64).copy()
        self.wait(self.world.Iallreduce(self.mpi.IN_PLACE, [array, self.mpi.DOUBLE], self.mpi.SUM), what)
        return array

    def broadcast(self, array, what="values"):
        """Overwrites ``array`` (contiguous) with rank 0's."""
        self.wait(self.world.Ibcast([array, self.mpi.BYTE]), what)
        return array
