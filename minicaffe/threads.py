"""Thread policy: OpenMP owns the cores, BLAS runs single-threaded.

Kernels parallelize with OpenMP ``prange`` and call single-threaded BLAS inside the parallel region, so
the BLAS libraries loaded by NumPy and SciPy are held to one thread while a net runs; otherwise both
thread pools would compete for the same cores.
"""
import contextlib

_controller = None


def _threadpool_controller():
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController
        _controller = ThreadpoolController()
    return _controller


@contextlib.contextmanager
def blas_single_threaded():
    with _threadpool_controller().limit(limits=1, user_api="blas"):
        yield


def num_threads():
    from .kernels import parallel
    return parallel.num_threads()


def set_num_threads(n):
    from .kernels import parallel
    parallel.set_num_threads(int(n))
