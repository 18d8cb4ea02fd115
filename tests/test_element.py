"""Element-granularity ROSE (dense): RoseAdamW against the element reference of tests/reference.py."""

import pytest
import torch
from models import tiny_bert
from test_optim import make_rose, rose_step, run_parity

from rose_ds import RoseConfig
from rose_ds.config import RoseConfigError
from rose_ds.selection import element_band_masks, element_second_order_scores


@pytest.mark.parametrize("mode", ["first", "second", "ensemble"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_element_granularity_matches_the_reference(mode, scope):
    masks, _ = run_parity(mode=mode, upper=70, granularity="element", scope=scope)
    fractions = [v for m in masks[1:] for v in m.values()]
    # really masking elements: tensors neither all kept nor all frozen
    assert any(0 < v < 1 for v in fractions)
    if scope == "global":  # one band over all eligible elements: tensors differ in how much they keep
        assert max(fractions) - min(fractions) > 0.1
    else:  # a band per tensor keeps about `upper` percent of each tensor
        assert all(abs(v - 0.7) < 0.05 or mode == "ensemble" for v in fractions)


def test_second_order_element_scores_and_the_first_step():
    g = torch.tensor([1.0, 2.0, 0.0, 5.0])
    m = torch.tensor([0.5, 0.0, 1.0, 0.5])
    assert element_second_order_scores(g, m, 0.1).tolist() == pytest.approx([0.8, float("inf"), 1.0, 0.0])
    keep = element_band_masks([element_second_order_scores(g, m, 0.1)], 0, 100)[0]
    assert keep.tolist() == [True, False, True, True]  # an infinite score (m = 0) is never kept
    masks, _ = run_parity(mode="second", upper=50, granularity="element")
    assert set(masks[0].values()) == {1.0}  # no momentum on step 1: every element is updated


def test_frozen_elements_keep_weight_and_momentum_exactly():
    model = tiny_bert()
    opt = make_rose(model, mode="first", upper=50, granularity="element", scope="tensor")
    for step in range(3):
        before = {n: (p.detach().clone(), opt.state[p]["exp_avg"].clone() if p in opt.state else None)
                  for n, p in model.named_parameters()}  # fmt: skip
        rose_step(model, opt, step)
        name = opt.eligible_names[0]
        p = dict(model.named_parameters())[name]
        moved = p.detach() != before[name][0]
        assert 0.3 < moved.float().mean() < 0.7  # about half the elements moved (upper 50)
        if before[name][1] is not None:
            still = ~moved
            assert torch.equal(opt.state[p]["exp_avg"][still], before[name][1][still])


def test_scope_needs_element_granularity():
    with pytest.raises(RoseConfigError, match="scope"):
        RoseConfig(scope="tensor")
    with pytest.raises(RoseConfigError, match="granularity"):
        RoseConfig(granularity="row")
