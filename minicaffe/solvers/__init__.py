"""Solvers: the base loop (base.py) and one module per family of update rules."""
from .base import Solver, get_solver, register_solver  # noqa: F401
