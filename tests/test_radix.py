"""Exact distributed order statistics (rose_ds.radix) against torch.kthvalue / torch.quantile."""

import threading

import pytest
import torch

from rose_ds import radix


class ThreadRanks:
    """N ranks as threads whose all_reduce really sums every rank's tensor (a barrier per call)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world
        self.local = threading.local()
        self.calls = 0
        self.bytes = 0

    def all_reduce(self, t):
        rank = self.local.rank
        self.slots[rank] = t.clone()
        self.barrier.wait()
        total = torch.stack(self.slots).sum(0)
        if rank == 0:
            self.calls += 1
            self.bytes += t.numel() * t.element_size()
        self.barrier.wait()
        return total

    def run(self, fn, shards):
        out, errors = [None] * self.world, []

        def body(rank):
            self.local.rank = rank
            try:
                out[rank] = fn(shards[rank], self.all_reduce)
            except Exception as err:  # surfaced below
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out


def split(x, world, generator):
    """Uneven shards (some possibly empty), as ZeRO partitions can be."""
    cuts = sorted(torch.randint(0, x.numel() + 1, (world - 1,), generator=generator).tolist())
    bounds = [0, *cuts, x.numel()]
    return [x[a:b] for a, b in zip(bounds, bounds[1:])]


def distributions(generator, n):
    yield "normal", torch.randn(n, generator=generator)
    yield "heavily tied", torch.randint(0, 5, (n,), generator=generator).float() * 0.25
    yield "constant", torch.full((n,), 3.5)
    wide = torch.randn(n, generator=generator) * torch.pow(10.0, torch.randint(-38, 38, (n,), generator=generator))
    yield "wide range", wide
    with_inf = torch.rand(n, generator=generator)
    with_inf[torch.randperm(n, generator=generator)[: n // 7]] = float("inf")
    yield "with inf", with_inf
    yield "zeros of both signs", torch.where(torch.rand(n, generator=generator) < 0.5, -0.0, 0.0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_kth_smallest_is_exact_for_every_distribution(world):
    generator = torch.Generator().manual_seed(world)
    for name, x in distributions(generator, 5003):
        ks = [0, 1, 2500, 4999, 5002, *torch.randint(0, 5003, (6,), generator=generator).tolist()]
        ranks = ThreadRanks(world)
        results = ranks.run(lambda shard, ar: radix.kth_smallest(shard, ks, ar), split(x, world, generator))
        expected = [float(torch.kthvalue(x, k + 1).values) for k in ks]
        for got in results:  # every rank gets the same, exact answer
            assert got == expected, name
        assert ranks.calls == 1 + radix.ROUNDS  # the count, then one all-reduce per byte


@pytest.mark.parametrize("world", [1, 2, 3])
def test_quantiles_equal_torch_quantile_bit_for_bit(world):
    generator = torch.Generator().manual_seed(10 + world)
    qs = [0.0, 0.3, 0.4, 0.7, 0.999, 1.0]
    for n in (1, 2, 7, 1000, 100_003):
        for name, x in distributions(generator, n):
            shards = split(x, world, generator)
            results = ThreadRanks(world).run(lambda shard, ar: radix.quantiles(shard, qs, ar), shards)
            expected = torch.quantile(x, torch.tensor(qs))
            # torch.quantile interpolates two infinite neighbours to NaN (inf - inf); the band needs inf there
            ranks = torch.tensor(qs) * (n - 1)
            both_inf = torch.isinf(x.sort().values[ranks.long()]) & torch.isinf(x.sort().values[ranks.ceil().long()])
            expected = torch.where(both_inf, float("inf"), expected)
            for got in results:
                assert torch.equal(got.nan_to_num(), expected.nan_to_num()), (name, n, got, expected)
                assert torch.equal(got.isnan(), expected.isnan())


def test_more_than_two_to_the_24_elements_on_three_ranks():
    generator = torch.Generator().manual_seed(0)
    n = radix.FLOAT32_RANKS + 1_000_003
    x = torch.randn(n, generator=generator)
    x[::3] = x[1::3][: x[::3].numel()]  # ties as well
    with pytest.raises(RuntimeError):  # what the issue is about: torch.quantile cannot do this
        torch.quantile(x, 0.5)
    qs = [0.0, 0.25, 0.7, 1.0]
    ranks = ThreadRanks(3)
    results = ranks.run(lambda shard, ar: radix.quantiles(shard, qs, ar), split(x, 3, generator))
    sorted_x = x.sort().values
    for q, got in zip(qs, results[0].tolist()):
        rank = q * (n - 1)  # float64: exact here
        lo, hi = sorted_x[int(rank)], sorted_x[int(-(-rank // 1))]
        assert got == float(torch.lerp(lo, hi, torch.tensor(rank - int(rank), dtype=torch.float32)))
    assert all(torch.equal(r, results[0]) for r in results)
    # traffic does not grow with n: the count, then 4 rounds of (targets x 256) int64 counts
    targets = len({int(q * (n - 1)) for q in qs} | {int(-(-q * (n - 1) // 1)) for q in qs})
    assert ranks.calls == 1 + radix.ROUNDS and ranks.bytes == 8 + radix.ROUNDS * targets * radix.BINS * 8


def test_nan_sorts_highest_and_bad_k_is_refused():
    x = torch.tensor([1.0, float("nan"), -2.0, float("-nan"), 0.5])
    low, nan_a, nan_b = radix.kth_smallest(x, [0, 1, 2]), *radix.kth_smallest(x, [3, 4])
    assert low == [-2.0, 0.5, 1.0] and nan_a != nan_a and nan_b != nan_b  # both NaNs (any sign) sort last
    with pytest.raises(IndexError, match="outside"):
        radix.kth_smallest(x, [5])
    assert radix.key_value(int(radix.order_keys(torch.tensor([-3.25]))[0])) == -3.25


def test_a_list_of_tensors_is_taken_together_without_concatenating():
    generator = torch.Generator().manual_seed(5)
    parts = [torch.randn(3, 7, generator=generator), torch.empty(0), torch.randint(0, 3, (11,)).float()]
    flat = torch.cat([p.reshape(-1) for p in parts])
    ks = list(range(flat.numel()))
    assert radix.kth_smallest(parts, ks) == flat.sort().values.tolist()
    assert torch.equal(radix.quantiles(parts, [0.1, 0.5, 0.9]), torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9])))


def test_nonnegative_scores_take_the_zero_copy_path_with_the_same_answer():
    generator = torch.Generator().manual_seed(7)
    for _, x in distributions(generator, 4001):
        scores = x.abs()
        scores[::97] = float("nan")  # abs() of a NaN gradient: a NaN without the sign bit
        scores = scores.abs()
        assert (radix.order_keys(scores, nonnegative=True) >= 0).all()
        for ks in ([0, 17, 2000, 4000],):
            assert radix.kth_smallest(scores, ks, nonnegative=True)[:3] == radix.kth_smallest(scores, ks)[:3]
        finite = scores[~scores.isnan()]
        qs = [0.0, 0.65]
        assert torch.equal(radix.quantiles(finite, qs, nonnegative=True), radix.quantiles(finite, qs))
