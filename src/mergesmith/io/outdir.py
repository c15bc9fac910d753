"""The output directory: built in a temporary sibling and renamed into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergesmith.errors import OutputError
from mergesmith.io.index import WEIGHT_SUFFIXES

# Files never copied from the donor model: we write our own versions or they are weights.
_NEVER_COPY = {"config.json", "README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_TOKENIZER_FILES = (
    "tokenizer",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.",
    "merges.txt",
    "chat_template",
    "spiece.model",
)
MAX_SIDE_FILE = 64 * 1024 * 1024  # larger non-weight files are not "small files" worth copying


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty existing output unless overwrite; refuse a file in the way."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output directory {out} is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; on success move it into place, on any failure delete it."""
    out = Path(out).absolute()
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.mergesmith-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.mergesmith-old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_tokenizer_file(name: str) -> bool:
    return name.startswith(_TOKENIZER_FILES) or name.endswith((".model", ".tiktoken"))


def copy_side_files(donor: Path, dest: Path, copy_tokenizer: bool) -> list[str]:
    """Copy the donor's small non-weight files (tokenizer, generation config, templates); return their names."""
    copied = []
    for f in sorted(donor.iterdir()):
        name = f.name
        if not f.is_file() or name.startswith(".") or name in _NEVER_COPY or name.endswith(WEIGHT_SUFFIXES):
            continue
        if not copy_tokenizer and is_tokenizer_file(name):
            continue
        if f.stat().st_size > MAX_SIDE_FILE:
            continue
        shutil.copyfile(f, dest / name)
        copied.append(name)
    return copied


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
