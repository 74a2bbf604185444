"""Builds the Cython kernels under minicaffe/kernels/.

OpenMP is found by compiling a probe program with the compiler's OpenMP flag; without it the kernels
build single-threaded (``prange`` becomes a plain loop). Kernels are compiled for the build machine's
CPU (``-march=native``) unless MINICAFFE_PORTABLE=1; the low-precision kernels still choose their
instruction set at run time.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def compiler_accepts(flags, source=OPENMP_PROBE, link_flags=()):
    """True when the C compiler compiles, links and runs ``source`` with ``flags``."""
    cc = os.environ.get("CC", "cc")
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(source)
        cmd = [cc, *flags, src, "-o", exe, *link_flags]
        ok = subprocess.run(cmd, capture_output=True).returncode == 0
        return ok and subprocess.run([exe], capture_output=True).returncode == 0
    except OSError:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_flags():
    compile_args = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-unused-function", "-Wno-unreachable-code"]
    link_args = []
    if os.environ.get("MINICAFFE_PORTABLE") != "1" and compiler_accepts(["-march=native"], "int main(void){return 0;}"):
        compile_args.append("-march=native")
    if os.environ.get("MINICAFFE_NO_OPENMP") != "1" and compiler_accepts(["-fopenmp"], link_flags=["-fopenmp"]):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    else:
        print("minicaffe: no OpenMP support found; kernels will run single-threaded", file=sys.stderr)
    return compile_args, link_args


def extensions():
    compile_args, link_args = build_flags()
    include_dirs = [numpy.get_include(), os.path.join("minicaffe", "kernels", "include")]
    exts = []
    for pyx in sorted(glob.glob(os.path.join("minicaffe", "kernels", "*.pyx"))):
        module = pyx[:-4].replace(os.sep, ".")
        exts.append(Extension(module, [pyx], include_dirs=include_dirs,
                              extra_compile_args=compile_args, extra_link_args=link_args,
                              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]))
    return cythonize(exts, compiler_directives={
        "language_level": 3, "boundscheck": False, "wraparound": False,
        "cdivision": True, "initializedcheck": False, "nonecheck": False,
    }, nthreads=os.cpu_count() or 1)


setup(ext_modules=extensions())
