"""Small process-level helpers in mergesmith._util."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_malloc_tuning_applies_on_linux_glibc():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    code = "from mergesmith._util import keep_freed_memory_in_heap as k; print(k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_dtype_itemsize_needs_no_torch_and_agrees_with_it():
    import torch

    from mergesmith._util import ST_DTYPES, dtype_itemsize

    for name, _ in ST_DTYPES.values():
        assert dtype_itemsize(name) == getattr(torch, name).itemsize
    assert dtype_itemsize("bf16") == 2 and dtype_itemsize("uint16") == 2  # an alias; a name not in the table


def test_lazy_module_imports_on_first_use():
    import sys

    from mergesmith._util import lazy_module

    assert "colorsys" not in sys.modules or sys.modules.pop("colorsys")
    stand_in = lazy_module("colorsys")
    assert "colorsys" not in sys.modules
    assert stand_in.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    assert "colorsys" in sys.modules and "rgb_to_hsv" in vars(stand_in)  # kept for the next use


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise through libc is Linux-only")
def test_madvise_advises_a_map_and_leaves_it_closable(tmp_path) -> None:
    import errno
    import mmap

    from mergesmith._util import madvise

    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 4096)
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    madvise(mapped, 3)  # MADV_WILLNEED, known to every Linux (the reader's MADV_POPULATE_READ needs 5.14)
    assert mapped[255::256] == bytes([255]) * 4096
    with pytest.raises(OSError) as err:
        madvise(mapped, 9999)  # no such advice
    assert err.value.errno == errno.EINVAL
    mapped.close()  # the address was taken without leaving an export behind, or this raises BufferError
    with open(path, "rb") as fh:
        readonly = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    madvise(readonly, 3)  # no writable buffer to take the address of: mmap.madvise does it
    assert readonly[:3] == bytes([0, 1, 2])
    readonly.close()
