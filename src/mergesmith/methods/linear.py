"""Linear merge (model soup): a weighted average of the inputs."""

from __future__ import annotations

import torch

from mergesmith.methods.registry import register
from mergesmith.methods.spec import MergeInputs, Param


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate in float32, or float64 when the inputs already are."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@register(
    "linear",
    params=(
        Param("weight", float, "per_model", help="weight of this model in the sum"),
        Param("normalize", bool, "global", True, help="divide by the sum of the weights"),
    ),
    paper="https://arxiv.org/abs/2203.05482",
    elementwise=True,
)
def linear(inputs: MergeInputs) -> torch.Tensor:
    """Weighted sum of every input, divided by the weight total when normalize is set."""
    first = inputs.tensors[0]
    dtype = work_dtype(first)
    weights = [float(p["weight"]) for p in inputs.per_model]
    out = first.to(dtype) * weights[0]
    for tensor, w in zip(inputs.tensors[1:], weights[1:]):
        out.add_(tensor, alpha=w)  # mixed-dtype add accumulates in `out`'s dtype without a converted copy
    if inputs.params["normalize"]:
        out.div_(torch.tensor(weights, dtype=dtype).sum())
    return out.to(first.dtype)
