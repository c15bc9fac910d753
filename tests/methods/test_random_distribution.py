"""DARE and DELLA draw from mergesmith's own stream (hashrng): same distribution as mergekit's
torch.bernoulli masks, checked statistically against a reference that uses torch.bernoulli."""

from __future__ import annotations

import pytest
import torch

N_ROWS, N_COLS = 400, 512  # 204,800 entries: large enough for the fused CPU kernels too


def tensors(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N_ROWS, N_COLS, generator=g) * 0.02
    return [base.to(dtype)] + [
        (base + torch.randn(N_ROWS, N_COLS, generator=g) * 0.002).to(dtype) for _ in range(2)
    ]


def sigma(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("kernels", ["", "torch"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_each_entry_with_probability_density(merge, monkeypatch, kernels, density) -> None:
    monkeypatch.setenv("MERGESMITH_KERNELS", kernels)
    ts = tensors()
    out = merge(
        "dare_linear",
        ts,
        params={"rescale": False},
        per={"weight": [1.0, 0.0], "density": [density, 0.5]},
        seed=3,
    )
    delta = ts[1] - ts[0]
    kept = (out != ts[0])[delta != 0].float()
    n = kept.numel()
    # mergekit's rule, drawn with torch.bernoulli
    ref = torch.bernoulli(torch.full((n,), density), generator=torch.Generator().manual_seed(3))
    assert abs(float(kept.mean()) - density) < 5 * sigma(density, n)
    assert abs(float(kept.mean()) - float(ref.mean())) < 7 * sigma(density, n)
    # no structure: neighbouring entries and rows are independent
    flat = kept.reshape(-1)
    both = float((flat[1:] * flat[:-1]).mean())
    assert abs(both - density**2) < 6 * sigma(density**2, n)


@pytest.mark.parametrize("kernels", ["", "torch"])
def test_dare_models_and_tensors_get_independent_masks(merge, monkeypatch, kernels) -> None:
    monkeypatch.setenv("MERGESMITH_KERNELS", kernels)
    base, a, _ = tensors()
    out = merge(
        "dare_linear",
        [base, a, a],
        params={"rescale": False},
        per={"weight": [1.0, 1.0], "density": [0.5, 0.5]},
        seed=5,
    )
    delta = (a - base).float()
    # each model keeps its own half: the sum is 0, 1 or 2 deltas in proportions 1/4, 1/2, 1/4
    moved = (out.float() - base.float())[delta != 0] / delta[delta != 0]
    twice = float((moved > 1.5).float().mean())
    assert abs(twice - 0.25) < 0.01


@pytest.mark.parametrize("kernels", ["", "torch"])
def test_della_keep_probability_follows_the_magnitude_rank(merge, monkeypatch, kernels) -> None:
    monkeypatch.setenv("MERGESMITH_KERNELS", kernels)
    ts = tensors()
    density, eps = 0.5, 0.2
    out = merge(
        "della_linear",
        ts,
        params={"rescale": False},
        per={"weight": [1.0, 0.0], "density": [density, 0.5], "epsilon": [eps, 0.1]},
        seed=9,
    )
    delta = (ts[1] - ts[0]).float()
    kept = (out != ts[0]).float()
    ranks = torch.sort(delta.abs(), dim=1, stable=True).indices.argsort(dim=1).float() / (N_COLS - 1)
    probs = (density - eps) + ranks * 2 * eps
    ref = torch.bernoulli(probs, generator=torch.Generator().manual_seed(9))  # mergekit's draw
    valid = delta != 0
    for lo in (0.0, 0.25, 0.5, 0.75):
        sel = valid & (ranks >= lo) & (ranks < lo + 0.25)
        expected = float(probs[sel].mean())
        n = int(sel.sum())
        assert abs(float(kept[sel].mean()) - expected) < 5 * sigma(expected, n)
        assert abs(float(kept[sel].mean()) - float(ref[sel].mean())) < 7 * sigma(expected, n)


def test_l1_rescale_keeps_the_task_vector_scale(merge) -> None:
    ts = tensors(torch.float32)
    out = merge("dare_linear", ts, per={"weight": [1.0, 0.0], "density": [0.3, 0.5]}, seed=2)
    before = (ts[1] - ts[0]).abs().sum()
    after = (out - ts[0]).abs().sum()
    torch.testing.assert_close(after, before, rtol=1e-3, atol=0)
