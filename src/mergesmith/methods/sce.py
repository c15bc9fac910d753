"""SCE: Select (high-variance entries), Calculate (per-model weights), Erase (minority signs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith._util import lazy_module
from mergesmith.methods.primitives import sign_agreement, topk_mask
from mergesmith.methods.registry import register
from mergesmith.methods.spec import MergeInputs, Param

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


def _fraction(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def variance_mask(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the entries whose variance across models is among the top `fraction` of the nonzero ones.

    The number kept is int(count_nonzero(variance) * fraction), computed in float32 as
    mergekit does; ties in variance follow the primitives tie rule (lower flat index wins).
    """
    if fraction >= 1:
        return torch.ones(task_vectors.shape[1:], dtype=torch.bool, device=task_vectors.device)
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    if fraction <= 0:
        return torch.zeros_like(variance, dtype=torch.bool)
    k = int(torch.count_nonzero(variance) * fraction)
    return topk_mask(variance.abs(), k)


def model_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared task-vector entry, normalised to sum to 1 (uniform if all ~0)."""
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


@register(
    "sce",
    params=(
        Param(
            "select_topk",
            float,
            "global",
            1.0,
            help="fraction of highest-variance entries kept",
            check=_fraction,
        ),
        Param(
            "int8_mask", bool, "global", False, help="accepted for mergekit compatibility; masks are boolean"
        ),
    ),
    base="required",
    paper="https://arxiv.org/abs/2408.07990",
)
def sce(inputs: MergeInputs) -> torch.Tensor:
    """Task vectors masked to high-variance entries, sign-elected, averaged with energy weights."""
    base = inputs.base
    assert base is not None
    others = inputs.others
    if not others:
        return base
    tvs = torch.stack([t - base for t in others], dim=0)
    fraction = float(inputs.params["select_topk"])
    if fraction < 1:
        tvs = tvs * variance_mask(tvs, fraction)
    agree = sign_agreement(tvs)
    weights = model_weights(tvs).reshape((-1,) + (1,) * base.dim())
    kept_weights = weights * agree
    merged = (tvs * kept_weights).sum(dim=0)
    return base + merged / kept_weights.sum(dim=0).clamp(min=1e-6)
