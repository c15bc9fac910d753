"""Lazy tensor reading: safetensors through mmap (zero-copy views), pickles only via weights_only."""

from __future__ import annotations

import mmap
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mergesmith.errors import ModelError

if TYPE_CHECKING:
    import torch

    from mergesmith.io.index import ShardIndex


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
        raise ModelError(
            f"refusing to load {path}: it is a pickle that needs code execution to open "
            f"(torch.load weights_only=True rejected it: {str(exc).splitlines()[0]}). Convert it to "
            "safetensors with a tool you trust."
        ) from None
    except Exception as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a plain dictionary of tensors")
    return state


class ModelReader:
    """Reads tensors of one model on demand; files are mapped once and shared by every read."""

    def __init__(self, index: ShardIndex) -> None:
        self.index = index
        self._maps: dict[Path, mmap.mmap] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def _map(self, path: Path) -> mmap.mmap:
        with self._lock:
            m = self._maps.get(path)
            if m is None:
                with open(path, "rb") as fh:
                    # ACCESS_COPY: private, writable view so torch.frombuffer needs no copy and no warning.
                    m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                self._maps[path] = m
            return m

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor `name` (a view into the mapped file for safetensors)."""
        import torch

        info = self.index.tensors.get(name)
        if info is None:
            raise ModelError(f"tensor {name!r} is not in the model at {self.index.root}")
        if self.index.format == "pickle":
            with self._lock:
                state = self._pickles.get(info.file)
                if state is None:
                    state = self._pickles[info.file] = load_pickle_state(info.file)
            return state[name]
        dtype = getattr(torch, info.dtype)
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        buf = self._map(info.file)
        flat = torch.frombuffer(buf, dtype=dtype, count=info.numel, offset=info.start)
        return flat.view(info.shape)

    def close(self) -> None:
        with self._lock:
            self._pickles.clear()
            for m in self._maps.values():
                try:
                    m.close()
                except BufferError:  # a tensor view is still alive; the map closes when it is collected
                    pass
            self._maps.clear()
