"""Linear merge (model soup): a weighted average of the inputs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from mergesmith._util import lazy_module
from mergesmith.methods import task_vector_fast
from mergesmith.methods.registry import register
from mergesmith.methods.spec import ArrayInputs, MergeInputs, Param

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate in float32, or float64 when the inputs already are."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _weights(per_model: tuple[Mapping[str, Any], ...]) -> list[float]:
    return [float(p["weight"]) for p in per_model]


def _f32(x: float | Fraction) -> Fraction | None:
    """x rounded to the nearest float32 (ties to even), exactly; None outside the normal range."""
    x = Fraction(x)
    if x == 0:
        return x
    e = math.floor(math.log2(abs(x)))
    if abs(x) < Fraction(2) ** e:  # log2 rounded up near a power of two
        e -= 1
    if not -126 <= e <= 127:
        return None
    step = Fraction(2) ** (e - 23)
    return round(x / step) * step  # round() on a Fraction breaks ties to even


def _torch_f32_sum(weights: list[float]) -> float | None:
    """What torch.tensor(weights, dtype=float32).sum() gives, found without torch where that is certain:
    up to three weights are added left to right (below any vector width, torch adds them in order), and
    more are summed exactly when every subset of them sums to a float32 value (then no order rounds).
    None otherwise."""
    values = [_f32(w) for w in weights]
    if any(v is None for v in values):
        return None
    if len(values) <= 3:
        total: Fraction | None = values[0]  # type: ignore[assignment]
        for v in values[1:]:
            total = _f32(total + v)  # type: ignore[operator]
            if total is None:
                return None
        return float(total)  # type: ignore[arg-type]
    if len(values) > 12:
        return None
    for subset in range(1, 1 << len(values)):
        s = sum((v for i, v in enumerate(values) if subset >> i & 1), Fraction(0))
        if _f32(s) != s:
            return None
    return float(sum(values, Fraction(0)))  # type: ignore[arg-type]


def _linear_fused(a: ArrayInputs) -> bool:
    """The same sum in one pass of a CPU kernel (bfloat16/float32), with the same rounding steps."""
    weights = _weights(a.per_model)
    total = _torch_f32_sum(weights)
    if total is None:  # torch's summation order decides the rounding: let torch add them
        total = float(torch.tensor(weights, dtype=torch.float32).sum())
    return task_vector_fast.weighted_sum_into(a, weights, total, a.params["normalize"])


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
    weights = _weights(inputs.per_model)
    out = first.to(dtype) * weights[0]
    for tensor, w in zip(inputs.tensors[1:], weights[1:]):
        out.add_(tensor, alpha=w)  # mixed-dtype add accumulates in `out`'s dtype without a converted copy
    if inputs.params["normalize"]:
        out.div_(torch.tensor(weights, dtype=dtype).sum())
    return out.to(first.dtype)
