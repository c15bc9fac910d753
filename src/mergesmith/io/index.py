"""Which tensors a model directory holds, where, with what dtype and shape: from file headers only."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from mergesmith._util import ST_DTYPES
from mergesmith.errors import ModelError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: its file, dtype name (torch attribute), shape and byte range in a safetensors file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int = -1  # absolute byte offset of the data (safetensors only)
    end: int = -1

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        if self.start >= 0:
            return self.end - self.start
        from mergesmith._util import dtype_itemsize

        return self.numel * dtype_itemsize(self.dtype)


@dataclass(frozen=True)
class ShardIndex:
    """Every tensor of one model, keyed by name, in storage order."""

    root: Path
    tensors: dict[str, TensorInfo]
    format: str  # "safetensors" or "pickle"

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    @property
    def names(self) -> list[str]:
        return list(self.tensors)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte length + JSON) without touching the tensor data."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ModelError(f"{path} is not a safetensors file (too short)")
            (size,) = struct.unpack("<Q", raw)
            if size > 100_000_000:
                raise ModelError(
                    f"{path} has an implausible safetensors header ({size} bytes): file corrupt?"
                )
            header = json.loads(fh.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"cannot read safetensors header of {path}: {exc}") from None
    base = 8 + size
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        code = meta.get("dtype")
        if code not in ST_DTYPES:
            raise ModelError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        start, end = meta["data_offsets"]
        out[name] = TensorInfo(name, path, ST_DTYPES[code][0], tuple(meta["shape"]), base + start, base + end)
    return out


def _pickle_header(path: Path) -> dict[str, TensorInfo]:
    from mergesmith.io.read import load_pickle_state

    state = load_pickle_state(path)
    return {
        name: TensorInfo(name, path, str(t.dtype).removeprefix("torch."), tuple(t.shape))
        for name, t in state.items()
    }


def index_model_dir(root: Path) -> ShardIndex:
    """Index the weights of a model directory: sharded or single safetensors first, then pickles."""
    root = Path(root)
    if not root.is_dir():
        raise ModelError(f"model directory {root} does not exist")
    for index_name, fmt in (
        ("model.safetensors.index.json", "safetensors"),
        ("pytorch_model.bin.index.json", "pickle"),
    ):
        index_file = root / index_name
        if index_file.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelError(f"{index_file} is not a valid shard index: {exc}") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (root / f).is_file()]
            if missing:
                raise ModelError(f"{index_file} names shard files that are missing: {', '.join(missing[:5])}")
            tensors: dict[str, TensorInfo] = {}
            for f in files:
                found = (
                    read_safetensors_header(root / f) if fmt == "safetensors" else _pickle_header(root / f)
                )
                tensors.update({k: v for k, v in found.items() if weight_map.get(k) == f})
            return ShardIndex(root, tensors, fmt)
    st_files = sorted(root.glob("*.safetensors"))
    if st_files:
        tensors = {}
        for f in st_files:
            tensors.update(read_safetensors_header(f))
        return ShardIndex(root, tensors, "safetensors")
    bins = [root / n for n in ("pytorch_model.bin", "model.bin", "pytorch_model.pt") if (root / n).is_file()]
    if bins:
        return ShardIndex(root, _pickle_header(bins[0]), "pickle")
    present = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
    raise ModelError(
        f"no model weights found in {root}: expected model.safetensors (or shards with an index) "
        f"or pytorch_model.bin; the directory holds {present}"
    )
