"""Spherical linear interpolation between the base model and one other model."""

from __future__ import annotations

import math

import torch

from mergesmith.methods.registry import register
from mergesmith.methods.spec import MergeInputs, Param

DOT_THRESHOLD = 0.9995  # above this |cos| the two tensors are treated as colinear
EPS = 1e-8


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Interpolate from a (t=0) to b (t=1) along the great circle of the flattened tensors.

    Works in float32 (float64 if the inputs are) and returns the input dtype; falls back
    to plain linear interpolation when the tensors are nearly colinear or antipodal.
    """
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x = a.to(dtype)
    y = b.to(dtype)
    na = torch.linalg.vector_norm(x)
    nb = torch.linalg.vector_norm(y)
    na = na if na > EPS else torch.ones_like(na)
    nb = nb if nb > EPS else torch.ones_like(nb)
    dot = float(((x / na) * (y / nb)).sum().clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        ca, cb = 1.0 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        ca = math.sin((1.0 - t) * theta) / s
        cb = math.sin(t * theta) / s
    out = x.mul_(ca).add_(y, alpha=cb) if x is not a else x * ca + y * cb
    return out.to(a.dtype)


@register(
    "slerp",
    params=(Param("t", float, "global", help="0 gives the base model, 1 the other model"),),
    base="required",
    min_models=2,
    max_models=2,
    paper="https://en.wikipedia.org/wiki/Slerp",
)
def slerp(inputs: MergeInputs) -> torch.Tensor:
    """Spherical interpolation from the base model towards the other model by t."""
    base = inputs.base
    assert base is not None  # the planner guarantees a base for this method
    (other,) = inputs.others
    return slerp_tensors(float(inputs.params["t"]), base, other)
