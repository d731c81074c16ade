"""Low-rank algebra against dense references (hypothesis): factored SVD, pad/truncate, FlexLoRA, HetLoRA."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pollinate.strategies.fedopt_math import fedopt_step
from pollinate.strategies.flexlora_math import flexlora_redistribute
from pollinate.strategies.hetlora_math import hetlora_aggregate, self_prune_rank
from pollinate.strategies.lowrank import factored_svd, pad_rank, split_factors, truncate_rank

SETTINGS = settings(max_examples=40, deadline=None)
dims = st.integers(1, 24)
ranks = st.lists(st.integers(1, 8), min_size=1, max_size=5)


def _clients(seed: int, d_out: int, d_in: int, rs: list[int]):
    rng = np.random.default_rng(seed)
    return ([rng.standard_normal((d_out, r)) for r in rs], [rng.standard_normal((r, d_in)) for r in rs],
            list(rng.uniform(0.1, 1.0, size=len(rs))))


@SETTINGS
@given(seed=st.integers(0, 2**31), d_out=dims, d_in=dims, rs=ranks)
def test_factored_svd_equals_the_dense_svd(seed: int, d_out: int, d_in: int, rs: list[int]) -> None:
    bs, as_, w = _clients(seed, d_out, d_in, rs)
    dense = sum(wk * b @ a for wk, b, a in zip(w, bs, as_))
    u, s, vt = factored_svd(bs, as_, w)
    reference = np.linalg.svd(dense, compute_uv=False)
    np.testing.assert_allclose(s[: len(reference)], reference[: len(s)], rtol=1e-6, atol=1e-8 * reference[0])
    np.testing.assert_allclose((u * s) @ vt, dense, atol=1e-8 * max(1.0, np.abs(dense).max()))


@SETTINGS
@given(seed=st.integers(0, 2**31), r=st.integers(1, 8), extra=st.integers(0, 8))
def test_pad_then_truncate_is_the_identity_and_padding_keeps_the_product(seed: int, r: int, extra: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((r, 7)), rng.standard_normal((5, r))
    pa, pb = pad_rank(a, b, r + extra)
    assert not pa[r:].any() and not pb[:, r:].any()  # the padding is exact zeros ...
    # ... so the product is the same up to BLAS summation order (its blocking changes with the rank).
    np.testing.assert_allclose(pb @ pa, b @ a, rtol=1e-12, atol=1e-12)
    ta, tb = truncate_rank(pa, pb, r)
    np.testing.assert_array_equal(ta, a)
    np.testing.assert_array_equal(tb, b)


@SETTINGS
@given(seed=st.integers(0, 2**31), d_out=dims, d_in=dims, rs=ranks, out_rank=st.integers(1, 12))
def test_flexlora_gives_the_dense_truncated_svd(seed: int, d_out: int, d_in: int, rs: list[int], out_rank: int) -> None:
    bs, as_, w = _clients(seed, d_out, d_in, rs)
    scalings = [2.0 / r for r in rs]
    dense = sum(wk * sk * b @ a for wk, sk, b, a in zip(w, scalings, bs, as_))
    [(a, b)] = flexlora_redistribute(bs, as_, w, scalings, [out_rank], [0.5])
    u, s, vt = np.linalg.svd(dense, full_matrices=False)
    k = min(out_rank, len(s))
    best = (u[:, :k] * s[:k]) @ vt[:k]
    assert a.shape == (out_rank, d_in) and b.shape == (d_out, out_rank)
    np.testing.assert_allclose(0.5 * b @ a, best, atol=1e-7 * max(1.0, np.abs(dense).max()))


@SETTINGS
@given(seed=st.integers(0, 2**31), r=st.integers(1, 6), k=st.integers(1, 5))
def test_hetlora_of_identical_clients_returns_the_padded_input(seed: int, r: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((r, 6)), rng.standard_normal((4, r))
    out_a, out_b = hetlora_aggregate([a] * k, [b] * k, list(rng.uniform(0.1, 1, size=k)), r + 2)
    pa, pb = pad_rank(a, b, r + 2)
    np.testing.assert_allclose(out_a, pa, atol=1e-12)
    np.testing.assert_allclose(out_b, pb, atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 2**31), true_rank=st.integers(1, 6), padding=st.integers(0, 4))
def test_self_pruning_finds_the_true_rank(seed: int, true_rank: int, padding: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = pad_rank(rng.standard_normal((true_rank, 9)), rng.standard_normal((8, true_rank)), true_rank + padding)
    assert self_prune_rank(a, b, gamma=0.0) <= true_rank
    u, s, vt = factored_svd([b], [a], [1.0])
    sa, sb = split_factors(u, s, vt, true_rank + padding)  # SVD-ordered: the tail really is zero
    assert self_prune_rank(sa, sb, gamma=1e-9) == true_rank


def test_fedopt_steps_along_the_pseudo_gradient() -> None:
    x, delta = np.zeros(4, np.float32), np.array([1.0, -2.0, 0.5, 0.0], np.float32)
    for variant in ("adam", "yogi"):
        new, m, v = fedopt_step(x, delta, np.zeros(4), np.full(4, 1e-6), 0.1, 0.9, 0.99, 1e-3, variant)
        assert np.array_equal(np.sign(new), np.sign(delta)) and np.all(v >= 0)
