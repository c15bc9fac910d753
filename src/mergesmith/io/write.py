"""Safetensors shards written as a stream: shard layout and headers are fixed up front from the plan,
so each tensor goes straight to its offset in the file and no shard is ever held in memory."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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


@dataclass
class _OpenShard:
    fd: int
    hash: _OverlappedHash
    mappable: bool  # its blocks are reserved and the file has its final size: regions may be mapped


def _write_at(fd: int, data: memoryview, pos: int) -> None:
    """All of `data` at byte `pos` of the file (a large write may be done in parts)."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while view.nbytes:
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, view, pos)
        else:  # every write of a shard holds the writer's lock, so seek-then-write cannot interleave
            os.lseek(fd, pos, os.SEEK_SET)
            n = os.write(fd, view)
        view, pos = view[n:], pos + n


class ShardWriter:
    """Writes tensors in layout order, whole or as consecutive row chunks; opens each shard when its first
    bytes arrive, hashes it (sha256) as it goes and reports each completed shard to `on_shard_done`.

    A producer may instead `claim` a tensor's (or rows') place in its shard as a writable buffer mapped on
    the file and compute straight into it; it then hands that buffer over as a RawTensor with
    `in_place=True`, which is hashed in its turn but not copied. `start_shard` skips shards already
    completed by an interrupted run (resume)."""

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
        self._headers = [s.header() for s in shards]
        self._place: dict[str, tuple[int, int, OutEntry]] = {}  # tensor -> (shard, offset of its data, entry)
        for si, s in enumerate(shards):
            pos = len(self._headers[si])
            for e in s.entries:
                self._place[e.name] = (si, pos, e)
                pos += e.nbytes
        self._next = sum(len(s.entries) for s in shards[:start_shard])
        self._first = start_shard
        self._open: dict[int, _OpenShard] = {}
        self._closed: set[int] = set()
        self._shard = -1
        self._entry_done = 0  # bytes of the current entry written so far (row-chunked writes)
        self._claims: dict[tuple[str, int], int] = {}  # (tensor, file offset) -> bytes handed out by claim
        self.bytes_written = 0
        self.hashes: dict[str, str] = dict(done_hashes or {})
        self._on_shard_done = on_shard_done
        # write() and abort() may run on different threads: once abort() returns, no file is touched again.
        self._lock = threading.Lock()
        # The open files and the claims, also used by claim() from the producer's thread: held only briefly,
        # so a claim never waits for a write (or its hash) in progress.
        self._files = threading.Lock()
        self._aborted = False

    @property
    def done_names(self) -> set[str]:
        """Names of the tensors fully written so far (including those of skipped, completed shards)."""
        return {e.name for _, e in self._order[: self._next]}

    def claim(self, name: str, start_row: int, nbytes: int) -> memoryview | None:
        """A writable buffer mapped on the shard file where `nbytes` of tensor `name` starting at row
        `start_row` go, or None where mapping is not possible (the filesystem could not reserve the
        shard's blocks, so a full disk would only show as a crash while writing through the map): the
        caller then makes its own buffer and the bytes are written as usual."""
        import mmap

        with self._files:
            if self._aborted or name not in self._place or nbytes <= 0:
                return None
            si, start, entry = self._place[name]
            rows = entry.shape[0] if entry.shape else 1
            pos = start + start_row * (entry.nbytes // max(1, rows))
            finished = si < self._first or si < self._shard or si in self._closed
            if finished or pos + nbytes > start + entry.nbytes:
                return None  # (a finished shard is never opened again: that would empty it)
            try:
                shard = self._opened(si)
            except OutputError:
                return None  # the write of this tensor reports it
            if not shard.mappable:
                return None
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            # Pages fault in as the kernel writes them (faulting them all in first with
            # MADV_POPULATE_WRITE measured slower: twice the system time).
            region = mmap.mmap(shard.fd, pos + nbytes - base, offset=base)
            self._claims[(name, pos)] = nbytes
            return memoryview(region)[pos - base :]

    def write(self, name: str, tensor: torch.Tensor | RawTensor) -> None:
        """Append the next tensor, or the next rows of it; it must be what the layout expects next."""
        with self._lock:
            self._write(name, tensor)

    def _opened(self, si: int) -> _OpenShard:
        """Shard si's open file, created on first use: header written, blocks reserved, hash started.
        Called with `_files` held."""
        if si in self._open:
            return self._open[si]
        path = self.out_dir / self.shards[si].filename
        header = self._headers[si]
        size = len(header) + self.shards[si].data_bytes
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            reserved = reserve_file_space(fd, size)
            if reserved:
                os.ftruncate(fd, size)  # mapped regions must lie inside the file
            _write_at(fd, memoryview(header), 0)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OutputError(
                    f"cannot write {path}: {exc.strerror} (the shard needs {human_bytes(size)}); "
                    "free some space or choose another output directory"
                ) from None
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        self._open[si] = _OpenShard(fd, _OverlappedHash(header), reserved)
        return self._open[si]

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
        pos = self._place[name][1] + self._entry_done
        in_place = isinstance(tensor, RawTensor) and tensor.in_place
        with self._files:  # (a claim whose producer then wrote a buffer of its own is dropped here too)
            if self._claims.pop((name, pos), None) != nbytes and in_place:
                raise OutputError(f"tensor {name!r} came in a buffer that was not claimed for its place")
        try:
            if si != self._shard:
                self._close_shard()
                self._shard = si
            with self._files:
                shard = self._opened(si)
            if nbytes:
                shard.hash.update(data)
                if not in_place:
                    _write_at(shard.fd, data, pos)
        except OSError as exc:  # disk full, quota, directory removed: an output problem, not a bug
            path = self.out_dir / self.shards[si].filename
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        self._entry_done += nbytes
        self.bytes_written += nbytes
        if self._entry_done == entry.nbytes:
            self._entry_done = 0
            self._next += 1
            if self._next == len(self._order) or self._order[self._next][0] != si:
                self._close_shard()

    def _close_shard(self) -> None:
        with self._files:
            shard = self._open.pop(self._shard, None)
            self._closed.add(self._shard)
        if shard is not None:
            os.close(shard.fd)
            spec = self.shards[self._shard]
            digest = shard.hash.hexdigest()
            self.hashes[spec.filename] = digest
            if self._on_shard_done is not None and not self._aborted:
                self._on_shard_done(spec.filename, digest, tuple(e.name for e in spec.entries))

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
        with self._lock, self._files:
            self._aborted = True
            for shard in self._open.values():
                os.close(shard.fd)
            self._open.clear()
