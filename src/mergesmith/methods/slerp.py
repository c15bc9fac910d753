"""Spherical linear interpolation between the base model and one other model."""

from __future__ import annotations

import math

import torch

from mergesmith.methods.registry import register
from mergesmith.methods.spec import MergeInputs, Param

DOT_THRESHOLD = 0.9995  # above this |cos| the two tensors are treated as colinear
EPS = 1e-8


CHUNK = 1 << 20  # elements per pass: statistics and output are computed chunk by chunk


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Interpolate from a (t=0) to b (t=1) along the great circle of the flattened tensors.

    Works in float32 (float64 if the inputs are) chunk by chunk, so no full-size float32 copy is made,
    and returns the input dtype; falls back to plain linear interpolation when the tensors are nearly
    colinear or antipodal.
    """
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.reshape(-1), b.reshape(-1)
    sq_a = torch.zeros((), dtype=dtype)
    sq_b = torch.zeros((), dtype=dtype)
    for s in range(0, x.numel(), CHUNK):
        xa, yb = x[s : s + CHUNK].to(dtype), y[s : s + CHUNK].to(dtype)
        sq_a += xa.square().sum()
        sq_b += yb.square().sum()
    na, nb = float(sq_a.sqrt()), float(sq_b.sqrt())
    na = na if na > EPS else 1.0
    nb = nb if nb > EPS else 1.0
    dot_t = torch.zeros((), dtype=dtype)
    for s in range(0, x.numel(), CHUNK):
        dot_t += ((x[s : s + CHUNK].to(dtype) / na) * (y[s : s + CHUNK].to(dtype) / nb)).sum()
    dot = min(1.0, max(-1.0, float(dot_t)))
    if abs(dot) > DOT_THRESHOLD:
        ca, cb = 1.0 - t, t
    else:
        theta = math.acos(dot)
        sin = math.sin(theta)
        ca = math.sin((1.0 - t) * theta) / sin
        cb = math.sin(t * theta) / sin
    out = torch.empty_like(x)
    for s in range(0, x.numel(), CHUNK):
        part = x[s : s + CHUNK].to(dtype) * ca
        part.add_(y[s : s + CHUNK], alpha=cb)
        out[s : s + CHUNK] = part
    return out.view(a.shape)


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
