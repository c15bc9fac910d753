"""Re-index embedding-like tensors (rows = tokens) of every input onto the output vocabulary.

A VocabAligner is built per output tensor at planning time and holds only index tensors. At merge time
`align` gives each input a tensor with one row per output token:

- a token the input has keeps the input's own row (unless the token is forced, see below);
- a token the input lacks gets a default row, the same for every input of the tensor. Unless `tokenizer.tokens`
  says otherwise, the default comes from the only input that has the token, else from the base model if it
  has it, else it is the mean of the rows of the inputs that have it, and zero if none has it;
- a token with `force: true` gets its default row in every input, even those that have it;
- padding rows (pad_to_multiple_of) get the mean of the input's aligned token rows.

All arithmetic happens in the tensor's compute dtype, in the order mergekit uses, so results are identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ZERO, COPY, MEAN = 0, 1, 2


@dataclass(frozen=True, eq=False)
class VocabAligner:
    """Index plan mapping each source of one tensor onto the output vocabulary (see module docstring)."""

    tensor: str
    size: int  # tokens in the output vocabulary
    rows: int  # rows of the aligned tensors (size, padded)
    dtype: str  # compute dtype: inputs are cast to it first, as mergekit loads them
    perms: tuple[torch.Tensor, ...] = field(repr=False)  # per source: row of each output token, or -1
    forced: torch.Tensor = field(repr=False)  # output ids whose default row replaces every source's own
    fill: torch.Tensor = field(repr=False)  # output ids with a default row (lacking somewhere, or forced)
    kind: torch.Tensor = field(repr=False)  # per fill id: ZERO, COPY or MEAN
    src: torch.Tensor = field(repr=False)  # per fill id: source position to copy from (COPY), else -1
    row: torch.Tensor = field(repr=False)  # per fill id: row to copy in that source (COPY), else -1
    trivial: bool = False  # every source already has exactly the output layout

    def digest(self) -> str:
        """A hash of everything that decides the aligned rows (for fingerprints of a plan)."""
        import hashlib

        h = hashlib.sha256(repr((self.size, self.rows, self.dtype, self.trivial)).encode())
        for t in (*self.perms, self.forced, self.fill, self.kind, self.src, self.row):
            h.update(t.contiguous().numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()

    def align(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One tensor per source, in the compute dtype, with `rows` rows laid out as the output vocabulary."""
        import torch

        if len(tensors) != len(self.perms):
            raise ValueError(
                f"{self.tensor}: {len(tensors)} tensors given, the plan has {len(self.perms)} sources"
            )
        dtype = getattr(torch, self.dtype)
        ts = [t.to(dtype) for t in tensors]
        if self.trivial:
            return ts
        tail = tuple(ts[0].shape[1:])
        defaults = ts[0].new_zeros((self.fill.numel(), *tail))
        copy = self.kind == COPY
        for pos, t in enumerate(ts):
            sel = (copy & (self.src == pos)).nonzero().squeeze(1)
            if sel.numel():
                defaults[sel] = t.index_select(0, self.row[sel])
        mean = (self.kind == MEAN).nonzero().squeeze(1)
        if mean.numel():
            defaults[mean] = self._means(ts, self.fill[mean], tail)
        out = []
        for perm, t in zip(self.perms, ts):
            own = perm
            if self.forced.numel():
                own = perm.clone()
                own[self.forced] = -1
            new = t.new_zeros((self.rows, *tail))
            have = (own >= 0).nonzero().squeeze(1)
            new.index_copy_(0, have, t.index_select(0, own[have]))
            if self.fill.numel():
                lacking = (own[self.fill] < 0).nonzero().squeeze(1)
                new.index_copy_(0, self.fill[lacking], defaults[lacking])
            if self.rows > self.size:
                new[self.size :] = torch.mean(new[: self.size], dim=0)
            out.append(new)
        return out

    def _means(self, ts: list[torch.Tensor], ids: torch.Tensor, tail: tuple[int, ...]) -> torch.Tensor:
        """Mean of the rows of the sources that have each token: summed in source order, then divided."""
        import torch

        acc = ts[0].new_zeros((ids.numel(), *tail))
        count = torch.zeros(ids.numel(), dtype=torch.long)
        for perm, t in zip(self.perms, ts):
            r = perm[ids]
            sel = (r >= 0).nonzero().squeeze(1)
            if sel.numel():
                acc[sel] = acc[sel] + t.index_select(0, r[sel])
                count[sel] += 1
        for c in count.unique().tolist():
            sel = (count == c).nonzero().squeeze(1)
            part = acc[sel]
            part /= c
            acc[sel] = part
        return acc
