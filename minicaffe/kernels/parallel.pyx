"""The thread count every kernel uses, and whether OpenMP is compiled in.

OpenMP owns the cores and BLAS runs single-threaded inside the parallel regions (see
minicaffe/threads.py). The count starts as OMP_NUM_THREADS when set, else OpenMP's default (the
cores this process may run on), and ``set_num_threads`` changes it for the whole process.
"""
import os

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int minicaffe_openmp_enabled(void) { return 1; }
    static int minicaffe_omp_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int minicaffe_openmp_enabled(void) { return 0; }
    static int minicaffe_omp_max_threads(void) { return 1; }
    #endif
    """
    int minicaffe_openmp_enabled() noexcept nogil
    int minicaffe_omp_max_threads() noexcept nogil


def openmp_enabled():
    """True when the kernels were compiled with OpenMP (else every kernel runs on one thread)."""
    return bool(minicaffe_openmp_enabled())


def _default_num_threads():
    if not minicaffe_openmp_enabled():
        return 1
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, minicaffe_omp_max_threads()))


cdef int _num_threads = _default_num_threads()


def num_threads():
    """The number of OpenMP threads the kernels split their work across."""
    return _num_threads


def set_num_threads(int n):
    """Sets the kernels' thread count (clamped to 1 when OpenMP is not compiled in)."""
    global _num_threads
    if n < 1:
        raise ValueError(f"thread count must be at least 1, got {n}")
    _num_threads = n if minicaffe_openmp_enabled() else 1
