"""The native-library settings minicaffe makes at import: OpenBLAS's core type and the OpenMP wait."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minicaffe import cpu

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("OPENBLAS_CORETYPE", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def settings_after_import(**environment):
    """The settings' values in a fresh interpreter after ``import minicaffe``, from this environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in SETTINGS and k != "MINICAFFE_OPENBLAS_CORETYPE"}
    env.update(environment, PYTHONPATH=str(REPO))
    code = ("import json, os, minicaffe; "
            f"print(json.dumps({{k: os.environ.get(k) for k in {SETTINGS!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_openmp_spins_briefly_unless_the_user_chose():
    assert settings_after_import()["GOMP_SPINCOUNT"] == cpu.OPENMP_SPIN_COUNT
    assert settings_after_import(GOMP_SPINCOUNT="7")["GOMP_SPINCOUNT"] == "7"
    chosen = settings_after_import(OMP_WAIT_POLICY="passive")
    assert chosen["OMP_WAIT_POLICY"] == "passive" and chosen["GOMP_SPINCOUNT"] is None


@pytest.mark.parametrize("request_, expected", [("keep", None), ("Haswell", "Haswell")])
def test_openblas_core_type_follows_the_request(request_, expected):
    assert settings_after_import(MINICAFFE_OPENBLAS_CORETYPE=request_)["OPENBLAS_CORETYPE"] == expected


def test_openblas_core_type_follows_the_cpu():
    assert cpu.openblas_coretype(cpu.SKYLAKEX_FLAGS | {"avx2"}) == "SkylakeX"
    assert cpu.openblas_coretype(frozenset({"avx2", "fma", "avx512f"})) is None
    assert settings_after_import()["OPENBLAS_CORETYPE"] == cpu.openblas_coretype(cpu.cpu_flags())
