"""Loss-landscape flatness around a fine-tuned checkpoint (the ROSE paper's Figure 1).

The method is that of Li et al. (2018), "Visualizing the Loss Landscape of Neural Nets": evaluate the
loss at ``w + alpha * d1 + beta * d2`` for random Gaussian directions ``d`` that are *filter
normalised*, i.e. every output row of ``d`` is rescaled to the norm of the same row of ``w``. Without
that rescaling a direction moves small-norm layers relatively further than large-norm ones, and
networks that differ only by a scale symmetry would look differently sharp.

Everything here is plain PyTorch on whatever device the model is on; there is no distributed code, so
a ZeRO checkpoint has to be consolidated into an ordinary model first.

Conventions:

* Parameters are visited in ``model.parameters()`` order; a direction is a list aligned with it.
* Parameters with ``ndim <= 1`` (biases, LayerNorm) get a zero direction, as in Li et al.
* Losses are averaged over examples (not over batches) and accumulated in float64.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

Batch = Mapping[str, Tensor]
Direction = list[Tensor]


def mean_loss(model: nn.Module, batches: Sequence[Batch]) -> float:
    """The example-weighted mean of the model's own loss (cross-entropy for a classifier).

    The model is evaluated in eval mode (no dropout) under ``torch.no_grad``; the train/eval flag of
    every submodule is restored afterwards, even if they were mixed.

    Args:
        model: A Hugging Face model that returns ``outputs.loss`` when given ``labels``, e.g. an
            ``AutoModelForSequenceClassification``.
        batches: Dicts of tensors the model accepts (``input_ids``, ``attention_mask``, ``labels``, ...).
            Tensors are moved to the device of the model's first parameter.

    Returns:
        ``sum_b n_b * loss_b / sum_b n_b`` where ``n_b`` is the number of examples in batch ``b``.

    Raises:
        ValueError: when there are no batches, or the model returns no loss (no ``labels``).
    """
    if len(batches) == 0:
        raise ValueError("mean_loss needs at least one batch")
    device = next(model.parameters()).device
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                outputs = model(**inputs)
                if outputs.loss is None:
                    raise ValueError("the model returned no loss; every batch needs 'labels'")
                n = _batch_size(inputs)
                total += float(outputs.loss) * n
                count += n
    finally:
        for module, training in modes:
            module.training = training
    return total / count


def _batch_size(batch: Mapping[str, Any]) -> int:
    key = "labels" if "labels" in batch else "input_ids"
    return int(batch[key].shape[0])


def random_direction(model: nn.Module, generator: torch.Generator, *, filter_normalize: bool = True) -> Direction:
    """One random Gaussian direction in parameter space, normalised to the model's weights.

    Args:
        model: The model whose parameters set the shapes, dtypes, devices and norms.
        generator: A CPU generator; the draw depends only on its state, not on the model's device.
        filter_normalize: If true, every slice ``d[k]`` along dim 0 of a parameter with ``ndim >= 2``
            is rescaled to ``||w[k]||`` (Li et al.'s filter normalisation; for a linear layer or an
            embedding a slice is one output row or one token). If false, each such tensor as a whole
            is rescaled to ``||w||``.

    Returns:
        One tensor per parameter in ``model.parameters()`` order, with the parameter's shape, dtype and
        device. Parameters with ``ndim <= 1`` get zeros in both modes, as in Li et al.'s default.
    """
    direction = []
    for p in model.parameters():
        if p.ndim <= 1:
            direction.append(torch.zeros_like(p))
            continue
        # Drawn and normalised in float32 on the CPU so the direction does not depend on where the
        # model lives, and a bf16 model gets the same direction as its float32 original (rounded).
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        w = p.detach().to(device="cpu", dtype=torch.float32)
        if filter_normalize:
            dims = tuple(range(1, p.ndim))
            d = d * (w.norm(dim=dims, keepdim=True) / d.norm(dim=dims, keepdim=True))
        else:
            d = d * (w.norm() / d.norm())
        direction.append(d.to(device=p.device, dtype=p.dtype))
    return direction


@contextmanager
def perturbed(model: nn.Module, directions: Sequence[Direction], coefficients: Sequence[float]) -> Iterator[nn.Module]:
    """Temporarily moves the model to ``w + sum_i coefficients[i] * directions[i]``, in place.

    On exit (also on an exception) every parameter is copied back from a saved clone, so the original
    values are restored bit for bit; subtracting the perturbation again would not be exact.

    Args:
        model: The model to perturb.
        directions: Directions as returned by :func:`random_direction`.
        coefficients: One scalar per direction.

    Yields:
        The perturbed model itself.

    Raises:
        ValueError: when the numbers of directions and coefficients, or of parameters and direction
            entries, do not match.
    """
    if len(directions) != len(coefficients):
        raise ValueError(f"{len(directions)} directions but {len(coefficients)} coefficients")
    params = list(model.parameters())
    for direction in directions:
        if len(direction) != len(params):
            raise ValueError(f"a direction has {len(direction)} tensors but the model has {len(params)} parameters")
    originals = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for j, p in enumerate(params):
                delta = sum(float(c) * direction[j] for c, direction in zip(coefficients, directions))
                if isinstance(delta, Tensor):
                    p.add_(delta)
        yield model
    finally:
        with torch.no_grad():
            for p, original in zip(params, originals):
                p.copy_(original)


def sharpness(
    model: nn.Module, batches: Sequence[Batch], *, rho: float = 0.05, samples: int = 10, seed: int = 0
) -> dict[str, Any]:
    """The average loss increase under random filter-normalised perturbations of relative size ``rho``.

    Sample ``s`` uses the direction drawn from ``torch.Generator().manual_seed(seed + s)`` and measures
    ``mean_loss(w + rho * d) - mean_loss(w)``. Because ``d`` is filter normalised, ``rho`` is the size
    of the step relative to each weight row, which makes the number comparable across checkpoints.

    Args:
        model: The model at the point to measure.
        batches: Evaluation batches, as for :func:`mean_loss`.
        rho: Relative perturbation size.
        samples: Number of random directions, at least 1.
        seed: Seed of the first direction.

    Returns:
        ``{"base_loss", "rho", "samples", "sharpness", "sharpness_std", "increases"}``: the mean and the
        unbiased standard deviation (0 for one sample) of the per-direction increases, and the list.

    Raises:
        ValueError: when ``samples < 1``.
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    base = mean_loss(model, batches)
    increases = []
    for s in range(samples):
        direction = random_direction(model, torch.Generator().manual_seed(seed + s))
        with perturbed(model, [direction], [rho]):
            increases.append(mean_loss(model, batches) - base)
    return {
        "base_loss": base,
        "rho": rho,
        "samples": samples,
        "sharpness": statistics.fmean(increases),
        "sharpness_std": statistics.stdev(increases) if samples > 1 else 0.0,
        "increases": increases,
    }


def surface_1d(
    model: nn.Module, batches: Sequence[Batch], direction: Direction, alphas: Sequence[float]
) -> list[float]:
    """The loss along a line: ``[mean_loss(w + alpha * direction) for alpha in alphas]``."""
    losses = []
    for alpha in alphas:
        with perturbed(model, [direction], [alpha]):
            losses.append(mean_loss(model, batches))
    return losses


def surface_2d(
    model: nn.Module,
    batches: Sequence[Batch],
    d1: Direction,
    d2: Direction,
    alphas: Sequence[float],
    betas: Sequence[float],
) -> list[list[float]]:
    """The loss on a plane: row ``i``, column ``j`` is ``mean_loss(w + alphas[i] * d1 + betas[j] * d2)``."""
    rows = []
    for alpha in alphas:
        row = []
        for beta in betas:
            with perturbed(model, [d1, d2], [alpha, beta]):
                row.append(mean_loss(model, batches))
        rows.append(row)
    return rows


def landscape(
    model: nn.Module, batches: Sequence[Batch], *, steps: int = 11, span: float = 1.0, seed: int = 0
) -> dict[str, Any]:
    """The 1-D and 2-D loss surfaces around the model, on ``steps`` points from ``-span`` to ``span``.

    The directions are drawn with generators seeded ``seed`` and ``seed + 1``; the 1-D curve runs along
    the first. The grid is that of ``torch.linspace(-span, span, steps)``, but computed as
    ``span * k / (steps - 1)`` for integers ``k`` so that it is exactly symmetric and, for odd
    ``steps``, its centre is exactly 0 (float32 ``linspace`` puts it at about ``-1.5e-8``), i.e. the
    centre of the surface is the checkpoint itself.

    Args:
        model: The model at the centre point.
        batches: Evaluation batches, as for :func:`mean_loss`.
        steps: Grid points per axis, at least 2; ``steps**2 + steps`` loss evaluations in all.
        span: Half-width of the grid in units of the filter-normalised direction.
        seed: Seed of the first direction.

    Returns:
        A JSON-serialisable dict ``{"alphas", "surface_1d", "surface_2d", "seed", "span"}``; the betas
        of the 2-D surface are the alphas.

    Raises:
        ValueError: when ``steps < 2``.
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    d1 = random_direction(model, torch.Generator().manual_seed(seed))
    d2 = random_direction(model, torch.Generator().manual_seed(seed + 1))
    last = steps - 1
    alphas = [float(span) * (2 * i - last) / last for i in range(steps)]
    return {
        "alphas": alphas,
        "surface_1d": surface_1d(model, batches, d1, alphas),
        "surface_2d": surface_2d(model, batches, d1, d2, alphas, alphas),
        "seed": seed,
        "span": span,
    }


def plot_landscapes(landscapes: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Draws several runs' landscapes into one PNG: a shared 1-D panel, then one contour per run.

    All contour panels share one colour scale (and one colour bar), so flatter runs show visibly
    wider basins. The figure is built on a bare ``Figure`` with the Agg canvas rather than through
    ``pyplot``, which neither touches the caller's pyplot backend nor leaves a figure open.

    Args:
        landscapes: Run name to a dict as returned by :func:`landscape`.
        path: Where to write the PNG.

    Raises:
        ValueError: when ``landscapes`` is empty.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not landscapes:
        raise ValueError("plot_landscapes needs at least one landscape")
    surfaces = {name: np.asarray(ls["surface_2d"], dtype=np.float64) for name, ls in landscapes.items()}
    finite = np.concatenate([s[np.isfinite(s)] for s in surfaces.values()])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        # contourf needs strictly increasing levels; a perfectly flat surface still gets one band.
        lo, hi = lo - 0.5, hi + 0.5
    levels = np.linspace(lo, hi, 21)

    n = len(landscapes)
    fig = Figure(figsize=(4.2 * (n + 1) + 0.8, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n + 1, squeeze=False)[0]

    curve_ax = axes[0]
    for name, ls in landscapes.items():
        curve_ax.plot(ls["alphas"], ls["surface_1d"], marker="o", markersize=3, label=name)
    curve_ax.set_xlabel(r"$\alpha$ (direction 1)")
    curve_ax.set_ylabel("loss")
    curve_ax.set_title("1-D slice")
    curve_ax.legend()

    contour = None
    for ax, (name, ls) in zip(axes[1:], landscapes.items()):
        alphas = np.asarray(ls["alphas"], dtype=np.float64)
        betas = np.asarray(ls.get("betas", ls["alphas"]), dtype=np.float64)
        z = np.ma.masked_invalid(surfaces[name])
        # Rows of surface_2d are alphas; transposing puts alpha on the x axis like the 1-D panel.
        contour = ax.contourf(alphas, betas, z.T, levels=levels, cmap="viridis")
        ax.contour(alphas, betas, z.T, levels=levels, colors="k", linewidths=0.3)
        ax.plot([0.0], [0.0], marker="+", color="w", markersize=10)
        ax.set_xlabel(r"$\alpha$ (direction 1)")
        ax.set_ylabel(r"$\beta$ (direction 2)")
        ax.set_title(name)
        ax.set_aspect("equal")
    fig.colorbar(contour, ax=list(axes[1:]), label="loss")
    fig.savefig(os.fspath(path), dpi=100)
