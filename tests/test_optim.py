"""RoseAdamW against the dense reference written from the specification (tests/reference.py)."""

import copy

import pytest
import torch
from models import FROZEN, decay_groups, frozen_bert, random_batch, tiny_bert
from reference import ReferenceRose, reference_losses

from rose_ds import RoseAdamW, RoseConfig, rose_losses
from rose_ds.optim import sum_of_squares

LR, BETAS, EPS, WD = 2e-3, (0.9, 0.98), 1e-6, 0.01
STEPS = 7


def make_rose(model, foreach=True, fused=False, **rose):
    decay, no_decay = decay_groups(model)
    params = dict(model.named_parameters())
    groups = [
        {"params": [(n, params[n]) for n in decay], "weight_decay": WD},
        {"params": [(n, params[n]) for n in no_decay], "weight_decay": 0.0},
    ]
    return RoseAdamW(groups, lr=LR, betas=BETAS, eps=EPS, rose=RoseConfig(**rose), foreach=foreach, fused=fused)


def make_reference(model, **rose):
    decay, no_decay = decay_groups(model)
    cfg = RoseConfig(**rose)
    return ReferenceRose(
        model,
        [(decay, LR, WD), (no_decay, LR, 0.0)],
        mode=cfg.mode,
        upper=cfg.upper,
        lower=cfg.lower,
        gamma=cfg.gamma,
        coef=cfg.second_order_coef,
        warmup=cfg.warmup_steps,
        betas=BETAS,
        eps=EPS,
        granularity=cfg.granularity,
        scope=cfg.scope,
    )


def rose_step(model, opt, step, clip=None):
    inputs, labels = random_batch(step)
    torch.manual_seed(500 + step)  # same dropout masks in both runs
    losses = rose_losses(model, inputs, labels)
    losses.robust.backward(retain_graph=True)
    opt.capture_robust_grads()
    opt.zero_grad()
    losses.task.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad()


def reference_step(model, ref, step, clip=None):
    inputs, labels = random_batch(step)
    torch.manual_seed(500 + step)
    # the two dropout passes as one forward over the batch stacked twice (what rose_losses does,
    # so that both runs draw the same dropout masks)
    z = model(**{k: torch.cat([v, v]) for k, v in inputs.items()}).logits
    z1, z2 = z.chunk(2)
    l_task, l_rob = reference_losses(z1, z2, labels)
    l_rob.backward(retain_graph=True)
    rob = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    l_task.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    ref.step(rob)
    model.zero_grad(set_to_none=True)


def relative_error(a, b):
    return ((a - b).double().norm() / b.double().norm().clamp_min(1e-30)).item()


def flat_parameters(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_parameters_close(model, ref_model):
    """All parameters within relative 1e-6 of the reference (as one vector), and every tensor within
    1e-5 of its own norm (zero-initialised biases with near-zero gradients are the loosest: Adam turns
    rounding noise in a tiny gradient into an lr-sized step)."""
    whole = relative_error(flat_parameters(model), flat_parameters(ref_model))
    assert whole <= 1e-6, f"parameters differ from the reference by {whole:.2e} (relative)"
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert relative_error(p, q) <= 1e-5, f"{name} differs from the reference by {relative_error(p, q):.2e}"


def run_parity(clip=None, fused=False, **rose):
    model = tiny_bert()
    ref_model = copy.deepcopy(model)
    opt = make_rose(model, fused=fused, **rose)
    ref = make_reference(ref_model, **rose)
    masks = []
    for step in range(STEPS):
        rose_step(model, opt, step, clip)
        reference_step(ref_model, ref, step, clip)
        assert opt.last_mask == ref.last_mask, f"step {step + 1}: masks differ"
        masks.append(dict(opt.last_mask))
    assert_parameters_close(model, ref_model)
    return masks, model


@pytest.mark.parametrize(
    "rose",
    [
        dict(mode="none"),
        dict(mode="first", upper=70),
        dict(mode="second", upper=60),
        dict(mode="ensemble", upper=70, gamma=0.5),
        dict(mode="ensemble", upper=80, lower=10, gamma=0.3),
        dict(mode="second", upper=50, second_order_coef=0.2),
    ],
    ids=["none", "first", "second", "ensemble", "ensemble-band-gamma0.3", "second-coef0.2"],
)
def test_matches_reference(rose):
    masks, _ = run_parity(**rose)
    values = {c for m in masks for c in m.values()}
    if rose["mode"] == "none":
        assert values == {1.0}
        return
    # The test is only meaningful when tensors really are frozen.
    assert 0.0 in values or (rose["mode"] == "ensemble" and any(v < 1 for v in values))
    if rose["mode"] == "ensemble" and rose["gamma"] == 0.5:
        assert 0.5 in values
    if rose["mode"] in ("second", "ensemble"):
        # no momentum before step 1: the second-order part keeps every tensor then
        floor = 1.0 - rose.get("gamma", 0.5) if rose["mode"] == "ensemble" else 1.0
        assert min(masks[0].values()) == pytest.approx(floor)


def test_matches_reference_with_clipping_and_warmup():
    masks, _ = run_parity(clip=0.5, mode="ensemble", upper=70, warmup_steps=2)
    assert set(masks[0].values()) == {1.0} and set(masks[1].values()) == {1.0}
    assert any(v < 1 for v in masks[2].values())


def test_published_band_size():
    masks, _ = run_parity(mode="first", upper=70)
    n = len(masks[0])
    assert n == 16  # 8 eligible tensors per BERT layer, 2 layers
    # quantile(0.7) over 16 distinct scores lies between the 11th and 12th smallest: 11 kept
    assert all(sum(m.values()) == 11 for m in masks)


def test_foreach_and_per_tensor_paths_are_bit_identical():
    results = []
    for foreach in (True, False):
        model = tiny_bert()
        opt = make_rose(model, foreach=foreach, mode="ensemble", upper=70)
        for step in range(4):
            rose_step(model, opt, step)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_all_kept_band_is_bit_identical_to_plain_adamw_mode():
    results = []
    for rose in (dict(mode="none"), dict(mode="first", upper=100)):
        model = tiny_bert()
        opt = make_rose(model, **rose)
        for step in range(3):
            rose_step(model, opt, step)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_frozen_tensor_keeps_weight_and_momentum_but_v_and_step_move():
    model = tiny_bert()
    opt = make_rose(model, mode="second", upper=50)  # step 1 updates all, so every momentum is non-zero
    rose_step(model, opt, 0)
    before = {
        n: (p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    rose_step(model, opt, 1)
    frozen = [n for n, c in opt.last_mask.items() if c == 0]
    assert len(frozen) == 8
    params = dict(model.named_parameters())
    for n in frozen:
        p = params[n]
        w, m, v = before[n]
        assert torch.equal(p, w) and torch.equal(opt.state[p]["exp_avg"], m)
        assert not torch.equal(opt.state[p]["exp_avg_sq"], v)
        assert int(opt.state[p]["step"]) == 2


def _accumulation_run(micro_batches):
    """Dropout off and a sample-additive stand-in robust loss, so N micro-batches equal one batch."""
    model = tiny_bert(dropout=0.0)
    opt = make_rose(model, mode="ensemble", upper=70)
    for step in range(4):
        inputs, labels = random_batch(step, batch_size=12)
        chunks = zip(*(torch.chunk(v, micro_batches) for v in (*inputs.values(), labels)), strict=True)
        for ids, mask, y in chunks:
            losses = rose_losses(model, {"input_ids": ids, "attention_mask": mask}, y)
            z1, z2 = losses.logits1, losses.logits2
            stand_in = ((z1 - 0.1 - 0.3 * z2) ** 2).sum()  # KL is 0 without dropout
            opt.capture_robust_grads(stand_in)
            (losses.task / micro_batches).backward()
        opt.step()
        opt.zero_grad()
        yield dict(opt.last_mask), [p.detach().clone() for p in model.parameters()]


def test_gradient_accumulation_equals_one_large_batch():
    for (mask3, params3), (mask1, params1) in zip(_accumulation_run(3), _accumulation_run(1), strict=True):
        assert mask3 == mask1
        assert any(v < 1 for v in mask3.values())
        for a, b in zip(params3, params1, strict=True):
            assert relative_error(a, b) <= 1e-6


def test_grad_form_refuses_accumulation():
    model = tiny_bert()
    opt = make_rose(model, mode="first")
    inputs, labels = random_batch(0)
    for _ in range(2):
        losses = rose_losses(model, inputs, labels)
        losses.robust.backward(retain_graph=True)
        if _ == 0:
            opt.capture_robust_grads()
        else:
            with pytest.raises(RuntimeError, match="capture_robust_grads\\(loss_rob\\)"):
                opt.capture_robust_grads()


def test_missing_robust_gradient_is_an_error():
    model = tiny_bert()
    opt = make_rose(model, mode="ensemble")
    inputs, labels = random_batch(0)
    rose_losses(model, inputs, labels).task.backward()
    with pytest.raises(RuntimeError, match="no robust gradient was captured"):
        opt.step()


def test_second_mode_needs_no_robust_gradient():
    model = tiny_bert()
    opt = make_rose(model, mode="second", upper=50)
    for step in range(3):
        inputs, labels = random_batch(step)
        rose_losses(model, inputs, labels, two_passes=False).task.backward()
        opt.step()
        opt.zero_grad()
    assert 0.0 in opt.last_mask.values()


def test_requires_named_parameters():
    model = tiny_bert()
    with pytest.raises(TypeError, match="named_parameters"):
        RoseAdamW(model.parameters())
    groups = [{"params": list(model.parameters()), "param_names": [n for n, _ in model.named_parameters()]}]
    assert len(RoseAdamW(groups).eligible_names) == 16


def test_invalid_hyper_parameters():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"betas\[1\]=1.0"):
        RoseAdamW(model.named_parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr=-1"):
        RoseAdamW(model.named_parameters(), lr=-1)


def test_state_dict_round_trip_keeps_mask_and_continues_identically():
    model = tiny_bert()
    opt = make_rose(model, mode="ensemble", upper=70)
    for step in range(2):
        rose_step(model, opt, step)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["rose"]["last_mask"] == opt.last_mask
    rose_step(model, opt, 2)
    expected = [p.detach().clone() for p in model.parameters()]

    model2 = tiny_bert(seed=7)
    model2.load_state_dict(saved_model)
    opt2 = make_rose(model2, mode="ensemble", upper=70)
    opt2.load_state_dict(saved_opt)
    assert opt2.last_mask == saved_opt["rose"]["last_mask"]
    rose_step(model2, opt2, 2)
    for a, b in zip(model2.parameters(), expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["none", "first", "second", "ensemble"])
def test_fused_kernel_matches_reference(mode):
    masks, _ = run_parity(fused=True, mode=mode, upper=70)
    assert ({v for m in masks for v in m.values()} == {1.0}) == (mode == "none")


@pytest.mark.parametrize(
    "rose",
    [
        dict(mode="second", upper=60, warmup_steps=2),
        dict(mode="ensemble", upper=70),
        dict(mode="first", upper=70),
        dict(mode="second", upper=60, granularity="element"),
    ],
    ids=["second-warmup2", "ensemble", "first", "element-second"],
)
def test_frozen_parameters_are_out_of_selection_state_and_step_count(rose):
    """RoseAdamW(model.named_parameters()) with frozen tensors (the first parameter among them, whose state
    once gave the step count, so every step ran as t = 1) equals the reference over the trainable ones."""
    model = frozen_bert()
    ref_model = copy.deepcopy(model)
    opt = RoseAdamW(model.named_parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, rose=RoseConfig(**rose))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    cfg = RoseConfig(**rose)
    ref = ReferenceRose(ref_model, [(trainable, LR, WD)], mode=cfg.mode, upper=cfg.upper, warmup=cfg.warmup_steps,
                        betas=BETAS, eps=EPS, granularity=cfg.granularity)  # fmt: skip
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    masks = []
    for step in range(STEPS):
        rose_step(model, opt, step)
        reference_step(ref_model, ref, step)
        assert opt.last_mask == ref.last_mask, f"step {step + 1}: masks differ"
        masks.append(opt.last_mask)
    assert_parameters_close(model, ref_model)
    assert len(opt.eligible_names) == 14 and not set(FROZEN) & set(opt.eligible_names)
    params = dict(model.named_parameters())
    for name, before in frozen.items():
        assert params[name] not in opt.state and torch.equal(params[name], before)
    assert {int(opt.state[params[n]]["step"]) for n in trainable} == {STEPS}
    if cfg.mode == "second":  # masking starts once warm-up and step 1 are over, then freezes tensors
        first_masked = max(cfg.warmup_steps, 1)
        assert all(min(m.values()) == 1.0 for m in masks[:first_masked])
        assert all(min(m.values()) < 1.0 for m in masks[first_masked:])


def test_step_count_survives_a_state_dict_round_trip_with_frozen_parameters():
    model = frozen_bert()
    opt = RoseAdamW(model.named_parameters(), lr=LR, rose=RoseConfig(mode="second", upper=60))
    for step in range(3):
        rose_step(model, opt, step)
    again = RoseAdamW(model.named_parameters(), lr=LR, rose=RoseConfig(mode="second", upper=60))
    again.load_state_dict(opt.state_dict())
    assert again._global_step() == 3


def test_squared_norms_stay_exact_at_hundreds_of_millions_of_elements():
    """One fp32 accumulation over a whole tensor is off by ~3e-3 at 1e8 elements, enough to decide masks
    near the threshold; sum_of_squares stays within 2e-7 at 2e8 elements (measured 4e-10 for fp32 data,
    6e-8 for fp32 data of bf16 precision, where fp32 rounding of the sums is biased, and for bf16)."""
    n = 200_000_000
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).mul_(0.01).add_(0.003)
    for data in (x, x.bfloat16().float(), x.bfloat16()):
        want = sum(float(c.double().square().sum()) for c in data.split(1 << 24))
        got = float(sum_of_squares([data, data[:1000]])[0])
        assert abs(got - want) / want < 2e-7
        if data is x:  # data hard enough that one fp32 accumulation fails
            assert abs(float(x.dot(x)) - want) / want > 1e-5
