"""Loss-landscape analysis on a tiny real BERT classifier: filter normalisation, exact restore, losses
against hand-written references, sharpness, and the figure."""

import copy
import json
import statistics

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from rose_ds.analysis import (
    landscape,
    mean_loss,
    perturbed,
    plot_landscapes,
    random_direction,
    sharpness,
    surface_1d,
    surface_2d,
)

VOCAB = 100


def _tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg)


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    batches = []
    # Unequal batch sizes, so a mean over batches differs from the mean over examples.
    for size in (5, 3, 8):
        ids = torch.randint(1, VOCAB, (size, 10), generator=g)
        lengths = torch.randint(4, 11, (size, 1), generator=g)
        mask = (torch.arange(10) < lengths).long()
        batches.append(
            {
                "input_ids": ids * mask,
                "attention_mask": mask,
                "labels": torch.randint(0, 2, (size,), generator=g),
            }
        )
    return batches


@pytest.fixture(scope="module")
def trained():
    """A model fine-tuned on the batches for a few epochs: a loss well below chance, but not yet memorised
    to ~0, where every surface would be flat and the comparisons below meaningless."""
    model = _tiny_bert()
    batches = _batches()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(10):
        for batch in batches:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    return model


@pytest.fixture
def model(trained):
    return copy.deepcopy(trained)


@pytest.fixture
def batches():
    return _batches()


def _loss_at(model, batches, directions, coefficients) -> float:
    """mean_loss at w + sum_i c_i d_i, built by hand into a copy of the model."""
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for j, (p_new, p) in enumerate(zip(shifted.parameters(), model.parameters())):
            p_new.copy_(p + sum(c * d[j] for c, d in zip(coefficients, directions)))
    return mean_loss(shifted, batches)


def test_filter_normalisation_matches_weight_rows(model):
    direction = random_direction(model, torch.Generator().manual_seed(0))
    params = list(model.parameters())
    assert len(direction) == len(params)
    assert any(p.shape[0] == VOCAB and p.ndim == 2 for p in params), "the embedding matrix is covered"
    for p, d in zip(params, direction):
        assert d.shape == p.shape and d.dtype == p.dtype and d.device == p.device
        if p.ndim <= 1:
            assert not d.any()
            continue
        rows_w = p.detach().flatten(1).norm(dim=1)
        rows_d = d.flatten(1).norm(dim=1)
        torch.testing.assert_close(rows_d, rows_w, rtol=1e-5, atol=0)
        # Same norms, but a random direction and not a rescaled copy of the weights.
        cos = F.cosine_similarity(d.flatten(), p.detach().flatten(), dim=0)
        assert abs(cos.item()) < 0.5


def test_direction_is_reproducible_and_layer_normalisation(model):
    a = random_direction(model, torch.Generator().manual_seed(7))
    b = random_direction(model, torch.Generator().manual_seed(7))
    c = random_direction(model, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))

    whole = random_direction(model, torch.Generator().manual_seed(7), filter_normalize=False)
    for p, d in zip(model.parameters(), whole):
        if p.ndim <= 1:
            assert not d.any()
        else:
            torch.testing.assert_close(d.norm(), p.detach().norm(), rtol=1e-5, atol=0)
    # Only the whole tensor is normalised now, so individual rows no longer match.
    emb = model.bert.embeddings.word_embeddings.weight
    idx = [i for i, p in enumerate(model.parameters()) if p is emb][0]
    assert not torch.allclose(whole[idx].norm(dim=1), emb.detach().norm(dim=1), rtol=1e-3)


def test_perturbed_moves_the_weights_and_restores_them_bit_exactly(model, batches):
    before = [p.detach().clone() for p in model.parameters()]
    d1 = random_direction(model, torch.Generator().manual_seed(1))
    d2 = random_direction(model, torch.Generator().manual_seed(2))
    base = mean_loss(model, batches)

    with perturbed(model, [d1, d2], [0.7, -0.3]) as inside:
        assert inside is model
        for p, w, a, b in zip(model.parameters(), before, d1, d2):
            torch.testing.assert_close(p.detach(), w + 0.7 * a - 0.3 * b)
        moved = mean_loss(model, batches)
    assert abs(moved - base) > 1e-3
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))
    assert mean_loss(model, batches) == base

    with pytest.raises(RuntimeError, match="boom"), perturbed(model, [d1], [0.5]):
        raise RuntimeError("boom")
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))

    with pytest.raises(ValueError):
        with perturbed(model, [d1, d2], [0.5]):
            pass


def test_mean_loss_is_the_per_example_cross_entropy(model, batches):
    model.eval()
    losses = []
    with torch.no_grad():
        for batch in batches:
            for i in range(batch["labels"].shape[0]):
                logits = model(
                    input_ids=batch["input_ids"][i : i + 1], attention_mask=batch["attention_mask"][i : i + 1]
                )
                losses.append(F.cross_entropy(logits.logits, batch["labels"][i : i + 1]).item())
    reference = statistics.fmean(losses)
    assert mean_loss(model, batches) == pytest.approx(reference, abs=1e-6)

    # The weighting matters on these batches: an unweighted mean of batch means is measurably different.
    with torch.no_grad():
        per_batch = statistics.fmean(model(**b).loss.item() for b in batches)
    assert abs(per_batch - reference) > 1e-4


def test_mean_loss_uses_eval_mode_and_restores_mixed_modes(model, batches):
    model.train()
    model.classifier.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    first = mean_loss(model, batches)
    assert mean_loss(model, batches) == first  # no dropout noise
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_surface_1d_against_hand_built_weights(model, batches):
    base = mean_loss(model, batches)
    direction = random_direction(model, torch.Generator().manual_seed(3))
    alphas = [-0.5, 0.0, 0.25, 0.5]
    losses = surface_1d(model, batches, direction, alphas)
    assert losses[1] == base
    for alpha, loss in zip(alphas, losses):
        assert loss == pytest.approx(_loss_at(model, batches, [direction], [alpha]), abs=1e-6)
    assert losses[0] > base + 1e-3 and losses[3] > base + 1e-3


def test_surface_2d_layout_and_centre(model, batches):
    base = mean_loss(model, batches)
    d1 = random_direction(model, torch.Generator().manual_seed(4))
    d2 = random_direction(model, torch.Generator().manual_seed(5))
    alphas, betas = [-0.4, 0.0, 0.4], [-0.3, 0.0, 0.3, 0.6]
    grid = surface_2d(model, batches, d1, d2, alphas, betas)
    assert len(grid) == 3 and all(len(row) == 4 for row in grid)
    assert grid[1][1] == base
    # Row i is alpha (d1), column j is beta (d2).
    assert [row[1] for row in grid] == surface_1d(model, batches, d1, alphas)
    assert grid[1] == surface_1d(model, batches, d2, betas)
    assert grid[0][3] == pytest.approx(_loss_at(model, batches, [d1, d2], [-0.4, 0.6]), abs=1e-6)
    assert grid[2][0] == pytest.approx(_loss_at(model, batches, [d1, d2], [0.4, -0.3]), abs=1e-6)


def test_landscape_grid_centre_and_json(model, batches):
    base = mean_loss(model, batches)
    result = landscape(model, batches, steps=5, span=0.3, seed=11)
    assert result["alphas"] == [-0.3, -0.15, 0.0, 0.15, 0.3]  # exact, unlike float32 linspace
    assert result["seed"] == 11 and result["span"] == 0.3
    assert result["surface_1d"][2] == base
    assert result["surface_2d"][2][2] == base
    # The 1-D curve runs along the first direction, i.e. the centre column of the 2-D surface.
    assert [row[2] for row in result["surface_2d"]] == result["surface_1d"]
    d1 = random_direction(model, torch.Generator().manual_seed(11))
    assert result["surface_1d"] == surface_1d(model, batches, d1, result["alphas"])
    assert json.loads(json.dumps(result)) == result


def test_sharpness_is_seeded_and_grows_with_rho(model, batches):
    first = sharpness(model, batches, rho=0.1, samples=4, seed=3)
    assert sharpness(model, batches, rho=0.1, samples=4, seed=3) == first
    assert first["base_loss"] == mean_loss(model, batches)
    assert first["rho"] == 0.1 and first["samples"] == 4 and len(first["increases"]) == 4
    assert first["sharpness"] == pytest.approx(statistics.fmean(first["increases"]))
    assert first["sharpness_std"] == pytest.approx(statistics.stdev(first["increases"]))
    # Sample s uses seed + s, so seed 4 shares three directions with seed 3 and another seed shares none.
    shifted = sharpness(model, batches, rho=0.1, samples=4, seed=4)
    assert shifted["increases"][:3] == first["increases"][1:]
    other = sharpness(model, batches, rho=0.1, samples=4, seed=100)
    assert set(other["increases"]).isdisjoint(first["increases"])
    assert other["sharpness"] != first["sharpness"]

    assert sharpness(model, batches, rho=0.1, samples=1)["sharpness_std"] == 0.0
    with pytest.raises(ValueError):
        sharpness(model, batches, samples=0)

    # The checkpoint is not an exact minimum, so single directions can slope down at first; on average
    # the loss rises, and a twenty times larger step raises it clearly more.
    near = sharpness(model, batches, rho=0.01, samples=4, seed=0)
    far = sharpness(model, batches, rho=0.2, samples=4, seed=0)
    assert far["base_loss"] == near["base_loss"]
    assert far["sharpness"] > max(near["sharpness"], 0.0) + 1e-3


def test_plot_landscapes_writes_a_readable_png(model, batches, tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt
    from PIL import Image

    backend, figures = plt.get_backend(), plt.get_fignums()
    runs = {
        "fine-tuned": landscape(model, batches, steps=3, span=0.5),
        "random init": landscape(_tiny_bert(seed=1), batches, steps=3, span=0.5),
        "flat": {"alphas": [-1.0, 0.0, 1.0], "surface_1d": [0.5] * 3, "surface_2d": [[0.5] * 3] * 3},
    }
    path = tmp_path / "landscape.png"
    plot_landscapes(runs, path)
    assert path.stat().st_size > 1000
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > height > 100
    assert matplotlib.image.imread(path).shape[:2] == (height, width)
    assert plt.get_backend() == backend and plt.get_fignums() == figures

    with pytest.raises(ValueError):
        plot_landscapes({}, tmp_path / "empty.png")
