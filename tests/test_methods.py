"""R-Drop, R3F and ChildTuning-F (rose_ds/methods.py) against the dense reference written from
docs/algorithm.md, on fresh random inputs over several steps. The sharded runs (ZeRO 0-3) are compared
with the dense RoseAdamW in tests/test_zero.py (test_methods_composed_with_rose_match_dense)."""

import pytest
import torch
from models import random_batch, tiny_bert
from reference import ReferenceRose, reference_losses, reference_r3f, reference_rdrop

from rose_ds import RoseAdamW, RoseConfig, methods
from rose_ds.methods import MethodConfig, MethodConfigError, childtuning_f_, childtuning_f_keep, tensor_key
from rose_ds.zero import decay_param_groups


def _stacked(inputs, times):
    return {k: torch.cat([v] * times) for k, v in inputs.items()}


@pytest.mark.parametrize("robust", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rdrop_loss_is_the_reference(robust, seed):
    model = tiny_bert(dropout=0.1, seed=seed)
    inputs, labels = random_batch(seed)
    cfg = MethodConfig(name="rdrop", rdrop_alpha=0.7)
    torch.manual_seed(seed)
    got = methods.method_losses(model, inputs, labels, cfg, robust=robust)
    torch.manual_seed(seed)
    z = model(**_stacked(inputs, 2)).logits
    z1, z2 = z[:8], z[8:]
    task, l_rob = reference_losses(z1, z2, labels)
    torch.testing.assert_close(got.task, task + 0.7 * reference_rdrop(z1, z2), rtol=1e-6, atol=1e-7)
    assert (got.robust is None) == (not robust)
    if robust:
        torch.testing.assert_close(got.robust, l_rob, rtol=1e-6, atol=1e-7)
    assert reference_rdrop(z1, z2) > 0  # dropout made the passes differ: the term is real


@pytest.mark.parametrize("robust", [True, False])
@pytest.mark.parametrize("noise", ["uniform", "normal"])
def test_r3f_loss_is_the_reference(robust, noise):
    model = tiny_bert(dropout=0.1, seed=3)
    inputs, labels = random_batch(5)
    cfg = MethodConfig(name="r3f", r3f_lambda=2.0, r3f_eps=0.1, r3f_noise=noise)
    torch.manual_seed(7)
    got = methods.method_losses(model, inputs, labels, cfg, robust=robust)
    torch.manual_seed(7)  # the reference draws in the same order: the noise, then the dropout masks
    emb = model.get_input_embeddings()(inputs["input_ids"])
    eps = 0.1
    noise_t = torch.empty_like(emb).uniform_(-eps, eps) if noise == "uniform" else torch.empty_like(emb).normal_(0, eps)
    clean = 2 if robust else 1
    z = model(inputs_embeds=torch.cat([emb] * clean + [emb + noise_t]),
              attention_mask=torch.cat([inputs["attention_mask"]] * (clean + 1))).logits  # fmt: skip
    passes = [z[i * 8 : (i + 1) * 8] for i in range(clean + 1)]
    ce = [torch.nn.functional.cross_entropy(p, labels) for p in passes[:clean]]
    want = sum(ce) / clean + 2.0 * reference_r3f(passes[0], passes[-1])
    torch.testing.assert_close(got.task, want, rtol=1e-6, atol=1e-7)
    if robust:
        torch.testing.assert_close(got.robust, reference_losses(passes[0], passes[1], labels)[1], rtol=1e-6, atol=1e-7)
    assert reference_r3f(passes[0], passes[-1]) > 0


def test_childtuning_f_mask_is_layout_free_and_bernoulli():
    key = tensor_key("bert.encoder.layer.0.attention.self.query.weight", seed=3, step=5)
    whole = childtuning_f_keep(key, 0, 100_003, 0.3)
    pieces = torch.cat([childtuning_f_keep(key, a, b - a, 0.3) for a, b in [(0, 7), (7, 50_000), (50_000, 100_003)]])
    assert torch.equal(whole, pieces)  # any shard computes its own slice of the same mask
    assert abs(whole.float().mean().item() - 0.3) < 0.01
    others = [tensor_key("bert.encoder.layer.0.attention.self.query.weight", 3, 6),
              tensor_key("bert.encoder.layer.0.attention.self.key.weight", 3, 5),
              tensor_key("bert.encoder.layer.0.attention.self.query.weight", 4, 5)]  # fmt: skip
    for other in others:  # another step, tensor or seed: another, uncorrelated mask
        agree = (childtuning_f_keep(other, 0, 100_003, 0.3) == whole).float().mean().item()
        assert abs(agree - (0.3**2 + 0.7**2)) < 0.01
    assert childtuning_f_keep(key, 0, 1000, 1.0).all()
    g = torch.randn(2_000_000)
    kept = childtuning_f_keep(key, 10, g.numel(), 0.25)
    want = torch.where(kept, g * (1 / 0.25), torch.zeros(()))
    assert torch.equal(childtuning_f_(g.clone(), key, 10, 0.25), want)  # chunked in-place == one-shot


@pytest.mark.parametrize("mode", ["none", "second", "ensemble"])
def test_childtuning_f_optimizer_matches_reference(mode):
    """RoseAdamW(method=childtuning-f) equals the reference fed the masked, rescaled gradient."""
    p_keep, seed, steps = 0.4, 11, 4
    model = tiny_bert(dropout=0.0, seed=1)
    ref_model = tiny_bert(dropout=0.0, seed=1)
    rose = RoseConfig(mode=mode, upper=70)
    method = MethodConfig(name="childtuning-f", childtuning_p=p_keep, seed=seed)
    opt = RoseAdamW(decay_param_groups(model, 0.01), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
                    rose=rose, method=method)  # fmt: skip
    groups = [([n for n, _ in g["params"]], 1e-3, g["weight_decay"]) for g in decay_param_groups(ref_model, 0.01)]
    ref = ReferenceRose(ref_model, groups, mode=mode, upper=70, betas=(0.9, 0.98), eps=1e-6)
    for step in range(steps):
        inputs, labels = random_batch(step)
        for m in (model, ref_model):
            z1, z2 = m(**inputs).logits, m(**inputs).logits
            task, l_rob = reference_losses(z1, z2, labels)
            if m is model and mode == "ensemble":
                opt.capture_robust_grads(l_rob)
            if m is ref_model and mode == "ensemble":
                trainable = [(n, p) for n, p in ref_model.named_parameters() if p.requires_grad]
                grads = torch.autograd.grad(l_rob, [p for _, p in trainable], retain_graph=True, allow_unused=True)
                robust = {n: g for (n, _), g in zip(trainable, grads)}
            task.backward()
        for name, p in ref_model.named_parameters():
            if p.grad is not None:
                keep = childtuning_f_keep(tensor_key(name, seed, step + 1), 0, p.numel(), p_keep).view_as(p)
                p.grad = torch.where(keep, p.grad * (1 / p_keep), torch.zeros(()))
        opt.step()
        ref.step(robust if mode == "ensemble" else None)
        model.zero_grad()
        ref_model.zero_grad()
        assert opt.last_mask == pytest.approx(ref.last_mask), f"step {step + 1}"
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize("name", ["rdrop", "r3f", "childtuning-f"])
def test_each_method_changes_training(name):
    """The method is not a no-op: two steps with it end elsewhere than two steps of plain ROSE."""
    ends = []
    for method in (MethodConfig(), MethodConfig(name=name, r3f_eps=0.1)):
        model = tiny_bert(dropout=0.1, seed=2)
        opt = RoseAdamW(model.named_parameters(), lr=1e-3, rose=RoseConfig(mode="ensemble", upper=70), method=method)
        torch.manual_seed(0)
        for step in range(2):
            inputs, labels = random_batch(step)
            losses = methods.loss_fn(method)(model, inputs, labels, two_passes=True)
            opt.capture_robust_grads(losses.robust)
            losses.task.backward()
            opt.step()
            opt.zero_grad()
        ends.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert not torch.equal(ends[0], ends[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "fgsm"}, "MethodConfig.name='fgsm' is invalid: expected one of none, rdrop, r3f, childtuning-f"),
        ({"rdrop_alpha": 0}, "MethodConfig.rdrop_alpha=0 is invalid"),
        ({"r3f_eps": float("nan")}, "MethodConfig.r3f_eps=nan is invalid"),
        ({"r3f_noise": "gumbel"}, "MethodConfig.r3f_noise='gumbel' is invalid"),
        ({"childtuning_p": 1.5}, "MethodConfig.childtuning_p=1.5 is invalid: expected a fraction in (0, 1]"),
        ({"seed": 1.5}, "MethodConfig.seed=1.5 is invalid"),
    ],
)
def test_bad_method_values_are_one_line(kwargs, message):
    with pytest.raises(MethodConfigError) as err:
        MethodConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_childtuning_d_keeps_the_top_p_by_fisher_as_the_reference():
    """The mask is the top p of all eligible elements' Fisher values (torch.quantile on the
    concatenation), whatever way the elements are split into pieces; the optimizer zeroes the rest."""
    torch.manual_seed(0)
    fisher = [torch.rand(37, 5) ** 3, torch.rand(1000), torch.zeros(12), torch.rand(64, 64)]
    fisher[1][:100] = fisher[1][100]  # ties at many values
    masks, threshold = methods.childtuning_d_masks(fisher, 0.3)
    flat = torch.cat([f.reshape(-1) for f in fisher])
    want = torch.quantile(flat, 0.7)
    assert threshold == pytest.approx(float(want), rel=0, abs=0)
    assert torch.equal(torch.cat([m.reshape(-1) for m in masks]), flat >= want)
    assert abs(torch.cat([m.reshape(-1) for m in masks]).float().mean().item() - 0.3) < 0.01
    pieces = [p for f in fisher for p in f.reshape(-1).split(50)]  # another layout: the same elements kept
    assert torch.equal(torch.cat(methods.childtuning_d_masks(pieces, 0.3)[0]), flat >= want)
    assert all(m.all() for m in methods.childtuning_d_masks(fisher, 1.0)[0])


def test_childtuning_d_optimizer_zeroes_the_masked_gradient():
    model = tiny_bert(dropout=0.0, seed=4)
    reference = tiny_bert(dropout=0.0, seed=4)
    method = MethodConfig(name="childtuning-d", childtuning_p=0.25)
    opt = RoseAdamW(model.named_parameters(), lr=1e-3, rose=RoseConfig(mode="none"), method=method)
    params = dict(model.named_parameters())
    fisher = [torch.rand_like(params[n]) for n in opt.eligible_names]
    opt.set_childtuning_d_fisher(fisher)
    masks, _ = methods.childtuning_d_masks(fisher, 0.25)
    inputs, labels = random_batch(0)
    torch.nn.functional.cross_entropy(model(**inputs).logits, labels).backward()
    torch.nn.functional.cross_entropy(reference(**inputs).logits, labels).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, mask in zip(opt.eligible_names, masks):
        assert torch.equal(params[n].grad, torch.where(mask, dict(reference.named_parameters())[n].grad, 0.0))
        moved = params[n].detach() != before[n]
        assert not (moved & ~mask).any()  # frozen elements: no Adam step (weight decay 0 here)
        assert moved[mask].float().mean() > 0.9
    assert opt.state[params[opt.eligible_names[0]]]["child_mask"].dtype == torch.bool
    assert "child_mask" in opt.state_dict()["state"][0]  # the mask travels with checkpoints
    with pytest.raises(ValueError, match="not 'childtuning-d'"):
        RoseAdamW(model.named_parameters(), lr=1e-3).set_childtuning_d_fisher(fisher)
