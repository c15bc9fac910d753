"""ModelRef -> local directories: a path on disk, or a repo in the Hugging Face cache (downloaded if allowed).

`resolve` gives the base model's directory, `resolve_lora` the LoRA adapter's (for `base+adapter`)."""

from __future__ import annotations

import os
from pathlib import Path

from mergesmith.config.ref import ModelPath, ModelRef
from mergesmith.errors import ModelError

_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
# Repos that only hold pickles: fetched only when a snapshot has no safetensors weights.
_PICKLE_PATTERNS = ["pytorch_model*.bin", "*.bin.index.json"]
_ADAPTER_PATTERNS = ["*.json", "adapter_model.safetensors", "adapter_model.bin"]


def resolve(ref: ModelRef, cache_dir: str | None = None) -> Path:
    """Local directory of the (base) model; raise ModelError when it is neither local nor obtainable.

    For `base+adapter` references this is the base; `resolve_lora` gives the adapter."""
    return _resolve_path(ref.model, str(ref), "", cache_dir, _PATTERNS)


def resolve_lora(ref: ModelRef, cache_dir: str | None = None) -> Path | None:
    """Local directory of the LoRA adapter of `base+adapter`, or None when the reference has none."""
    if ref.lora is None:
        return None
    return _resolve_path(ref.lora, str(ref), f"LoRA adapter {ref.lora}: ", cache_dir, _ADAPTER_PATTERNS)


def _resolve_path(mp: ModelPath, ref: str, what: str, cache_dir: str | None, patterns: list[str]) -> Path:
    path = Path(os.path.expanduser(mp.path))
    if path.is_dir():
        if mp.revision:
            raise ModelError(f"model {ref}: {what}a revision ('@{mp.revision}') only applies to hub repos")
        return path
    if path.exists():
        holds = "adapter_config.json" if what else "config.json"
        raise ModelError(f"model {ref}: {what}{path} is a file; give the directory that holds {holds}")
    looks_local = mp.path.startswith((".", "/", "~")) or mp.path.count("/") != 1
    if looks_local:
        raise ModelError(f"model {ref}: {what}directory {path} does not exist")
    return _from_hub(mp, ref, what, cache_dir, patterns)


def _from_hub(mp: ModelPath, ref: str, what: str, cache_dir: str | None, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelError(f"model {ref}: huggingface_hub is needed to use hub repos") from None
    kwargs = {"repo_id": mp.path, "revision": mp.revision, "cache_dir": cache_dir}
    try:
        return Path(snapshot_download(**kwargs, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        raise ModelError(
            f"model {ref}: {what}not a local directory and not in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set"
        )
    try:
        path = Path(snapshot_download(**kwargs, allow_patterns=patterns))
        if patterns is _PATTERNS and not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(**kwargs, allow_patterns=_PICKLE_PATTERNS))
        return path
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"model {ref}: {what}not a local directory, not in the Hugging Face cache, "
            f"and the download failed ({reason})"
        ) from None
