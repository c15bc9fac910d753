"""NuSLERP: spherical interpolation of two models, optionally of their task vectors, row-wise or flattened."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith._util import lazy_module
from mergesmith.errors import MethodError
from mergesmith.methods.registry import register
from mergesmith.methods.spec import MergeInputs, Param

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8


def nuslerp_tensors(
    t: float, a: torch.Tensor, b: torch.Tensor, row_wise: bool, flatten: bool
) -> torch.Tensor:
    """Slerp from a (t=0) to b (t=1).

    flatten: treat each tensor as one vector. Otherwise interpolate each vector along the last
    dimension (row_wise=False) or along the first dimension (row_wise=True; each column of a
    matrix is one vector). Vectors that are (numerically exactly) parallel or antiparallel,
    i.e. 1 - cos^2 <= 1e-16, are interpolated linearly instead. Magnitudes are not
    normalised: the result is sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b.
    """
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    ua = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    ub = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = torch.sum(ua * ub, dim=-1, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(parallel, 0, cos))  # finite placeholder where parallel
    sin = torch.sin(theta)
    curved = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin
    out = torch.where(parallel, (1 - t) * a + t * b, curved)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@register(
    "nuslerp",
    params=(
        Param("weight", float, "non_base", help="relative weight; t = weight_2 / (weight_1 + weight_2)"),
        Param(
            "nuslerp_row_wise",
            bool,
            "global",
            False,
            help="slerp the vectors along dim 0 instead of the last dim (when not flattened)",
        ),
        Param("nuslerp_flatten", bool, "global", True, help="slerp each tensor as one flat vector"),
    ),
    base="optional",
    min_models=2,
    max_models=3,
    min_non_base=2,
    max_non_base=2,
)
def nuslerp(inputs: MergeInputs) -> torch.Tensor:
    """Slerp between exactly two models (or their task vectors when a base model is given)."""
    others = inputs.others
    if len(others) != 2:
        raise MethodError(
            f"merge method 'nuslerp' needs exactly 2 models besides the base model, got {len(others)}"
        )
    w0, w1 = (float(p["weight"]) for p in inputs.others_params)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    row_wise = bool(inputs.params["nuslerp_row_wise"])
    flatten = bool(inputs.params["nuslerp_flatten"])
    base = inputs.base
    if base is None:
        return nuslerp_tensors(t, others[0], others[1], row_wise, flatten)
    return base + nuslerp_tensors(t, others[0] - base, others[1] - base, row_wise, flatten)
