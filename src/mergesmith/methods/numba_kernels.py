"""Fused CPU kernels (numba): the sparsifying task-vector methods (ties, dare_*, della*), linear, slerp.

The torch code in `task_arithmetic` and `primitives` is the definition; these kernels compute the same
thing in one or two passes over memory instead of a dozen, for bfloat16 and float32 tensors. They follow
the same rounding steps (bfloat16 results are rounded to nearest-even after each step the torch code
rounds), so they give the same bits; the random methods draw from the same `hashrng` stream.

Arrays are bfloat16 bit patterns (uint16) or float32; every kernel works on both (the helpers below
dispatch on the array dtype at compile time). This module imports numba: import it only where the
kernels run. Compiled code is cached on disk, so only the first run pays for compiling.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from mergesmith.methods.hashrng import GOLDEN, MIX1, MIX2

u32 = np.uint32
u64 = np.uint64
f32 = np.float32


@intrinsic
def f32_from_bits(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


@intrinsic
def bits_from_f32(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


@intrinsic
def fma32(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a * b + c rounded once (LLVM's fma), as torch's vectorized `add(x, y, alpha=w)` computes it."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        from llvmlite import ir

        f = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f, [f, f, f]), "llvm.fma.f32")
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def claim(typingctx: Any, taken: Any, c: Any) -> Any:
    """Mark chunk c of a kernel call taken (taken[c] = 1, one atomic step); True when it was free."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])
        old = builder.atomic_rmw("xchg", ptr, context.get_constant(types.int64, 1), "monotonic")
        return builder.icmp_unsigned("==", old, context.get_constant(types.int64, 0))

    return types.boolean(types.Array(types.int64, 1, "C"), types.intp), codegen


@numba.njit
def next_chunk(taken: Any, start: int, prev: int) -> int:
    """The next chunk for the worker that began at chunk `start` (prev: its last one, -1 at first), or -1.

    Kernels run their chunks as workers, one per iteration of the parallel loop: a worker takes chunks
    upwards from its own start until it meets one already taken, then takes what is left from the top
    down. numba gives each thread a fixed run of iterations, so each thread's first worker takes that
    thread's share in order and, if it finishes first, the share a delayed thread has not reached (a
    thread held up by the loader, writer or hashing threads no longer leaves the other core idle); the
    later workers find nothing left. The threads write far apart in the output, as with a fixed split
    (taking chunks in turn from one counter put them in the same pages: 2.5 s more system time for a
    DARE-TIES merge of the bench models)."""
    n, first, last = np.int64(taken.size), np.int64(start), np.int64(prev)  # (prange indices are unsigned)
    c = first if last < 0 else last + 1
    if last < 0 or last >= first:
        if c < n and claim(taken, c):
            return c
        c = n - 1
    else:
        c = last - 1
    while c >= 0:
        if claim(taken, c):
            return c
        c -= 1
    return -1


@numba.njit
def chunks_for(taken: Any, worker: int) -> Any:
    """The chunks a kernel's worker takes, one after another (see `next_chunk`)."""
    c = next_chunk(taken, worker, -1)
    while c >= 0:
        yield c
        c = next_chunk(taken, worker, c)


@numba.njit
def tiles(lo: int, hi: int) -> Any:
    """(start, stop) of each TILE-long piece of the range [lo, hi), the last one shorter."""
    for t0 in range(lo, hi, TILE):
        yield t0, min(hi, t0 + TILE)


def load(a: Any, j: int) -> Any:
    """Entry j of a bfloat16-bits or float32 array, as float32."""


def rnd(like: Any, f: Any) -> Any:
    """f rounded to the dtype of array `like` (nearest even for bfloat16, as torch converts)."""


def store(a: Any, j: int, f: Any) -> None:
    """Write float32 f (already rounded) into entry j of a bfloat16-bits or float32 array."""


@overload(load)
def _load(a, j):  # type: ignore[no-untyped-def]  # numba compares these parameters with the lambda's
    if a.dtype == types.uint16:
        return lambda a, j: f32_from_bits(u32(a[j]) << u32(16))
    return lambda a, j: f32(a[j])


@numba.njit
def _round_bf16(f: Any) -> Any:
    """f rounded to the nearest bfloat16, ties to even, for every float32 f except NaNs with any of their
    low 16 bits set (the carry may turn them into an infinity or a zero). The kernels make no such NaN:
    theirs come from bfloat16 inputs (low half zero), are the default NaN of an invalid operation
    (0x7FC00000 or 0xFFC00000) or pass one of those on (arithmetic keeps an operand NaN's bits, only
    quieting it), and the float32 parameters are converted from Python floats, whose NaNs are of the same
    kinds. Such a NaN comes out unchanged. (Testing for NaN here, even by a select, cost the combining
    passes a quarter to a third of their time.)"""
    b = bits_from_f32(f32(f))
    r = (b + u32(0x7FFF) + ((b >> u32(16)) & u32(1))) & u32(0xFFFF0000)
    return f32_from_bits(r)


@overload(rnd)
def _rnd(like, f):  # type: ignore[no-untyped-def]
    if like.dtype == types.uint16:
        return lambda like, f: _round_bf16(f)
    return lambda like, f: f32(f)


@overload(store)
def _store(a, j, f):  # type: ignore[no-untyped-def]
    if a.dtype == types.uint16:
        return lambda a, j, f: _set_u16(a, j, u32(bits_from_f32(f32(f)) >> u32(16)))
    return lambda a, j, f: _set_f32(a, j, f32(f))


@numba.njit
def _set_u16(a: Any, j: int, v: Any) -> None:
    a[j] = np.uint16(v)


@numba.njit
def _set_f32(a: Any, j: int, v: Any) -> None:
    a[j] = v


jit = numba.njit(cache=True, nogil=True)
pjit = numba.njit(cache=True, nogil=True, parallel=True)
# For kernels that also sum norms: 'reassoc' lets those float64 sums vectorize (their order is free;
# no other fast-math flag, so every rounding step of the merge itself stays exact).
sjit = numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc"})
TILE = 2048  # kernels that keep per-entry scratch work through their block in tiles this long (L1-sized)


@numba.njit
def key(d: Any) -> Any:
    """Magnitude order key: the bits of |d| (monotonic in |d| for non-negative floats)."""
    return bits_from_f32(f32(d)) & u32(0x7FFFFFFF)


@numba.njit
def origin(seed: Any, j: Any) -> Any:
    """The first step of value j of the `hashrng` stream: seed + (j + 1) * GOLDEN. Value j + 1's is this
    plus GOLDEN, so loops over consecutive values carry it by an add instead of a multiply."""
    return u64(seed) + (u64(j) + u64(1)) * u64(GOLDEN)


@numba.njit
def mixed(z: Any) -> Any:
    """splitmix64 on an `origin` up to its last product p; the stream value is (p ^ (p >> 31)) >> 32. The
    top 24 bits, DELLA's random value, are p >> 40: the last shift changes nothing above bit 32."""
    z = (z ^ (z >> u64(30))) * u64(MIX1)
    return (z ^ (z >> u64(27))) * u64(MIX2)


@numba.njit
def top32(p: Any) -> Any:
    """The stream value (32 bits) from `mixed`'s product."""
    return (p ^ (p >> u64(31))) >> u64(32)


@numba.njit
def stream(seed: Any, j: Any) -> Any:
    """Value j of the `hashrng` stream with this seed (32 bits, as uint64)."""
    return top32(mixed(origin(seed, j)))


@numba.njit
def draw(keep: Any, seed: Any, bound: Any, start: Any) -> None:
    """keep[j] = 1 where stream(seed, start + j) < bound, else 0: a tile's DARE keep decisions, drawn in a
    loop of their own before the loop that uses them (apart, each compiles to tighter code: 15-25% less
    time than one loop doing both). The first step's product is carried from entry to entry by adding
    GOLDEN (`origin`): a third fewer 64-bit multiplies, which AVX2 builds from three 32-bit ones each
    (random_sums 1.17 against 1.40 ns per entry)."""
    z = origin(seed, start)
    for j in range(keep.size):
        keep[j] = np.uint8(top32(mixed(z)) < bound)
        z += u64(GOLDEN)


@numba.njit
def delta(base: Any, ft: Any, j: int) -> Any:
    """ft[j] - base[j] rounded to the arrays' dtype, as float32."""
    return rnd(base, load(ft, j) - load(base, j))


NO_NORMS = (0.0, 0.0, 0.0, 0.0, u32(0), u32(0))


@numba.njit(fastmath={"reassoc"})  # as the kernels that call it: so their loops still vectorize the sums
def add_norms(acc: Any, d: Any, v: Any) -> Any:
    """The six norm sums of a pruned task vector (`NO_NORMS` to start), with entry d, kept as v, added:
    sums of |d|, |v|, d*d and v*v in float64, and the largest |d| and |v| as keys (integer max
    vectorizes, float max does not)."""
    s0, s1, s2, s3, m4, m5 = acc
    a, w = np.float64(abs(d)), np.float64(abs(v))
    return s0 + a, s1 + w, s2 + a * a, s3 + w * w, max(m4, key(d)), max(m5, key(v))


@numba.njit
def put_norms(row: Any, acc: Any) -> None:
    """The six sums of `add_norms` into a row of six float64 columns (the maxima as floats)."""
    s0, s1, s2, s3, m4, m5 = acc
    row[0], row[1], row[2] = s0, s1, s2
    row[3], row[4], row[5] = s3, f32_from_bits(m4), f32_from_bits(m5)


# Kernels split the flat range into `block`-sized chunks (DELLA's: runs of rows), which the parallel
# loop's workers take with `chunks_for`, and work on slices of each chunk: loops that start at 0 are
# the ones LLVM vectorizes.


@pjit
def hist_high(base: Any, ft: Any, block: int) -> Any:
    """Per block: counts of the top 15 key bits of d = ft - base.

    Keys are computed a tile at a time (vectorized), then counted into four interleaved histograms
    so that runs of equal keys do not wait on each other's increments.
    """
    n = base.size
    nb = (n + block - 1) // block
    hist = np.empty((nb, 32768), np.int64)  # every count is written below: no need to clear it first
    taken = np.zeros(nb, np.int64)
    for worker in prange(nb):
        keys = np.empty(TILE, np.uint32)
        for c in chunks_for(taken, worker):
            h4 = np.zeros((4, 32768), np.int32)
            for t0, t1 in tiles(c * block, min(n, (c + 1) * block)):
                m = t1 - t0
                b, f = base[t0:t1], ft[t0:t1]
                for j in range(m):
                    keys[j] = key(delta(b, f, j)) >> u32(16)
                j = 0
                while j + 4 <= m:
                    h4[0, keys[j]] += 1
                    h4[1, keys[j + 1]] += 1
                    h4[2, keys[j + 2]] += 1
                    h4[3, keys[j + 3]] += 1
                    j += 4
                while j < m:
                    h4[0, keys[j]] += 1
                    j += 1
            for v in range(32768):
                hist[c, v] = h4[0, v] + h4[1, v] + h4[2, v] + h4[3, v]
    return hist


@pjit
def hist_low(base: Any, ft: Any, block: int, high: int) -> Any:
    """Per block: counts of the low 16 key bits among entries whose top bits equal `high`."""
    n = base.size
    nb = (n + block - 1) // block
    hist = np.zeros((nb, 65536), np.int64)
    taken = np.zeros(nb, np.int64)
    for worker in prange(nb):
        for c in chunks_for(taken, worker):
            lo = c * block
            hi = min(n, lo + block)
            b, f, h = base[lo:hi], ft[lo:hi], hist[c]
            for j in range(hi - lo):
                k = key(delta(b, f, j))
                if (k >> u32(16)) == high:
                    h[k & u32(0xFFFF)] += 1
    return hist


@jit
def find_cut(base: Any, ft: Any, lo: int, hi: int, thr: int, m: int) -> int:
    """Index just after the m-th entry (1-based) in [lo, hi) whose key equals thr."""
    seen = 0
    for j in range(lo, hi):
        if key(delta(base, ft, j)) == thr:
            seen += 1
            if seen == m:
                return j + 1
    return hi


@pjit
def top_bin(hist: Any, k: int) -> Any:
    """(v, above): the highest bin v at which the counts of bins v and up, summed over hist's rows (the
    per-block histograms of `hist_high` or `hist_low`), reach k, and the count of the bins above v.
    Column totals are summed in parallel, a chunk of columns per task (numpy's sum of a 16 x 32768
    int64 array took 1.3 ms per tensor and fine-tune, on the merging thread alone)."""
    blocks, cols = hist.shape
    totals = np.zeros(cols, np.int64)
    chunk = 4096
    for q in prange((cols + chunk - 1) // chunk):
        lo = q * chunk
        hi = min(cols, lo + chunk)
        t = totals[lo:hi]
        for c in range(blocks):
            h = hist[c, lo:hi]
            for v in range(hi - lo):
                t[v] += h[v]
    above = 0
    for v in range(cols - 1, -1, -1):
        if above + totals[v] >= k:
            return v, above
        above += totals[v]
    return cols - 1, 0  # fewer than k entries in all: the top bin, as an empty search would give


@sjit
def prune_magnitude(base: Any, ft: Any, thr: int, cut: int, out: Any, block: int) -> Any:
    """out = d where key(d) > thr, or == thr before index cut; 0 elsewhere. Returns norm sums."""
    n = base.size
    nb = (n + block - 1) // block
    sums = np.zeros((nb, 6))
    taken = np.zeros(nb, np.int64)
    for worker in prange(nb):
        for c in chunks_for(taken, worker):
            lo = c * block
            hi = min(n, lo + block)
            b, f, o = base[lo:hi], ft[lo:hi], out[lo:hi]
            edge = min(max(cut - lo, 0), hi - lo)  # entries equal to thr are kept below this local index
            acc = NO_NORMS
            for j in range(hi - lo):
                d = delta(b, f, j)
                k = key(d)
                v = d if k > thr or (k == thr and j < edge) else f32(0.0)
                store(o, j, v)
                acc = add_norms(acc, d, v)
            put_norms(sums[c], acc)
    return sums


@sjit
def prune_random(base: Any, ft: Any, seed: int, bound: int, keep_prob: Any, out: Any, block: int) -> Any:
    """out (float32) = d where stream(seed, j) < bound (divided by keep_prob when > 0), 0 elsewhere."""
    n = base.size
    nb = (n + block - 1) // block
    sums = np.zeros((nb, 6))
    ubound = u64(bound)
    scale = f32(keep_prob) if keep_prob > 0 else f32(1.0)
    taken = np.zeros(nb, np.int64)
    for worker in prange(nb):
        for c in chunks_for(taken, worker):
            lo = c * block
            hi = min(n, lo + block)
            b, f, o = base[lo:hi], ft[lo:hi], out[lo:hi]
            acc = NO_NORMS
            for j in range(hi - lo):
                d = delta(b, f, j)
                v = f32(d) / scale if stream(seed, lo + j) < ubound else f32(0.0)
                o[j] = v
                acc = add_norms(acc, d, v)
            put_norms(sums[c], acc)
    return sums


@jit
def _row_ranks(keys: Any, ranks: Any, count: Any, order: Any, spare: Any) -> None:
    """ranks[i] = position of entry i when the row is sorted by key, equal keys by index (stable).

    A counting sort over the key range when `count` can hold it (every bfloat16 row: clearing and
    summing even 32768 counters costs less than the scattered writes of a second pass), else a
    least-significant-digit radix sort of (key - smallest key) in as few digits of at most 11 bits as
    cover the range (float32 rows). count, order and spare are uint32: as indices, unsigned values skip
    numba's wrap of negative ones (float32 della_mask 9.29 against 10.76 ns per entry).
    """
    width = keys.size
    # Exact zeros (entries a fine-tune left unchanged) rank first, in index order; the counting sort
    # then only spans the non-zero keys, a few thousand values in a bfloat16 row instead of ~16000.
    zeros = 0
    kmin, kmax = u32(0xFFFFFFFF), u32(0)
    for i in range(width):
        k = keys[i]
        if k == 0:
            zeros += 1
        else:
            kmin = min(kmin, k)
            kmax = max(kmax, k)
    if zeros == width:
        for i in range(width):
            ranks[i] = i
        return
    span = int(kmax - kmin) + 1
    if span <= count.size:
        count[:span] = 0
        for i in range(width):
            k = keys[i]
            if k != 0:
                count[k - kmin] += 1
        total = zeros
        for v in range(span):
            c = count[v]
            count[v] = total
            total += c
        z = 0
        for i in range(width):
            k = keys[i]
            if k == 0:
                ranks[i] = z
                z += 1
            else:
                v = k - kmin
                ranks[i] = count[v]
                count[v] += 1
        return
    if zeros:
        kmin = u32(0)
    span = int(kmax - kmin) + 1
    bits = 0
    while (1 << bits) < span:
        bits += 1
    passes = (bits + 10) // 11
    digit = (bits + passes - 1) // passes
    mask = u32((1 << digit) - 1)
    for i in range(width):
        order[i] = i
    for step in range(passes):
        shift = u32(digit * step)
        count[: mask + 1] = 0
        for i in range(width):
            count[((keys[i] - kmin) >> shift) & mask] += 1
        total = 0
        for v in range(mask + 1):
            c = count[v]
            count[v] = total
            total += c
        for i in range(width):
            p = order[i]
            v = ((keys[p] - kmin) >> shift) & mask
            spare[count[v]] = p
            count[v] += 1
        order, spare = spare, order
    for r in range(width):
        ranks[order[r]] = r


@sjit
def prune_della(
    base: Any,
    ft: Any,
    rows: int,
    width: int,
    low: Any,
    span: Any,
    seed: int,
    keep_prob: bool,
    out: Any,
    key_shift: int,
    block_rows: int,
) -> Any:
    """DELLA MagPrune per row: keep probability low + span * rank / (width - 1), ranks by |d| ascending
    (stable). out (float32) = d, or d / p, where kept; 0 elsewhere. Returns norm sums per row.
    Keys are shifted right by `key_shift` (16 for bfloat16, whose low key half is always zero). Rows
    are handed out `block_rows` at a time."""
    sums = np.zeros((rows, 6))
    shift = u32(key_shift)
    chunks = (rows + block_rows - 1) // block_rows
    taken = np.zeros(chunks, np.int64)
    for worker in prange(chunks):
        keys = np.empty(width, np.uint32)
        ranks = np.empty(width, np.int32)
        count = np.empty(32768, np.uint32)
        order = np.empty(width, np.uint32)
        spare = np.empty(width, np.uint32)
        for c in chunks_for(taken, worker):
            scale = f32(width - 1)
            for r in range(c * block_rows, min(rows, (c + 1) * block_rows)):
                off = r * width
                b, f, o = base[off : off + width], ft[off : off + width], out[off : off + width]
                for i in range(width):
                    keys[i] = key(delta(b, f, i)) >> shift
                _row_ranks(keys, ranks, count, order, spare)
                acc = NO_NORMS
                for i in range(width):
                    d = delta(b, f, i)
                    rn = f32(ranks[i]) / scale if width > 1 else f32(0.5)
                    p = f32(low + rn * span)
                    keep = f32(np.int32(stream(seed, off + i) >> u64(8))) < p * f32(16777216.0)
                    v = (f32(d) / p if keep_prob else f32(d)) if keep else f32(0.0)
                    o[i] = v
                    acc = add_norms(acc, d, v)
                put_norms(sums[r], acc)
    return sums


@jit
def della_thresholds(width: int, low: Any, span: Any) -> Any:
    """Per rank r of a row `width` long: the DELLA keep probability p = low + span * r / (width - 1) in
    float32 as `prune_della` rounds it, as the integer t = ceil(p * 2**24). A 24-bit random value x
    keeps the entry when x < p * 2**24, that is when x < t."""
    thr = np.empty(width, np.int32)
    scale = f32(width - 1)
    for r in range(width):
        rn = f32(r) / scale if width > 1 else f32(0.5)
        p = f32(low + rn * span)
        thr[r] = np.int32(np.ceil(p * f32(16777216.0)))
    return thr


ALL_ZERO, COUNTED, WIDE = 0, 1, 2  # how `_della_counts` left a row


@jit
def _della_counts(b: Any, f: Any, keys: Any, count: Any, shift: Any) -> Any:
    """A row's keys, then, where they fit the counters (every bfloat16 row), its counting sort up to the
    rank pass: count[k] becomes the rank of key k's first entry. Returns (kmin, kmax, how): the row's
    smallest non-zero and largest key, and ALL_ZERO, COUNTED or WIDE (keys too large: `_della_wide`)."""
    width = keys.size
    for i in range(width):
        keys[i] = key(delta(b, f, i)) >> shift
    # keys are below 2**31; int32 min/max vectorize
    kmin, kmax = np.int32(0x7FFFFFFF), np.int32(0)
    for i in range(width):
        k = np.int32(keys[i])
        kmin = min(kmin, k if k != 0 else np.int32(0x7FFFFFFF))
        kmax = max(kmax, k)
    if kmax == 0:
        return kmin, kmax, ALL_ZERO
    if kmax >= count.size:
        return kmin, kmax, WIDE
    for i in range(width):
        count[keys[i]] += 1
    # Non-zero keys rank from the number of zeros on, in key order (the zeros rank first, so the ranks
    # are those of the full row); the zeros' ranks run from width on.
    total = count[0]
    count[0] = width
    # Unsigned indices here and in the rank passes: numba wraps a signed index that may be negative
    # (three more instructions per lookup; della_mask 3.10 against 3.33 ns per entry).
    for v in range(u32(kmin), u32(kmax) + u32(1)):
        n_v = count[v]
        count[v] = total
        total += n_v
    return kmin, kmax, COUNTED


@numba.njit
def _della_step(keys: Any, count: Any, keep: Any, i: int, z: Any, ext: Any) -> None:
    """Entry i of a COUNTED row's rank pass: it takes the next rank of its key and is kept when its
    random value (from z, its `origin`) is below that rank's threshold."""
    k = keys[i]
    rk = count[k]
    count[k] = rk + 1
    keep[i] = np.uint8(np.int32(mixed(z) >> u64(40)) < ext[u32(rk)])


@jit
def _della_ranks1(keys: Any, count: Any, keep: Any, off: int, ext: Any, seed: Any) -> None:
    """A COUNTED row's rank pass (`_della_step` on each entry)."""
    z = origin(seed, off)
    for i in range(keys.size):
        _della_step(keys, count, keep, i, z, ext)
        z += u64(GOLDEN)


@jit
def _della_ranks2(
    ka: Any, ca: Any, pa: Any, oa: int, kb: Any, cb: Any, pb: Any, ob: int, ext: Any, seed: Any
) -> None:
    """`_della_ranks1` on two COUNTED rows of the same width in one loop."""
    za, zb = origin(seed, oa), origin(seed, ob)
    for i in range(ka.size):
        _della_step(ka, ca, pa, i, za, ext)
        _della_step(kb, cb, pb, i, zb, ext)
        za += u64(GOLDEN)
        zb += u64(GOLDEN)


@jit
def _della_wide(
    keys: Any,
    count: Any,
    start: Any,
    flag: Any,
    pend: Any,
    members: Any,
    keep: Any,
    off: int,
    ext: Any,
    seed: Any,
    kmin: Any,
    kmax: Any,
) -> None:
    """DELLA's decisions for a row of keys too large for a counter each (float32), without sorting it.

    The keys are counted by their top 15 bits (count, start, flag: 32768 each; count and flag are left
    zero), so an entry's rank lies between its bucket's first and last rank. The thresholds grow with
    the rank, so the random value decides the entry at once unless it falls between those two ranks'
    thresholds: 4 in 10^4 entries of a fine-tune's float32 row, 3 in 10^3 when its values came from
    bfloat16 (a few large buckets). Those entries (pend) get their exact rank (equal keys by position):
    counted over the whole row when they are few, else among their buckets' members, gathered in one
    more pass. float32 della_mask 4.0-4.3 ns per entry (4.8-4.9 for values from bfloat16), against
    9.4-13.0 with a radix sort of every row (one thread)."""
    width = keys.size
    hlo, hhi = u32(kmin) >> u32(16), u32(kmax) >> u32(16)
    for i in range(width):
        count[keys[i] >> u32(16)] += 1
    total = u32(0)
    if hlo > 0:  # bucket 0 holds only the exact zeros, which rank first
        start[0] = 0
        total = u32(count[0])
    for v in range(hlo, hhi + u32(1)):
        start[v] = total
        total += u32(count[v])
    z = origin(seed, off)
    n_pend = 0
    for i in range(width):
        k = keys[i]
        h = k >> u32(16)
        first = start[h]
        x = np.int32(mixed(z) >> u64(40))
        z += u64(GOLDEN)
        low = x < ext[first]
        if low != (x < ext[first + u32(count[h]) - u32(1)]):
            pend[n_pend] = i
            n_pend += 1
        keep[i] = np.uint8(low & (k != 0))
    if 0 < n_pend <= 4:  # a few: each counts its rank over the whole row
        for q in range(n_pend):
            i = pend[q]
            k = keys[i]
            rank = 0
            for j in range(width):
                kj = keys[j]
                rank += (kj < k) | ((kj == k) & (j < i))
            x = np.int32(stream(seed, off + i) >> u64(8))
            keep[i] = np.uint8((x < ext[rank]) & (k != 0))
    elif n_pend:  # more (values from bfloat16 fill a few large buckets): gather those buckets first
        # flag[h]: where bucket h's next member goes in `members`, from 1 (slot 0 takes the writes of
        # the other buckets' entries, so the gathering pass has no branch)
        pos = 1
        for q in range(n_pend):
            h = keys[pend[q]] >> u32(16)
            if flag[h] == 0:
                flag[h] = pos
                pos += count[h]
        for j in range(width):
            h = keys[j] >> u32(16)
            f = flag[h]
            members[f] = j
            flag[h] = f + u32(f != 0)
        for q in range(n_pend):
            i = pend[q]
            k = keys[i]
            h = k >> u32(16)
            end = flag[h]  # one past the bucket's last member
            rank = np.int64(start[h])
            for m in range(end - u32(count[h]), end):
                j = members[m]
                kj = keys[j]
                rank += (kj < k) | ((kj == k) & (j < i))
            x = np.int32(stream(seed, off + i) >> u64(8))
            keep[i] = np.uint8((x < ext[rank]) & (k != 0))
        for q in range(n_pend):
            flag[keys[pend[q]] >> u32(16)] = 0
    count[0] = 0
    count[hlo : hhi + 1] = 0


@sjit
def della_mask(
    base: Any,
    ft: Any,
    rows: int,
    width: int,
    thr: Any,
    seed: int,
    mask: Any,
    norm: int,
    key_shift: int,
    block_rows: int,
) -> Any:
    """DELLA's keep decisions (those of `prune_della`) into `mask`, one byte per entry, and one norm of d
    and of the kept d per row (norm as in `random_sums`; -1: none), for `combine_fused` to read back.

    Per row, two rows at a time: keys, then a counting sort (`_della_counts`) whose rank pass decides
    each entry as it goes (thr: `della_thresholds`; the random value is made there too, with scalar
    64-bit multiplies: drawn in a vectorized loop of its own, it measured slower). Exact zeros are marked
    dropped: kept or not, they add nothing. Rows whose keys are too large for the counters (float32) are
    decided by `_della_wide`, without ranking every entry."""
    sums = np.zeros((rows, 6))
    shift = u32(key_shift)
    chunks = (rows + block_rows - 1) // block_rows
    taken = np.zeros(chunks, np.int64)
    # Ranks from width on belong to exact zeros: their threshold 0 drops them with no test of the key.
    ext = np.zeros(2 * width, np.int32)
    ext[:width] = thr
    for worker in prange(chunks):
        # Rows go two at a time (one set of buffers each): their rank passes share one loop, whose two
        # independent counter chains overlap (1.47 against 1.83 ns per entry, the pass alone).
        keys = np.empty((2, width), np.uint32)
        # One counter per key value, indexed by the key itself (no offset or zero test per entry); each
        # row clears the counters it used, so they start at zero.
        count = np.zeros((2, 32768), np.int32)
        # float32 rows (`_della_wide`): bucket starts and slots, undecided entries, their buckets' members
        wide = np.empty(32768, np.uint32)
        flag = np.zeros(32768, np.uint32)
        pend = np.empty(width, np.uint32)
        members = np.empty(width + 1, np.uint32)
        for c in chunks_for(taken, worker):
            hi = min(rows, (c + 1) * block_rows)
            for r0 in range(c * block_rows, hi, 2):
                pair = min(2, hi - r0)
                ka, kb, ca, cb = keys[0], keys[1], count[0], count[1]
                oa, ob = r0 * width, (r0 + 1) * width
                pa = mask[oa : oa + width]
                sa = _della_counts(base[oa : oa + width], ft[oa : oa + width], ka, ca, shift)
                sb = sa
                ranked = False  # both rows' rank passes already run, in one loop
                if pair == 2:
                    pb = mask[ob : ob + width]
                    sb = _della_counts(base[ob : ob + width], ft[ob : ob + width], kb, cb, shift)
                    if sa[2] == COUNTED and sb[2] == COUNTED:
                        _della_ranks2(ka, ca, pa, oa, kb, cb, pb, ob, ext, seed)
                        ranked = True
                for q in range(pair):
                    k_q, c_q, state = (ka, ca, sa) if q == 0 else (kb, cb, sb)
                    off = oa if q == 0 else ob
                    keep = mask[off : off + width]
                    kmin, kmax, how = state
                    if how == ALL_ZERO:
                        keep[:] = 0
                    elif how == COUNTED:
                        if not ranked:
                            _della_ranks1(k_q, c_q, keep, off, ext, seed)
                        c_q[0] = 0
                        c_q[kmin : kmax + 1] = 0
                    else:
                        _della_wide(k_q, c_q, wide, flag, pend, members, keep, off, ext, seed, kmin, kmax)
                    r = r0 + q
                    if norm == 2:
                        m4 = m5 = u32(0)
                        for i in range(width):
                            k = k_q[i]
                            m4 = max(m4, k)
                            m5 = max(m5, k if keep[i] else u32(0))
                        sums[r, 4], sums[r, 5] = f32_from_bits(m4 << shift), f32_from_bits(m5 << shift)
                    elif norm >= 0:
                        s0 = s1 = 0.0
                        for i in range(width):
                            a = np.float64(f32_from_bits(k_q[i] << shift))
                            if norm == 1:
                                a = a * a
                            s0 += a
                            s1 += a if keep[i] else 0.0
                        sums[r, 2 * norm], sums[r, 2 * norm + 1] = s0, s1
    return sums


@pjit
def combine(
    base: Any,
    deltas: Any,
    weights: Any,
    consensus: bool,
    normalize: bool,
    lam: Any,
    scale_lam: bool,
    linear_div: Any,
    out: Any,
    block: int,
) -> None:
    """base + lam * mix(weights[i] * deltas[i]) with TIES sign election when `consensus`.

    Loops run model by model over a tile (so they vectorize); each entry still sums its models in
    model order, as torch's sum over dim 0 does.
    """
    n = base.size
    models = deltas.shape[0]
    nb = (n + block - 1) // block
    taken = np.zeros(nb, np.int64)
    for worker in prange(nb):
        total = np.empty(TILE, np.float32)
        mixed = np.empty(TILE, np.float32)
        div = np.empty(TILE, np.float32)
        for c in chunks_for(taken, worker):
            for t0, t1 in tiles(c * block, min(n, (c + 1) * block)):
                m = t1 - t0
                b, o = base[t0:t1], out[t0:t1]
                mixed[:m] = 0.0
                if consensus:
                    total[:m] = 0.0
                    div[:m] = 0.0
                    for i in range(models):
                        w, dr = weights[i], deltas[i][t0:t1]
                        for j in range(m):
                            total[j] += rnd(b, load(dr, j) * w)
                    for j in range(m):
                        total[j] = rnd(b, total[j])
                    for i in range(models):
                        w, dr = weights[i], deltas[i][t0:t1]
                        for j in range(m):
                            wd = rnd(b, load(dr, j) * w)
                            agree = (wd > 0) if total[j] >= 0 else (wd < 0)
                            mixed[j] += wd if agree else f32(0.0)
                            div[j] += w if agree else f32(0.0)
                    for j in range(m):
                        d = rnd(b, div[j])
                        div[j] = d if d != 0 else f32(1.0)
                else:
                    for i in range(models):
                        w, dr = weights[i], deltas[i][t0:t1]
                        for j in range(m):
                            mixed[j] += rnd(b, load(dr, j) * w)
                    div[:m] = linear_div
                for j in range(m):
                    x = rnd(b, mixed[j])
                    if normalize:
                        x = rnd(b, x / div[j])
                    if scale_lam:
                        x = rnd(b, x * lam)
                    store(o, j, rnd(b, load(b, j) + x))


@sjit
def random_sums(base: Any, ft: Any, seed: int, bound: int, mask: Any, norm: int, block: int) -> Any:
    """Per block: one norm of d and of d masked by stream(seed, j) < bound (see prune_random), in the
    columns prune_random uses for it: norm 0 = L1 (columns 0, 1), 1 = L2 (2, 3), 2 = L-inf (4, 5); only
    that norm is summed (a third less work than all three). The keep decisions go to `mask` (one byte
    per entry), so the combining pass reads them instead of hashing again."""
    n = base.size
    nb = (n + block - 1) // block
    sums = np.zeros((nb, 6))
    ubound = u64(bound)
    taken = np.zeros(nb, np.int64)
    for worker in prange(nb):
        for c in chunks_for(taken, worker):
            lo = c * block
            hi = min(n, lo + block)
            s0 = s1 = 0.0
            m4 = m5 = u32(0)  # largest |d| and |kept| as keys: integer max vectorizes, float max does not
            for t0 in range(lo, hi, TILE):  # (not `tiles`: here it measured 0-10% slower, near the noise)
                t1 = min(hi, t0 + TILE)
                b, f, keep = base[t0:t1], ft[t0:t1], mask[t0:t1]
                draw(keep, seed, ubound, t0)  # the sums then read the decisions back from L1
                if norm == 2:
                    for j in range(t1 - t0):
                        k = key(delta(b, f, j))
                        m4 = max(m4, k)
                        m5 = max(m5, k if keep[j] else u32(0))
                else:
                    for j in range(t1 - t0):
                        a = np.float64(abs(delta(b, f, j)))
                        if norm == 1:
                            a = a * a
                        s0 += a
                        s1 += a if keep[j] else 0.0
            if norm == 2:
                sums[c, 4], sums[c, 5] = f32_from_bits(m4), f32_from_bits(m5)
            else:
                sums[c, 2 * norm], sums[c, 2 * norm + 1] = s0, s1
    return sums


KEEP_ALL, KEEP_MAGNITUDE, KEEP_RANDOM, KEEP_MASKED = 0, 1, 2, 3


@pjit
def combine_fused(
    base: Any,
    fts: Any,
    kinds: Any,
    thr: Any,
    cut: Any,
    seeds: Any,
    bounds: Any,
    masks: Any,
    factors: Any,
    weights: Any,
    consensus: bool,
    normalize: bool,
    lam: Any,
    scale_lam: bool,
    linear_div: Any,
    out: Any,
    block: int,
) -> None:
    """`combine` with each task vector made on the fly from fts[i] - base, never stored.

    kinds[i]: KEEP_ALL; KEEP_MAGNITUDE (key > thr[i], or == thr[i] before index cut[i]); KEEP_RANDOM
    (stream(seeds[i], j) < bounds[i]); KEEP_MASKED (decisions recorded in masks[i] by `random_sums`
    or `della_mask`). Kept entries are multiplied by factors[i] in float32 and rounded (DARE's norm
    rescale, as the torch code does it); dropped ones are 0.
    """
    n = base.size
    models = len(fts)
    nb = (n + block - 1) // block
    taken = np.zeros(nb, np.int64)
    for worker in prange(nb):
        wdt = np.empty((models, TILE), np.float32)
        total = np.empty(TILE, np.float32)
        mixed = np.empty(TILE, np.float32)
        div = np.empty(TILE, np.float32)
        drawn = np.empty(TILE, np.uint8)
        for c in chunks_for(taken, worker):
            for t0, t1 in tiles(c * block, min(n, (c + 1) * block)):
                m = t1 - t0
                b, o = base[t0:t1], out[t0:t1]
                for i in range(models):
                    f, row, w, fac = fts[i][t0:t1], wdt[i], weights[i], factors[i]
                    kind = kinds[i]
                    if kind == KEEP_MAGNITUDE:
                        th, edge = thr[i], min(max(cut[i] - t0, 0), m)
                        if edge == 0 or edge == m:
                            # Every tile but the one the cut splits: one int32 comparison per entry, no
                            # index test (key > th, or key >= th when the whole tile lies before the cut;
                            # keys and th are below 2**31). The index test cost this pass a third.
                            low = np.int32(th - (1 if edge == m else 0))
                            for j in range(m):
                                d = delta(b, f, j)
                                v = d if np.int32(key(d)) > low else f32(0.0)
                                row[j] = rnd(b, v * w)
                        else:
                            for j in range(m):
                                d = delta(b, f, j)
                                k = key(d)
                                v = d if k > th or (k == th and j < edge) else f32(0.0)
                                row[j] = rnd(b, v * w)
                    elif kind == KEEP_RANDOM or kind == KEEP_MASKED:
                        if kind == KEEP_RANDOM:
                            keep = drawn[:m]
                            draw(keep, seeds[i], u64(bounds[i]), t0)
                        else:
                            keep = masks[i][t0:t1]
                        if fac == f32(1.0):  # no rescale: v * 1 is v, so one product and rounding fewer
                            for j in range(m):
                                d = delta(b, f, j)
                                row[j] = rnd(b, (d if keep[j] else f32(0.0)) * w)
                        else:
                            for j in range(m):
                                d = delta(b, f, j)
                                v = d if keep[j] else f32(0.0)
                                row[j] = rnd(b, rnd(b, v * fac) * w)
                    elif fac == f32(1.0):
                        for j in range(m):
                            row[j] = rnd(b, delta(b, f, j) * w)
                    else:
                        for j in range(m):
                            row[j] = rnd(b, rnd(b, delta(b, f, j) * fac) * w)
                mixed[:m] = 0.0
                if consensus:
                    total[:m] = 0.0
                    div[:m] = 0.0
                    for i in range(models):
                        row = wdt[i]
                        for j in range(m):
                            total[j] += row[j]
                    for j in range(m):
                        total[j] = rnd(b, total[j])
                    for i in range(models):
                        row, w = wdt[i], weights[i]
                        for j in range(m):
                            wd = row[j]
                            agree = (wd > 0) if total[j] >= 0 else (wd < 0)
                            mixed[j] += wd if agree else f32(0.0)
                            div[j] += w if agree else f32(0.0)
                    for j in range(m):
                        d = rnd(b, div[j])
                        div[j] = d if d != 0 else f32(1.0)
                else:
                    for i in range(models):
                        row = wdt[i]
                        for j in range(m):
                            mixed[j] += row[j]
                    div[:m] = linear_div
                for j in range(m):
                    x = rnd(b, mixed[j])
                    if normalize:
                        x = rnd(b, x / div[j])
                    if scale_lam:
                        x = rnd(b, x * lam)
                    store(o, j, rnd(b, load(b, j) + x))


@pjit
def scale_into(work: Any, factor: Any, out: Any, block: int) -> None:
    """out = work * factor (float32), rounded to out's dtype: a pruned task vector's norm rescale."""
    n = work.size
    nb = (n + block - 1) // block
    taken = np.zeros(nb, np.int64)
    for worker in prange(nb):
        for c in chunks_for(taken, worker):
            lo = c * block
            hi = min(n, lo + block)
            w, o = work[lo:hi], out[lo:hi]
            for j in range(hi - lo):
                store(o, j, rnd(o, w[j] * factor))


@sjit
def slerp_sums(x: Any, y: Any, block: int) -> Any:
    """Per block of `block` entries: the sums of x*x, y*y and x*y in float64 (slerp's norms and dot
    product; the caller adds the blocks in order, so the result does not depend on the thread count)."""
    n = x.size
    nb = (n + block - 1) // block
    sums = np.zeros((nb, 3))
    taken = np.zeros(nb, np.int64)
    for worker in prange(nb):
        for c in chunks_for(taken, worker):
            lo = c * block
            hi = min(n, lo + block)
            a, b = x[lo:hi], y[lo:hi]
            sxx = syy = sxy = 0.0
            for j in range(hi - lo):
                u, v = np.float64(load(a, j)), np.float64(load(b, j))
                sxx += u * u
                syy += v * v
                sxy += u * v
            sums[c, 0], sums[c, 1], sums[c, 2] = sxx, syy, sxy
    return sums


@pjit
def lerp_into(x: Any, y: Any, ca: Any, cb: Any, out: Any, block: int) -> None:
    """out = ca * x + cb * y in float32 (each product rounded, then the sum), rounded to out's dtype:
    the output pass of slerp, as torch computes it."""
    n = x.size
    nb = (n + block - 1) // block
    taken = np.zeros(nb, np.int64)
    for worker in prange(nb):
        for c in chunks_for(taken, worker):
            lo = c * block
            hi = min(n, lo + block)
            a, b, o = x[lo:hi], y[lo:hi], out[lo:hi]
            for j in range(hi - lo):
                p = f32(ca * load(a, j))
                q = f32(cb * load(b, j))
                store(o, j, rnd(o, p + q))


@pjit
def weighted_sum(xs: Any, w: Any, divisor: Any, normalize: bool, out: Any, block: int) -> None:
    """out = (x0 * w0 + x1 * w1 + ...) / divisor in float32, rounded to out's dtype: linear's sum as
    torch computes it (first product rounded, each further term added with one fused multiply-add)."""
    n = out.size
    nb = (n + block - 1) // block
    taken = np.zeros(nb, np.int64)
    for worker in prange(nb):
        for c in chunks_for(taken, worker):
            lo = c * block
            hi = min(n, lo + block)
            acc = np.empty(TILE, np.float32)
            for t, t_end in tiles(lo, hi):
                m = t_end - t
                x = xs[0][t : t + m]
                w0 = w[0]
                for j in range(m):
                    acc[j] = f32(load(x, j) * w0)
                for i in range(1, len(xs)):
                    x = xs[i][t : t + m]
                    wi = w[i]
                    for j in range(m):
                        acc[j] = fma32(load(x, j), wi, acc[j])
                o = out[t : t + m]
                if normalize:
                    for j in range(m):
                        store(o, j, rnd(o, acc[j] / divisor))
                else:
                    for j in range(m):
                        store(o, j, rnd(o, acc[j]))
