"""Sparsifier building blocks: selection and its tie rule, rescaling, randomness discipline."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.errors import MethodError
from mergesmith.methods import primitives as P


def test_rank_window_tie_rule_keeps_earlier_index() -> None:
    scores = torch.tensor([1.0, 3.0, 3.0, 3.0, 2.0])
    assert P.topk_mask(scores, 2).tolist() == [False, True, True, False, False]
    assert P.topk_mask(scores, 4).tolist() == [False, True, True, True, True]
    # ranks 2..3 (largest first): the third 3.0 then the 2.0
    assert P.rank_window_mask(scores, 2, 4).tolist() == [False, False, False, True, True]
    assert P.rank_window_mask(scores, 3, 3).sum() == 0
    assert P.rank_window_mask(scores, -5, 99).all()


def test_all_equal_magnitudes_keep_the_first_k() -> None:
    x = torch.tensor([[-2.0, 2.0, 2.0], [2.0, -2.0, 2.0]])
    out = P.magnitude_prune(x, 0.5)
    assert out.flatten().tolist() == [-2.0, 2.0, 2.0, 0.0, 0.0, 0.0]
    # breadcrumbs with equal magnitudes: the dropped "outliers" are the earliest entries
    out = P.magnitude_outliers_prune(x, 0.5, gamma=1 / 6)
    assert out.flatten().tolist() == [0.0, 2.0, 2.0, 2.0, 0.0, 0.0]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 300),
    levels=st.integers(1, 8),
    data=st.data(),
)
def test_rank_window_matches_a_stable_sort(seed: int, n: int, levels: int, data: st.DataObject) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (n,), generator=gen).float()  # many ties
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    # reference: order by (score descending, index ascending) with a plain Python sort
    order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[start:stop]] = True
    assert torch.equal(P.rank_window_mask(scores, start, stop), expected)


def test_selection_does_not_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("full sort used")

    monkeypatch.setattr(torch, "sort", refuse)
    monkeypatch.setattr(torch, "argsort", refuse)
    monkeypatch.setattr(torch.Tensor, "sort", refuse)
    monkeypatch.setattr(torch.Tensor, "argsort", refuse)
    x = torch.randn(50, 40)
    assert int((P.magnitude_prune(x, 0.3) != 0).sum()) == 600
    assert int((P.magnitude_outliers_prune(x, 0.3, 0.05) != 0).sum()) == 600


def test_magnitude_keeps_at_least_one_and_handles_extremes() -> None:
    x = torch.tensor([0.5, -3.0, 1.0])
    assert P.magnitude_prune(x, 0.1).tolist() == [0.0, -3.0, 0.0]
    assert P.magnitude_prune(x, 1.0) is x
    assert P.magnitude_prune(x, 0.0).tolist() == [0.0, 0.0, 0.0]
    # breadcrumbs follows int(density * n): 0.1 * 3 -> 0 entries kept
    assert P.magnitude_outliers_prune(x, 0.1, 0.0).tolist() == [0.0, 0.0, 0.0]


def test_breadcrumbs_gamma_rounding_to_zero_keeps_the_top() -> None:
    x = torch.tensor([0.125, -0.5, 0.375, 0.25])
    # gamma * n = 0.04 -> no outlier removed; the two largest survive (no whole-tensor drop)
    assert P.magnitude_outliers_prune(x, 0.5, 0.01).tolist() == [0.0, -0.5, 0.375, 0.0]


def test_rescale_modes() -> None:
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    mask = torch.tensor([True, False, True, False])
    l1 = P.rescale_masked(x, mask, "l1")
    assert torch.allclose(l1.abs().sum(), x.abs().sum())
    l2 = P.rescale_masked(x, mask, "l2")
    assert torch.allclose(l2.norm(), x.norm())
    linf = P.rescale_masked(x, mask, "linf")
    assert torch.allclose(linf.abs().max(), x.abs().max())
    kp = P.rescale_masked(x, mask, "keep_prob", keep_prob=0.25)
    assert kp.tolist() == [4.0, 0.0, 12.0, 0.0]
    assert P.rescale_masked(x, mask, None).tolist() == [1.0, 0.0, 3.0, 0.0]
    # nothing left: no division by zero
    assert P.rescale_masked(x, torch.zeros(4, dtype=torch.bool), "l1").tolist() == [0.0] * 4
    with pytest.raises(MethodError):
        P.rescale_masked(x, mask, "l3")


def test_random_sparsifiers_leave_the_global_rng_alone() -> None:
    x = torch.randn(200)
    state = torch.get_rng_state()
    P.bernoulli_prune(x, 0.5, "l1", torch.Generator().manual_seed(1))
    P.della_magprune(x, 0.5, 0.1, "l1", torch.Generator().manual_seed(1))
    P.bernoulli_prune(x, 0.5, "l1", None)  # no generator: a fresh one, still not the global RNG
    assert torch.equal(torch.get_rng_state(), state)


def test_della_bounds_are_enforced_at_merge_time() -> None:
    x = torch.randn(10, 10)
    with pytest.raises(MethodError, match="epsilon"):
        P.della_magprune(x, 0.1, 0.15)
    with pytest.raises(MethodError, match="epsilon"):
        P.della_magprune(x, 0.9, 0.1)
    assert P.della_magprune(x, 1.0, 0.5) is x  # density 1: nothing pruned, no check


def test_della_single_column_rows_use_density() -> None:
    x = torch.ones(20000, 1)
    out = P.della_magprune(x, 0.3, 0.1, None, torch.Generator().manual_seed(0))
    assert abs(float((out != 0).float().mean()) - 0.3) < 0.02


def test_della_keep_probability_rises_with_magnitude() -> None:
    x = torch.randn(400, 500, generator=torch.Generator().manual_seed(5))
    out = P.della_magprune(x, 0.5, 0.2, None, torch.Generator().manual_seed(6))
    kept = out != 0
    ranks = x.abs().argsort(dim=1).argsort(dim=1)
    low = kept[ranks < 50].float().mean()  # keep probabilities 0.300 .. 0.339, mean 0.320
    high = kept[ranks >= 450].float().mean()  # 0.661 .. 0.700, mean 0.680
    assert abs(float(kept.float().mean()) - 0.5) < 0.01
    assert abs(float(low) - 0.32) < 0.02
    assert abs(float(high) - 0.68) < 0.02


def test_kth_smallest_is_exact_on_large_tensors_with_ties():
    from mergesmith.methods.primitives import kth_smallest

    g = torch.Generator().manual_seed(3)
    for values in (
        torch.randn(3_000_000, generator=g).abs(),
        torch.randn(3_000_000, generator=g).bfloat16().float().abs(),  # heavy ties
        torch.zeros(2_000_000),
    ):
        n = values.numel()
        for k in (1, 7, n // 3, n // 2, n - 3, n):
            assert kth_smallest(values, k).item() == values.kthvalue(k).values.item()
