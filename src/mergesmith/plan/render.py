"""Human-readable summary of a MergePlan (what --dry-run prints)."""

from __future__ import annotations

from collections import Counter

from mergesmith._util import human_bytes
from mergesmith.plan.types import MergePlan


def render(plan: MergePlan, per_tensor: bool = False) -> str:
    """Counts, bytes in/out, methods and dtypes; with per_tensor, one line per output tensor."""
    methods = Counter(t.method for t in plan.tensors)
    dtypes = Counter(t.out_dtype for t in plan.tensors)
    lines = [
        f"merge method: {plan.method}",
        "inputs:",
        *(
            f"  [{i}] {m.ref}  ({m.path}{f' + adapter {m.lora}' if m.lora else ''})"
            for i, m in enumerate(plan.models)
        ),
        f"output tensors: {len(plan.tensors)}",
        f"bytes read: {human_bytes(plan.bytes_in)}   bytes written: {human_bytes(plan.bytes_out)}",
        "methods: " + ", ".join(f"{k} x{v}" for k, v in methods.most_common()),
        "output dtypes: " + ", ".join(f"{k} x{v}" for k, v in dtypes.most_common()),
    ]
    layer_key = next(
        (k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in plan.out_config), None
    )
    if layer_key:
        lines.append(f"output layers: {plan.out_config[layer_key]}")
    if plan.tokenizer is not None:
        lines.append(f"tokenizer: {getattr(plan.tokenizer, 'description', '') or 'merged'}")
    if plan.warnings:
        lines.append(f"warnings: {len(plan.warnings)} (see above)")
    if per_tensor:
        lines.append("tensors:")
        for t in plan.tensors:
            srcs = ", ".join(f"[{s.model}]{s.name}" for s in t.sources)
            params = " ".join(_kv(k, v) for k, v in t.params)
            lines.append(f"  {t.name} {list(t.shape)} {t.out_dtype} <- {t.method}({srcs}) {params}".rstrip())
            for s, mp in zip(t.sources, t.per_model):
                if mp:
                    lines.append(f"      [{s.model}] " + " ".join(_kv(k, v) for k, v in mp if v is not None))
    return "\n".join(lines)


def _kv(key: str, value: object) -> str:
    return f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
