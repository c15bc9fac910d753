"""Lazy tensor reading: safetensors tensors as private memory maps of their bytes, pickles only via weights_only."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mergesmith._util import dtype_itemsize, madvise
from mergesmith.errors import ModelError

if TYPE_CHECKING:
    import mmap

    import torch

    from mergesmith.io.index import ShardIndex, TensorInfo
    from mergesmith.io.lora import LoraReader


@dataclass(frozen=True)
class RawTensor:
    """A tensor's bytes with its dtype name and shape, with no torch involved: how stored tensors reach a
    fused kernel or go straight to a shard, and how a kernel's result reaches the writer."""

    dtype: str  # torch attribute name
    shape: tuple[int, ...]
    data: memoryview  # unsigned bytes, C order
    # True when data is a region of an output shard claimed from the writer (see ShardWriter.claim)
    in_place: bool = False

    def to_torch(self) -> torch.Tensor:
        """A CPU tensor over these bytes (no copy; it keeps them, and a map, alive)."""
        import torch

        dtype = getattr(torch, self.dtype)
        if not self.data.nbytes:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(self.data, dtype=torch.uint8).view(dtype).view(self.shape)


class TensorReader(Protocol):
    def read(self, name: str) -> torch.Tensor: ...

    def close(self) -> None: ...


def load_pickle_state(path: Path) -> dict[str, torch.Tensor]:
    """Open a PyTorch pickle checkpoint safely (weights_only, mmap when possible); never runs its code."""
    import pickle

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        raise ModelError(_unsafe_pickle_message(path, str(exc))) from None
    except Exception as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a plain dictionary of tensors")
    return state


def _unsafe_pickle_message(path: Path, reason: str) -> str:
    """Say what torch's weights_only unpickler refused, without its advice to turn the check off."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", reason)
    if found:
        what = f"it is a pickle that would import and call {found[1]} while loading"
    else:
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", reason)
        what = "it is not a plain PyTorch checkpoint of tensors (or it is corrupt)" + (
            f": {detail[1].strip()}" if detail else ""
        )
    return (
        f"refusing to load {path}: {what}. Pickles are only opened with torch.load(weights_only=True), "
        "which never runs code from the file; convert it to safetensors with a tool you trust."
    )


class ModelReader:
    """Reads tensors of one model on demand. Each safetensors tensor of 1 MB or more is a private
    (copy-on-write) memory map of exactly its own bytes, prefaulted from the page cache: no copy, no
    zero-filled buffer, and the mapping is released with the tensor, so memory stays bounded by the
    tensors alive. Writing into a returned tensor is safe (it copies the touched pages) and never
    reaches the file. Smaller tensors are copied by a positional read. Thread-safe."""

    def __init__(self, index: ShardIndex) -> None:
        self.index = index
        self._fds: dict[Path, int] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise ModelError(f"cannot open {path}: {exc.strerror}") from None
                self._fds[path] = fd
            return fd

    def _info(self, name: str) -> TensorInfo:
        info = self.index.tensors.get(name)
        if info is None:
            raise ModelError(f"tensor {name!r} is not in the model at {self.index.root}")
        return info

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        """The stored tensor `name` as a new CPU tensor; with `rows`, only its first rows are read."""
        info = self._info(name)
        if self.index.format == "pickle":
            with self._lock:
                state = self._pickles.get(info.file)
                if state is None:
                    state = self._pickles[info.file] = load_pickle_state(info.file)
            t = state[name]
            return t if rows is None else t[:rows]
        return self.read_raw(name, None if rows is None else 0, rows).to_torch()

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (dim 0), reading only those bytes."""
        if self.index.format == "pickle":
            return self.read(name)[start:stop]
        return self.read_raw(name, start, stop).to_torch()

    def read_raw(self, name: str, start: int | None = None, stop: int | None = None) -> RawTensor:
        """The stored bytes of tensor `name` (of rows [start, stop) when given), without torch; safetensors
        models only (a pickle's bytes are not laid out as the tensor)."""
        info = self._info(name)
        if self.index.format != "safetensors":
            raise ModelError(f"{self.index.root} is not a safetensors model: its raw bytes cannot be copied")
        offset, shape = (info.start, info.shape) if start is None else _row_range(info, start, stop)
        nbytes = dtype_itemsize(info.dtype)
        for s in shape:
            nbytes *= s
        if nbytes < MAP_MIN_BYTES:  # a map costs five system calls and a file descriptor: copy small ones
            buf = bytearray(nbytes)
            _read_exact(self._fd(info.file), memoryview(buf), offset, info.file)
            return RawTensor(info.dtype, shape, memoryview(buf))
        return RawTensor(info.dtype, shape, self._mapped(info.file, offset, nbytes))

    def _mapped(self, path: Path, offset: int, nbytes: int) -> memoryview:
        """The `nbytes` at `offset` of `path` as a private, prefaulted mapping, unmapped once the last view
        of it is gone."""
        import mmap

        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        lead = offset - start
        try:
            mapped = mmap.mmap(self._fd(path), lead + nbytes, access=mmap.ACCESS_COPY, offset=start)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot map {path}: {exc}; the file is truncated or was changed") from None
        _prefault(mapped, path)
        return memoryview(mapped)[lead : lead + nbytes]

    def close(self) -> None:
        with self._lock:
            self._pickles.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


MAP_MIN_BYTES = 1 << 20  # smaller tensors are copied into fresh memory with a positional read
_MADV_POPULATE_READ = 22  # Linux 5.14+: map the file's cached pages now, read-only, without copying them


def _prefault(mapped: mmap.mmap, path: Path) -> None:
    """Fault the whole mapping in at once (on the reading thread, not the compute thread that uses it).
    Older kernels lack the advice and fault pages in as they are touched; a file cut short fails here
    with a clear error instead of a SIGBUS later."""
    import errno

    try:
        madvise(mapped, _MADV_POPULATE_READ)
    except OSError as exc:
        if exc.errno in (errno.EFAULT, errno.EIO, errno.ENOMEM):
            raise ModelError(
                f"cannot read {path}: {exc.strerror}; the file is truncated, unreadable or was changed"
            ) from None


def _row_range(info: TensorInfo, start: int, stop: int | None) -> tuple[int, tuple[int, ...]]:
    """File offset and shape of rows [start, stop) of a stored tensor (dim 0)."""
    rows = info.shape[0]
    stop = rows if stop is None else min(stop, rows)
    row_bytes = info.nbytes // max(1, rows)
    return info.start + start * row_bytes, (max(0, stop - start), *info.shape[1:])


def _read_exact(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    """Fill buf from fd at offset, looping over short reads."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise ModelError(f"cannot read {path}: the file is truncated or was changed during the merge")
        done += n


def open_model(path: Path, lora: Path | None = None) -> ModelReader | LoraReader:
    """A reader for the model at `path`; with `lora`, a reader that applies that PEFT adapter to each tensor
    as it is read (io.lora.LoraReader: same index, `read` and `read_range` as a ModelReader)."""
    from mergesmith.io.index import index_model_dir

    reader = ModelReader(index_model_dir(path))
    if lora is None:
        return reader
    from mergesmith.io.lora import open_lora_model

    try:
        return open_lora_model(reader, Path(lora))
    except BaseException:
        reader.close()
        raise
