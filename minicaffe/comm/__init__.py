"""An MLSL-style communicator for data-parallel training under ``mpiexec``.

    env = environment()                      # rank, size; MPI only when mpiexec started N > 1 ranks
    dist = create_distribution(env)          # data parts = ranks
    session = create_session(net, dist, CommConfig(...), env)
    net.backward_layers(on_layer_done=session.on_layer_done)   # each layer's allreduce starts here
    session.gradients_ready(); session.wait_param(i); update(i)  # wait just before updating

A single-process run gets ``Distribution`` and ``LocalSession``: no mpi4py import, no copies, no waits.
"""
from .distribution import CommTimeout, Distribution, MPIDistribution
from .environment import Environment, environment, launched_rank, launched_ranks, stop_all_ranks
from .session import CommConfig, LocalSession, ParameterSet, Session
from .statistics import Statistics

__all__ = ["CommConfig", "CommTimeout", "Distribution", "Environment", "LocalSession", "MPIDistribution",
           "ParameterSet", "Session", "Statistics", "create_distribution", "create_session", "environment",
           "launched_rank", "launched_ranks", "stop_all_ranks"]


def create_distribution(env, timeout_s=300.0):
    return MPIDistribution(env, timeout_s) if env.distributed else Distribution()


def create_session(net, distribution, config, env=None):
    if distribution.size == 1:
        return LocalSession()
    return Session(net, distribution, config, env)
