"""sce, ram, ramplus_tl, nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.errors import MethodError
from mergesmith.methods import get


def randn(seed: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def family(seed: int, n: int, shape=(16, 12), scale=0.1, dtype=torch.float32):
    base = randn(seed, *shape, dtype=dtype)
    return [base] + [base + scale * randn(seed * 100 + i + 1, *shape, dtype=dtype) for i in range(n)]


# --------------------------------------------------------------------------- sce


def ref_sce(base, models, topk):
    tvs = torch.stack([m - base for m in models])
    if topk < 1:
        var = ((tvs - tvs.mean(0)) ** 2).mean(0)
        k = int(int((var != 0).sum()) * topk)
        keep = torch.zeros(var.numel())
        keep[var.flatten().argsort(descending=True)[:k]] = 1
        tvs = tvs * keep.reshape(var.shape)
    energy = torch.tensor([float((tv**2).mean()) for tv in tvs])
    w = energy / energy.sum()
    elected = torch.where(tvs.sum(0) >= 0, 1.0, -1.0)
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for i, tv in enumerate(tvs):
        agree = (torch.sign(tv) == elected).float()
        num += w[i] * agree * tv
        den += w[i] * agree
    return base + num / den.clamp(min=1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("shape", [(16, 12), (200,)])
def test_sce_matches_reference(merge, topk, shape) -> None:
    tensors = family(1, 3, shape=shape)
    got = merge("sce", tensors, params={"select_topk": topk})
    torch.testing.assert_close(got, ref_sce(tensors[0], tensors[1:], topk), rtol=1e-5, atol=1e-6)


def test_sce_zero_task_vectors_give_base(merge) -> None:
    base = randn(3, 8, 8)
    assert torch.equal(merge("sce", [base, base.clone(), base.clone()]), base)


# --------------------------------------------------------------------------- ram


def ref_ram(base, models, eps, plus=None):
    tvs = [(m - base).flatten().tolist() for m in models]
    n = len(tvs[0])
    active = [[abs(tv[j]) > eps for j in range(n)] for tv in tvs]
    counts = [sum(a[j] for a in active) for j in range(n)]
    boost = [1.0] * len(tvs)
    if plus is not None:
        r, alpha = plus
        for i in range(len(tvs)):
            shared = sum(1 for j in range(n) if active[i][j] and counts[j] > 1)
            unique = sum(1 for j in range(n) if active[i][j] and counts[j] == 1)
            ratio = shared / max(unique, eps)
            boost[i] = 1 + r * min(max(ratio, 0.0), alpha)
    out = []
    for j in range(n):
        if counts[j] == 1:
            i = next(i for i in range(len(tvs)) if active[i][j])
            out.append(tvs[i][j] * boost[i])
        elif counts[j] > 1:
            out.append(sum(tvs[i][j] for i in range(len(tvs)) if active[i][j]) / counts[j])
        else:
            out.append(0.0)
    return base + torch.tensor(out).reshape(base.shape)


def sparse_family(seed: int, n: int, shape=(10, 9), frac=0.4):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(n):
        on = torch.rand(shape, generator=g) < frac
        models.append(base + 0.01 * torch.randn(shape, generator=g) * on)
    return [base, *models]


@pytest.mark.parametrize("eps", [1e-5, 0.004])
def test_ram_matches_reference(merge, eps) -> None:
    tensors = sparse_family(2, 3)
    got = merge("ram", tensors, params={"epsilon": eps})
    torch.testing.assert_close(got, ref_ram(tensors[0], tensors[1:], eps), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.5, 1.0), (1.0, 5.0)])
def test_ramplus_tl_matches_reference(merge, r, alpha) -> None:
    tensors = sparse_family(3, 3)
    got = merge("ramplus_tl", tensors, params={"r": r, "alpha": alpha})
    expected = ref_ram(tensors[0], tensors[1:], 1e-5, plus=(r, alpha))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_ram_disjoint_changes_are_summed(merge) -> None:
    base = torch.zeros(6)
    a = torch.tensor([1.0, 2.0, 0, 0, 0, 0])
    b = torch.tensor([0, 0, 3.0, 4.0, 0, 0])
    assert merge("ram", [base, a, b]).tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0]


def test_ramplus_epsilon_zero_stays_finite(merge) -> None:
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, 0, 0])
    b = torch.tensor([1.0, 1.0, 0, 0])  # no unique entries at all
    out = merge("ramplus_tl", [base, a, b], params={"epsilon": 0.0})
    assert torch.isfinite(out).all()
    assert out.tolist() == [1.0, 1.0, 0.0, 0.0]


# --------------------------------------------------------------------------- nuslerp


def ref_slerp_vec(t: float, a: list[float], b: list[float]) -> list[float]:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    cos = sum(x * y for x, y in zip(a, b)) / (max(na, 1e-7) * max(nb, 1e-7))
    cos = max(-1.0, min(1.0, cos))
    if 1 - cos * cos <= 1e-16:
        return [(1 - t) * x + t * y for x, y in zip(a, b)]
    theta = math.acos(cos)
    s = math.sin(theta)
    return [(math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / s for x, y in zip(a, b)]


def ref_nuslerp(t, a, b, row_wise, flatten):
    if flatten:
        return torch.tensor(ref_slerp_vec(t, a.flatten().tolist(), b.flatten().tolist())).reshape(a.shape)
    if row_wise:  # vectors along dim 0
        cols = [ref_slerp_vec(t, a[:, j].tolist(), b[:, j].tolist()) for j in range(a.shape[1])]
        return torch.tensor(cols).T
    return torch.tensor([ref_slerp_vec(t, a[i].tolist(), b[i].tolist()) for i in range(a.shape[0])])


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False), (True, True)])
def test_nuslerp_matches_reference(merge, with_base, row_wise, flatten) -> None:
    tensors = family(4, 2, scale=0.8)
    weights = [0.3, 0.9]
    t = 0.9 / 1.2
    params = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    if with_base:
        base, a, b = tensors
        expected = base + ref_nuslerp(t, a - base, b - base, row_wise, flatten)
        got = merge("nuslerp", tensors, base_index=0, params=params, per={"weight": weights})
    else:
        _, a, b = tensors
        expected = ref_nuslerp(t, a, b, row_wise, flatten)
        got = merge("nuslerp", [a, b], base_index=None, params=params, per={"weight": weights})
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_nuslerp_endpoints_and_zero_weights(merge) -> None:
    _, a, b = family(5, 2, scale=1.0)
    torch.testing.assert_close(merge("nuslerp", [a, b], None, per={"weight": [1.0, 0.0]}), a)
    torch.testing.assert_close(merge("nuslerp", [a, b], None, per={"weight": [0.0, 2.0]}), b)
    # weights summing to ~0 mean t = 0.5
    half = merge("nuslerp", [a, b], None, per={"weight": [1.0, -1.0]})
    torch.testing.assert_close(half, ref_nuslerp(0.5, a, b, False, True), rtol=1e-4, atol=1e-5)


def test_nuslerp_refuses_three_fine_tunes(merge) -> None:
    tensors = family(6, 3)
    with pytest.raises(MethodError, match="exactly 2"):
        merge("nuslerp", tensors[1:], None, per={"weight": [1.0, 1.0, 1.0]})


# --------------------------------------------------------------------------- multislerp


def ref_multislerp(tensors, weights, base=None, normalize=True, eps=1e-8):
    xs = [(t - base if base is not None else t).double().flatten() for t in tensors]
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = [x.norm() for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    length = tangent.norm() + eps
    point = mean * torch.cos(length) + tangent * torch.sin(length) / length
    out = (point * sum(wi * n for wi, n in zip(w, norms))).reshape(tensors[0].shape).float()
    return out if base is None else out + base


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_reference(merge, with_base, normalize) -> None:
    tensors = family(7, 3, scale=0.7)
    weights = [0.2, 0.5, 0.3] if normalize else [0.4, 0.4, 0.4]
    params = {"normalize_weights": normalize}
    if with_base:
        got = merge("multislerp", tensors, 0, params=params, per={"weight": weights})
        expected = ref_multislerp(tensors[1:], weights, base=tensors[0], normalize=normalize)
    else:
        got = merge("multislerp", tensors[1:], None, params=params, per={"weight": weights})
        expected = ref_multislerp(tensors[1:], weights, normalize=normalize)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_multislerp_single_model_and_antipodal_inputs(merge) -> None:
    a = randn(8, 5, 5)
    assert torch.equal(merge("multislerp", [a], None, per={"weight": [0.3]}), a)
    # two antipodal inputs with equal weights: weighted linear fallback
    out = merge("multislerp", [a, -a], None, per={"weight": [1.0, 1.0]})
    torch.testing.assert_close(out, torch.zeros_like(a))
    with pytest.raises(MethodError, match="weights"):
        merge("multislerp", [a, -a, a, -a], None, per={"weight": [1.0, 1.0, 1.0, 1.0]})


# --------------------------------------------------------------------------- karcher


def ref_karcher(tensors, iters=2000):
    """Karcher mean of the directions by plain Riemannian gradient descent in float64."""
    xs = [t.double().flatten() for t in tensors]
    norms = [x.norm() for x in xs]
    units = [x / n for x, n in zip(xs, norms)]
    point = sum(units) / len(units)
    point = point / point.norm()
    for _ in range(iters):
        grad = torch.zeros_like(point)
        for u in units:
            c = torch.clamp(point @ u, -1, 1)
            th = torch.arccos(c)
            if th > 1e-12:
                grad += th / torch.sin(th) * (u - c * point) / len(units)
        g = grad.norm()
        if g < 1e-14:
            break
        point = torch.cos(g) * point + torch.sin(g) * grad / g
        point = point / point.norm()
    return (point * (sum(norms) / len(norms))).reshape(tensors[0].shape)


def test_karcher_matches_reference(merge) -> None:
    tensors = [randn(9 + i, 12, 10, dtype=torch.float64) for i in range(3)]
    got = merge("karcher", tensors, None, params={"max_iter": 200, "tol": 1e-12})
    torch.testing.assert_close(got, ref_karcher(tensors), rtol=1e-7, atol=1e-9)
    # float32 with the defaults converges to the same point within float32 accuracy
    got32 = merge("karcher", [t.float() for t in tensors], None)
    torch.testing.assert_close(got32.double(), ref_karcher(tensors), rtol=2e-3, atol=2e-3)


def test_karcher_zero_inputs(merge) -> None:
    z = torch.zeros(4, 4)
    assert torch.equal(merge("karcher", [z, z.clone()], None), z)
    a = randn(1, 4, 4)
    # a zero input takes no part in the direction but halves the scale
    out = merge("karcher", [a, z], None)
    torch.testing.assert_close(out, a / 2)


# --------------------------------------------------------------------------- model_stock


def ref_model_stock(base, models, filter_wise):
    rows = (
        (lambda x: x.reshape(1, -1) if x.dim() == 1 else x) if filter_wise else (lambda x: x.reshape(1, -1))
    )
    b = rows(base).double()
    ws = [rows(m).double() for m in models]
    ds = [w - b for w in ws]
    out = torch.empty_like(b)
    n = len(ws)
    for r in range(b.shape[0]):
        cos = []
        for i in range(n):
            for j in range(i + 1, n):
                x, y = ds[i][r], ds[j][r]
                cos.append(float(torch.clamp(x @ y / max(float(x.norm() * y.norm()), 1e-6), -1, 1)))
        c = sum(cos) / len(cos)
        denom = 1 + (n - 1) * c
        t = 0.0 if abs(denom) < 1e-6 else n * c / denom
        avg = sum(w[r] for w in ws) / n
        out[r] = t * avg + (1 - t) * b[r]
    return out.reshape(base.shape).float()


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape,n", [((16, 12), 2), ((16, 12), 4), ((50,), 3)])
def test_model_stock_matches_reference(merge, filter_wise, shape, n) -> None:
    base = randn(11, *shape)
    common = 0.1 * randn(12, *shape)  # shared direction so the cosines are clearly positive
    models = [base + common + 0.1 * randn(13 + i, *shape) for i in range(n)]
    got = merge("model_stock", [base, *models], params={"filter_wise": filter_wise})
    expected = ref_model_stock(base, models, filter_wise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_model_stock_singular_keeps_base(merge) -> None:
    base = torch.zeros(6)
    a = torch.tensor([1.0, 0, 0, 0, 0, 0])
    b = -a  # cos = -1 with two models: 1 + (2 - 1) * (-1) = 0
    assert torch.equal(merge("model_stock", [base, a, b]), base)


# --------------------------------------------------------------------------- nearswap


@pytest.mark.parametrize("t", [0.0, 0.01, 0.1, 10.0])
def test_nearswap_matches_reference(merge, t) -> None:
    base, other = family(14, 1, scale=0.05)
    expected = []
    for a, b in zip(base.flatten().tolist(), other.flatten().tolist()):
        mix = min(1.0, max(0.0, t / max(abs(a - b), 1e-6)))
        expected.append(mix * b + (1 - mix) * a)
    got = merge("nearswap", [base, other], params={"t": t})
    torch.testing.assert_close(got, torch.tensor(expected).reshape(base.shape), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- arcee_fusion


def ref_arcee(base, tuned):
    p = torch.softmax(tuned.double(), -1) + 1e-8
    q = torch.softmax(base.double(), -1) + 1e-8
    kl = (p * (p / q).log()).sum(-1, keepdim=True)
    score = ((tuned - base).abs().double() * kl).flatten()
    ordered = sorted(score.tolist())
    n = len(ordered)
    q1, q2, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    keep = (score >= q2 + 1.5 * (q3 - q1)).reshape(base.shape)
    return torch.where(keep, tuned, base)


@pytest.mark.parametrize("shape", [(32, 24), (500,)])
def test_arcee_fusion_matches_reference(merge, shape) -> None:
    base, tuned = family(15, 1, shape=shape, scale=0.3)
    got = merge("arcee_fusion", [base, tuned], seed=0)
    torch.testing.assert_close(got, ref_arcee(base, tuned), rtol=1e-5, atol=1e-6)


def test_arcee_fusion_sampling_is_seeded(merge) -> None:
    base, tuned = family(16, 1, shape=(300, 200), scale=0.3)
    small = {"quantile_sample_size": 5000}
    a = merge("arcee_fusion", [base, tuned], params=small, seed=1)
    b = merge("arcee_fusion", [base, tuned], params=small, seed=1)
    c = merge("arcee_fusion", [base, tuned], params=small, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    exact = merge("arcee_fusion", [base, tuned], params={"quantile_sample_size": 0}, seed=1)
    torch.testing.assert_close(exact, ref_arcee(base, tuned), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- identity properties


def away_from_zero(seed: int, rows: int, cols: int, scale: float) -> torch.Tensor:
    """Random entries with magnitudes in [scale/2, 3*scale/2] (no near-zero vectors to trip eps floors)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0)
    return scale * sign * (0.5 + torch.rand(rows, cols, generator=g))


shapes = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 10), st.integers(1, 10), st.floats(0.05, 20.0))


@settings(max_examples=50, deadline=None)
@given(case=shapes, n=st.integers(2, 5))
def test_model_stock_of_identical_fine_tunes_is_that_fine_tune(merge, case, n) -> None:
    seed, rows, cols, scale = case
    base = randn(seed, rows, cols)
    tuned = base + away_from_zero(seed + 1, rows, cols, scale)
    for filter_wise in (False, True):
        out = merge(
            "model_stock", [base] + [tuned.clone() for _ in range(n)], params={"filter_wise": filter_wise}
        )
        torch.testing.assert_close(out, tuned, rtol=1e-5, atol=1e-5 * scale)


@settings(max_examples=50, deadline=None)
@given(case=shapes, n=st.integers(2, 4), with_base=st.booleans(), data=st.data())
def test_spherical_means_of_identical_inputs_return_the_input(merge, case, n, with_base, data) -> None:
    seed, rows, cols, scale = case
    x = away_from_zero(seed, rows, cols, scale)
    base = randn(seed + 7, rows, cols) if with_base else None
    weights = [data.draw(st.floats(0.1, 5.0)) for _ in range(n)]
    tol = {"rtol": 1e-4, "atol": 1e-5 * scale}
    copies = [x.clone() for _ in range(n)]
    karcher = merge("karcher", copies, None)
    torch.testing.assert_close(karcher, x, **tol)
    inputs, index = ([base] + [x + base for _ in range(n)], 0) if with_base else (copies, None)
    expected = x + base if with_base else x
    multi = merge("multislerp", inputs, index, per={"weight": weights})
    torch.testing.assert_close(multi, expected, **tol)
    pair = inputs[: 3 if with_base else 2]
    nus = merge("nuslerp", pair, index, per={"weight": weights[:2]})
    torch.testing.assert_close(nus, expected, **tol)


# --------------------------------------------------------------------------- contracts

CONTRACTS = {
    # name: (base policy, min_models, max_models, min_non_base, {param: default})
    "sce": ("required", 1, None, 0, {"select_topk": 1.0, "int8_mask": False}),
    "ram": ("required", 1, None, 0, {"epsilon": 1e-5}),
    "ramplus_tl": ("required", 1, None, 0, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    "nuslerp": ("optional", 2, 3, 2, {"nuslerp_row_wise": False, "nuslerp_flatten": True}),
    "multislerp": ("optional", 1, None, 1, {"normalize_weights": True, "eps": 1e-8}),
    "karcher": ("ignored", 1, None, 0, {"max_iter": 10, "tol": 1e-5}),
    "model_stock": ("required", 3, None, 0, {"filter_wise": False}),
    "nearswap": ("required", 2, 2, 0, {}),
    "arcee_fusion": ("required", 2, 2, 0, {"quantile_sample_size": 1_000_000}),
}


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_contracts_and_defaults_follow_mergekit(name: str) -> None:
    base, lo, hi, non_base, defaults = CONTRACTS[name]
    spec = get(name)
    assert (spec.base, spec.min_models, spec.max_models, spec.min_non_base) == (base, lo, hi, non_base)
    for param, default in defaults.items():
        assert spec.param(param).default == default, param
    assert all(p.scope == "global" for p in spec.params if p.name != "weight")
    if name in ("nuslerp", "multislerp"):
        assert spec.param("weight").scope == "non_base" and spec.param("weight").required
    if name == "nearswap":
        assert spec.param("t").required


@pytest.mark.parametrize(
    "name,params,per",
    [
        ("ram", {}, {}),
        ("nearswap", {"t": 0.05}, {}),
        ("task_arithmetic", {"lambda": 0.7, "normalize": True}, {"weight": [0.5, 0.8]}),
    ],
)
def test_elementwise_methods_give_the_same_result_row_by_row(merge, name, params, per) -> None:
    assert get(name).elementwise
    tensors = sparse_family(17, 1 if name == "nearswap" else 2, shape=(12, 7))
    whole = merge(name, tensors, params=params, per=per)
    rows = torch.cat(
        [merge(name, [t[i : i + 5] for t in tensors], params=params, per=per) for i in range(0, 12, 5)]
    )
    assert torch.equal(whole, rows)
