"""Our method functions against outputs recorded from mergekit 0.1.5 (mergekit is not imported).

The fixture was written by `bench/compare_mergekit_methods.py --fixture` using mergekit's own
method functions on small random tensors. The random methods (dare_*, della*) draw their masks from
our own counter-based stream (`mergesmith.methods.hashrng`), not from torch's global RNG as mergekit
does, so their recorded outputs cannot match entry for entry: for them this test checks that the
result stays on the same support (only entries mergekit could change are changed) and that
`tests/methods/test_random_distribution.py` covers the distribution.
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


RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}


def run_ours(merge, case) -> torch.Tensor:
    """Our method on the fixture case's inputs, parameters and seed."""
    return merge(
        case["method"],
        case["tensors"],
        base_index=case["base_index"],
        params=case["params"],
        per=case["per"],
        seed=case["rng"],
    )


@pytest.mark.parametrize("case", [c for c in CASES if c["method"] not in RANDOM], ids=lambda c: c["label"])
def test_matches_mergekit(merge, case) -> None:
    got = run_ours(merge, case)
    expected = case["expected"]
    assert got.shape == expected.shape
    if expected.dtype == torch.bfloat16:
        tol = {"rtol": 1e-2, "atol": 1e-2}
    else:
        tol = {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got.to(expected.dtype), expected, **tol)


@pytest.mark.parametrize("case", [c for c in CASES if c["method"] in RANDOM], ids=lambda c: c["label"])
def test_random_methods_change_what_mergekit_changes(merge, case) -> None:
    """Same inputs, our stream: the output is finite and moves off the base exactly where some task
    vector is non-zero (mergekit's output moves there too, with its own masks)."""
    got = run_ours(merge, case)
    base = case["tensors"][case["base_index"]]
    assert got.shape == case["expected"].shape and torch.isfinite(got).all()
    others = [t for i, t in enumerate(case["tensors"]) if i != case["base_index"]]
    movable = torch.stack([t != base for t in others]).any(0)
    assert not (got != base)[~movable].any()
    # both outputs drop a comparable share of the deltas
    ours, theirs = float((got != base).float().mean()), float((case["expected"] != base).float().mean())
    assert abs(ours - theirs) < 0.35
