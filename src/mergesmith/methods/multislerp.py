"""Multi-SLERP: a weighted spherical average of any number of models (or task vectors)."""

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


@register(
    "multislerp",
    params=(
        Param("weight", float, "non_base", help="weight of this model in the spherical average"),
        Param("normalize_weights", bool, "global", True, help="divide the weights by their sum"),
        Param("eps", float, "global", 1e-8, help="small constant guarding divisions by a norm"),
    ),
    base="optional",
    min_non_base=1,
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
)
def multislerp(inputs: MergeInputs) -> torch.Tensor:
    """Average on the unit sphere via the tangent space at the weighted mean direction.

    Each input (minus the base model when there is one) is flattened and divided by its norm
    (+eps). The weighted mean m of these unit vectors is normalised; the unit vectors are
    projected onto the tangent plane at m, averaged with the weights, and mapped back with the
    exponential map (cos|v| m + sin|v| v/|v|, |v| taken +eps). The result is scaled by the
    weighted mean of the original norms and the base is added back. A single model is
    returned as is. When the mean direction vanishes (|m| < eps): two models fall back to the
    weighted linear sum, more than two are an error.
    """
    others = inputs.others
    if len(others) == 1:
        return others[0]
    eps = float(inputs.params["eps"])
    base = inputs.base
    stacked = torch.stack(others, dim=0)
    if base is not None:
        stacked = stacked - base
    vecs = stacked.reshape(len(others), -1)
    weights = torch.tensor(
        [float(p["weight"]) for p in inputs.others_params], dtype=stacked.dtype, device=stacked.device
    )
    if inputs.params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.norm(vecs, dim=-1, keepdim=True)
    units = vecs / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(others) != 2:
            raise MethodError(
                f"multislerp: the weighted mean direction of tensor {inputs.name or '?'} is zero "
                "(antipodal inputs whose weights cancel); change the weights"
            )
        out = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
        return out if base is None else out + base
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangent * weights.view(-1, 1)).sum(0)
    step_norm = torch.norm(step) + eps
    point = mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)
    out = (point * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
    return out if base is None else out + base
