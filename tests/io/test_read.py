"""The safetensors reader: tensors are private maps of the file (copy-on-write), freed with the tensor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergesmith.errors import ModelError
from mergesmith.io.index import index_model_dir
from mergesmith.io.read import ModelReader


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {
        "a": torch.arange(400_000, dtype=torch.float32).reshape(1000, 400),  # 1.6 MB: mapped
        "b": torch.randn(7, 3).to(torch.bfloat16),  # copied
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path, tensors


def test_reads_whole_tensors_and_row_ranges(stored) -> None:
    root, tensors = stored
    reader = ModelReader(index_model_dir(root))
    for name, t in tensors.items():
        got = reader.read(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert torch.equal(reader.read_range("a", 10, 20), tensors["a"][10:20])
    assert torch.equal(reader.read_range("a", 990, 2000), tensors["a"][990:])
    assert torch.equal(reader.read("a", rows=3), tensors["a"][:3])
    reader.close()


def test_raw_reads_are_the_stored_bytes(stored) -> None:
    root, tensors = stored
    reader = ModelReader(index_model_dir(root))

    def as_bytes(t: torch.Tensor) -> bytes:
        return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()

    for name, t in tensors.items():
        raw = reader.read_raw(name)
        assert (raw.dtype, raw.shape) == (str(t.dtype).removeprefix("torch."), tuple(t.shape))
        assert raw.data.tobytes() == as_bytes(t)
    part = reader.read_raw("a", 990, 2000)
    assert part.shape == (10, 400) and part.data.tobytes() == as_bytes(tensors["a"][990:])
    reader.close()
    assert bytes(part.data[:4]) == as_bytes(tensors["a"][990, :1])  # a map outlives the reader's files


def test_raw_reads_refuse_pickles(tmp_path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "pytorch_model.bin")
    reader = ModelReader(index_model_dir(tmp_path))
    with pytest.raises(ModelError, match="not a safetensors model"):
        reader.read_raw("w")
    reader.close()


def test_writing_into_a_tensor_never_reaches_the_file(stored) -> None:
    root, tensors = stored
    before = (root / "model.safetensors").read_bytes()
    reader = ModelReader(index_model_dir(root))
    got = reader.read("a")
    got.mul_(-1)
    got[0, 0] = 42.0
    assert torch.equal(reader.read("a"), tensors["a"])
    reader.close()
    assert got[0, 0] == 42.0 and got[1, 0] == -400.0  # still usable after the reader is closed
    assert (root / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("name", ["a", "b"])
def test_a_file_cut_short_after_indexing_is_a_clear_error(stored, name) -> None:
    root, _ = stored
    reader = ModelReader(index_model_dir(root))
    os.truncate(root / "model.safetensors", 200)
    with pytest.raises(ModelError, match="truncated"):
        reader.read(name)
    reader.close()
