"""Leaf helpers: size parsing, dtype table, human-readable bytes. Imports nothing from mergesmith."""

from __future__ import annotations

import difflib
import functools
import importlib
import re
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class _LazyModule(types.ModuleType):
    """Stands for a module until an attribute is first used; then imports it and keeps each attribute
    it hands out, so later uses are plain lookups."""

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value


def lazy_module(name: str) -> Any:
    """A stand-in for module `name` that imports it on first use: merge methods name torch at module level
    yet registering them (planning, --dry-run, byte-copy merges) never pays torch's second of imports."""
    return _LazyModule(name)


# Config dtype names (mergekit spellings included) -> torch attribute names.
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
}

# Floating dtypes (torch attribute names): tensors of these dtypes are merged, all others copied.
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})

# safetensors header dtype codes -> (torch attribute name, bytes per element).
ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}

_SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)(I?B?)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse '5B', '500M', '2GB', '1.5G', '8GiB' or a plain integer into a byte count."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot read size {text!r}: use a number with K, M, B/G or T, e.g. '5B' or '500M'")
    number, unit, suffix = m.groups()
    unit = unit.upper()
    base = _SIZE_UNITS[unit]
    if suffix and suffix.upper() == "IB" and unit:
        base = 1024 ** ("KMGT".index(unit) + 1) if unit != "B" else 1024**3
    return int(float(number) * base)


def human_bytes(n: float) -> str:
    """Format a byte count with a decimal unit (e.g. '1.23 GB')."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def canonical_dtype(name: str) -> str:
    """Return the canonical dtype name for a config spelling, or raise ValueError listing allowed names."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        allowed = ", ".join(sorted(set(DTYPE_NAMES.values())))
        raise ValueError(f"unknown dtype {name!r}; allowed: {allowed} (also fp16, bf16, fp32)")
    return DTYPE_NAMES[key]


_ITEMSIZE = {torch_name: size for torch_name, size in ST_DTYPES.values()}


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a dtype name, from the table for the usual ones (no torch import)."""
    key = canonical_dtype(name) if name in DTYPE_NAMES else name
    size = _ITEMSIZE.get(key)
    return size if size is not None else torch_dtype(key).itemsize


def torch_dtype(name: str) -> torch.dtype:
    """Resolve a dtype name to a torch.dtype (imports torch lazily)."""
    import torch

    return getattr(torch, canonical_dtype(name) if name in DTYPE_NAMES else name)


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean X?)' hint for a misspelt name, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def keep_freed_memory_in_heap() -> bool:
    """Ask glibc to serve large buffers from the heap and keep them there once freed.

    A merge allocates and frees tensors of the same few sizes thousands of times; by default each
    large one is a fresh mmap whose pages the kernel zero-fills on first touch (seconds of system time
    on a multi-GB merge). Meant for a process that exits after the merge (the CLI): memory freed
    during the merge is reused, not handed back. Returns False where this is not glibc.
    """
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        return bool(libc.mallopt(m_mmap_threshold, 64 << 20) and libc.mallopt(m_trim_threshold, 2**31 - 1))
    except AttributeError:
        return False


def reserve_file_space(fd: int, nbytes: int) -> bool:
    """Reserve disk blocks for the first `nbytes` of a file about to be written (Linux fallocate with
    FALLOC_FL_KEEP_SIZE: the file's size still grows only as bytes are written). True when the blocks
    are reserved, so writes there cannot run out of space.

    One extent allocation up front instead of thousands of small delayed ones makes the writes cheaper
    on ext4/xfs, and a full disk fails here, before the work. Filesystems without fallocate are left
    alone (False). Raises OSError (ENOSPC, EDQUOT, EFBIG) when the space cannot be had.
    """
    import ctypes
    import errno
    import os

    libc = _libc()
    if nbytes <= 0 or libc is None:
        return False
    keep_size = 1
    if libc.fallocate(fd, keep_size, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))
        return False
    return True


def madvise(mapped: Any, advice: int) -> None:
    """madvise(2) over the whole of mmap object `mapped`, with the GIL released while the kernel works:
    `mmap.madvise` holds it, so populating a map there stalls every other Python thread for as long (0.2 s
    for a 2 GB map here). Raises OSError. Without libc, or for a read-only map, it falls back to
    `mmap.madvise` where that exists."""
    import ctypes
    import os

    libc = _libc()
    try:
        view = ctypes.c_char.from_buffer(mapped) if libc is not None else None
    except TypeError:  # a read-only map: ctypes takes the address of writable buffers only
        view = None
    if view is None:
        if hasattr(mapped, "madvise"):
            mapped.madvise(advice)
        return
    address = ctypes.addressof(view)
    del view  # only the address was needed: the export is released at once, before any close
    if libc.madvise(address, len(mapped), advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@functools.cache
def _libc() -> Any:
    """glibc through ctypes (errno kept), or None off Linux/glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc
