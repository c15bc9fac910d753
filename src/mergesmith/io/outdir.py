"""The output directory: built in a temporary sibling and renamed into place only when complete."""

from __future__ import annotations

import glob
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
def atomic_dir(
    out: Path, overwrite: bool, *, adopt: Path | None = None, keep_on_interrupt: bool = False
) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; on success move it into place, on failure delete it.

    adopt: the temporary directory of an interrupted run to continue in (resume) instead of a fresh one.
    keep_on_interrupt: leave the temporary directory on Ctrl-C so that `--resume` can pick it up."""
    out = Path(out).absolute()
    check_target(out, overwrite)
    tmp = out.parent / f".{out.name}.mergesmith-tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if adopt is not None and adopt != tmp:
            if tmp.exists():
                shutil.rmtree(tmp)
            adopt.rename(tmp)
        remove_stale_temps(out)
        if adopt is None:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    except OSError as exc:
        raise OutputError(
            f"cannot create a temporary directory beside {out}: {exc.strerror or exc}"
        ) from None
    try:
        yield tmp
    except KeyboardInterrupt:
        if not keep_on_interrupt:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if out.exists():
            old = out.parent / f".{out.name}.mergesmith-old-{os.getpid()}"
            out.rename(old)
        tmp.rename(out)
    except OSError as exc:
        if old is not None and not out.exists():
            old.rename(out)  # put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot move the finished merge into {out}: {exc.strerror or exc}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def temp_siblings(out: Path, dead_only: bool = True) -> list[Path]:
    """Temporary directories beside `out` (`.NAME.mergesmith-tmp-PID`), newest first; with dead_only, only
    those whose process is gone (killed or interrupted runs). On non-POSIX systems, none."""
    if os.name != "posix":
        return []
    found = []
    for p in Path(out).absolute().parent.glob(f".{glob.escape(Path(out).name)}.mergesmith-tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if p.is_dir() and pid.isdigit() and int(pid) != os.getpid():
            if not dead_only or not _pid_alive(int(pid)):
                found.append(p)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete temporary siblings of `out` left by runs that were killed (their process is gone).

    Only `-tmp-` directories are removed, never `-old-` ones (those may hold the only copy of a previous
    output). Only on POSIX, where a pid can be probed without touching the process."""
    removed = []
    for p in temp_siblings(out, dead_only=True):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def is_tokenizer_file(name: str) -> bool:
    return name.startswith(_TOKENIZER_FILES) or name.endswith((".model", ".tiktoken"))


def copy_side_files(donor: Path, dest: Path, copy_tokenizer: bool, tokenizer_only: bool = False) -> list[str]:
    """Copy the donor's small non-weight files (tokenizer, generation config, templates); return their names.

    tokenizer_only: copy just the tokenizer files (when they come from another model than the rest)."""
    copied = []
    for f in sorted(donor.iterdir()):
        name = f.name
        if not f.is_file() or name.startswith(".") or name in _NEVER_COPY or name.endswith(WEIGHT_SUFFIXES):
            continue
        if (not copy_tokenizer or tokenizer_only) and is_tokenizer_file(name) != tokenizer_only:
            continue
        if f.stat().st_size > MAX_SIDE_FILE:
            continue
        shutil.copyfile(f, dest / name)
        copied.append(name)
    return copied


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
