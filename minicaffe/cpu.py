"""CPU features, and the native-library settings chosen from them before NumPy and SciPy load BLAS.

OpenBLAS picks its kernels once, when the library loads, from ``OPENBLAS_CORETYPE`` or its own CPU
probe. On CPUs with AVX-512 its SkylakeX kernels run sgemm about twice as fast as the AVX2 (Haswell)
ones (benchmarks/gemm_peak.py measures both), yet environments often pin Haswell. So when the CPU has
the AVX-512 subset those kernels need, minicaffe asks for SkylakeX. ``MINICAFFE_OPENBLAS_CORETYPE``
overrides the choice: a core type name, or ``keep`` to leave the environment alone.

OpenMP threads spin briefly before they sleep (``GOMP_SPINCOUNT=1000``, some 10-50 microseconds) unless
the user sets ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``. A thread that sleeps at once leaves its core idle,
and in a virtual machine waking an idle core for the next parallel region took about 0.1 ms, longer
than many regions' work; a long spin, on the other hand, takes the core from any other busy process
(docs/ARCHITECTURE.md has the measurements).

This module must not import NumPy or SciPy: ``configure_native_libraries`` runs before they load.
"""
import os
import sys

# What OpenBLAS's SkylakeX kernels execute.
SKYLAKEX_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})

# Spins before an idle OpenMP thread sleeps, unless the user chose (see the module's docstring).
OPENMP_SPIN_COUNT = "1000"

_choices = {}


def cpu_flags():
    """The CPU feature flags the kernel reports (Linux); an empty set where they can't be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def openblas_coretype(flags):
    """The OpenBLAS core type minicaffe asks for on a CPU with these flags, or None for OpenBLAS's own."""
    return "SkylakeX" if SKYLAKEX_FLAGS <= flags else None


def configure_native_libraries():
    """Sets OPENBLAS_CORETYPE (unless BLAS is already loaded) and the OpenMP spin for this process."""
    request = os.environ.get("MINICAFFE_OPENBLAS_CORETYPE", "auto")
    coretype = openblas_coretype(cpu_flags()) if request == "auto" else (None if request == "keep" else request)
    # The kernels call SciPy's OpenBLAS (NumPy carries its own copy, which minicaffe barely uses).
    applied = bool(coretype) and "scipy.linalg" not in sys.modules
    if applied:
        os.environ["OPENBLAS_CORETYPE"] = coretype
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)
    _choices.update(openblas_coretype=os.environ.get("OPENBLAS_CORETYPE", "(OpenBLAS's own probe)"),
                    requested=coretype, applied=applied, openmp_wait=openmp_wait())


def openmp_wait():
    """How OpenMP threads wait in this process, from the environment libgomp reads when it loads."""
    return ", ".join(f"{name}={os.environ[name]}" for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                     if name in os.environ) or "libgomp's default"


def native_library_choices():
    """What configure_native_libraries chose, for logs and benchmarks."""
    return dict(_choices)
