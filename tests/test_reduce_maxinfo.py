"""MaxInfo: rect_maxvol reproduces maxvolpy's py_rect_maxvol (transcribed below with scipy's LAPACK/BLAS
calls, as in maxvolpy/maxvol.py) on fixed matrices; the selection's invariances; frame selection on the
real test video through the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import get_blas_funcs, get_lapack_funcs

from llava_next.reduce import MaxInfo, ReductionError, parse_reduction
from llava_next.reduce.maxinfo import maxvol, rect_maxvol, select_rows


# ---- maxvolpy's python implementation, transcribed (reference) ------------------------------------------
def py_maxvol(A, tol=1.05, max_iters=100):
    tol = max(tol, 1.0)
    N, r = A.shape
    if N <= r:
        return np.arange(N, dtype=np.int32), np.eye(N, dtype=A.dtype)
    B = np.copy(A, order="F")
    C = np.copy(A.T, order="F")
    H, ipiv, info = get_lapack_funcs("getrf", [B])(B, overwrite_a=1)
    index = np.arange(N, dtype=np.int32)
    for i in range(r):
        tmp = index[i]
        index[i] = index[ipiv[i]]
        index[ipiv[i]] = tmp
    B = H[:r]
    trtrs = get_lapack_funcs("trtrs", [B])
    trtrs(B, C, trans=1, lower=0, unitdiag=0, overwrite_b=1)
    trtrs(B, C, trans=1, lower=1, unitdiag=1, overwrite_b=1)
    i, j = divmod(abs(C).argmax(), N)
    ger = get_blas_funcs("ger", [C])
    iters = 0
    while abs(C[i, j]) > tol and iters < max_iters:
        index[i] = j
        tmp_row = C[i].copy()
        tmp_column = C[:, j].copy()
        tmp_column[i] -= 1.
        alpha = -1. / C[i, j]
        ger(alpha, tmp_column, tmp_row, a=C, overwrite_a=1)
        iters += 1
        i, j = divmod(abs(C).argmax(), N)
    return index[:r].copy(), C.T


def py_rect_maxvol(A, tol=1., maxK=None, minK=None, start_maxvol_iters=10):
    tol2 = tol ** 2
    N, r = A.shape
    if N <= r:
        return np.arange(N, dtype=np.int32)
    if maxK is None or maxK > N:
        maxK = N
    if maxK < r:
        maxK = r
    if minK is None or minK < r:
        minK = r
    if minK > N:
        minK = N
    if minK > maxK:
        minK = maxK
    index = np.zeros(N, dtype=np.int32)
    chosen = np.ones(N)
    tmp_index, C = py_maxvol(A, 1.05, start_maxvol_iters)
    index[:r] = tmp_index
    chosen[tmp_index] = 0
    C = np.asfortranarray(C)
    row_norm_sqr = np.array([chosen[i] * np.linalg.norm(C[i], 2) ** 2 for i in range(N)])
    i = np.argmax(row_norm_sqr)
    K = r
    ger = get_blas_funcs("ger", [C])
    while (row_norm_sqr[i] > tol2 and K < maxK) or K < minK:
        index[K] = i
        chosen[i] = 0
        c = C[i].copy()
        v = C.dot(c.conj())
        l = 1.0 / (1 + v[i])
        ger(-l, v, c, a=C, overwrite_a=1)
        C = np.hstack([C, l * v.reshape(-1, 1)])
        row_norm_sqr -= (l * v * v.conj()).real
        row_norm_sqr *= chosen
        i = row_norm_sqr.argmax()
        K += 1
    return index[:K].copy()


def fixed(n, r, seed):
    return np.random.default_rng(seed).standard_normal((n, r))


@pytest.mark.parametrize("n,r,tol,max_k", [(40, 8, 0.3, 16), (40, 8, 1.0, None), (100, 5, 0.3, 64), (12, 4, 0.5, 12),
                                           (60, 8, 0.3, 8), (9, 8, 0.3, 9)])
def test_rect_maxvol_equals_maxvolpy_on_fixed_matrices(n, r, tol, max_k):
    for seed in range(3):
        A = fixed(n, r, seed)
        ref = py_rect_maxvol(A.copy(), tol=tol, maxK=max_k)
        ours = rect_maxvol(torch.from_numpy(A), tol=tol, max_k=max_k)
        assert ours.tolist() == ref.tolist()


def test_rect_maxvol_structured_matrix():
    """Repeated and scaled rows (ties in the LU pivots and in the row norms) choose what maxvolpy chooses."""
    base = fixed(6, 3, 7)
    A = np.concatenate([base, base[:3], 2 * base[3:]])  # rows 6..8 repeat 0..2, 9..11 are multiples of 3..5
    ref = py_rect_maxvol(A.copy(), tol=0.3, maxK=6)
    ours = rect_maxvol(torch.from_numpy(A), tol=0.3, max_k=6).tolist()
    assert ours == ref.tolist() and len(ours) == 6


def test_square_maxvol_dominance():
    A = torch.from_numpy(fixed(50, 6, 1))
    rows, C = maxvol(A)
    assert C.abs().max() <= 1.05 + 1e-9 and torch.allclose(C[rows], torch.eye(6, dtype=C.dtype), atol=1e-9)


def test_selection_is_invariant_to_the_svd_scaling():
    """U_R (paper) and U_R S_R (code) pick the same rows: C = A A_I^-1 is unchanged by A -> A M."""
    E = torch.from_numpy(fixed(30, 20, 3))
    U, S, _ = torch.linalg.svd(E, full_matrices=False)
    a = rect_maxvol(U[:, :8] * S[:8], tol=0.3, max_k=12)
    b = rect_maxvol(U[:, :8], tol=0.3, max_k=12)
    assert sorted(a.tolist()) == sorted(b.tolist())
    assert select_rows(E.float(), 8, 0.3, 12) == sorted(a.tolist())


def test_static_video_does_not_break_the_lu():
    E = torch.ones(20, 16) + 1e-9 * torch.from_numpy(fixed(20, 16, 0)).float()
    rows = select_rows(E, 8, 0.3, 8)
    assert 1 <= len(rows) <= 8 and rows == sorted(set(rows))


def test_settings_are_checked():
    with pytest.raises(ReductionError, match="maxinfo: rank must be"):
        MaxInfo(rank=0)
    with pytest.raises(ReductionError, match="fastv is not a frame selector; --select-frames takes: maxinfo"):
        parse_reduction(select_frames="fastv")
    assert parse_reduction(select_frames="maxinfo:frames=16").select_frames == MaxInfo(frames=16)
