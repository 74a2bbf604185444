"""Compiled kernels (Cython with OpenMP, and C headers under include/)."""
