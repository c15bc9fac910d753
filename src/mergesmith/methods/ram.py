"""Reinforced Agent Merging (RAM) and its tensor-local RAM+ variant.

Per entry, count how many task vectors are "active" there (|delta| > epsilon). Entries only
one model touches keep that model's value; entries several models touch get the mean of the
active values. RAM+ additionally boosts each model's unique entries by
1 + r * clamp(shared / unique, 0, alpha), where shared / unique count that model's active
entries in overlapping / unique positions of this tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith._util import lazy_module
from mergesmith.methods.registry import register
from mergesmith.methods.spec import MergeInputs, Param

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

PAPER = "https://arxiv.org/abs/2601.13572"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _active(
    inputs: MergeInputs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened task vectors, activity mask, per-entry active counts, overlap and unique masks."""
    base = inputs.base
    assert base is not None
    flat = torch.stack([t - base for t in inputs.others], dim=0).reshape(len(inputs.others), -1)
    active = flat.abs() > float(inputs.params["epsilon"])
    counts = active.sum(dim=0, keepdim=True)
    return flat, active, counts, counts > 1, counts == 1


def _finish(
    base: torch.Tensor,
    unique_part: torch.Tensor,
    flat_active: torch.Tensor,
    overlap: torch.Tensor,
    counts: torch.Tensor,
) -> torch.Tensor:
    """base + per entry: the unique contributions plus the mean of the overlapping active values."""
    shared_part = flat_active * overlap / counts.clamp(min=1)
    merged = (unique_part + shared_part).sum(dim=0, keepdim=True)
    return base + merged.reshape(base.shape)


EPSILON = Param(
    "epsilon", float, "global", 1e-5, help="|delta| above this counts as a change", check=_non_negative
)


@register("ram", params=(EPSILON,), base="required", paper=PAPER, elementwise=True)
def ram(inputs: MergeInputs) -> torch.Tensor:
    """Keep entries changed by one model, average entries changed by several."""
    base = inputs.base
    assert base is not None
    if not inputs.others:
        return base
    flat, active, counts, overlap, unique = _active(inputs)
    flat_active = flat * active
    return _finish(base, flat_active * unique, flat_active, overlap, counts)


@register(
    "ramplus_tl",
    params=(
        Param("r", float, "global", 0.1, help="strength of the boost on unique entries"),
        Param("alpha", float, "global", 0.2, help="cap on the shared/unique ratio", check=_non_negative),
        EPSILON,
    ),
    base="required",
    paper=PAPER,
)
def ramplus_tl(inputs: MergeInputs) -> torch.Tensor:
    """RAM with each model's unique entries scaled up by its (capped) shared/unique ratio."""
    base = inputs.base
    assert base is not None
    if not inputs.others:
        return base
    flat, active, counts, overlap, unique = _active(inputs)
    shared_n = (active & overlap).sum(dim=1)
    unique_n = (active & unique).sum(dim=1)
    eps = float(inputs.params["epsilon"])
    # mergekit floors the unique count at epsilon; with epsilon = 0 a model with no active
    # entries would give 0/0 = NaN and poison the output (a NaN boost times a zero mask), so
    # the floor is 1 then. The boost only touches unique entries, so nothing else changes.
    ratio = shared_n / unique_n.clamp(min=eps if eps > 0 else 1.0)
    boost = 1 + float(inputs.params["r"]) * ratio.clamp(min=0, max=float(inputs.params["alpha"]))
    flat_active = flat * active
    return _finish(base, flat_active * unique * boost.unsqueeze(-1), flat_active, overlap, counts)
