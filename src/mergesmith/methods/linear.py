"""Linear merge (model soup): a weighted average of the inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith._util import lazy_module
from mergesmith.methods import task_vector_fast
from mergesmith.methods.registry import register
from mergesmith.methods.spec import MergeInputs, Param

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate in float32, or float64 when the inputs already are."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _weights(inputs: MergeInputs) -> list[float]:
    return [float(p["weight"]) for p in inputs.per_model]


def _linear_fused(inputs: MergeInputs, out: torch.Tensor) -> bool:
    """The same sum in one pass of a CPU kernel (bfloat16/float32), with the same rounding steps."""
    weights = _weights(inputs)
    total = torch.tensor(weights, dtype=torch.float32).sum()
    return task_vector_fast.weighted_sum_into(inputs.tensors, weights, total, inputs.params["normalize"], out)


@register(
    "linear",
    params=(
        Param("weight", float, "per_model", help="weight of this model in the sum"),
        Param("normalize", bool, "global", True, help="divide by the sum of the weights"),
    ),
    paper="https://arxiv.org/abs/2203.05482",
    elementwise=True,
    fused=_linear_fused,
)
def linear(inputs: MergeInputs) -> torch.Tensor:
    """Weighted sum of every input, divided by the weight total when normalize is set."""
    first = inputs.tensors[0]
    dtype = work_dtype(first)
    weights = _weights(inputs)
    out = first.to(dtype) * weights[0]
    for tensor, w in zip(inputs.tensors[1:], weights[1:]):
        out.add_(tensor, alpha=w)  # mixed-dtype add accumulates in `out`'s dtype without a converted copy
    if inputs.params["normalize"]:
        out.div_(torch.tensor(weights, dtype=dtype).sum())
    return out.to(first.dtype)
