"""mergesmith_manifest.json: what went in (files, sizes, header digests, hub revisions) and what came out
(every output file with its sha256), so a merge can be audited and reproduced."""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

MANIFEST = "mergesmith_manifest.json"


def _header_digest(path: Path) -> str | None:
    """sha256 of a safetensors header: it lists every tensor's name, dtype, shape and byte range."""
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            return hashlib.sha256(fh.read(size)).hexdigest()
    except (OSError, struct.error):
        return None


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 16 MB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def hub_revision(path: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot directory (…/snapshots/<commit>), if that is what it is."""
    parts = Path(path).resolve().parts
    if len(parts) >= 2 and parts[-2] == "snapshots" and len(parts[-1]) == 40:
        return parts[-1]
    return None


def _weight_files(directory: Path) -> list[dict[str, Any]]:
    files = []
    for f in sorted(Path(directory).iterdir()):
        if f.suffix in (".safetensors", ".bin") and f.is_file():
            entry: dict[str, Any] = {"name": f.name, "size": f.stat().st_size}
            if f.suffix == ".safetensors":
                entry["header_sha256"] = _header_digest(f)
            files.append(entry)
    return files


def describe_input(ref: str, path: Path, lora: Path | None = None) -> dict[str, Any]:
    """One input model: where it is, its hub revision if any, its weight files (and its LoRA adapter's)."""
    out: dict[str, Any] = {
        "model": ref,
        "path": str(path),
        "revision": hub_revision(path),
        "files": _weight_files(path),
    }
    if lora is not None:
        out["adapter"] = {"path": str(lora), "revision": hub_revision(lora), "files": _weight_files(lora)}
    return out


def write_manifest(
    directory: Path,
    inputs: list[dict[str, Any]],
    shard_hashes: dict[str, str],
    version: str,
    seed: int | None,
) -> None:
    """Write the manifest listing inputs and every file of `directory` with its sha256."""
    outputs = []
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            digest = shard_hashes.get(f.name) or file_sha256(f)
            outputs.append({"name": f.name, "size": f.stat().st_size, "sha256": digest})
    manifest = {
        "mergesmith_version": version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "random_seed": seed,
        "inputs": inputs,
        "outputs": outputs,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
