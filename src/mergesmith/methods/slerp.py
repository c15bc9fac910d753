"""Spherical linear interpolation between the base model and one other model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith._util import lazy_module
from mergesmith.methods import task_vector_fast
from mergesmith.methods.registry import register
from mergesmith.methods.spec import ArrayInputs, MergeInputs, Param

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

DOT_THRESHOLD = 0.9995  # above this |cos| the two tensors are treated as colinear
EPS = 1e-8


CHUNK = 1 << 20  # elements per pass: statistics and output are computed chunk by chunk


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Interpolate from a (t=0) to b (t=1) along the great circle of the flattened tensors.

    Works in float32 (float64 if the inputs are) chunk by chunk, so no full-size float32 copy is made,
    and returns the input dtype; falls back to plain linear interpolation when the tensors are nearly
    colinear or antipodal. The reductions follow mergekit's order (per-chunk norms, then the norm of
    those; per-chunk dot products, then their sum) so the coefficients agree with it bit for bit.
    """
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.reshape(-1), b.reshape(-1)
    n = x.numel()
    if n == 0:
        return a.clone()
    spans = [(s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]
    norms_a = torch.stack([torch.linalg.vector_norm(x[i:j].to(dtype)) for i, j in spans])
    norms_b = torch.stack([torch.linalg.vector_norm(y[i:j].to(dtype)) for i, j in spans])
    na, nb = torch.linalg.vector_norm(norms_a), torch.linalg.vector_norm(norms_b)
    na = torch.where(na > EPS, na, torch.ones_like(na))
    nb = torch.where(nb > EPS, nb, torch.ones_like(nb))
    dot = torch.stack([((x[i:j].to(dtype) / na) * (y[i:j].to(dtype) / nb)).sum() for i, j in spans])
    dot = dot.sum().clamp(-1, 1)
    tt = torch.tensor(t, dtype=dtype)
    if bool(dot.abs() > DOT_THRESHOLD):
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin = torch.sin(theta)
        ca, cb = torch.sin((1 - tt) * theta) / sin, torch.sin(tt * theta) / sin
    out = torch.empty_like(x)
    for i, j in spans:
        out[i:j] = ca * x[i:j].to(dtype) + cb * y[i:j].to(dtype)
    return out.view(a.shape)


def _slerp_fused(a: ArrayInputs) -> bool:
    """The CPU kernel: norms and dot product summed in float64 in one pass (where the torch code sums in
    float32, so the two may differ by a rounding step), then the same float32 output pass."""
    if len(a.arrays) != 2 or a.base_index is None:
        return False
    x, y = a.arrays[a.base_index], a.arrays[1 - a.base_index]
    return task_vector_fast.slerp_into(x, y, a.out, float(a.params["t"]), a.threads, DOT_THRESHOLD, EPS)


@register(
    "slerp",
    params=(Param("t", float, "global", help="0 gives the base model, 1 the other model"),),
    base="required",
    min_models=2,
    max_models=2,
    paper="https://en.wikipedia.org/wiki/Slerp",
    fused=_slerp_fused,
)
def slerp(inputs: MergeInputs) -> torch.Tensor:
    """Spherical interpolation from the base model towards the other model by t."""
    base = inputs.base
    assert base is not None  # the planner guarantees a base for this method
    (other,) = inputs.others
    return slerp_tensors(float(inputs.params["t"]), base, other)
