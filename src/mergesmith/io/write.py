"""Safetensors shards written as a stream: shard layout and headers are fixed up front from the plan,
so each tensor goes straight to its offset in the file and no shard is ever held in memory."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mergesmith._util import ST_DTYPES, human_bytes, reserve_file_space
from mergesmith.errors import OutputError
from mergesmith.io.read import RawTensor

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

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data (the file is the header plus these)."""
        return sum(e.nbytes for e in self.entries)

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


def _bytes_of(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], memoryview]:
    """A tensor's dtype name, shape and bytes (C order, on the CPU)."""
    import torch

    dtype = str(tensor.dtype).removeprefix("torch.")
    if tensor.numel() == 0:
        return dtype, tuple(tensor.shape), memoryview(b"")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return dtype, tuple(tensor.shape), memoryview(flat.numpy())


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


ShardDone = Callable[[str, str, tuple[str, ...]], None]  # (filename, sha256 hex, tensor names)


class _OverlappedHash:
    """A shard's sha256, computed on a helper thread while the writer thread writes the same bytes.

    At most one chunk is being hashed at a time (each `update` first waits for the previous one), so
    hashing adds no memory and keeps the file's byte order; hashlib releases the GIL on large buffers.
    """

    INLINE = 1 << 20  # smaller chunks are hashed on the calling thread

    def __init__(self, first: bytes) -> None:
        self._sha = hashlib.sha256(first)
        self._pending: threading.Thread | None = None

    def update(self, data: memoryview) -> None:
        self.wait()
        if data.nbytes < self.INLINE:
            self._sha.update(data)
            return
        self._pending = threading.Thread(target=self._sha.update, args=(data,), daemon=True)
        self._pending.start()

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.join()
            self._pending = None

    def hexdigest(self) -> str:
        self.wait()
        return self._sha.hexdigest()


class ShardWriter:
    """Writes tensors in layout order, whole or as consecutive row chunks; opens each shard when its first
    bytes arrive, hashes it (sha256) as it goes and reports each completed shard to `on_shard_done`.

    `start_shard` skips shards already completed by an interrupted run (resume)."""

    def __init__(
        self,
        out_dir: Path,
        shards: list[Shard],
        *,
        start_shard: int = 0,
        on_shard_done: ShardDone | None = None,
        done_hashes: dict[str, str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.shards = shards
        self._order = [(si, e) for si, s in enumerate(shards) for e in s.entries]
        self._next = sum(len(s.entries) for s in shards[:start_shard])
        self._fh: BinaryIO | None = None
        self._hash: Any = None
        self._shard = -1
        self._entry_done = 0  # bytes of the current entry written so far (row-chunked writes)
        self.bytes_written = 0
        self.hashes: dict[str, str] = dict(done_hashes or {})
        self._on_shard_done = on_shard_done
        # write() and abort() may run on different threads: once abort() returns, no file is touched again.
        self._lock = threading.Lock()
        self._aborted = False

    @property
    def done_names(self) -> set[str]:
        """Names of the tensors fully written so far (including those of skipped, completed shards)."""
        return {e.name for _, e in self._order[: self._next]}

    def write(self, name: str, tensor: torch.Tensor | RawTensor) -> None:
        """Append the next tensor, or the next rows of it; it must be what the layout expects next."""
        with self._lock:
            self._write(name, tensor)

    def _write(self, name: str, tensor: torch.Tensor | RawTensor) -> None:
        if self._aborted:
            raise OutputError(f"tensor {name!r} arrived after the write was aborted")
        if self._next >= len(self._order):
            raise OutputError(f"tensor {name!r} arrived after every planned tensor was written")
        si, entry = self._order[self._next]
        if entry.name != name:
            raise OutputError(f"writer expected tensor {entry.name!r} next, got {name!r}")
        dtype, shape, data = (
            (tensor.dtype, tensor.shape, tensor.data) if isinstance(tensor, RawTensor) else _bytes_of(tensor)
        )
        whole = shape == entry.shape
        rows_ok = len(entry.shape) > 0 and len(shape) == len(entry.shape) and shape[1:] == entry.shape[1:]
        nbytes = data.nbytes
        if dtype != entry.dtype or not (whole or rows_ok) or self._entry_done + nbytes > entry.nbytes:
            raise OutputError(
                f"tensor {name!r} came out as {shape} {dtype}, planned {entry.shape} {entry.dtype}"
            )
        path = self.out_dir / self.shards[si].filename
        try:
            if si != self._shard:
                self._close_shard()
                self._shard = si
                self._fh = open(path, "wb")
                header = self.shards[si].header()
                size = len(header) + self.shards[si].data_bytes
                try:
                    reserve_file_space(self._fh.fileno(), size)
                except OSError as exc:
                    raise OutputError(
                        f"cannot write {path}: {exc.strerror} (the shard needs {human_bytes(size)}); "
                        "free some space or choose another output directory"
                    ) from None
                self._hash = _OverlappedHash(header)
                self._fh.write(header)
            assert self._fh is not None
            if nbytes:
                self._hash.update(data)
                self._fh.write(data)
        except OSError as exc:  # disk full, quota, directory removed: an output problem, not a bug
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        self._entry_done += nbytes
        self.bytes_written += nbytes
        if self._entry_done == entry.nbytes:
            self._entry_done = 0
            self._next += 1
            if self._next == len(self._order) or self._order[self._next][0] != si:
                self._close_shard()

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            shard = self.shards[self._shard]
            digest = self._hash.hexdigest()
            self.hashes[shard.filename] = digest
            if self._on_shard_done is not None and not self._aborted:
                self._on_shard_done(shard.filename, digest, tuple(e.name for e in shard.entries))

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
        total = sum(s.data_bytes for s in self.shards)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close any open shard and refuse further writes (the caller deletes the directory)."""
        with self._lock:
            self._aborted = True
            if self._fh is not None:
                self._fh.close()
                self._fh = None
