"""Karcher (Riemannian) mean of the inputs on the unit hypersphere, rescaled by their mean norm."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith._util import lazy_module
from mergesmith.methods.registry import register
from mergesmith.methods.spec import MergeInputs, Param

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _at_least_zero(v: int) -> str | None:
    return None if v >= 0 else "must be >= 0"


def karcher_mean(
    tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Weighted Karcher mean of the directions of `tensors`, times sum(alpha_i * |tensor_i|).

    Norms are taken in float32 (float64 for float64 inputs); directions stay in the input
    dtype. Inputs with norm <= tol take no part in the direction (their alphas are dropped and
    the rest renormalised) but still count in the final scale. Start from the normalised
    weighted mean direction (or the first direction when that is ~0) and repeat at most
    max_iter times: average the log maps of the inputs at the current point (skipping inputs
    closer than tol radians), stop when that tangent is shorter than tol, else follow it with
    the exponential map and renormalise.
    """
    if len(tensors) == 1:
        return tensors[0]
    norm_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(norm_dtype)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    used = [i for i, n in enumerate(norms) if n.item() > tol]
    if not used:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in used)
    weights = [alphas[i] / total for i in used]
    dirs = [units[i] for i in used]

    point = torch.zeros_like(dirs[0])
    for w, d in zip(weights, dirs):
        point += w * d
    size = torch.linalg.vector_norm(point.to(norm_dtype))
    point = dirs[0].clone() if size.item() < tol else (point / size).to(point.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(point)
        for w, d in zip(weights, dirs):
            cos = torch.clamp(torch.dot(point.flatten(), d.flatten()), -1.0, 1.0)
            angle = torch.arccos(cos)
            if angle.item() < tol:
                continue
            tangent += w * (angle / torch.sin(angle)) * (d - cos * point)
        length = torch.linalg.vector_norm(tangent.to(norm_dtype))
        if length.item() < tol:
            break
        point = (torch.cos(length) * point + torch.sin(length) * (tangent / length)).to(point.dtype)
        size = torch.linalg.vector_norm(point.to(norm_dtype))
        if size.item() > tol:
            point = (point / size).to(point.dtype)

    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * point


@register(
    "karcher",
    params=(
        Param("max_iter", int, "global", 10, help="maximum iterations", check=_at_least_zero),
        Param("tol", float, "global", 1e-5, help="convergence tolerance (radians / norm)", check=_positive),
    ),
    paper="https://arxiv.org/abs/2603.04972",
)
def karcher(inputs: MergeInputs) -> torch.Tensor:
    """Equal-weight Karcher mean of all inputs on the sphere, scaled by their average norm."""
    tensors = list(inputs.tensors)
    alphas = [1.0 / len(tensors)] * len(tensors)
    return karcher_mean(tensors, alphas, int(inputs.params["max_iter"]), float(inputs.params["tol"]))
