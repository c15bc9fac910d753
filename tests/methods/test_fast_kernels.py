"""The fused CPU kernels (numba) against the torch definition of ties / dare / della."""

from __future__ import annotations

import pytest
import torch

from mergesmith.methods import hashrng, task_vector_fast
from mergesmith.methods.spec import ArrayInputs

pytest.importorskip("numba")

METHODS = ["ties", "dare_linear", "dare_ties", "della", "della_linear"]


def family(seed: int, models: int, shape: tuple[int, ...], dtype: torch.dtype, levels: int | None = None):
    """A base and fine-tunes; with `levels`, deltas take few distinct magnitudes (many exact ties)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    out = [base.to(dtype)]
    for _ in range(models):
        noise = torch.randn(shape, generator=g) * 0.002
        if levels:
            noise = torch.randint(-levels, levels + 1, shape, generator=g) * 2.0**-10
        out.append((base + noise).to(dtype))
    return out


def both(merge, monkeypatch, method, tensors, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch path, fused path) results of the same call."""
    calls = []
    real = task_vector_fast.fast_combine

    def spy(row, inputs):
        out = real(row, inputs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(task_vector_fast, "fast_combine", spy)
    monkeypatch.setenv("MERGESMITH_KERNELS", "torch")
    slow = merge(method, tensors, **kw)
    monkeypatch.setenv("MERGESMITH_KERNELS", "")
    fast = merge(method, tensors, **kw)
    assert calls == [False, True], "the fused path was not taken"
    return slow, fast


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", [None, "l1", "l2", "linf", "keep_prob"])
def test_bfloat16_matches_the_torch_path_bit_for_bit(merge, monkeypatch, method, mode) -> None:
    tensors = family(1, 2, (300, 256), torch.bfloat16)
    per = {"weight": [0.7, -0.3], "density": [0.4, 0.75], "epsilon": [0.1, 0.2]}
    if method == "ties":
        params = {"rescale": mode is not None, "rescale_mode": mode or "l1", "lambda": 1.3}
    else:
        params = {"rescale": mode is not None, "rescale_mode": mode or "l1"}
    per = {k: v for k, v in per.items() if k != "epsilon" or "della" in method}
    slow, fast = both(merge, monkeypatch, method, tensors, params=params, per=per, seed=5)
    assert torch.equal(slow, fast)


@pytest.mark.parametrize("method", METHODS)
def test_float32_matches_the_torch_path(merge, monkeypatch, method) -> None:
    tensors = family(2, 3, (257, 300), torch.float32)
    per = {"weight": [1.0, 0.5, 0.25], "density": [0.5, 0.3, 1.0]}
    if "della" in method:
        per["epsilon"] = [0.1, 0.2, 0.0]
    slow, fast = both(merge, monkeypatch, method, tensors, per=per, seed=9)
    if method != "ties":
        # DARE's and DELLA's l1 rescale: the kernels sum the norms in float64, torch in float32 in an order
        # that depends on its thread count, so the factors may differ in their last bit (with one thread,
        # 5068 entries of dare_linear differed, by at most 7.5e-9: one float32 step at the inputs' scale)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-8)
    else:
        assert torch.equal(slow, fast)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.93])
def test_ties_threshold_with_many_exact_ties(merge, monkeypatch, dtype, density) -> None:
    # deltas take 9 distinct magnitudes: the k-th largest value is shared by thousands of entries
    tensors = family(3, 2, (400, 300), dtype, levels=4)
    per = {"weight": [1.0, 1.0], "density": [density, density]}
    slow, fast = both(merge, monkeypatch, "ties", tensors, per=per)
    assert torch.equal(slow, fast)


@pytest.mark.parametrize("cols", [32768, 65536])
def test_top_bin_finds_the_bin_where_the_count_from_the_top_reaches_k(cols) -> None:
    import numpy as np

    from mergesmith.methods import numba_kernels as K

    def expected(hist, k):  # the search as written with numpy: cumulative counts from the top bin down
        top = np.cumsum(hist.sum(0)[::-1])
        i = int(np.argmax(top >= k))
        return cols - 1 - i, int(top[i - 1]) if i else 0

    rng = np.random.default_rng(cols)
    for trial in range(60):
        hist = rng.integers(0, 3, (int(rng.integers(1, 20)), cols)).astype(np.int64)
        if trial % 3 == 0:  # a few crowded bins, as the magnitudes of a real task vector give
            hist[:, rng.integers(0, cols, 50)] += 1000
        total = int(hist.sum())
        for k in (1, int(rng.integers(1, total + 1)), total, total + 1):
            got = K.top_bin(hist, k)
            assert (int(got[0]), int(got[1])) == expected(hist, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_della_ranks_with_exact_zeros_and_ties(merge, monkeypatch, dtype) -> None:
    # deltas take 9 values, a ninth of them exactly zero; row 7 of one fine-tune is unchanged altogether
    tensors = family(6, 2, (300, 257), dtype, levels=4)
    tensors[1][7] = tensors[0][7]
    per = {"weight": [1.0, 0.5], "density": [0.5, 0.3], "epsilon": [0.1, 0.2]}
    slow, fast = both(merge, monkeypatch, "della", tensors, per=per, seed=3)
    if dtype == torch.float32:  # l1 norms are summed in another order: equal up to float rounding
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-9)
    else:
        assert torch.equal(slow, fast)


def test_della_float32_rows_of_every_kind_side_by_side(merge, monkeypatch) -> None:
    # della_mask ranks rows two at a time: pairs mixing a row of ordinary float32 deltas (bucketed),
    # a row of subnormal deltas small enough for the key-indexed counters, and an unchanged row
    base, ft1, ft2 = family(8, 2, (41, 1700), torch.float32)
    g = torch.Generator().manual_seed(9)
    base[5:9] = 0.0
    ft1[5] = torch.randint(-30000, 30000, (1700,), generator=g).float() * 2.0**-149  # keys below 32768
    ft1[6], ft1[8] = 0.0, 0.0
    ft2[6] = torch.randint(-30000, 30000, (1700,), generator=g).float() * 2.0**-149
    per = {"weight": [1.0, 0.5], "density": [0.5, 0.3], "epsilon": [0.1, 0.2]}
    slow, fast = both(merge, monkeypatch, "della", [base, ft1, ft2], per=per, seed=4)
    # float32 sums in another order than the torch code: equal up to rounding (other data: 1.5e-8)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("width", [257, 4000])
def test_della_float32_of_bfloat16_values(merge, monkeypatch, width) -> None:
    # float32 merges of bfloat16 models: the deltas fill a few large buckets of equal top bits, so many
    # entries fall between their bucket's thresholds and are ranked exactly (two ways, by their number)
    tensors = [t.bfloat16().float() for t in family(10, 2, (20000 // width * 4, width), torch.float32)]
    per = {"weight": [1.0, 0.5], "density": [0.5, 0.3], "epsilon": [0.1, 0.2]}
    slow, fast = both(merge, monkeypatch, "della", tensors, per=per, seed=6)
    # float32 sums in another order: a few entries near zero differ by 2**-29; a keep decision that
    # differs moves an entry by a whole weighted delta, 1e-5 or more here
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-8)


def test_one_dimensional_tensors(merge, monkeypatch) -> None:
    tensors = family(4, 2, (70000,), torch.bfloat16)
    for method in ("ties", "della", "dare_ties"):
        per = {"weight": [1.0, 0.5], "density": [0.5, 0.5]}
        if method == "della":
            per["epsilon"] = [0.1, 0.1]
        slow, fast = both(merge, monkeypatch, method, tensors, per=per, seed=1)
        assert torch.equal(slow, fast)


def test_small_tensors_and_float16_stay_on_the_torch_path(merge, monkeypatch) -> None:
    calls = []
    real = task_vector_fast.fast_combine
    monkeypatch.setattr(task_vector_fast, "fast_combine", lambda row, inputs: calls.append(real(row, inputs)))
    monkeypatch.setenv("MERGESMITH_KERNELS", "")
    merge("ties", family(5, 2, (10, 10), torch.bfloat16), per={"weight": [1, 1], "density": [0.5, 0.5]})
    merge("ties", family(5, 2, (300, 256), torch.float16), per={"weight": [1, 1], "density": [0.5, 0.5]})
    merge("breadcrumbs", family(5, 2, (300, 256), torch.bfloat16), per={"weight": [1, 1]})
    assert calls == [None, None, None]


def test_stream_matches_a_plain_python_splitmix64() -> None:
    mask = (1 << 64) - 1

    def reference(seed: int, j: int) -> int:
        z = (seed + (j + 1) * hashrng.GOLDEN) & mask
        z = ((z ^ (z >> 30)) * hashrng.MIX1) & mask
        z = ((z ^ (z >> 27)) * hashrng.MIX2) & mask
        return (z ^ (z >> 31)) >> 32

    seed = 2**62 + 12345
    assert hashrng.uniform_u32(seed, 50, start=1000).tolist() == [
        reference(seed, j) for j in range(1000, 1050)
    ]


def test_stream_is_uniform() -> None:
    u = hashrng.uniform_u32(7, 1 << 20).double() / 2**32
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert (counts - (1 << 16)).abs().max() < 6 * 256  # 6 sigma of a binomial count
    assert abs(float(u.mean()) - 0.5) < 0.002
    keep = hashrng.bernoulli_keep(7, (1 << 20,), 0.3, "cpu")
    assert abs(float(keep.float().mean()) - 0.3) < 0.003


def test_a_numba_failure_falls_back_to_the_torch_code(merge, monkeypatch, caplog) -> None:
    from numba.core.errors import TypingError

    tensors = family(6, 2, (300, 256), torch.bfloat16)
    per = {"weight": [1.0, 0.5], "density": [0.5, 0.5]}
    monkeypatch.setenv("MERGESMITH_KERNELS", "torch")
    expected = merge("dare_ties", tensors, per=per, seed=4)
    monkeypatch.setenv("MERGESMITH_KERNELS", "")

    def broken(*args, **kwargs):
        raise TypingError("no implementation for this platform")

    monkeypatch.setattr(task_vector_fast, "_run", broken)
    monkeypatch.setattr(task_vector_fast, "_BROKEN", None)
    got = merge("dare_ties", tensors, per=per, seed=4)
    assert torch.equal(got, expected)  # same masks: the generator was rewound before the torch code ran
    assert "fused CPU kernels unavailable" in caplog.text
    assert not task_vector_fast.enabled()


def fused(name: str, tensors, params, base_index=None, threads=None, per=None, seed=None) -> torch.Tensor:
    """The method's fused kernel on these tensors (it must take them); params and per as `merge` takes
    them (missing ones get the method's defaults)."""
    from tests.methods.conftest import build_inputs

    from mergesmith.methods.registry import get

    inputs = build_inputs(name, tensors, base_index, params, per, None)
    out = torch.empty_like(tensors[0])
    arrays, view = task_vector_fast.tensor_arrays(list(tensors), out)
    dtype = str(out.dtype).removeprefix("torch.")
    a = ArrayInputs(
        arrays, view, dtype, base_index, inputs.params, inputs.per_model, "w", threads, seed, out.shape
    )
    assert get(name).fused(a)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("spread", [1e-5, 0.1])  # nearly colinear (plain lerp), far apart (great circle)
def test_slerp_kernel_agrees_with_the_torch_path(merge, dtype, t, spread) -> None:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(300, 257, generator=g)
    other = base + spread * torch.randn(300, 257, generator=g) * 10
    base, other = base.to(dtype), other.to(dtype)
    slow = merge("slerp", [base, other], params={"t": t})
    fast = fused("slerp", [base, other], {"t": t}, base_index=0)
    if spread < 1e-3:  # the same coefficients: the same bits
        assert torch.equal(slow, fast)
    else:  # norms and dot summed in float64 instead of float32: the coefficients differ by rounding only
        terms = base.float().abs() + other.float().abs()
        bound = torch.finfo(dtype).eps * slow.float().abs() + 4 * torch.finfo(torch.float32).eps * terms
        assert ((fast.float() - slow.float()).abs() <= bound).all()
        if dtype == torch.bfloat16:  # rounding to bfloat16 hides nearly all of that
            assert (fast != slow).float().mean() < 0.01
    assert torch.equal(fast, fused("slerp", [base, other], {"t": t}, base_index=0, threads=1))
    swapped = fused("slerp", [other, base], {"t": t}, base_index=1)  # the base may come second
    assert torch.equal(fast, swapped)


def test_slerp_kernel_gives_nan_like_the_torch_path(merge) -> None:
    base, other = family(7, 1, (64, 64), torch.float32)
    other[3, 3] = float("nan")
    fast = fused("slerp", [base, other], {"t": 0.5}, base_index=0)
    assert fast.isnan().all() and merge("slerp", [base, other], params={"t": 0.5}).isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 0.5, 0.2], [0.7, -0.3, 1.1], [2.0, 0.0]])
def test_linear_kernel_matches_the_torch_path(make_inputs, monkeypatch, dtype, normalize, weights) -> None:
    from mergesmith.methods import numba_kernels
    from mergesmith.methods.registry import get

    # 300 x 257 entries: the blocks do not divide the tensor evenly, and the last tile is short
    tensors = family(5, len(weights) - 1, (300, 257), dtype)
    tensors[-1][3, :40] = float("inf")
    inputs = make_inputs("linear", tensors, None, {"normalize": normalize}, {"weight": weights}, None)
    spec = get("linear")
    slow = spec.fn(inputs)
    fast = torch.empty_like(slow)
    calls = []
    real = numba_kernels.weighted_sum
    monkeypatch.setattr(numba_kernels, "weighted_sum", lambda *a: calls.append(1) or real(*a))
    arrays, out = task_vector_fast.tensor_arrays(list(inputs.tensors), fast)
    dtype = str(dtype).removeprefix("torch.")
    assert spec.fused(ArrayInputs(arrays, out, dtype, None, inputs.params, inputs.per_model))
    assert calls == [1]
    assert torch.equal(slow.isnan(), fast.isnan())  # NaN bit patterns may differ (torch is not uniform)
    assert torch.equal(slow.nan_to_num(), fast.nan_to_num())


def test_kernels_take_no_tensors_they_do_not_cover() -> None:
    half = family(5, 1, (300, 257), torch.float16)
    mixed = [family(5, 0, (300, 257), torch.bfloat16)[0], family(5, 0, (300, 257), torch.float32)[0]]
    strided = [t.t() for t in family(5, 1, (300, 257), torch.float32)]
    for tensors in (half, mixed, strided):
        assert task_vector_fast.tensor_arrays(tensors, torch.zeros_like(tensors[0])) is None
    fine = family(5, 1, (300, 257), torch.float32)
    assert task_vector_fast.tensor_arrays(fine, torch.zeros_like(fine[0])) is not None


@pytest.mark.parametrize("workers", [[0], [0, 8], [0, 5, 11], [3, 0]])
@pytest.mark.parametrize("trial", range(20))
def test_workers_take_every_chunk_once_each_from_its_start_up_then_from_the_top(workers, trial) -> None:
    import random

    import numpy as np

    from mergesmith.methods import numba_kernels as K

    rng = random.Random(trial)
    chunks = 16
    taken = np.zeros(chunks, np.int64)
    got: dict[int, list[int]] = {w: [] for w in workers}
    active = {w: -1 for w in workers}  # each worker's last chunk (-1: none yet)

    def step(w: int) -> None:
        active[w] = K.next_chunk(taken, w, active[w])
        if active[w] < 0:
            assert taken.all(), (w, taken)  # a worker stops only when no chunk is left to take
            del active[w]
        else:
            got[w].append(active[w])

    late = rng.choice(workers)  # one worker starts after the others have run a while
    for _ in range(rng.randrange(chunks)):
        others = [w for w in active if w != late]
        if others:
            step(rng.choice(others))
    while active:
        step(rng.choice(list(active)))
    assert sorted(c for seq in got.values() for c in seq) == list(range(chunks))
    for w, seq in got.items():
        up = 0
        while up < len(seq) and seq[up] == w + up:
            up += 1
        assert seq[up:] == sorted(seq[up:], reverse=True), (w, seq)  # then downwards from the top


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(300, 257), (7, 5), (70000,), (1,)])
@pytest.mark.parametrize("params", [{}, {"lambda": 1.3, "normalize": False}])
def test_ties_kernel_on_arrays_matches_the_torch_path(merge, monkeypatch, dtype, shape, params) -> None:
    tensors = family(3, 2, shape, dtype)
    per = {"weight": [0.3, 0.7], "density": [0.5, 0.8]}
    monkeypatch.setenv("MERGESMITH_KERNELS", "torch")
    slow = merge("ties", tensors, params=params, per=per)
    monkeypatch.setenv("MERGESMITH_KERNELS", "")
    assert torch.equal(fused("ties", tensors, params, base_index=0, per=per), slow)
    swapped = [tensors[1], tensors[0], tensors[2]]  # the base need not come first
    assert torch.equal(fused("ties", swapped, params, base_index=1, per=per), slow)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(300, 257), (7, 5)])
@pytest.mark.parametrize("mode", [None, "l1", "l2", "linf"])
def test_dare_ties_kernel_on_arrays_matches_the_torch_path(merge, monkeypatch, dtype, shape, mode) -> None:
    tensors = family(8, 2, shape, dtype)
    per = {"weight": [0.6, 0.5], "density": [0.4, 1.0]}
    params = {"rescale": mode is not None, "rescale_mode": mode or "l1"}
    monkeypatch.setenv("MERGESMITH_KERNELS", "torch")
    slow = merge("dare_ties", tensors, params=params, per=per, seed=21)
    monkeypatch.setenv("MERGESMITH_KERNELS", "")
    fast = fused("dare_ties", tensors, params, base_index=0, per=per, seed=21)
    if dtype == torch.float32 and mode in ("l1", "l2"):  # norms summed in float64, not in float32
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-8)
        if shape == (300, 257):  # the kernels of the torch-tensor path give the same bits
            assert torch.equal(fast, merge("dare_ties", tensors, params=params, per=per, seed=21))
    else:
        assert torch.equal(fast, slow)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(300, 257), (7, 5), (70000,)])
@pytest.mark.parametrize("mode", [None, "l1", "keep_prob"])
@pytest.mark.parametrize("method", ["della", "dare_ties"])
def test_two_pass_kernels_on_arrays_match_the_torch_path(
    merge, monkeypatch, dtype, shape, mode, method
) -> None:
    tensors = family(6, 2, shape, dtype)
    per = {"weight": [0.6, 0.5], "density": [0.4, 0.7]}
    if method == "della":
        per["epsilon"] = [0.1, 0.2]
    params = {"rescale": mode is not None, "rescale_mode": mode or "l1"}
    monkeypatch.setenv("MERGESMITH_KERNELS", "torch")
    slow = merge(method, tensors, params=params, per=per, seed=4)
    monkeypatch.setenv("MERGESMITH_KERNELS", "")
    fast = fused(method, tensors, params, base_index=0, per=per, seed=4)
    # float32: l1 norms are summed in float64, not in float32; a one-row della computes its keep
    # probabilities in another order (the kernels of the torch-tensor path do the same)
    if dtype == torch.float32 and (mode == "l1" or (method == "della" and len(shape) == 1)):
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-8)
    else:
        assert torch.equal(fast, slow)


def test_torch_stream_seeds_are_what_a_torch_generator_draws() -> None:
    import random

    rng = random.Random(5)
    for seed in [0, 1, 2**32 - 1, 2**32 + 7, *(rng.randrange(2**64) for _ in range(30))]:
        gen = torch.Generator().manual_seed(seed)
        assert hashrng.torch_stream_seeds(seed, 4) == [hashrng.stream_seed(gen) for _ in range(4)], seed
    for count in (113, 114, 700):  # the shortcut's last count, the first past it, past the first 624 words
        gen = torch.Generator().manual_seed(9)
        assert hashrng.torch_stream_seeds(9, count) == [hashrng.stream_seed(gen) for _ in range(count)], count


def test_sparse_kernels_leave_what_they_do_not_cover_to_the_torch_code() -> None:
    from tests.methods.conftest import build_inputs

    from mergesmith.methods.registry import get

    tensors = family(3, 2, (64, 64), torch.float32)
    per = {"weight": [0.3, 0.7], "density": [0.5, 0.8]}
    inputs = build_inputs("ties", tensors, 0, {"rescale": True}, per, None)
    out = torch.zeros_like(tensors[0])
    arrays, view = task_vector_fast.tensor_arrays(tensors, out)
    a = ArrayInputs(arrays, view, "float32", 0, inputs.params, inputs.per_model)
    assert not get("ties").fused(a) and not out.any()
    wide = build_inputs(
        "della", [t.reshape(8, 8, 64) for t in tensors], 0, {}, {**per, "epsilon": [0.1, 0.1]}
    )
    a = ArrayInputs(arrays, view, "float32", 0, wide.params, wide.per_model, seed=3, shape=(8, 8, 64))
    assert not get("della").fused(a) and not out.any()  # rows of a 3-d tensor: the torch code
    no_seed = build_inputs("dare_ties", tensors, 0, {}, per, None)
    assert not get("dare_ties").fused(
        ArrayInputs(arrays, view, "float32", 0, no_seed.params, no_seed.per_model)
    )
    assert get("dare_linear").fused is None and get("della_linear").fused is None  # no sign election


def test_linear_weight_total_without_torch_is_torchs() -> None:
    import random

    from mergesmith.methods.linear import _torch_f32_sum

    rng = random.Random(3)
    found = 0
    for _ in range(3000):
        n = rng.randint(1, 6)
        pool = [
            0.5,
            1.0,
            2.0,
            0.25,
            0.3,
            0.7,
            0.2,
            -0.5,
            rng.random(),
            rng.uniform(-3, 3) * 10 ** rng.randint(-6, 6),
        ]
        weights = [rng.choice(pool) for _ in range(n)]
        total = _torch_f32_sum(weights)
        if total is not None:
            found += 1
            assert total == float(torch.tensor(weights, dtype=torch.float32).sum()), weights
    assert found > 1500  # up to three weights always, more when their sums are exact
    assert _torch_f32_sum([0.1, 0.2, 0.3, 0.4, 0.5]) is None  # five inexact weights: torch adds them
    assert _torch_f32_sum([1e39]) is None  # not a float32 number


def test_bfloat16_rounding_matches_torch_on_special_values() -> None:
    """The kernels' float32 -> bfloat16 rounding (no branch, no NaN test) against torch's conversion on
    every float32 that is not a NaN: ties to even, overflow to infinity, subnormals, signed zeros. NaNs
    of the only kind the kernels make (low 16 bits zero) come through with their bits unchanged."""
    import numba
    import numpy as np

    from mergesmith.methods import numba_kernels as K

    @numba.njit
    def round_all(x, out):  # type: ignore[no-untyped-def]
        for j in range(x.size):
            out[j] = K._round_bf16(x[j])

    special = [0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x80000000, 0x00000000]
    special += [0x3F808000, 0x3F818000, 0x3F807FFF, 0x007FFFFF, 0x00408000, 0xFF7FFFFF, 0x80008000]
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(0, 2**32, (100_000,), generator=g, dtype=torch.int64).tolist()
    bits = np.array(special + rand, dtype=np.uint32)
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    out = np.empty_like(x)
    round_all(x, out)
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).float().numpy()
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))

    # NaNs as bfloat16 inputs hold them (any payload, either sign), and the default NaNs of x86 and Arm
    halves = torch.randint(0, 2**16, (20_000,), generator=g, dtype=torch.int64).numpy().astype(np.uint32)
    nan_bits = np.concatenate([(halves | 0x7F81) << 16, (halves | 0xFF81) << 16])
    nan_bits = np.concatenate([nan_bits, np.array([0x7FC00000, 0xFFC00000, 0x7F810000], np.uint32)])
    nans = nan_bits.view(np.float32)
    assert np.isnan(nans).all()
    out = np.empty_like(nans)
    round_all(nans, out)
    assert np.array_equal(out.view(np.uint32), nan_bits)
