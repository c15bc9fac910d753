"""Helpers for calling a registered method function on hand-built MergeInputs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch

from mergesmith.methods import get
from mergesmith.methods.spec import MergeInputs


def build_inputs(
    method: str,
    tensors: Sequence[torch.Tensor],
    base_index: int | None,
    params: Mapping[str, Any] | None = None,
    per: Mapping[str, Sequence[Any]] | None = None,
    generator: torch.Generator | None = None,
) -> MergeInputs:
    """MergeInputs with every parameter filled from `params` / `per` or the spec default.

    `per` maps a per-model parameter to a list of values: one per non-base input for
    "non_base" parameters, one per input for "per_model" ones.
    """
    spec = get(method)
    params = dict(params or {})
    per = dict(per or {})
    globals_ = {p.name: params.get(p.name, p.default) for p in spec.params if p.scope == "global"}
    per_model: list[dict[str, Any]] = [{} for _ in tensors]
    for p in spec.params:
        if p.scope == "global":
            continue
        targets = [i for i in range(len(tensors)) if not (p.scope == "non_base" and i == base_index)]
        values = per.get(p.name)
        for j, i in enumerate(targets):
            per_model[i][p.name] = p.default if values is None else values[j]
    return MergeInputs(
        tensors=tuple(tensors),
        base_index=base_index,
        params=globals_,
        per_model=tuple(per_model),
        name="test.weight",
        generator=generator,
    )


def run(
    method: str,
    tensors: Sequence[torch.Tensor],
    base_index: int | None = 0,
    params: Mapping[str, Any] | None = None,
    per: Mapping[str, Sequence[Any]] | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Call method `method` on the tensors (generator seeded with `seed` when given)."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return get(method).fn(build_inputs(method, tensors, base_index, params, per, gen))


@pytest.fixture(scope="session")
def merge() -> Callable[..., torch.Tensor]:
    return run


@pytest.fixture(scope="session")
def make_inputs() -> Callable[..., MergeInputs]:
    return build_inputs
