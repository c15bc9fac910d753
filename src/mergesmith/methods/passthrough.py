"""Passthrough: copy a single input tensor, optionally scaled (layer stacking, frankenmerges)."""

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
    "passthrough",
    params=(Param("scale", float, "per_model", None, help="multiply the tensor by this factor"),),
    max_models=1,
    elementwise=True,
)
def passthrough(inputs: MergeInputs) -> torch.Tensor:
    """Return the only input unchanged, or multiplied by its `scale`."""
    (tensor,) = inputs.tensors
    scale = inputs.per_model[0].get("scale")
    return tensor if scale is None else tensor * scale
