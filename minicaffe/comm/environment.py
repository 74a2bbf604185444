"""Which process this is, and how many there are: MLSL's Environment.

A run started by ``mpiexec -n N`` (N > 1) is recognised from the variables the launcher sets, so that
a single-process run never imports mpi4py or initialises MPI. Under MPI, an error on any rank stops
every rank at once (``stop_all_ranks``): the failing rank prints one line naming itself and calls
``MPI_Abort``, and the launcher ends the others, so nothing waits forever on a rank that is gone.
"""
import os
import sys
import time
import traceback

from ..errors import MinicaffeError

# Variables that MPICH/Intel MPI (PMI), Open MPI and MVAPICH set for every rank they launch.
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")
_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")


def _first_int(names):
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def launched_ranks():
    """The number of ranks the launcher started (1 when not launched by mpiexec)."""
    return _first_int(_SIZE_VARIABLES) or 1


def launched_rank():
    """This process's rank as the launcher set it (0 when not launched by mpiexec); needs no MPI."""
    return _first_int(_RANK_VARIABLES) or 0


class Environment:
    """The process grid: ``rank``, ``size``, and (under MPI) ``mpi`` and ``world``."""

    def __init__(self):
        self.rank, self.size = 0, 1
        self.mpi = None
        self.world = None

    @property
    def distributed(self):
        return self.size > 1

    def init(self):
        if self.mpi is not None or launched_ranks() <= 1:
            return self
        try:
            from mpi4py import MPI
        except ImportError:
            raise MinicaffeError(f"started by mpiexec with {launched_ranks()} ranks, but mpi4py is not "
                                 "installed (pip install 'minicaffe[mpi]')") from None
        self.mpi, self.world = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        if self.size > 1:
            sys.excepthook = _abort_on_uncaught
        return self

    @property
    def thread_multiple(self):
        return self.mpi is not None and self.mpi.Query_thread() >= self.mpi.THREAD_MULTIPLE


_environment = Environment()


def environment():
    """The process's Environment, initialised on first use (MLSL's Environment::GetEnv().Init())."""
    return _environment.init()


def stop_all_ranks(message):
    """Under MPI, prints ``message`` naming this rank and aborts every rank; otherwise returns.

    Used for any error on one rank: the others may be inside a collective that would never finish.
    """
    env = _environment
    if not env.distributed:
        return
    print(f"rank {env.rank} of {env.size}: {message}", file=sys.stderr, flush=True)
    # Give the launcher a moment to forward the line before it tears every rank down.
    time.sleep(0.5)
    env.world.Abort(1)


def _abort_on_uncaught(kind, value, tb):
    if issubclass(kind, KeyboardInterrupt):
        stop_all_ranks("interrupted")
    text = "".join(traceback.format_exception(kind, value, tb))
    print(text, file=sys.stderr, flush=True)
    stop_all_ranks(f"uncaught {kind.__name__}: {value}")
