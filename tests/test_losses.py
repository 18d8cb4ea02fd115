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


def _token_case(seed, batch=3, length=7, hidden=5, vocab=11):
    """Fresh random hidden states of two passes, an output head and labels with a masked prompt and
    right padding (-100), as the causal-LM collator makes them."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * batch, length, hidden, generator=g, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[:, :2] = -100  # the prompt
    labels[0, 5:] = -100  # padding of a shorter sequence
    return h, head, labels


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_token_losses_equal_the_unchunked_formula(seed, chunk):
    """Values and gradients (hidden states and head) equal the formula over the whole logits."""
    from reference import reference_token_losses

    from rose_ds import token_losses

    h, head, labels = _token_case(seed)
    batch = labels.shape[0]
    got = token_losses(h, head, labels, chunk_tokens=chunk)
    grads = torch.autograd.grad(got.task + 3 * got.robust, (h, head.weight))
    z = head(h)
    task, rob = reference_token_losses(z[:batch], z[batch:], labels)
    expected = torch.autograd.grad(task + 3 * rob, (h, head.weight))
    assert got.tokens == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(got.task, task, rtol=1e-5) and torch.allclose(got.robust, rob, rtol=1e-5)
    for a, b in zip(grads, expected, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    one = token_losses(h[:batch], head, labels, two_passes=False, chunk_tokens=chunk)
    plain = F.cross_entropy(z[:batch, :-1].reshape(-1, z.shape[-1]), labels[:, 1:].reshape(-1))
    assert one.robust is None and torch.allclose(one.task, plain, rtol=1e-5)


def test_token_losses_of_identical_passes_and_of_no_supervised_token():
    from rose_ds import token_losses

    h, head, labels = _token_case(5)
    batch = labels.shape[0]
    same = torch.cat([h[:batch], h[:batch]]).detach()
    # zero up to the head's rounding: BLAS may round the second pass's rows (another alignment) apart
    assert abs(token_losses(same, head, labels).robust.item()) < 1e-9
    none = torch.full_like(labels, -100)
    empty = token_losses(h, head, none)
    assert empty.tokens == 0 and empty.task.item() == 0.0 and empty.task.requires_grad
    with pytest.raises(ValueError, match="do not hold 2 pass"):
        token_losses(h[:batch], head, labels)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_causal_lm_losses_of_real_decoders_equal_the_formula_without_whole_logits(family):
    """Two dropout passes of a tiny Llama, Qwen2 or GPT-2: the losses equal the formula over the whole
    logits of the same stacked forward, and the output head never sees more than a chunk of tokens."""
    from models import tiny_decoder
    from reference import reference_token_losses

    from rose_ds import causal_lm_losses

    model = tiny_decoder(family)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 50, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, a, _o: seen.append(a[0].shape[0]))
    torch.manual_seed(1)
    got = causal_lm_losses(model, {"input_ids": ids, "attention_mask": mask}, labels, chunk_tokens=4)
    hook.remove()
    torch.manual_seed(1)
    z = model(input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([mask, mask]), use_cache=False).logits
    task, rob = reference_token_losses(z[:3], z[3:], labels)
    assert max(seen) <= 4 and sum(seen) == 2 * got.tokens
    assert torch.allclose(got.task, task, rtol=1e-5) and torch.allclose(got.robust, rob, rtol=1e-4)
    assert got.robust.item() > 0  # dropout made the passes differ
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the head is back
