"""Sparsifiers and small tensor helpers shared by the merge methods.

Everything here is a pure function of its arguments. Random draws always come from an explicit
`torch.Generator`; the global torch RNG is never touched.

Tie rule for magnitude ranking (used everywhere a method keeps "the k largest" entries):
entries are ordered by score, largest first, and among equal scores the entry with the lower
flat (row-major) index counts as the larger one. So when several entries share the threshold
magnitude, the ones that come first in the flattened tensor are kept. Selection uses
`torch.kthvalue` to find the boundary values and never sorts the whole tensor.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from mergesmith._util import lazy_module
from mergesmith.errors import MethodError
from mergesmith.methods import hashrng

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

RESCALE_MODES = ("l1", "l2", "linf", "keep_prob")
NORM_EPS = 1e-7  # below this a norm counts as zero and no rescaling happens


def float_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 tensors, float32 for everything else."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- selection


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a 1-D tensor: exactly `flat.kthvalue(k).values`, faster.

    For large tensors a sorted random sample brackets the answer; one counting pass and one masked
    select keep only the entries inside the bracket, and `kthvalue` runs on that small band. The sample
    only guides the search (its seed is fixed and it never touches the caller's generator): the result is
    exact, and when the bracket misses, the full `kthvalue` runs instead.
    """
    n = flat.numel()
    if n <= 1 << 20:
        return flat.kthvalue(k).values
    m = 1 << 16
    g = torch.Generator(device=flat.device).manual_seed(0)
    sample = flat[torch.randint(n, (m,), generator=g, device=flat.device)].sort().values
    q = k / n
    margin = 6 * math.sqrt(max(q * (1 - q), 1.0 / m) / m) + 2.0 / m
    lo = sample[max(0, int((q - margin) * m))]
    hi = sample[min(m - 1, math.ceil((q + margin) * m))]
    below = int(torch.count_nonzero(flat < lo))
    band = flat[(flat >= lo) & (flat <= hi)]
    if below < k <= below + band.numel():
        return band.kthvalue(k - below).values
    return flat.kthvalue(k).values


def rank_window_mask(scores: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Boolean mask of the entries ranked start .. stop-1 when ordered largest first.

    Ties are broken by flat position (earlier index ranks higher), so the mask always has
    exactly max(0, min(stop, n) - max(start, 0)) entries set. Costs two `kthvalue` calls
    plus a few elementwise passes; the tensor is never fully sorted.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    start, stop = max(0, start), min(n, stop)
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if stop <= start:
        return mask.view(scores.shape)
    # kthvalue is 1-based and ascending: rank r (0-based, descending) is the (n - r)-th smallest.
    high = flat.max() if start == 0 else kth_smallest(flat, n - start)  # score of the first kept rank
    low = flat.min() if stop == n else kth_smallest(flat, n - stop + 1)  # score of the last kept rank
    mask = (flat < high) & (flat > low)
    for edge in (high,) if bool(high == low) else (high, low):
        # Entries equal to `edge` occupy ranks first .. first+len(ties)-1, in index order.
        ties = torch.nonzero(flat == edge).squeeze(1)
        first = int(torch.count_nonzero(flat > edge))
        mask[ties[max(0, start - first) : max(0, stop - first)]] = True
    return mask.view(scores.shape)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest scores (ties: lower flat index wins)."""
    return rank_window_mask(scores, 0, k)


# --------------------------------------------------------------------------- rescaling


def rescale_masked(
    tensor: torch.Tensor,
    mask: torch.Tensor,
    mode: str | None,
    keep_prob: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero the entries outside `mask` and optionally rescale what is left.

    mode None: no rescale. "l1" / "l2" / "linf": multiply by norm(before) / norm(after) so the
    chosen norm of the tensor is unchanged (skipped when either norm is below 1e-7; this is
    what mergekit does, with "l1"). "keep_prob": divide every kept entry by the probability it
    had of being kept (`keep_prob`, a number or a tensor the shape of `tensor`), which makes
    the result an unbiased estimate of the input, as in the DARE and DELLA papers.
    """
    masked = tensor * mask
    if mode is None:
        return masked
    if mode == "keep_prob":
        if keep_prob is None:
            raise MethodError("rescale_mode 'keep_prob' needs a keep probability")
        return masked / keep_prob
    if mode == "l1":
        before, after = tensor.abs().sum(), masked.abs().sum()
    elif mode == "l2":
        before, after = tensor.norm(), masked.norm()
    elif mode == "linf":
        before, after = tensor.abs().max(), masked.abs().max()
    else:
        raise MethodError(f"unknown rescale_mode {mode!r}; expected one of {', '.join(RESCALE_MODES)}")
    if before < NORM_EPS or after < NORM_EPS:
        return masked
    return masked * (before / after)


# --------------------------------------------------------------------------- randomness


def generator_for(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """The generator to draw from: the given one, or a fresh entropy-seeded one when None."""
    if generator is not None:
        return generator
    fresh = torch.Generator(device=device)
    fresh.seed()
    return fresh


# --------------------------------------------------------------------------- sparsifiers


def magnitude_prune(tensor: torch.Tensor, density: float, rescale: str | None = None) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries (at least one), zero the rest.

    density >= 1 returns the tensor untouched (no rescaling), density <= 0 returns zeros.
    """
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = topk_mask(tensor.abs().to(float_dtype(tensor)), k)
    return rescale_masked(tensor, mask, rescale, keep_prob=density)


def magnitude_outliers_prune(
    tensor: torch.Tensor, density: float, gamma: float, rescale: str | None = None
) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest gamma fraction and then the smallest, keeping density.

    With n entries: keep = int(density * n), top = int(gamma * n); the `top` largest entries
    are dropped, then entries from the small end until `keep` remain. When keep + top > n the
    outlier cut shrinks so that exactly `keep` entries survive (the smallest ones). As in
    mergekit 0.1.5, density * n < 1 keeps nothing (unlike magnitude_prune, which keeps one).
    Older mergekit releases dropped the whole tensor when gamma * n rounded to zero; 0.1.5
    fixed that and so does this function (top = 0 simply keeps the `keep` largest).
    """
    if density >= 1:
        return tensor
    n = tensor.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    # Ascending ranks bottom .. bottom+keep-1 are descending ranks n-bottom-keep .. n-bottom-1.
    mask = rank_window_mask(tensor.abs().to(float_dtype(tensor)), n - bottom - keep, n - bottom)
    return rescale_masked(tensor, mask, rescale, keep_prob=density)


def bernoulli_prune(
    tensor: torch.Tensor,
    density: float,
    rescale: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: keep every entry independently with probability `density`.

    One `hashrng` stream seed is drawn from `generator` (even when density >= 1, so every model
    consumes the generator alike); entry j is kept when value j of the stream is below
    density * 2**32. Rescaling happens in float32 (float64 for float64 inputs), as mergekit does.
    """
    seed = hashrng.stream_seed(generator_for(generator, torch.device("cpu")))
    if density >= 1:
        return tensor
    work = float_dtype(tensor)
    mask = hashrng.bernoulli_keep(seed, tensor.shape, density, tensor.device)
    return rescale_masked(tensor.to(work), mask, rescale, keep_prob=density).to(tensor.dtype)


def della_bounds_problem(density: float, epsilon: float) -> str | None:
    """Why (density, epsilon) cannot be used by DELLA's MagPrune, or None when they can."""
    if density >= 1 or density <= 0:
        return None
    if density - epsilon <= 0 or density + epsilon >= 1:
        return (
            f"della needs 0 < density - epsilon and density + epsilon < 1, "
            f"got density={density:g}, epsilon={epsilon:g}"
        )
    return None


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA MagPrune: keep entries at random with a probability that grows with magnitude rank.

    Ranks are taken along dim 1 (a 1-D tensor is treated as one row): the smallest entry of a
    row gets keep probability density - epsilon, the largest density + epsilon, linearly in
    between. Equal magnitudes are ranked by position (stable sort). A row with a single entry
    gets probability `density` (mergekit divides 0 by 0 there and fails). "keep_prob"
    rescaling divides each kept entry by its own probability, as in the paper; "l1" matches
    the L1 norm of the whole tensor, as mergekit does. Entry j (row-major) is kept by
    `hashrng.bernoulli_keep_probs` on a stream whose seed is drawn from `generator` first.
    """
    seed = hashrng.stream_seed(generator_for(generator, torch.device("cpu")))
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    problem = della_bounds_problem(density, epsilon)
    if problem:
        raise MethodError(problem)
    shape = tensor.shape
    work = float_dtype(tensor)
    rows = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor
    width = rows.shape[1]
    order = torch.sort(rows.abs().to(work), dim=1, stable=True).indices
    position = torch.arange(width, device=rows.device).view(1, width, *([1] * (rows.dim() - 2)))
    ranks = torch.empty_like(order).scatter_(1, order, position.expand_as(order))
    del order
    if width > 1:
        rank_norm = ranks.to(work) / (width - 1)
    else:
        rank_norm = torch.full(ranks.shape, 0.5, dtype=work, device=rows.device)
    del ranks
    probs = ((density - epsilon) + rank_norm * 2 * epsilon).to(work)
    mask = hashrng.bernoulli_keep_probs(seed, probs)
    out = rescale_masked(rows.to(work), mask, rescale, keep_prob=probs)
    return out.to(tensor.dtype).reshape(shape)


# --------------------------------------------------------------------------- consensus


def sign_agreement(deltas: torch.Tensor, mask_dtype: torch.dtype | None = None) -> torch.Tensor:
    """TIES sign election over dim 0: True where an entry's sign equals the sign of the column sum.

    A column sum of exactly zero elects +1; zero entries never agree with it.
    """
    dtype = deltas.dtype if mask_dtype is None else mask_dtype
    sign = deltas.sign().to(dtype)
    elected = (deltas.sum(dim=0) >= 0).to(dtype) * 2 - 1
    return sign == elected
