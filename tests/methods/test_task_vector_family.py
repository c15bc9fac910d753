"""ties, dare_*, breadcrumbs*, della*: plain reference computations and properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.errors import MethodError
from mergesmith.methods import get, hashrng

# --------------------------------------------------------------------------- reference code


def l1_rescale(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def ref_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    flat = delta.flatten()
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat)
    keep[flat.abs().argsort(descending=True)[:k]] = 1
    return (flat * keep).reshape(delta.shape)


def ref_breadcrumbs(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    if density >= 1:
        return delta
    flat = delta.flatten()
    n = flat.numel()
    n_keep = int(density * n)
    n_bottom = max(0, n - n_keep - int(gamma * n))
    ascending = flat.abs().argsort()
    keep = torch.zeros_like(flat)
    keep[ascending[n_bottom : n_bottom + n_keep]] = 1
    return (flat * keep).reshape(delta.shape)


def ref_della_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    rows = delta if delta.dim() == 2 else delta.reshape(1, -1)
    rank = rows.abs().argsort(dim=1).argsort(dim=1).float()
    return (density - epsilon) + rank / (rows.shape[1] - 1) * 2 * epsilon


def ref_combine(base, models, weights, sparsify, consensus: bool, normalize: bool, lam: float = 1.0):
    weighted = torch.stack([w * sparsify(i, m - base) for i, (m, w) in enumerate(zip(models, weights))])
    if consensus:
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(weighted) == elected).float()
        total = (weighted * agree).sum(0)
        weight_sum = sum(w * agree[i] for i, w in enumerate(weights))
        weight_sum = torch.where(weight_sum == 0, torch.ones_like(weight_sum), weight_sum)
    else:
        total = weighted.sum(0)
        weight_sum = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if normalize:
        total = total / weight_sum
    return base + lam * total


def family(seed: int, n: int, shape=(24, 20), scale=0.05):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_ties_matches_reference(merge, normalize: bool, rescale: bool, lam: float) -> None:
    tensors = family(1, 3)
    weights, densities = [1.0, 0.5, 0.8], [0.2, 0.5, 0.9]

    def sparsify(i, d):
        kept = ref_magnitude(d, densities[i])
        return l1_rescale(d, kept) if rescale else kept

    expected = ref_combine(tensors[0], tensors[1:], weights, sparsify, True, normalize, lam)
    got = merge(
        "ties",
        tensors,
        params={"normalize": normalize, "rescale": rescale, "lambda": lam},
        per={"weight": weights, "density": densities},
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_ties_with_base_in_the_middle_and_int8_mask(merge) -> None:
    tensors = family(2, 2)
    ordered = [tensors[1], tensors[0], tensors[2]]
    expected = ref_combine(
        tensors[0], tensors[1:], [0.3, 0.9], lambda i, d: ref_magnitude(d, 0.4), True, True
    )
    got = merge(
        "ties",
        ordered,
        base_index=1,
        params={"int8_mask": True},
        per={"weight": [0.3, 0.9], "density": [0.4, 0.4]},
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,consensus", [("dare_linear", False), ("dare_ties", True)])
@pytest.mark.parametrize("mode", ["l1", "keep_prob", None])
def test_dare_matches_reference(merge, method: str, consensus: bool, mode: str | None) -> None:
    tensors = family(3, 2)
    weights, densities = [0.7, 0.6], [0.3, 0.6]
    gen = torch.Generator().manual_seed(42)

    def sparsify(i, d):
        seed = hashrng.stream_seed(gen)
        mask = hashrng.bernoulli_keep(seed, d.shape, densities[i], "cpu").to(d.dtype)
        if mode is None:
            return d * mask
        if mode == "keep_prob":
            return d * mask / densities[i]
        return l1_rescale(d, d * mask)

    expected = ref_combine(tensors[0], tensors[1:], weights, sparsify, consensus, False)
    params = {"rescale": mode is not None, "rescale_mode": mode or "l1"}
    got = merge(method, tensors, params=params, per={"weight": weights, "density": densities}, seed=42)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.1, 0.6])
def test_breadcrumbs_matches_reference(merge, method: str, consensus: bool, gamma: float) -> None:
    tensors = family(4, 3)
    weights, densities = [1.0, -0.4, 0.5], [0.5, 0.7, 0.3]
    expected = ref_combine(
        tensors[0],
        tensors[1:],
        weights,
        lambda i, d: ref_breadcrumbs(d, densities[i], gamma),
        consensus,
        False,
    )
    got = merge(method, tensors, per={"weight": weights, "density": densities, "gamma": [gamma] * 3})
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "method,consensus,normalize", [("della", True, True), ("della_linear", False, False)]
)
@pytest.mark.parametrize("mode", ["l1", "keep_prob"])
@pytest.mark.parametrize("shape", [(24, 20), (300,)])
def test_della_matches_reference(merge, method, consensus, normalize, mode, shape) -> None:
    tensors = family(5, 2, shape=shape)
    weights, densities, epsilons = [1.0, 0.5], [0.5, 0.3], [0.2, 0.1]
    gen = torch.Generator().manual_seed(7)

    def sparsify(i, d):
        probs = ref_della_probs(d, densities[i], epsilons[i])
        mask = hashrng.bernoulli_keep_probs(hashrng.stream_seed(gen), probs).to(probs.dtype).reshape(d.shape)
        if mode == "keep_prob":
            return d * mask / probs.reshape(d.shape)
        return l1_rescale(d, d * mask)

    expected = ref_combine(tensors[0], tensors[1:], weights, sparsify, consensus, normalize)
    got = merge(
        method,
        tensors,
        params={"rescale_mode": mode},
        per={"weight": weights, "density": densities, "epsilon": epsilons},
        seed=7,
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_no_fine_tunes_returns_base(merge) -> None:
    base = torch.randn(5, 4)
    for method in ("ties", "dare_ties", "breadcrumbs", "della"):
        assert torch.equal(merge(method, [base], seed=0), base)


# --------------------------------------------------------------------------- properties

tensor_case = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=40, deadline=None)
@given(case=tensor_case, normalize=st.booleans(), lam=st.floats(0.1, 2.0))
def test_ties_density_one_with_agreeing_signs_is_task_arithmetic(merge, case, normalize, lam) -> None:
    seed, n, rows, cols = case
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    sign = torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
    models = [base + sign * (0.1 + torch.rand(rows, cols, generator=g)) for _ in range(n)]
    weights = (0.1 + torch.rand(n, generator=g)).tolist()
    params = {"normalize": normalize, "lambda": lam}
    per = {"weight": weights, "density": [1.0] * n}
    ties = merge("ties", [base, *models], params=params, per=per)
    plain = merge("task_arithmetic", [base, *models], params=params, per=per)
    torch.testing.assert_close(ties, plain, rtol=1e-6, atol=1e-6)
    # dare_ties at density 1 with agreeing signs is the same thing
    dare = merge("dare_ties", [base, *models], params=params, per=per, seed=seed)
    torch.testing.assert_close(dare, plain, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(case=tensor_case, rescale=st.booleans())
def test_dare_density_one_is_task_arithmetic(merge, case, rescale) -> None:
    seed, n, rows, cols = case
    tensors = family(seed, n, shape=(rows, cols))
    g = torch.Generator().manual_seed(seed + 1)
    per = {"weight": torch.randn(n, generator=g).tolist(), "density": [1.0] * n}
    dare = merge("dare_linear", tensors, params={"rescale": rescale}, per=per, seed=seed)
    plain = merge("task_arithmetic", tensors, per=per)
    assert torch.equal(dare, plain)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_same_seed_same_output_different_seed_different(merge, method: str) -> None:
    tensors = family(9, 2, shape=(40, 30))
    per = {"weight": [1.0, 0.5], "density": [0.5, 0.5], "epsilon": [0.1, 0.1]}
    per = {k: v for k, v in per.items() if get(method).param(k) is not None}
    a = merge(method, tensors, per=per, seed=123)
    b = merge(method, tensors, per=per, seed=123)
    c = merge(method, tensors, per=per, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_and_unbiased_rescale(merge, density: float) -> None:
    g = torch.Generator().manual_seed(2024)
    n = 1_000_000
    base = torch.zeros(n)
    delta = 1.0 + torch.randn(n, generator=g)  # mean 1, E[x^2] = 2
    tuned = base + delta
    per = {"weight": [1.0], "density": [density]}
    out = merge("dare_linear", [base, tuned], params={"rescale": False}, per=per, seed=1)
    kept = float((out != 0).float().mean())
    # binomial std sqrt(p(1-p)/n) <= 5e-4; 10 sigma
    assert abs(kept - density) < 5e-3
    for mode in ("keep_prob", "l1"):
        out = merge("dare_linear", [base, tuned], params={"rescale_mode": mode}, per=per, seed=2)
        # std of the mean of x*b/p is sqrt(2 (1-p) / (p n)) <= 4.3e-3 for p >= 0.1; 10 sigma
        assert abs(float(out.mean()) - float(delta.mean())) < 0.045
    # keep_prob divides every kept entry by exactly the density
    out = merge("dare_linear", [base, tuned], params={"rescale_mode": "keep_prob"}, per=per, seed=3)
    kept_mask = out != 0
    torch.testing.assert_close(out[kept_mask], delta[kept_mask] / density)
    # l1 keeps the L1 norm
    out = merge("dare_linear", [base, tuned], per=per, seed=3)
    torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)


# --------------------------------------------------------------------------- config-time checks


def test_della_validate_rejects_bad_bounds_and_tolerates_missing_values() -> None:
    validate = get("della").validate
    assert validate is not None
    assert validate({}, [{"density": 0.5, "epsilon": 0.1}]) == []
    assert validate({}, [{"density": 0.1, "epsilon": 0.15}])  # density - epsilon <= 0
    assert validate({}, [{"density": 0.9, "epsilon": 0.1}])  # density + epsilon >= 1
    assert validate({"epsilon": 0.5}, [{"density": 0.5}, {"density": 0.5, "epsilon": 0.1}])[0].startswith(
        "model #1"
    )
    # missing or unreadable values are not guessed at
    assert validate({}, [{"density": 0.1}]) == []
    assert validate({}, [{}]) == []
    assert validate({}, []) == []
    assert validate({}, [{"density": {"filter": "mlp", "value": 0.1}, "epsilon": 0.15}]) == []
    # density 1 never prunes, so any epsilon is fine
    assert validate({}, [{"density": 1.0, "epsilon": 0.5}]) == []
    # gradients are checked along their whole range
    assert validate({}, [{"density": [0.5, 0.2], "epsilon": 0.1}]) == []
    assert validate({}, [{"density": [0.5, 0.05], "epsilon": 0.1}])
    assert validate({}, [{"density": [0.5, 1.0], "epsilon": 0.1}])
    assert validate({}, [{"density": [0.5, 1.0], "epsilon": [0.1, 0.0]}]) == []
    assert get("della_linear").validate is validate


def test_della_rejects_bad_bounds_when_merging(merge) -> None:
    tensors = family(1, 1)
    with pytest.raises(MethodError):
        merge("della", tensors, per={"weight": [1.0], "density": [0.1], "epsilon": [0.15]}, seed=0)


EXPECTED_FAMILY = {
    # name: (normalize, rescale, random, extra non_base param and default)
    "ties": (True, False, False, None),
    "dare_linear": (False, True, True, None),
    "dare_ties": (False, True, True, None),
    "breadcrumbs": (False, False, False, ("gamma", 0.01)),
    "breadcrumbs_ties": (False, False, False, ("gamma", 0.01)),
    "della": (True, True, True, ("epsilon", 0.15)),
    "della_linear": (False, True, True, ("epsilon", 0.15)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FAMILY))
def test_family_defaults_follow_mergekit(name: str) -> None:
    normalize, rescale, random, extra = EXPECTED_FAMILY[name]
    spec = get(name)
    assert spec.base == "required"
    assert spec.random is random
    assert spec.param("normalize").default is normalize
    assert spec.param("rescale").default is rescale
    assert spec.param("lambda").default == 1.0
    assert spec.param("density").default == 1.0
    assert spec.param("weight").required
    assert spec.param("rescale_mode").default == "l1"
    if extra:
        assert spec.param(extra[0]).default == extra[1]
        assert spec.param(extra[0]).scope == "non_base"


def _sampled_violation(density: list[float], epsilon: list[float]) -> bool:
    """Brute force: evaluate the gradients on a fine grid plus points right next to every crossing."""

    def at(anchors: list[float], t: float) -> float:
        if len(anchors) == 1:
            return anchors[0]
        x = t * (len(anchors) - 1)
        i = min(int(x), len(anchors) - 2)
        return (1 - (x - i)) * anchors[i] + (x - i) * anchors[i + 1]

    grid = [i / 4000 for i in range(4001)]
    for k in range(len(density) - 1):
        t0, t1 = k / (len(density) - 1), (k + 1) / (len(density) - 1)
        d0, d1 = density[k], density[k + 1]
        for level in (0.0, 1.0):
            if d0 != d1 and min(d0, d1) <= level <= max(d0, d1):
                c = t0 + (level - d0) / (d1 - d0) * (t1 - t0)
                grid += [min(1.0, max(0.0, c + s)) for s in (-1e-9, 1e-9)]
    for t in grid:
        d, e = at(density, t), at(epsilon, t)
        if 0 < d < 1 and (d - e <= 0 or d + e >= 1):
            return True
    return False


anchor_lists = st.lists(st.integers(0, 119), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(density=anchor_lists, epsilon=st.lists(st.integers(0, 60), min_size=1, max_size=3))
def test_della_validate_gradients_agree_with_brute_force(density, epsilon) -> None:
    # densities sit half a step off the epsilon grid, so no anchor lands exactly on a boundary
    d = [(v + 0.5) / 100 for v in density]
    e = [v / 100 for v in epsilon]
    found = get("della").validate({}, [{"density": d if len(d) > 1 else d[0], "epsilon": e}])
    assert bool(found) == _sampled_violation(d, e)
