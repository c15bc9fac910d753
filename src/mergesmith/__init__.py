"""mergesmith: merge pretrained language models in weight space, mergekit-compatible and streaming.

Heavy libraries (torch, transformers) are imported only where they are used, so `import mergesmith`
and `mergesmith --help` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "MergeConfig",
    "MergeOptions",
    "MergeResult",
    "MergesmithError",
    "__version__",
    "plan_merge",
    "register_method",
    "run_merge",
]

if TYPE_CHECKING:
    from mergesmith.api import MergeResult, plan_merge, run_merge
    from mergesmith.config.schema import MergeConfig
    from mergesmith.errors import MergesmithError
    from mergesmith.methods.registry import register as register_method
    from mergesmith.options import MergeOptions

_LAZY = {
    "run_merge": ("mergesmith.api", "run_merge"),
    "plan_merge": ("mergesmith.api", "plan_merge"),
    "MergeResult": ("mergesmith.api", "MergeResult"),
    "MergeConfig": ("mergesmith.config.schema", "MergeConfig"),
    "MergeOptions": ("mergesmith.options", "MergeOptions"),
    "MergesmithError": ("mergesmith.errors", "MergesmithError"),
    "register_method": ("mergesmith.methods.registry", "register"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mergesmith' has no attribute {name!r}")
