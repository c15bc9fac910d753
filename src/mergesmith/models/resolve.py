"""ModelRef -> local directory: a path on disk, or a repo in the Hugging Face cache (downloaded if allowed)."""

from __future__ import annotations

import os
from pathlib import Path

from mergesmith.config.ref import ModelRef
from mergesmith.errors import ModelError

_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def resolve(ref: ModelRef, cache_dir: str | None = None) -> Path:
    """Local directory holding the model's files; raise ModelError when it is neither local nor obtainable."""
    if ref.lora is not None:
        raise ModelError(
            f"model {ref}: LoRA adapters ('model+adapter') are not supported yet; merge the adapter into "
            "its base first (peft merge_and_unload) and reference the result"
        )
    path = Path(os.path.expanduser(ref.model.path))
    if path.is_dir():
        if ref.model.revision:
            raise ModelError(f"model {ref}: a revision ('@{ref.model.revision}') only applies to hub repos")
        return path
    if path.exists():
        raise ModelError(f"model {ref}: {path} is a file; give the directory that holds config.json")
    looks_local = ref.model.path.startswith((".", "/", "~")) or ref.model.path.count("/") != 1
    if looks_local:
        raise ModelError(f"model {ref}: directory {path} does not exist")
    return _from_hub(ref, cache_dir)


def _from_hub(ref: ModelRef, cache_dir: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelError(f"model {ref}: huggingface_hub is needed to use hub repos") from None
    kwargs = {"repo_id": ref.model.path, "revision": ref.model.revision, "cache_dir": cache_dir}
    try:
        return Path(snapshot_download(**kwargs, local_files_only=True, allow_patterns=_PATTERNS))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        raise ModelError(
            f"model {ref}: not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
        )
    try:
        return Path(snapshot_download(**kwargs, allow_patterns=_PATTERNS))
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"model {ref}: not a local directory, not in the Hugging Face cache, and the download failed ({reason})"
        ) from None
