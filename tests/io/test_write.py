"""The streaming shard writer: valid safetensors files, exact index, strict order."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergesmith.errors import OutputError
from mergesmith.io.write import INDEX_NAME, OutEntry, ShardWriter, layout_shards


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 3, generator=g),  # 84 bytes: not a multiple of 8
        "b.half": torch.randn(5, generator=g).half(),  # 10 bytes
        "c.bf16": torch.randn(3, 3, generator=g).bfloat16(),
        "d.double": torch.randn(2, 2, generator=g).double(),
        "e.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "f.mask": torch.tensor([True, False, True]),
        "g.empty": torch.empty(0, 4),
        "h.scalar": torch.tensor(3.5),
        "i.bytes": torch.arange(5, dtype=torch.uint8),
    }


def entries_of(tensors: dict[str, torch.Tensor]) -> list[OutEntry]:
    return [OutEntry(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items()]


def write_all(out: Path, tensors: dict[str, torch.Tensor], shard_size: int) -> ShardWriter:
    shards = layout_shards(entries_of(tensors), shard_size)
    writer = ShardWriter(out, shards)
    for k, v in tensors.items():
        writer.write(k, v)
    writer.finish()
    return writer


def read_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize("shard_size", [10**9, 100, 1])
def test_written_files_load_with_safetensors(tmp_path, shard_size):
    tensors = sample_tensors()
    writer = write_all(tmp_path, tensors, shard_size)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tensors)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert {f.name for f in files} == set(index["weight_map"].values())
    seen = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
            for k in h.keys():
                assert index["weight_map"][k] == f.name
                seen[k] = h.get_tensor(k)
    assert set(seen) == set(tensors)
    for k, v in tensors.items():
        assert seen[k].dtype == v.dtype and seen[k].shape == v.shape, k
        assert torch.equal(seen[k], v), k
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    assert index["metadata"]["total_size"] == total == writer.bytes_written
    # Every file is exactly header + data: nothing missing, nothing trailing.
    for f in files:
        n, header = read_header(f)
        ends = [m["data_offsets"][1] for k, m in header.items() if k != "__metadata__"]
        assert f.stat().st_size == 8 + n + max(ends)


def test_headers_are_padded_to_eight_bytes(tmp_path):
    write_all(tmp_path, sample_tensors(), 1)  # one shard per tensor: many different header lengths
    lengths = set()
    for f in tmp_path.glob("*.safetensors"):
        n, header = read_header(f)
        assert n % 8 == 0, f
        raw = f.read_bytes()[8 : 8 + n]
        assert raw.rstrip(b" ") == json.dumps(header, separators=(",", ":")).encode()
        lengths.add(len(raw.rstrip(b" ")) % 8)
    assert len(lengths) > 1  # padding was actually exercised, not coincidentally aligned


def test_data_offsets_are_contiguous_in_entry_order(tmp_path):
    tensors = sample_tensors()
    write_all(tmp_path, tensors, 10**9)
    (f,) = tmp_path.glob("*.safetensors")
    _, header = read_header(f)
    pos = 0
    for k, v in tensors.items():
        start, end = header[k]["data_offsets"]
        assert start == pos and end - start == v.numel() * v.element_size(), k
        pos = end


def test_tensor_bytes_match_what_safetensors_itself_writes(tmp_path):
    """Same tensors through safetensors.torch.save_file: same dtype codes, shapes and data bytes."""
    from safetensors.torch import save_file

    tensors = {k: v for k, v in sample_tensors().items() if v.numel()}
    (tmp_path / "ours").mkdir()
    write_all(tmp_path / "ours", tensors, 10**9)
    (ours,) = (tmp_path / "ours").glob("*.safetensors")
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, str(ref), metadata={"format": "pt"})

    def data(path: Path, name: str) -> tuple[str, list[int], bytes]:
        n, header = read_header(path)
        a, b = header[name]["data_offsets"]
        return header[name]["dtype"], header[name]["shape"], path.read_bytes()[8 + n + a : 8 + n + b]

    for k in tensors:
        assert data(ours, k) == data(ref, k), k


def test_layout_respects_the_shard_size_and_names_shards():
    entries = [OutEntry(f"t{i}", "float32", (25,)) for i in range(10)]  # 100 bytes each
    shards = layout_shards(entries, 300)
    assert [len(s.entries) for s in shards] == [3, 3, 3, 1]
    assert [s.filename for s in shards] == [f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)]
    assert [e.name for s in shards for e in s.entries] == [e.name for e in entries]  # order kept
    assert len(layout_shards(entries, 10**9)) == 1


def test_tensor_larger_than_the_shard_size_gets_its_own_shard(tmp_path):
    small = OutEntry("small1", "float32", (10,))  # 40 bytes
    big = OutEntry("big", "float32", (100,))  # 400 bytes
    shards = layout_shards([small, big, OutEntry("small2", "float32", (10,))], 100)
    assert [[e.name for e in s.entries] for s in shards] == [["small1"], ["big"], ["small2"]]
    tensors = {"small1": torch.ones(10), "big": torch.arange(100.0), "small2": torch.zeros(10)}
    write_all(tmp_path, tensors, 100)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) == 3
    with safe_open(str(tmp_path / index["weight_map"]["big"]), framework="pt") as h:
        assert list(h.keys()) == ["big"]
        assert torch.equal(h.get_tensor("big"), tensors["big"])


def make_writer(tmp_path: Path, shard_size: int = 10**9) -> tuple[ShardWriter, dict[str, torch.Tensor]]:
    tensors = {"x": torch.ones(4), "y": torch.zeros(2, 2), "z": torch.arange(3.0)}
    return ShardWriter(tmp_path, layout_shards(entries_of(tensors), shard_size)), tensors


def test_raw_bytes_write_like_tensors(tmp_path):
    from mergesmith.io.read import RawTensor

    tensors = {"x": torch.arange(6.0).reshape(3, 2), "ids": torch.arange(4)}
    shards = layout_shards(entries_of(tensors), 10**9)
    (tmp_path / "t").mkdir()
    (tmp_path / "r").mkdir()
    by_tensor, by_bytes = ShardWriter(tmp_path / "t", shards), ShardWriter(tmp_path / "r", shards)
    for name, t in tensors.items():
        by_tensor.write(name, t)
    x = tensors["x"].numpy().tobytes()
    by_bytes.write("x", RawTensor("float32", (1, 2), memoryview(x[:8])))  # rows arrive in two pieces
    by_bytes.write("x", RawTensor("float32", (2, 2), memoryview(x[8:])))
    by_bytes.write("ids", RawTensor("int64", (4,), memoryview(tensors["ids"].numpy().tobytes())))
    by_tensor.finish()
    by_bytes.finish()
    for f in (tmp_path / "t").iterdir():
        assert f.read_bytes() == (tmp_path / "r" / f.name).read_bytes()
    assert by_tensor.hashes == by_bytes.hashes


def test_writing_out_of_order_raises(tmp_path):
    writer, t = make_writer(tmp_path)
    with pytest.raises(OutputError, match="writer expected tensor 'x' next, got 'y'"):
        writer.write("y", t["y"])
    writer.write("x", t["x"])
    with pytest.raises(OutputError, match="expected tensor 'y' next, got 'z'"):
        writer.write("z", t["z"])
    with pytest.raises(OutputError, match="expected tensor 'y' next, got 'x'"):
        writer.write("x", t["x"])  # no writing a tensor twice either
    writer.abort()


def test_unplanned_name_shape_or_dtype_raises(tmp_path):
    writer, t = make_writer(tmp_path)
    with pytest.raises(OutputError, match="got 'nope'"):
        writer.write("nope", t["x"])
    with pytest.raises(OutputError, match=r"came out as \(5,\) float32, planned \(4,\) float32"):
        writer.write("x", torch.ones(5))
    with pytest.raises(OutputError, match="planned"):
        writer.write("x", torch.ones(4, dtype=torch.float16))
    writer.abort()


def test_extra_tensor_after_the_last_raises(tmp_path):
    writer, t = make_writer(tmp_path)
    for k, v in t.items():
        writer.write(k, v)
    with pytest.raises(OutputError, match="after every planned tensor was written"):
        writer.write("x", t["x"])
    writer.finish()


def test_finishing_early_raises_and_writes_no_index(tmp_path):
    writer, t = make_writer(tmp_path)
    writer.write("x", t["x"])
    with pytest.raises(OutputError, match="merge ended before tensor 'y' was written"):
        writer.finish()
    assert not (tmp_path / INDEX_NAME).exists()


def test_abort_closes_files_and_refuses_later_writes(tmp_path):
    writer, t = make_writer(tmp_path, shard_size=16)  # x | y | z: one shard each
    writer.write("x", t["x"])
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    writer.abort()
    assert not writer._open
    with pytest.raises(OutputError, match="after the write was aborted"):
        writer.write("y", t["y"])
    with pytest.raises(OutputError, match="aborted"):
        writer.finish()
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # no new shard was opened after abort
    assert not (tmp_path / INDEX_NAME).exists()


def test_abort_from_another_thread_stops_a_writing_thread(tmp_path):
    """The executor writes on its own thread; once abort() returns, no file in the directory changes."""
    n = 200
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(n)}
    writer = ShardWriter(tmp_path, layout_shards(entries_of(tensors), 256))  # one shard per tensor
    started = threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for k, v in tensors.items():
                writer.write(k, v)
                started.set()
        except OutputError as exc:
            errors.append(exc)

    th = threading.Thread(target=work)
    th.start()
    started.wait(5)
    writer.abort()
    after_abort = sorted(p.name for p in tmp_path.iterdir())
    th.join(5)
    assert sorted(p.name for p in tmp_path.iterdir()) == after_abort
    assert errors or len(after_abort) == n  # the thread either hit the abort or had already finished


def test_overlapped_hash_equals_sha256_of_the_bytes_in_order() -> None:
    import hashlib
    import os

    from mergesmith.io.write import _OverlappedHash

    chunks = [os.urandom(n) for n in (10, 3 << 20, 5, 1 << 20, (1 << 20) - 1, 2 << 20)]
    h = _OverlappedHash(b"header")
    for c in chunks:
        h.update(memoryview(c))
    assert h.hexdigest() == hashlib.sha256(b"header" + b"".join(chunks)).hexdigest()


def test_shard_space_is_reserved_without_changing_the_file_size(tmp_path: Path) -> None:
    from mergesmith._util import reserve_file_space

    path = tmp_path / "f.bin"
    with open(path, "wb") as fh:
        reserve_file_space(fh.fileno(), 10 * 2**20)
        assert path.stat().st_size == 0  # the size grows only with the bytes written
        fh.write(b"x" * 1000)
    assert path.read_bytes() == b"x" * 1000


def test_a_full_disk_fails_when_the_shard_opens_with_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    import ctypes
    import errno

    from mergesmith import _util

    class FullDisk:
        def fallocate(self, fd: int, mode: int, offset: int, length: int) -> int:
            ctypes.set_errno(errno.ENOSPC)
            return -1

    monkeypatch.setattr(_util, "_libc", lambda: FullDisk())
    tensors = sample_tensors()
    writer = ShardWriter(tmp_path, layout_shards(entries_of(tensors), 10**9))
    name, first = next(iter(tensors.items()))
    with pytest.raises(OutputError, match="No space left on device.*the shard needs"):
        writer.write(name, first)
    writer.abort()


def _can_reserve(directory: Path) -> bool:
    from mergesmith._util import reserve_file_space

    probe = directory / "probe.bin"
    with open(probe, "wb") as fh:
        ok = reserve_file_space(fh.fileno(), 1 << 16)
    probe.unlink()
    return ok


def test_claimed_regions_give_the_same_shards_as_writes(tmp_path: Path) -> None:
    """A producer computing straight into claimed regions of the shard files (whole tensors, and a tensor
    in two row ranges) gives the files and hashes plain writes give."""
    import numpy as np

    from mergesmith.io.read import RawTensor

    if not _can_reserve(tmp_path):
        pytest.skip("this filesystem cannot reserve blocks, so the writer never maps shards here")
    g = torch.Generator().manual_seed(1)
    tensors = {
        "a": torch.randn(6, 5, generator=g),
        "b": torch.randn(9, 4, generator=g).bfloat16(),
        "c": torch.randn(3, generator=g),
        "d": torch.randn(4000, 3, generator=g),  # spans pages, starts mid-page
    }
    shards = layout_shards(entries_of(tensors), 200)  # several shards
    (tmp_path / "plain").mkdir()
    (tmp_path / "claimed").mkdir()
    plain = ShardWriter(tmp_path / "plain", shards)
    claimed = ShardWriter(tmp_path / "claimed", shards)
    for name, t in tensors.items():
        plain.write(name, t)
        raw = t.contiguous().view(-1).view(torch.uint8).numpy()
        pieces = [(0, t.shape[0])] if name != "d" else [(0, 1234), (1234, 4000)]
        for start, stop in pieces:
            row = raw.size // t.shape[0]
            place = claimed.claim(name, start, (stop - start) * row)
            assert place is not None
            np.frombuffer(place, dtype=np.uint8)[:] = raw[start * row : stop * row]
            dtype = str(t.dtype).removeprefix("torch.")
            claimed.write(name, RawTensor(dtype, (stop - start, *t.shape[1:]), place, in_place=True))
    plain.finish()
    claimed.finish()
    assert claimed.hashes == plain.hashes
    for s in shards:
        assert (tmp_path / "claimed" / s.filename).read_bytes() == (
            tmp_path / "plain" / s.filename
        ).read_bytes()


def test_no_claims_where_blocks_cannot_be_reserved(tmp_path: Path, monkeypatch) -> None:
    """Without reserved blocks a full disk would show only as a crash while writing through a map: the
    writer hands out no region and the producer's own buffer is written as usual."""
    from mergesmith import _util

    monkeypatch.setattr(_util, "_libc", lambda: None)
    tensors = sample_tensors()
    writer = ShardWriter(tmp_path, layout_shards(entries_of(tensors), 10**9))
    assert writer.claim("a.weight", 0, 84) is None
    for k, v in tensors.items():
        writer.write(k, v)
    writer.finish()
    with safe_open(str(next(tmp_path.glob("*.safetensors"))), framework="pt") as h:
        for k, v in tensors.items():
            assert torch.equal(h.get_tensor(k), v), k


def test_an_in_place_buffer_must_have_been_claimed(tmp_path: Path) -> None:
    from mergesmith.io.read import RawTensor

    tensors = {"a": torch.ones(4, 4)}
    writer = ShardWriter(tmp_path, layout_shards(entries_of(tensors), 10**9))
    fake = memoryview(bytearray(64))
    with pytest.raises(OutputError, match="not claimed"):
        writer.write("a", RawTensor("float32", (4, 4), fake, in_place=True))
    writer.abort()


def test_a_finished_shard_is_never_claimed_again(tmp_path: Path) -> None:
    """Claiming into a shard already completed (by this run, or by the run a resume continues) would
    reopen and empty it: the writer refuses."""
    tensors = {"a": torch.ones(8, 8), "b": torch.zeros(8, 8), "c": torch.full((8, 8), 2.0)}
    shards = layout_shards(entries_of(tensors), 256)  # one shard per tensor
    writer = ShardWriter(tmp_path, shards)
    writer.write("a", tensors["a"])
    first = (tmp_path / shards[0].filename).read_bytes()
    assert writer.claim("a", 0, 256) is None
    assert (tmp_path / shards[0].filename).read_bytes() == first
    (tmp_path / "r").mkdir()
    resumed = ShardWriter(tmp_path / "r", shards, start_shard=2)
    assert resumed.claim("a", 0, 256) is None and resumed.claim("b", 0, 256) is None
    assert not list((tmp_path / "r").iterdir())  # nothing opened, nothing emptied
    writer.abort()
