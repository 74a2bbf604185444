"""The Eltwise SUM kernels (minicaffe/kernels/structure.pyx) against NumPy."""
import numpy as np
import pytest

from minicaffe.kernels import structure


def random(n, dtype, seed):
    return np.random.default_rng(seed).standard_normal(n).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 1000, 16384 * 3 + 17])
@pytest.mark.parametrize("coeffs", [(1.0, 1.0), (0.5, -2.0), (1.0, 3.0)])
def test_weighted_sum_matches_numpy(dtype, n, coeffs):
    x, z = random(n, dtype, 1), random(n, dtype, 2)
    y = np.empty_like(x)
    structure.weighted_sum(x, coeffs[0], z, coeffs[1], y, 2)
    expected = coeffs[0] * x.astype(np.float64) + coeffs[1] * z.astype(np.float64)
    np.testing.assert_allclose(y, expected, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-6)
    if coeffs == (1.0, 1.0):
        np.testing.assert_array_equal(y, x + z)       # the plain sum is exact
    structure.weighted_sum(x, coeffs[0], z, coeffs[1], x, 2)   # into an input
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 5, 16384 * 2 + 3])
def test_scaled_copies_match_numpy(dtype, n):
    dy = random(n, dtype, 3)
    dx, other = np.empty_like(dy), np.empty_like(dy)
    structure.scaled_copies(dy, dx, 1.0, other, -0.25, 2)
    np.testing.assert_array_equal(dx, dy)
    np.testing.assert_array_equal(other, dy * dtype(-0.25))
    structure.scaled_copies(dy, dx, 2.0, None, 0.0, 2)
    np.testing.assert_array_equal(dx, dy * dtype(2))


def test_eltwise_kernels_do_not_depend_on_the_thread_count():
    x, z = random(70000, np.float32, 4), random(70000, np.float32, 5)
    results = []
    for threads in (1, 2, 3):
        y, a, b = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        structure.weighted_sum(x, 0.3, z, 1.7, y, threads)
        structure.scaled_copies(y, a, 0.3, b, 1.7, threads)
        results.append((y, a, b))
    for other in results[1:]:
        for u, v in zip(results[0], other):
            np.testing.assert_array_equal(u, v)


def test_eltwise_kernels_reject_mismatched_sizes():
    x = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="differ in size"):
        structure.weighted_sum(x, 1.0, np.zeros(5, np.float32), 1.0, x, 1)
    with pytest.raises(ValueError, match="differ in size"):
        structure.scaled_copies(x, x.copy(), 1.0, np.zeros(3, np.float32), 1.0, 1)
