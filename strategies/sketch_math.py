"""The linear algebra of the ``sketch`` strategy: a randomised range finder split across clients.

Halko, Martinsson & Tropp 2011, Alg. 4.1: with Gaussian Omega (d_in x s), range(M Omega) =
range(M) with probability 1 when s >= rank(M); M = Q Q^T M then holds exactly.
"""

from __future__ import annotations

import numpy as np


def sketch_matrix(seed: int, d_in: int, size: int) -> np.ndarray:
    """The shared Gaussian Omega (d_in, size), float64, identical on every node for one seed."""
    return np.random.default_rng(seed).standard_normal((d_in, size))


def sketch_upload(a: np.ndarray, b: np.ndarray, weight_times_scaling: float, omega: np.ndarray) -> np.ndarray:
    """Y_k = c B (A Omega), (d_out, size); costs O(r (d_in + d_out) s)."""
    return (np.float64(weight_times_scaling) * b.astype(np.float64)) @ (a.astype(np.float64) @ omega)


def delta_sketch_matrix(seed: int, d_in: int, size: int) -> np.ndarray:
    """Omega / sqrt(size): E ||D Omega||_F^2 = ||D||_F^2, so one clip norm C means the same for Y_k and for D_k."""
    return sketch_matrix(seed, d_in, size) / np.sqrt(size)


def orthonormal_basis(y_sum: np.ndarray, rel_tol: float | None = 1e-10) -> np.ndarray:
    """Q (d_out, q): an orthonormal basis of range(Y), q = its numerical rank (at least 1); with ``rel_tol``
    None, q = min(d_out, size) whatever Y's rank (an orthonormal basis of a space holding range(Y))."""
    u, s, _ = np.linalg.svd(y_sum.astype(np.float64), full_matrices=False)
    if rel_tol is None:
        return u
    keep = max(1, int(np.sum(s > rel_tol * s[0]))) if s.size and s[0] > 0 else 1
    return u[:, :keep]


def project_upload(q: np.ndarray, a: np.ndarray, b: np.ndarray, weight_times_scaling: float) -> np.ndarray:
    """Z_k = Q^T (c B A) computed as (Q^T B) A, (q, d_in)."""
    return (np.float64(weight_times_scaling) * (q.T.astype(np.float64) @ b)) @ a.astype(np.float64)


def projected_svd(q: np.ndarray, z_sum: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thin SVD (U, s, Vt) of Q Z from the SVD of the small Z alone: U = Q U_Z, since Q is orthonormal."""
    u, s, vt = np.linalg.svd(z_sum.astype(np.float64), full_matrices=False)
    return q.astype(np.float64) @ u, s, vt
