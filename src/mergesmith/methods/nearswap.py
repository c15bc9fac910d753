"""NearSwap: take the other model's value where it is close to the base, keep the base elsewhere."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith._util import lazy_module
from mergesmith.methods.registry import register
from mergesmith.methods.spec import MergeInputs, Param

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "t must be >= 0"


@register(
    "nearswap",
    params=(
        Param(
            "t",
            float,
            "global",
            help="similarity threshold: |base - other| <= t swaps fully",
            check=_non_negative,
        ),
    ),
    base="required",
    min_models=2,
    max_models=2,
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    elementwise=True,
)
def nearswap(inputs: MergeInputs) -> torch.Tensor:
    """Per entry, mix = clamp(t / max(|base - other|, 1e-6), 0, 1); out = mix*other + (1-mix)*base."""
    base = inputs.base
    assert base is not None
    (other,) = inputs.others
    mix = (float(inputs.params["t"]) / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return mix * other + (1 - mix) * base
