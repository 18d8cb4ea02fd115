"""ROSE's two losses against the literal formulas of the specification."""

import pytest
import torch
import torch.nn.functional as F
from models import random_batch, tiny_bert
from reference import reference_losses

from rose_ds import robust_loss, rose_losses


def test_losses_match_the_specification_on_random_logits():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    labels = torch.randint(0, 3, (16,), generator=g)
    expected_task, expected_rob = reference_losses(z1, z2, labels)
    assert torch.allclose(robust_loss(z1, z2), expected_rob, rtol=1e-6)
    # summed over the batch: doubling the batch doubles it
    assert torch.allclose(robust_loss(torch.cat([z1, z1]), torch.cat([z2, z2])), 2 * expected_rob, rtol=1e-6)
    # symmetric, and zero for identical passes
    assert torch.allclose(robust_loss(z1, z2), robust_loss(z2, z1))
    assert robust_loss(z1, z1).abs().item() < 1e-6
    task = 0.5 * F.cross_entropy(z1, labels) + 0.5 * F.cross_entropy(z2, labels)
    assert torch.allclose(task, expected_task, rtol=1e-6)


def test_two_dropout_passes_on_a_real_model():
    model = tiny_bert(dropout=0.1)
    inputs, labels = random_batch(0)
    torch.manual_seed(0)
    losses = rose_losses(model, inputs, labels)
    assert not torch.equal(losses.logits1, losses.logits2)  # dropout differs between the passes
    expected_task, expected_rob = reference_losses(losses.logits1, losses.logits2, labels)
    assert torch.allclose(losses.task, expected_task, rtol=1e-6)
    assert torch.allclose(losses.robust, expected_rob, rtol=1e-6)
    assert losses.robust.item() > 0
    single = rose_losses(model, inputs, labels, two_passes=False)
    assert single.robust is None and single.logits2 is None


def test_the_two_passes_are_one_forward_over_the_stacked_batch():
    """Each half of the stacked forward is an ordinary pass: without dropout both equal a plain
    forward of the batch; the model is called once, on twice the batch."""
    model = tiny_bert(dropout=0.0)
    inputs, labels = random_batch(1)
    shapes = []
    model.register_forward_pre_hook(lambda _m, _a, kw: shapes.append(kw["input_ids"].shape), with_kwargs=True)
    losses = rose_losses(model, inputs, labels)
    plain = model(**inputs).logits
    assert shapes == [(2 * labels.shape[0], *inputs["input_ids"].shape[1:]), tuple(inputs["input_ids"].shape)]
    assert torch.allclose(losses.logits1, plain, atol=1e-5) and torch.allclose(losses.logits2, plain, atol=1e-5)
    assert losses.robust.abs().item() < 1e-6


def test_regression_head_uses_mse():
    model = tiny_bert(dropout=0.1, num_labels=1)
    inputs, _ = random_batch(0)
    targets = torch.linspace(-1, 1, 8)
    torch.manual_seed(0)
    losses = rose_losses(model, inputs, targets)
    z1, z2 = losses.logits1.squeeze(-1), losses.logits2.squeeze(-1)
    assert torch.allclose(losses.task, 0.5 * ((z1 - targets) ** 2).mean() + 0.5 * ((z2 - targets) ** 2).mean())
    assert torch.allclose(losses.robust, ((z1 - z2) ** 2).mean())


def test_eval_mode_is_refused():
    model = tiny_bert().eval()
    inputs, labels = random_batch(0)
    with pytest.raises(ValueError, match="model.train"):
        rose_losses(model, inputs, labels)
