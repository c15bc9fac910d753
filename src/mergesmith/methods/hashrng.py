"""The random stream of the random methods (DARE, DELLA): a counter-based hash, not a sequential generator.

Entry j of a stream with seed s is the top 32 bits of splitmix64(s + (j + 1) * golden), so any range of a
stream can be drawn on its own, in parallel, on any device, and always gives the same numbers. With one
probability p for a whole tensor (DARE) an entry is kept when its 32-bit value is below p * 2**32, a
Bernoulli(p) draw with a resolution of 2**-32; with a float32 probability per entry (DELLA) the top 24 bits
are compared with p * 2**24, the resolution of a float32 uniform draw. Each model's stream seed is drawn
from the tensor's `torch.Generator`, so the merge seed still decides everything.

This module holds the definition in torch (any device); `numba_kernels` holds the same hash in numba.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergesmith._util import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
TWO32 = 4294967296.0


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 value with the same bits (torch has no uint64 arithmetic)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def stream_seed(generator: torch.Generator) -> int:
    """A 63-bit stream seed drawn from `generator` (one draw per model and tensor)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64))


def torch_stream_seeds(seed: int, count: int) -> list[int]:
    """The first `count` values `stream_seed` draws from a CPU torch.Generator seeded with `seed`, computed
    without torch: that generator is a 32-bit-seeded mt19937, and each draw takes two of its outputs as
    one 64-bit number, reduced modulo 2**63 - 1 (tests check this against torch)."""
    need = 2 * count
    if need <= 624 - 397:
        # Word i of the first twist reads only words i, i + 1 and i + 397 of the seeded state: for the usual
        # few models only that much state is made and only the drawn words twisted (a fifth of the work;
        # this runs once per tensor, on the merging thread).
        state = _seeded_state(seed, need + 397)
        words = [_temper(_twisted(state, i)) for i in range(need)]
    else:
        state = _seeded_state(seed, 624)
        words = []
        while len(words) < need:
            for i in range(624):  # the twist, then the tempered outputs of the new state
                state[i] = _twisted(state, i)
            words += [_temper(y) for y in state]
    return [((words[2 * i] << 32) | words[2 * i + 1]) % (2**63 - 1) for i in range(count)]


def _seeded_state(seed: int, size: int) -> list[int]:
    """The first `size` words of mt19937's state as a 32-bit seed initialises it."""
    state = [seed & 0xFFFFFFFF]
    for i in range(1, size):
        prev = state[-1]
        state.append((1812433253 * (prev ^ (prev >> 30)) + i) & 0xFFFFFFFF)
    return state


def _twisted(state: list[int], i: int) -> int:
    """Word i of mt19937's state after the twist, from words i and i + 1 and i + 397 (mod 624)."""
    y = (state[i] & 0x80000000) | (state[(i + 1) % 624] & 0x7FFFFFFF)
    return state[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)


def _temper(y: int) -> int:
    """mt19937's output for state word y."""
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    return y ^ (y >> 18)


def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def uniform_u32(seed: int, count: int, device: torch.device | str = "cpu", start: int = 0) -> torch.Tensor:
    """Entries start .. start+count-1 of stream `seed`: int64 tensor of values in [0, 2**32)."""
    j = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z = j * _signed(GOLDEN) + _signed(seed)
    z = (z ^ _shr(z, 30)) * _signed(MIX1)
    z = (z ^ _shr(z, 27)) * _signed(MIX2)
    z = z ^ _shr(z, 31)
    return _shr(z, 32)


def keep_threshold(p: float) -> int:
    """The integer bound below which a 32-bit stream value means 'keep' for probability p."""
    return max(0, min(1 << 32, int(p * TWO32)))


def bernoulli_keep(
    seed: int, shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str
) -> torch.Tensor:
    """Bool tensor of `shape`: entry j (row-major) kept when stream value j < p * 2**32."""
    n = 1
    for s in shape:
        n *= int(s)
    return (uniform_u32(seed, n, device) < keep_threshold(p)).reshape(shape)


def bernoulli_keep_probs(seed: int, probs: torch.Tensor) -> torch.Tensor:
    """Bool tensor like float32 `probs`: entry j kept when the top 24 bits of stream value j, as a float32,
    are below probs[j] * 2**24 (both sides exact in float32: a 2**-24 resolution, as torch.rand has)."""
    top = (uniform_u32(seed, probs.numel(), probs.device) >> 8).to(torch.float32)
    return (top < probs.reshape(-1).to(torch.float32) * 16777216.0).reshape(probs.shape)
