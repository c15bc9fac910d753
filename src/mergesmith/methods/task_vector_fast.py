"""CPU fast path of the task-vector family (ties, dare_*, della*) on top of `numba_kernels`.

`fast_combine` returns None whenever it does not apply (no numba, not on the CPU, a dtype other than
bfloat16 / float32, breadcrumbs, tensors of more than two dimensions for della, small tensors where
compiling would cost more than it saves); the caller then runs the torch definition. `slerp_into` and
`weighted_sum_into` (linear) are the fused kernels of those methods, on numpy arrays; they return False
when numba fails.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mergesmith._util import lazy_module
from mergesmith.methods import hashrng
from mergesmith.methods.primitives import NORM_EPS, della_bounds_problem, generator_for

if TYPE_CHECKING:
    import torch

    from mergesmith.methods.spec import ArrayInputs, MergeInputs
    from mergesmith.methods.task_arithmetic import TaskVectorMethod
else:
    torch = lazy_module("torch")

log = logging.getLogger(__name__)
_BROKEN: str | None = None  # why the kernels failed once in this process, if they did

# Below this many elements the torch code is fast enough (and tiny merges never pay for compiling).
MIN_ELEMENTS = 1 << 16


@functools.cache
def _numba_importable() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def enabled() -> bool:
    """Whether the fused kernels may be used (numba installed and working; MERGESMITH_KERNELS=torch
    turns them off)."""
    return (
        _BROKEN is None
        and os.environ.get("MERGESMITH_KERNELS", "").lower() != "torch"
        and _numba_importable()
    )


def _np(t: torch.Tensor) -> Any:
    """A numpy view of a contiguous bfloat16 (as uint16 bits) or float32 tensor, flattened."""
    import numpy as np

    flat = t.reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def tensor_arrays(tensors: list[torch.Tensor], out: torch.Tensor) -> tuple[tuple[Any, ...], Any] | None:
    """Flat numpy views of `tensors` and `out` for a method's fused kernel, or None where none applies: the
    kernels are off, or these are not contiguous CPU bfloat16/float32 tensors of one dtype and shape."""
    if not (
        enabled()
        and out.dtype in (torch.bfloat16, torch.float32)
        and all(
            t.device.type == "cpu" and t.dtype == out.dtype and t.shape == out.shape and t.is_contiguous()
            for t in (out, *tensors)
        )
    ):
        return None
    return tuple(_np(t) for t in tensors), _np(out)


def _kernel_threads(threads: int | None = None) -> int:
    """Size numba's pool to `threads` (None: torch's thread count, what the executor chose); return it."""
    import numba

    want = threads if threads is not None else torch.get_num_threads()
    numba.set_num_threads(max(1, min(want, numba.config.NUMBA_NUM_THREADS)))
    return int(numba.get_num_threads())


def _block(n: int, threads: int) -> int:
    return max(1 << 15, -(-n // (8 * threads)))


def run_kernel(launch: Callable[[Any, int], None], n: int, threads: int | None = None) -> bool:
    """Run `launch(kernels_module, block)` over `n` elements on `threads` threads; False (after one warning
    per process) when numba fails, now or earlier in this process, so the caller uses the torch code."""
    if _BROKEN is not None:
        return False
    from mergesmith.methods import numba_kernels as K

    try:
        launch(K, _block(n, _kernel_threads(threads)))
    except Exception as exc:
        if not type(exc).__module__.startswith("numba"):
            raise
        _give_up(exc)
        return False
    return True


SUM_BLOCK = 1 << 16  # entries per partial sum of a reduction: fixed, so results do not depend on threads


def slerp_into(
    x: Any, y: Any, out: Any, t: float, threads: int | None, dot_threshold: float, eps: float
) -> bool:
    """Slerp from array x (t=0) to y (t=1) into `out` in two CPU passes: the norms and dot product summed
    in float64, then the float32 output pass as torch computes it. False when numba fails."""
    import numpy as np

    sums: list[Any] = []
    if not run_kernel(lambda K, block: sums.append(K.slerp_sums(x, y, SUM_BLOCK)), x.size, threads):
        return False
    sxx, syy, sxy = (float(v) for v in sums[0].sum(axis=0))
    na, nb = math.sqrt(sxx), math.sqrt(syy)
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = sxy / (na * nb)
    tt = float(np.float32(t))
    if math.isnan(dot):  # a NaN or infinite input: every entry is NaN, as in the torch code
        ca = cb = math.nan
    elif abs(dot) > dot_threshold:
        ca, cb = float(np.float32(1.0) - np.float32(t)), tt
    else:
        theta = math.acos(min(1.0, max(-1.0, dot)))
        ca, cb = math.sin((1 - tt) * theta) / math.sin(theta), math.sin(tt * theta) / math.sin(theta)
    return run_kernel(
        lambda K, block: K.lerp_into(x, y, np.float32(ca), np.float32(cb), out, block), x.size, threads
    )


def weighted_sum_into(a: ArrayInputs, weights: list[float], total: float, normalize: bool) -> bool:
    """a.out = sum(w_i * x_i) (divided by `total`, a float32 value, when normalize is set) with one fused
    CPU kernel, rounding as `linear` does in torch. False, touching nothing, when numba fails."""
    import numpy as np

    def launch(K: Any, block: int) -> None:
        w = np.asarray(weights, dtype=np.float32)
        K.weighted_sum(a.arrays, w, np.float32(total), bool(normalize), a.out, block)

    return run_kernel(launch, a.out.size, a.threads)


def _norms(sums: Any, mode: str) -> tuple[float, float]:
    """(before, after) norms of one pruned task vector from the kernels' per-block sums."""
    if mode == "l1":
        return float(sums[:, 0].sum()), float(sums[:, 1].sum())
    if mode == "l2":
        return math.sqrt(float(sums[:, 2].sum())), math.sqrt(float(sums[:, 3].sum()))
    return float(sums[:, 4].max()), float(sums[:, 5].max())


def _rescale(pruned: torch.Tensor, mode: str | None, sums: Any, keep_prob: float | None) -> torch.Tensor:
    """Norm-matching rescale of a pruned task vector (in its own dtype), as `primitives.rescale_masked`."""
    if mode is None or mode == "keep_prob":
        return pruned if mode is None else pruned / keep_prob
    before_f, after_f = _norms(sums, mode)
    before = torch.tensor(before_f, dtype=torch.float32).to(pruned.dtype)
    after = torch.tensor(after_f, dtype=torch.float32).to(pruned.dtype)
    if before < NORM_EPS or after < NORM_EPS:
        return pruned
    return pruned * (before / after)


def _threshold(K: Any, b: Any, f: Any, n: int, k: int, bf16: bool, block: int) -> tuple[int, int]:
    """(thr, cut) such that the k largest |d| are the entries with key > thr, plus those with key == thr
    before index cut (ties: lower index first), as `primitives.topk_mask` orders them."""
    import numpy as np

    hist = K.hist_high(b, f, block)
    high, above = (int(x) for x in K.top_bin(hist, k))
    if bf16:
        thr, per_block = high << 16, hist[:, high]
    else:
        low_hist = K.hist_low(b, f, block, high)
        low, above_low = (int(x) for x in K.top_bin(low_hist, k - above))
        above += above_low
        thr, per_block = (high << 16) | low, low_hist[:, low]
    m = k - above  # entries equal to the threshold that are kept: the first m by index
    reach = np.cumsum(per_block)
    c = int(np.argmax(reach >= m))
    before = int(reach[c - 1]) if c else 0
    return thr, K.find_cut(b, f, c * block, min(n, (c + 1) * block), thr, m - before)


def _magnitude(K: Any, b: Any, f: Any, n: int, density: float, bf16: bool, out: Any, block: int) -> Any:
    """Keep the int(density * n) largest |d| (ties: lower index first), as `primitives.magnitude_prune`."""
    if density >= 1:
        return K.prune_magnitude(b, f, -1, 0, out, block)
    thr, cut = _threshold(K, b, f, n, max(1, int(density * n)), bf16, block)
    return K.prune_magnitude(b, f, thr, cut, out, block)


def _factor(sums: Any, mode: str | None) -> float:
    """DARE's float32 rescale factor norm(before) / norm(after), or 1 where the torch code skips it."""
    import numpy as np

    if mode is None:
        return 1.0
    before_f, after_f = _norms(sums, mode)
    before, after = np.float32(before_f), np.float32(after_f)
    if before < NORM_EPS or after < NORM_EPS:
        return 1.0
    return float(before / after)


def _fused(K: Any, kind: str, b: Any, fts: list[Any], per: list[dict[str, Any]], ctx: dict[str, Any]) -> None:
    """One pass over the output: every task vector is made, pruned and combined on the fly."""
    import numpy as np

    n, bf16, block, mode, next_seed = ctx["n"], ctx["bf16"], ctx["block"], ctx["mode"], ctx["next_seed"]
    count = len(fts)
    kinds, thr, cut, bounds = (np.zeros(count, np.int64) for _ in range(4))
    seeds = np.zeros(count, np.uint64)
    recorded = kind == "della" or (kind == "random" and mode is not None)
    masks = np.empty((count, n if recorded else 1), np.uint8)
    factors = np.ones(count, np.float32)
    norm = {None: -1, "l1": 0, "l2": 1, "linf": 2}[mode]
    for i, (f, mp) in enumerate(zip(fts, per)):
        density = float(mp["density"])
        if kind == "magnitude":
            if density < 1:
                kinds[i] = K.KEEP_MAGNITUDE
                thr[i], cut[i] = _threshold(K, b, f, n, max(1, int(density * n)), bf16, block)
            continue
        seed = next_seed()
        if density >= 1:
            continue
        if kind == "della":  # the ranking pass records the keep decisions; the combine reads them back
            rows = _della_rows(ctx)
            eps = float(mp["epsilon"])
            thresholds = K.della_thresholds(n // rows, np.float32(density - eps), np.float32(2 * eps))
            sums = K.della_mask(
                b,
                f,
                rows,
                n // rows,
                thresholds,
                seed,
                masks[i],
                norm,
                16 if bf16 else 0,
                _rows_per_task(rows, ctx),
            )
            kinds[i], factors[i] = K.KEEP_MASKED, _factor(sums, mode)
            continue
        kinds[i], seeds[i], bounds[i] = K.KEEP_RANDOM, seed, hashrng.keep_threshold(density)
        if mode is not None:  # the norm pass records the keep decisions; the combine reads them back
            sums = K.random_sums(b, f, seed, int(bounds[i]), masks[i], norm, block)
            kinds[i], factors[i] = K.KEEP_MASKED, _factor(sums, mode)
    K.combine_fused(
        b, tuple(fts), kinds, thr, cut, seeds, bounds, masks, factors, *ctx["combine_args"], ctx["out"], block
    )


def _give_up(exc: BaseException) -> None:
    """A numba failure (say, no compiler support on this platform): warn once, use the torch code."""
    global _BROKEN
    _BROKEN = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    log.warning("fused CPU kernels unavailable (%s); using the torch code", _BROKEN)


def fast_combine(row: TaskVectorMethod, inputs: MergeInputs) -> torch.Tensor | None:
    """The task-vector merge of `inputs` with the fused kernels, or None when they do not apply."""
    from mergesmith.methods import task_arithmetic as ta

    base = inputs.base
    others = inputs.others
    if base is None or not others or not enabled():
        return None
    if base.device.type != "cpu" or base.dtype not in (torch.bfloat16, torch.float32):
        return None
    n = base.numel()
    kind = {ta._magnitude: "magnitude", ta._random: "random", ta._della: "della"}.get(row.sparsify)  # type: ignore[arg-type]
    if (
        n < MIN_ELEMENTS
        or kind is None
        or any(t.dtype != base.dtype or t.shape != base.shape for t in others)
    ):
        return None
    if kind == "della" and base.dim() > 2:
        return None
    params = dict(inputs.params)
    per = [dict(p) for p in inputs.others_params]
    if kind == "della" and _della_refused(per):
        return None  # the torch code raises the error
    state = inputs.generator.get_state() if inputs.generator is not None else None
    try:
        return _run(row, inputs, kind, per, params)
    except Exception as exc:
        if not type(exc).__module__.startswith("numba"):
            raise
        _give_up(exc)
        if state is not None:
            inputs.generator.set_state(state)  # type: ignore[union-attr]
        return None


def _in_dtype(x: float, dtype: str) -> float:
    """x as torch holds it in a tensor of `dtype` (bfloat16: rounded to float32, then to nearest even)."""
    import numpy as np

    f = np.float32(x)
    if dtype != "bfloat16" or f != f:
        return float(f)
    bits = int(f.view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return float(np.uint32(bits).view(np.float32))


def sparse_into(row: TaskVectorMethod, a: ArrayInputs) -> bool:
    """TIES, DARE-TIES and DELLA on numpy arrays: each task vector pruned (by magnitude, by the seeded
    random stream, or by magnitude-ranked random dropping) and combined with sign election, in the same
    passes as on torch tensors. The method's fused kernel, so these merges need no torch. False where it
    does not apply (TIES with a norm rescale, no seed for a random method, ...): the torch code runs."""
    import numpy as np

    from mergesmith.methods import task_arithmetic as ta

    params = dict(a.params)
    mode = ta._rescale(params)
    kinds = {ta._magnitude: "magnitude", ta._random: "random", ta._della: "della"}
    kind = kinds.get(row.sparsify)  # type: ignore[arg-type]
    per = [dict(p) for i, p in enumerate(a.per_model) if i != a.base_index]
    if (
        kind is None
        or not row.sign_consensus
        or (kind == "magnitude" and mode is not None)
        or (kind != "magnitude" and a.seed is None)
        or (kind == "della" and (len(a.shape) > 2 or _della_refused(per)))
        or a.base_index is None
        or len(a.arrays) < 2
        or a.out.size == 0
    ):
        return False
    b = a.arrays[a.base_index]
    fts = [x for i, x in enumerate(a.arrays) if i != a.base_index]
    weights = np.asarray([_in_dtype(float(p["weight"]), a.dtype) for p in per], dtype=np.float32)
    lam = float(params["lambda"])
    seeds = iter(hashrng.torch_stream_seeds(a.seed, len(fts)) if kind != "magnitude" else ())  # type: ignore[arg-type]

    def launch(K: Any, block: int) -> None:
        ctx = {
            "n": b.size,
            "bf16": a.dtype == "bfloat16",
            "block": block,
            "threads": _kernel_threads(a.threads),
            "mode": mode,
            "next_seed": seeds.__next__,
            # the weight total (last) only divides when there is no sign election
            "combine_args": (
                weights,
                True,
                bool(params["normalize"]),
                np.float32(lam),
                lam != 1,
                np.float32(1),
            ),
            "out": a.out,
            "shape": a.shape,
        }
        if _one_pass(kind, mode):
            _fused(K, kind, b, fts, per, ctx)  # type: ignore[arg-type]
        else:
            _two_pass(K, kind, b, fts, per, ctx)  # type: ignore[arg-type]

    return run_kernel(launch, b.size, a.threads)


def _one_pass(kind: str, mode: str | None) -> bool:
    """Whether the task vectors are made in the combine pass (else pruned and stored first): always but for
    a magnitude prune with a norm rescale and a per-entry keep_prob rescale."""
    return (kind == "magnitude" and mode is None) or (kind != "magnitude" and mode != "keep_prob")


def _della_rows(ctx: dict[str, Any]) -> int:
    """The rows DELLA ranks within: the first dimension (a tensor of fewer than two is one row)."""
    shape = ctx["shape"]
    return 1 if len(shape) < 2 else int(shape[0])


def _rows_per_task(rows: int, ctx: dict[str, Any]) -> int:
    """Rows a DELLA kernel task takes at a time: about eight tasks per thread, so they even out."""
    return max(1, rows // (8 * ctx["threads"]))


def _della_refused(per: list[dict[str, Any]]) -> bool:
    """A density/epsilon pair the torch code refuses with an error (it runs, to raise it)."""
    return any(della_bounds_problem(float(p["density"]), float(p["epsilon"])) for p in per)


def _run(
    row: TaskVectorMethod, inputs: MergeInputs, kind: str, per: list[dict[str, Any]], params: dict[str, Any]
) -> torch.Tensor:
    """Merge with the kernels (the checks in `fast_combine` have passed)."""
    import numpy as np

    from mergesmith.methods import numba_kernels as K
    from mergesmith.methods import task_arithmetic as ta

    base, others = inputs.base, inputs.others
    assert base is not None
    n = base.numel()
    threads = _kernel_threads()
    bf16 = base.dtype == torch.bfloat16
    mode = ta._rescale(params)
    weights_t = torch.tensor([float(mp["weight"]) for mp in per], dtype=base.dtype)
    linear_div = float(weights_t.sum())
    lam = float(params["lambda"])
    ctx = {
        "n": n,
        "bf16": bf16,
        "block": _block(n, threads),
        "threads": threads,
        "mode": mode,
        "next_seed": functools.partial(
            hashrng.stream_seed, generator_for(inputs.generator, torch.device("cpu"))
        )
        if row.random
        else None,
        "combine_args": (
            weights_t.float().numpy(),
            row.sign_consensus,
            bool(params["normalize"]),
            np.float32(lam),
            lam != 1,
            np.float32(linear_div if abs(linear_div) >= 1e-8 else 1.0),
        ),
    }
    tensors = [t.contiguous() for t in (base, *others)]  # kept alive while the kernels read them
    b, fts = _np(tensors[0]), [_np(t) for t in tensors[1:]]
    out = torch.empty(base.shape, dtype=base.dtype)
    ctx["out"], ctx["shape"] = _np(out), tuple(base.shape)
    if _one_pass(kind, mode):
        _fused(K, kind, b, fts, per, ctx)
    else:
        _two_pass(K, kind, b, fts, per, ctx)
    return out


def _two_pass(
    K: Any,
    kind: str,
    b: Any,
    fts: list[Any],
    per: list[dict[str, Any]],
    ctx: dict[str, Any],
) -> None:
    """Prune each task vector into memory, rescale it, then combine."""
    import numpy as np

    n, bf16, block, mode, next_seed = ctx["n"], ctx["bf16"], ctx["block"], ctx["mode"], ctx["next_seed"]
    deltas = np.empty((len(fts), n), dtype=b.dtype)
    work = np.empty(n if kind != "magnitude" else 0, dtype=np.float32)  # one float32 buffer, reused
    for i, (f, mp) in enumerate(zip(fts, per)):
        density = float(mp["density"])
        if kind == "magnitude":
            sums = _magnitude(K, b, f, n, density, bf16, deltas[i], block)
            pruned = _torch_view(deltas[i], bf16)
            pruned.copy_(_rescale(pruned, mode if density < 1 else None, sums, density))
            continue
        seed = next_seed()
        keep_prob = mode == "keep_prob"
        if density >= 1:
            sums = K.prune_random(b, f, seed, 1 << 32, 0.0, work, block)
            mode_i = None
        elif kind == "random":
            bound = hashrng.keep_threshold(density)
            sums = K.prune_random(b, f, seed, bound, density if keep_prob else 0.0, work, block)
            mode_i = mode
        else:
            rows = _della_rows(ctx)
            width = n // rows
            eps = float(mp["epsilon"])
            low, span = np.float32(density - eps), np.float32(2 * eps)
            sums = K.prune_della(
                b,
                f,
                rows,
                width,
                low,
                span,
                seed,
                keep_prob,
                work,
                16 if bf16 else 0,
                _rows_per_task(rows, ctx),
            )
            mode_i = mode
        factor = _factor(sums, None if mode_i == "keep_prob" else mode_i)
        K.scale_into(work, np.float32(factor), deltas[i], block)
    K.combine(b, deltas, *ctx["combine_args"], ctx["out"], block)


def _torch_view(a: Any, bf16: bool) -> torch.Tensor:
    """A tensor over numpy array `a` (bfloat16 from its uint16 bits)."""
    import numpy as np

    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if bf16 else torch.from_numpy(a)
