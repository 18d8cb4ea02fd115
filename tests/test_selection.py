"""Pure selection functions: scores, the quantile band (property-tested against torch.quantile)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rose_ds.config import RoseConfig
from rose_ds.selection import (
    band_mask,
    first_order_scores,
    mask_coefficients,
    quantiles,
    second_order_scores,
)

# Scores drawn from a small pool so ties are common, mixed with arbitrary finite values.
tied = st.sampled_from([0.0, 0.25, 1.0, 1.0, 3.5, 1e-12, 7e5])
finite = st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False)
score_vectors = st.lists(st.one_of(tied, finite), min_size=1, max_size=200)
percent = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(score_vectors, st.lists(percent, min_size=1, max_size=4))
def test_quantiles_equal_torch_quantile_bitwise(values, qs):
    scores = torch.tensor(values, dtype=torch.float64)
    levels = [q / 100.0 for q in qs]
    expected = torch.quantile(scores, torch.tensor(levels, dtype=torch.float64))
    assert torch.equal(quantiles(scores, levels), expected)


@settings(max_examples=300, deadline=None)
@given(score_vectors, percent, percent)
def test_band_is_inclusive_between_torch_quantiles(values, a, b):
    lower, upper = min(a, b), max(a, b)
    scores = torch.tensor(values, dtype=torch.float64)
    lo, hi = torch.quantile(scores, torch.tensor([lower / 100, upper / 100], dtype=torch.float64)).tolist()
    expected = [lo <= v <= hi for v in values]
    assert band_mask(scores, lower, upper).tolist() == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(finite, min_size=1, max_size=50), st.integers(min_value=0, max_value=5))
def test_infinite_and_nan_scores_are_frozen_and_sort_last(values, n_inf):
    scores = torch.tensor(values + [math.inf] * n_inf + [math.nan], dtype=torch.float64)
    keep = band_mask(scores, 0.0, 100.0)
    assert keep[: len(values)].all() and not keep[len(values) :].any()


def test_band_examples():
    # The specification's example: 96 distinct scores, upper = 70 keeps 67.
    scores = torch.randperm(96).to(torch.float64)
    assert int(band_mask(scores, 0, 70).sum()) == 67
    # all tied: the band is the single value, every tensor kept
    assert band_mask(torch.full((10,), 2.0, dtype=torch.float64), 0, 30).all()
    # a lower bound drops the smallest scores
    assert band_mask(torch.arange(11.0), 10, 100).tolist() == [False] + [True] * 10


def test_scores_from_squared_norms():
    assert first_order_scores(torch.tensor([9.0, 0.0])).tolist() == [3.0, 0.0]
    r2 = second_order_scores(torch.tensor([400.0, 4.0, 1.0]), torch.tensor([4.0, 1.0, 0.0]), 0.1)
    # |0.1 * 20 / 2 - 1| = 0, |0.1 * 2 / 1 - 1| = 0.8, zero momentum -> inf
    assert r2[0].item() == pytest.approx(0.0, abs=1e-15)
    assert r2[1].item() == pytest.approx(0.8)
    assert math.isinf(r2[2].item())
    assert second_order_scores(torch.tensor([0.0]), torch.tensor([0.0]))[0].item() == math.inf


def test_mask_coefficients_modes():
    n = 10
    rob = torch.arange(n, dtype=torch.float64) ** 2  # first-order scores 0..9: low index = robust
    grad = torch.full((n,), 100.0, dtype=torch.float64)
    mom = (n - torch.arange(n, dtype=torch.float64)) ** 2  # second-order 1 - 1/(10 - i): high index = robust
    kw = dict(robust_sq_norms=rob, grad_sq_norms=grad, momentum_sq_norms=mom)
    first = mask_coefficients(RoseConfig(mode="first", upper=70), 5, n, **kw)
    assert first.tolist() == [1.0] * 7 + [0.0] * 3
    second = mask_coefficients(RoseConfig(mode="second", upper=70), 5, n, **kw)
    assert second.tolist() == [0.0] * 3 + [1.0] * 7
    ens = mask_coefficients(RoseConfig(mode="ensemble", upper=70, gamma=0.5), 5, n, **kw)
    assert ens.tolist() == [0.5] * 3 + [1.0] * 4 + [0.5] * 3
    ens = mask_coefficients(RoseConfig(mode="ensemble", upper=20, gamma=0.25), 5, n, **kw)
    assert ens.tolist() == [0.25] * 2 + [0.0] * 6 + [0.75] * 2
    # step 1: no momentum, the second-order part keeps everything
    assert mask_coefficients(RoseConfig(mode="second", upper=50), 1, n).tolist() == [1.0] * n
    # warm-up and mode none keep everything
    assert mask_coefficients(RoseConfig(mode="first", upper=50, warmup_steps=3), 3, n, **kw).tolist() == [1.0] * n
    assert mask_coefficients(RoseConfig(mode="none"), 9, n).tolist() == [1.0] * n
