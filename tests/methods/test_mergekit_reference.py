"""Our method functions against outputs recorded from mergekit 0.1.5 (mergekit is not imported).

The fixture was written by `bench/compare_mergekit_methods.py --fixture` using mergekit's own
method functions on small random tensors; random methods were run with mergekit's global RNG
seeded with the same seed our generator gets, so on CPU they draw the same stream.
Regenerate it with:
    python bench/compare_mergekit_methods.py --mergekit-python /path/to/mergekit/python \
        --fixture tests/methods/data/mergekit_reference.pt
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURE = Path(__file__).parent / "data" / "mergekit_reference.pt"
CASES = torch.load(FIXTURE, weights_only=True)


def test_fixture_covers_every_method() -> None:
    from mergesmith.methods import names

    covered = {case["method"] for case in CASES}
    assert covered == set(names()) - {"linear", "slerp", "passthrough"}


@pytest.mark.parametrize("case", CASES, ids=[c["label"] for c in CASES])
def test_matches_mergekit(merge, case) -> None:
    got = merge(
        case["method"],
        case["tensors"],
        base_index=case["base_index"],
        params=case["params"],
        per=case["per"],
        seed=case["rng"],
    )
    expected = case["expected"]
    assert got.shape == expected.shape
    if expected.dtype == torch.bfloat16:
        tol = {"rtol": 1e-2, "atol": 1e-2}
    else:
        tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got.to(expected.dtype), expected, **tol)
