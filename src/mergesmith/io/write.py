"""Safetensors shards written as a stream: shard layout and headers are fixed up front from the plan,
so each tensor goes straight to its offset in the file and no shard is ever held in memory."""

from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from mergesmith._util import ST_DTYPES
from mergesmith.errors import OutputError

if TYPE_CHECKING:
    import torch

_CODE_OF = {torch_name: code for code, (torch_name, _) in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutEntry:
    name: str
    dtype: str  # torch attribute name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ST_DTYPES[_CODE_OF[self.dtype]][1]
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Shard:
    filename: str
    entries: tuple[OutEntry, ...]

    def header(self) -> bytes:
        """The padded JSON header with each tensor's byte range, in entry order."""
        meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for e in self.entries:
            meta[e.name] = {
                "dtype": _CODE_OF[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [pos, pos + e.nbytes],
            }
            pos += e.nbytes
        raw = json.dumps(meta, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw


def layout_shards(entries: list[OutEntry], max_shard_bytes: int) -> list[Shard]:
    """Split entries, in order, into shards of at most max_shard_bytes (a larger tensor gets its own shard)."""
    groups: list[list[OutEntry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


class ShardWriter:
    """Writes tensors in layout order; opens each shard when its first tensor arrives."""

    def __init__(self, out_dir: Path, shards: list[Shard]) -> None:
        self.out_dir = Path(out_dir)
        self.shards = shards
        self._order = [(si, e) for si, s in enumerate(shards) for e in s.entries]
        self._next = 0
        self._fh: BinaryIO | None = None
        self._shard = -1
        self.bytes_written = 0
        # write() and abort() may run on different threads: once abort() returns, no file is touched again.
        self._lock = threading.Lock()
        self._aborted = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the one the layout expects, with its dtype and shape."""
        with self._lock:
            self._write(name, tensor)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        if self._aborted:
            raise OutputError(f"tensor {name!r} arrived after the write was aborted")
        if self._next >= len(self._order):
            raise OutputError(f"tensor {name!r} arrived after every planned tensor was written")
        si, entry = self._order[self._next]
        if entry.name != name:
            raise OutputError(f"writer expected tensor {entry.name!r} next, got {name!r}")
        if tuple(tensor.shape) != entry.shape or str(tensor.dtype).removeprefix("torch.") != entry.dtype:
            raise OutputError(
                f"tensor {name!r} came out as {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {entry.shape} {entry.dtype}"
            )
        path = self.out_dir / self.shards[si].filename
        try:
            if si != self._shard:
                self._close_shard()
                self._shard = si
                self._fh = open(path, "wb")
                self._fh.write(self.shards[si].header())
            assert self._fh is not None
            if tensor.numel():
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                self._fh.write(memoryview(data))
        except OSError as exc:  # disk full, quota, directory removed: an output problem, not a bug
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.bytes_written += entry.nbytes
        self._next += 1

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> None:
        """Close the last shard and write the index; every planned tensor must have been written."""
        with self._lock:
            if self._aborted:
                raise OutputError("the write was aborted")
            self._close_shard()
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise OutputError(f"merge ended before tensor {missing!r} was written")
        weight_map = {e.name: s.filename for s in self.shards for e in s.entries}
        total = sum(e.nbytes for s in self.shards for e in s.entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close any open shard and refuse further writes (the caller deletes the directory)."""
        with self._lock:
            self._aborted = True
            self._close_shard()
