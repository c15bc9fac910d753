"""Model Stock: move from the base towards the average fine-tune by a ratio set by their angle."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith._util import lazy_module
from mergesmith.methods.registry import register
from mergesmith.methods.spec import MergeInputs, Param

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


@register(
    "model_stock",
    params=(Param("filter_wise", bool, "global", False, help="one ratio per row instead of per tensor"),),
    base="required",
    min_models=3,
    paper="https://arxiv.org/abs/2403.19522",
)
def model_stock(inputs: MergeInputs) -> torch.Tensor:
    """Interpolate base -> mean(fine-tunes) by t = N cos / (1 + (N - 1) cos).

    cos is the mean pairwise cosine between the fine-tunes' task vectors (each pair's cosine
    uses a norm product floored at 1e-6 and is clamped to [-1, 1]); N is the number of
    fine-tunes. With filter_wise, every row (vector along the last dim; a 1-D tensor is one
    row) gets its own cos and t. Where 1 + (N - 1) cos is within 1e-6 of zero, t = 0 (the
    base is kept) instead of dividing by ~0.
    """
    base = inputs.base
    assert base is not None
    tuned = list(inputs.others)
    shape = base.shape
    if inputs.params["filter_wise"]:
        if base.dim() == 1:
            base = base.unsqueeze(0)
            tuned = [w.unsqueeze(0) for w in tuned]
    else:
        base = base.reshape(-1)
        tuned = [w.reshape(-1) for w in tuned]
    deltas = [w - base for w in tuned]
    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tuned)
    denom = 1 + (n - 1) * cos
    degenerate = denom.abs() < 1e-6
    t = torch.where(
        degenerate, torch.zeros_like(cos), n * cos / torch.where(degenerate, torch.ones_like(denom), denom)
    )
    mean = sum(tuned) / n
    return (t * mean + (1 - t) * base).reshape(shape)
