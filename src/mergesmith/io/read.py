"""Lazy tensor reading: safetensors by positional reads into fresh tensors, pickles only via weights_only."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mergesmith.errors import ModelError

if TYPE_CHECKING:
    import torch

    from mergesmith.io.index import ShardIndex
    from mergesmith.io.lora import LoraReader


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
    """Reads tensors of one model on demand. Safetensors data is read with positional reads straight into
    a fresh tensor (no mmap: mapped pages would count against the process and stay resident), so a
    tensor costs exactly its own bytes and is freed with it. Thread-safe: preadv needs no shared offset."""

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

    def read(self, name: str, rows: int | None = None) -> torch.Tensor:
        """The stored tensor `name` as a new CPU tensor; with `rows`, only its first rows are read."""
        import torch

        info = self.index.tensors.get(name)
        if info is None:
            raise ModelError(f"tensor {name!r} is not in the model at {self.index.root}")
        if self.index.format == "pickle":
            with self._lock:
                state = self._pickles.get(info.file)
                if state is None:
                    state = self._pickles[info.file] = load_pickle_state(info.file)
            t = state[name]
            return t if rows is None else t[:rows]
        shape = info.shape if rows is None else (min(rows, info.shape[0]), *info.shape[1:])
        out = torch.empty(shape, dtype=getattr(torch, info.dtype))
        if out.numel():
            buf = memoryview(out.view(-1).view(torch.uint8).numpy())
            read_exact(self._fd(info.file), buf, info.start, info.file)
        return out

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (dim 0), reading only those bytes."""
        import torch

        info = self.index.tensors.get(name)
        if info is None:
            raise ModelError(f"tensor {name!r} is not in the model at {self.index.root}")
        if self.index.format == "pickle":
            return self.read(name)[start:stop]
        stop = min(stop, info.shape[0])
        row_bytes = info.nbytes // max(1, info.shape[0])
        out = torch.empty((max(0, stop - start), *info.shape[1:]), dtype=getattr(torch, info.dtype))
        if out.numel():
            buf = memoryview(out.view(-1).view(torch.uint8).numpy())
            read_exact(self._fd(info.file), buf, info.start + start * row_bytes, info.file)
        return out

    def close(self) -> None:
        with self._lock:
            self._pickles.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def read_exact(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    """Fill buf from fd at offset, looping over short reads (the kernel caps one read near 2 GiB)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done : done + (1 << 30)]], offset + done)
        if n <= 0:
            raise ModelError(f"{path} ended early: the file is truncated or was changed during the merge")
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
