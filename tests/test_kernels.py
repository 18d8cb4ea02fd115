"""rose_ds's C++ CPU kernels (rose_ds/csrc) and the sampled-bracket selection: against the dense reference
of tests/reference.py, against torch's path, and against torch.quantile."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import tiny_bert
from test_optim import make_rose, rose_step, run_parity
from test_radix import ThreadRanks, distributions, split

from rose_ds import RoseConfig, kernels, radix
from rose_ds.optim import masked_adamw_, sum_of_squares
from rose_ds.selection import ElementScores, element_bands, element_second_order_scores

ROOT = Path(__file__).resolve().parents[1]
COMPILED = kernels.cpu_kernels()
needs_kernels = pytest.mark.skipif(COMPILED is None, reason="rose_ds's C++ kernels are not built here")
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.98, eps=1e-6)


def test_the_kernels_build_wherever_a_compiler_exists():
    if os.environ.get(kernels.ENV) == "0" or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler here (or the kernels are switched off)")
    assert COMPILED is not None


@needs_kernels
@pytest.mark.parametrize(
    "rose",
    [
        dict(mode="none"),
        dict(mode="first", upper=70),
        dict(mode="second", upper=60),
        dict(mode="ensemble", upper=70, gamma=0.5),
        dict(mode="ensemble", upper=80, lower=10, gamma=0.3),
        dict(mode="first", upper=70, granularity="element"),
        dict(mode="second", upper=60, granularity="element", scope="tensor"),
        dict(mode="ensemble", upper=70, granularity="element"),
        dict(mode="ensemble", upper=70, gamma=0.3, granularity="element", scope="tensor"),
    ],
    ids=[
        "none",
        "first",
        "second",
        "ensemble",
        "ensemble-gamma0.3",
        "element-first",
        "element-second-tensor",
        "element-ensemble",
        "element-ensemble-gamma0.3-tensor",
    ],  # fmt: skip
)
@pytest.mark.parametrize("fused", [None, False], ids=["kernel", "torch"])
def test_both_paths_match_the_reference(rose, fused):
    """The default (the C++ kernel: fused=None) and torch's foreach path (fused=False) both equal the dense
    reference of the specification over 7 steps, masks exactly; weight decay on one group, off on the other."""
    masks, _ = run_parity(fused=fused, **rose)
    if rose["mode"] != "none":
        assert any(v < 1 for m in masks for v in m.values())


def _flat_views(sizes, generator, offset=3):
    """Views at odd offsets into one flat buffer per role (what ZeRO's segments are)."""
    total = offset + sum(sizes)
    buffers = [torch.randn(total, generator=generator) for _ in range(3)] + [torch.rand(total, generator=generator)]
    buffers[1].mul_(1e-2)
    buffers[2].mul_(1e-2)
    views, start = [], offset
    for n in sizes:
        views.append([b.narrow(0, start, n) for b in buffers])
        start += n
    return views


@needs_kernels
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_kernel_equals_torch_path_and_keeps_frozen_elements_exactly(weight_decay):
    sizes = [1, 17, 511, 513, 70_001]
    for c_kind in ("scalar", "bool", "float"):
        runs = []
        for fused in (None, False):
            views = _flat_views(sizes, torch.Generator().manual_seed(1))
            for step in range(1, 5):
                params, grads, ms, vs = (list(x) for x in zip(*views))
                for x in grads:
                    x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(step)) * 1e-2)
                if c_kind == "scalar":
                    cs = [1.0, 0.0, 0.5, 0.3, 1.0]
                elif c_kind == "bool":
                    cs = [torch.rand(n, generator=torch.Generator().manual_seed(step)) < 0.6 for n in sizes]
                else:
                    cs = [(torch.rand(n, generator=torch.Generator().manual_seed(step)) * 3).floor() / 2 for n in sizes]
                before = [(p.clone(), m.clone()) for p, m in zip(params, ms)]
                norms = masked_adamw_(params, grads, ms, vs, cs, weight_decay=weight_decay, step=step, fused=fused,
                                      momentum_norms=True, **HYPER)  # fmt: skip
                assert torch.equal(norms, sum_of_squares(ms))  # the pass's norm is sum_of_squares' to the bit
                for c, (p0, m0), p, m in zip(cs, before, params, ms):
                    frozen = (c == 0) if isinstance(c, torch.Tensor) else torch.full_like(p, c == 0, dtype=torch.bool)
                    assert torch.equal(p[frozen], p0[frozen]) and torch.equal(m[frozen], m0[frozen])
            runs.append([t.clone() for v in views for t in v[:1] + v[2:]])
        for a, b in zip(*runs, strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), c_kind


@needs_kernels
def test_results_do_not_depend_on_the_number_of_threads():
    """Fixed chunks by element index, partials added in chunk order: 1 and 2 threads give the same bits."""
    out = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            views = _flat_views([300_007, 131_072], torch.Generator().manual_seed(3))
            params, grads, ms, vs = (list(x) for x in zip(*views))
            mask = torch.rand(131_072, generator=torch.Generator().manual_seed(4)) < 0.5
            norms = masked_adamw_(params, grads, ms, vs, [0.5, mask], weight_decay=0.01, step=3, momentum_norms=True,
                                  **HYPER)  # fmt: skip
            keys = radix.order_keys(ms[0].abs(), nonnegative=True)
            counted = COMPILED.bracket_count([ms[0]], [None], 0.0, [int(keys.median()), 0], [int(keys.max()), 5])
            out.append([*params, *ms, *vs, norms, sum_of_squares(grads), counted[0], *counted[1]])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


@needs_kernels
def test_squared_norms_are_blocked_sums_of_any_size():
    g = torch.Generator().manual_seed(5)
    for n in (0, 1, 15, 16, 17, 511, 512, 513, 65_536, 65_537, 1_000_003):
        x = torch.randn(n, generator=g).mul_(3.0).add_(0.5)
        want = float(x.double().square().sum())
        got = float(sum_of_squares([x])[0])
        assert abs(got - want) <= 1e-7 * max(want, 1e-30)


@needs_kernels
def test_second_order_scores_equal_torch_bit_for_bit():
    g = torch.Generator().manual_seed(6)
    grad, m = torch.randn(100_003, generator=g), torch.randn(100_003, generator=g)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-45, 3e38, 1.0, 10.0])
    grad[: len(special)] = special
    m[: len(special)] = special.flip(0)
    m[20:30] = 0.0
    want = (0.1 * grad / m - 1.0).abs().masked_fill_(m == 0, float("inf"))
    got = element_second_order_scores(grad, m, 0.1)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@needs_kernels
def test_the_step_keeps_each_momentum_norm_and_rereads_a_stale_one():
    """ROSE-Second's ||m_{t-1}||^2 comes from the previous update's pass; it equals a fresh read of the
    momentum to the bit, and a momentum written between steps (or a reload) is read again."""
    model = tiny_bert()
    opt = make_rose(model, mode="second", upper=60)
    params = [dict(model.named_parameters())[n] for n in opt.eligible_names]
    for step in range(5):
        momenta = [opt.state[p]["exp_avg"].clone() if p in opt.state else None for p in params]
        if step == 3:  # an outside write: the kept norm no longer describes the momentum
            opt.state[params[0]]["exp_avg"].mul_(2.0)
            momenta[0] = opt.state[params[0]]["exp_avg"].clone()
        rose_step(model, opt, step)
        if step >= 1:
            assert torch.equal(opt.last_statistics[2], sum_of_squares(momenta)), step
        assert all(entry.step == step + 1 for entry in opt._momentum_norms.values())
    opt.load_state_dict(opt.state_dict())
    assert not opt._momentum_norms  # read again after a load


@needs_kernels
def test_the_kernel_tells_autograd_that_it_wrote():
    p = torch.nn.Parameter(torch.randn(100))
    m, v, g = torch.zeros(100), torch.zeros(100), torch.randn(100)
    versions = p._version, m._version, v._version
    masked_adamw_([p], [g], [m], [v], [1.0], weight_decay=0.0, step=1, **HYPER)
    assert p._version > versions[0] and m._version > versions[1] and v._version > versions[2]


# ---------------------------------------------------------------------- sampled-bracket selection


def _expected(x, qs):
    """torch.quantile with rose_ds's conventions: NaN sorts highest, two infinite neighbours give inf."""
    return radix.quantiles(x, qs)  # property-tested bit for bit against torch.quantile in tests/test_radix.py


def _same(a, b):
    return torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampled_quantiles_equal_the_radix_select_on_every_distribution(world):
    generator = torch.Generator().manual_seed(20 + world)
    for n in (1, 7, 1000, 20_003):
        for name, x in distributions(generator, n):
            for qs in ([0.0, 0.7], [0.3, 0.4, 0.999, 1.0], [0.65, 0.65]):
                shards = split(x, world, generator)
                for sample in (64, 512):
                    got = ThreadRanks(world).run(
                        lambda shard, ar: radix.sampled_quantiles(shard, qs, ar, sample=sample, seed=n), shards
                    )
                    for value in got:
                        assert _same(value, _expected(x, qs)), (name, n, qs, sample)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(
        st.one_of(st.floats(allow_nan=True, width=32), st.sampled_from([0.0, 1.0, 2.5, float("inf")])),
        min_size=1,
        max_size=3000,
    ),  # fmt: skip
    qs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3),
    world=st.integers(1, 3),
    sample=st.sampled_from([64, 128, 1024]),
    z=st.sampled_from([0.0, 1.0, radix.BRACKET_Z]),
    seed=st.integers(0, 2**31),
    nonnegative=st.booleans(),
)
def test_sampled_quantiles_are_exact_for_any_scores(values, qs, world, sample, z, seed, nonnegative):
    """Ties, infinities, NaN, tiny sizes, uneven shards (some empty) and narrow brackets that miss."""
    x = torch.tensor(values, dtype=torch.float32)
    if nonnegative:
        x = x.abs()
    shards = split(x, world, torch.Generator().manual_seed(seed % 1000))
    got = ThreadRanks(world).run(
        lambda shard, ar: radix.sampled_quantiles(shard, qs, ar, nonnegative=nonnegative, sample=sample, seed=seed,
                                                  z=z),
        shards,
    )  # fmt: skip
    want = _expected(x, qs)
    for value in got:
        assert _same(value, want)


def test_narrow_brackets_miss_and_the_full_radix_select_answers():
    """z = 0 brackets hold only the sample's neighbours: most miss, and the full radix select (int64
    histograms, where the bracket's are int32) gives the exact answer."""
    generator = torch.Generator().manual_seed(8)
    misses = 0
    for seed in range(6):
        x = torch.randn(50_000, generator=generator).abs()
        sent = []

        def all_reduce(t, sent=sent):
            sent.append(t.dtype)
            return t

        got = radix.sampled_quantiles(x, [0.0, 0.65], all_reduce, nonnegative=True, sample=1024, seed=seed, z=0.0)
        assert _same(got, _expected(x, [0.0, 0.65]))
        misses += sent.count(torch.int64) > 3  # the counts, the sample size, the brackets' counts: the rest missed
    assert misses > 0


@pytest.mark.parametrize("world", [1, 2, 3])
def test_traffic_is_a_few_kilobytes_whatever_the_number_of_scores(world):
    generator = torch.Generator().manual_seed(9)
    for n in (10_000, 300_000, 3_000_000):
        x = torch.rand(n, generator=generator)
        ranks = ThreadRanks(world)
        ranks.run(
            lambda s, ar: radix.sampled_quantiles(s, [0.0, 0.65], ar, nonnegative=True), split(x, world, generator)
        )
        assert ranks.bytes <= radix.sampled_traffic_bound(2) < 32_776  # under the full radix select's bound


@needs_kernels
@pytest.mark.parametrize("world", [1, 2])
def test_scores_computed_as_read_give_the_band_of_the_scores_in_memory(world):
    """ElementScores (the kernel scores each element in the counting pass) against the same scores
    made in memory, over shards; first- and second-order."""
    generator = torch.Generator().manual_seed(10)
    grads = [torch.randn(n, generator=generator) for n in (40_000, 3, 25_000)]
    momenta = [torch.randn(n, generator=generator) for n in (40_000, 3, 25_000)]
    momenta[0][::50] = 0.0  # infinite scores
    grads[2][::70] = float("nan")

    def cut(tensors, world):
        return [[t.narrow(0, t.numel() * r // world, t.numel() * (r + 1) // world - t.numel() * r // world)
                 for t in tensors] for r in range(world)]  # fmt: skip

    for make in (lambda g, m: ElementScores(grads=g, momenta=m, coef=0.1), lambda g, m: ElementScores(robust=g)):
        parts = list(zip(cut(grads, world), cut(momenta, world)))
        got = ThreadRanks(world).run(lambda gm, ar: radix.sampled_quantiles(make(*gm), [0.0, 0.65], ar, sample=4096),
                                     parts)  # fmt: skip
        whole = make(grads, momenta).scores()
        want = _expected(torch.cat(whole), [0.0, 0.65])
        for value in got:
            assert _same(value, want)


@needs_kernels
def test_element_bands_drive_the_update_as_masks_do():
    """element_bands + the band-driven kernel update equal the masks of element_coefficients applied by
    torch's path (test_both_paths_match_the_reference checks both against the reference)."""
    cfg = RoseConfig(mode="ensemble", upper=65, granularity="element")
    generator = torch.Generator().manual_seed(11)
    g = [torch.randn(5000, generator=generator) for _ in range(2)]
    m = [torch.randn(5000, generator=generator) for _ in range(2)]
    r = [torch.randn(5000, generator=generator) for _ in range(2)]
    bands = element_bands(cfg, 3, r, g, m)
    masks = bands.coefficients(r, g, m)
    assert {float(v) for c in masks for v in c.unique()} == {0.0, 0.5, 1.0}


def test_without_a_compiler_one_warning_line_and_torch_path(tmp_path):
    """No compiler: cpu_kernels() is None after one warning line, and RoseAdamW steps on torch's path;
    ROSE_DS_CPU_KERNELS=0: None without a word."""
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from rose_ds import RoseAdamW, RoseConfig, kernels\n"
        "assert kernels.cpu_kernels() is None and kernels.cpu_kernels() is None\n"
        "p = torch.nn.Parameter(torch.ones(4)); p.grad = torch.ones(4)\n"
        "opt = RoseAdamW([('layer.0.weight', p)], rose=RoseConfig(mode='second', upper=60)); opt.step(); opt.step()\n"
        "assert float(p[0]) < 1.0\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX="/nonexistent/c++")
    env.pop(kernels.ENV, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    lines = [
        line for line in proc.stderr.splitlines() if "rose_ds: the C++ CPU optimizer kernels could not be built" in line
    ]
    assert len(lines) == 1, proc.stderr
    env[kernels.ENV] = "0"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "rose_ds:" not in proc.stderr, proc.stderr
