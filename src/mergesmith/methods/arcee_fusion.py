"""Arcee Fusion: take the fine-tune's value only where its change from the base is unusually important."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith._util import lazy_module
from mergesmith.methods.primitives import generator_for
from mergesmith.methods.registry import register
from mergesmith.methods.spec import MergeInputs, Param

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

QUARTILES = (0.25, 0.5, 0.75)


def importance(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|tuned - base| times KL(softmax(tuned) || softmax(base)) over the last dim (1e-8 added to both)."""
    p = torch.softmax(tuned, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (tuned - base).abs() * kl


def quartiles(
    scores: torch.Tensor, sample_size: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower quartile, median and upper quartile of `scores` (order statistic floor(q * (n - 1))).

    With more than `sample_size` entries (and sample_size > 0) they are estimated from
    `sample_size` entries drawn uniformly with replacement using `generator`, as mergekit does
    (mergekit draws from the global RNG). Order statistics come from kthvalue, not a sort.
    """
    flat = scores.reshape(-1)
    if 0 < sample_size < flat.numel():
        gen = generator_for(generator, flat.device)
        picks = torch.randint(flat.numel(), (sample_size,), generator=gen, device=gen.device)
        flat = flat[picks.to(flat.device)]
    # Index arithmetic in float32 as mergekit does, so the chosen order statistics agree.
    ranks = (torch.tensor(QUARTILES) * (flat.numel() - 1)).long().tolist()
    q1, q2, q3 = (flat.kthvalue(r + 1).values for r in ranks)
    return q1, q2, q3


@register(
    "arcee_fusion",
    params=(
        Param(
            "quantile_sample_size",
            int,
            "global",
            1_000_000,
            help="estimate quartiles from this many random entries of larger tensors; 0 = exact",
            check=lambda v: None if v >= 0 else "must be >= 0",
        ),
    ),
    base="required",
    min_models=2,
    max_models=2,
    random=True,
    paper="https://arcee.ai",
)
def arcee_fusion(inputs: MergeInputs) -> torch.Tensor:
    """base + (tuned - base) where importance >= median + 1.5 * IQR of the importances, else base."""
    base = inputs.base
    assert base is not None
    (tuned,) = inputs.others
    scores = importance(tuned, base)
    q1, median, q3 = quartiles(scores, int(inputs.params["quantile_sample_size"]), inputs.generator)
    keep = (scores >= median + 1.5 * (q3 - q1)).float()
    return base + (tuned - base) * keep
