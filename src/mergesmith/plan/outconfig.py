"""The output's config.json and tokenizer source, derived from the donor model and the planned tensors."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

from mergesmith._util import FLOAT_DTYPES, canonical_dtype
from mergesmith.config.ref import ModelRef
from mergesmith.config.schema import MergeConfig
from mergesmith.models.layout import ModelLayout
from mergesmith.models.patterns import SUB_CONFIG_KEYS
from mergesmith.plan.types import TensorPlan

log = logging.getLogger("mergesmith")


class LoadedModel(Protocol):
    """What these functions need of an input: its reference, config.json and layer layout."""

    ref: ModelRef
    config: dict[str, Any]
    layout: ModelLayout


def tokenizer_donor(loaded: Sequence[LoadedModel], donor: int, rows: int | None) -> int | None:
    """With embeddings truncated to `rows`, a model whose vocabulary has exactly that many tokens."""
    if rows is None:
        return None
    sizes = [m.config.get("vocab_size") for m in loaded]
    if sizes[donor] == rows:
        return donor
    match = next((i for i, n in enumerate(sizes) if n == rows), None)
    if match is not None:
        log.warning(
            "embeddings were truncated to %d rows: copying the tokenizer of %s, which has that vocabulary",
            rows,
            loaded[match].ref,
        )
    else:
        log.warning("embeddings were truncated to %d rows, but no input's tokenizer has that size", rows)
    return match


def set_dtype(config: dict[str, Any], cfg: MergeConfig, tensors: list[TensorPlan]) -> None:
    """config.json's dtype follows the float tensors actually written when the config sets none."""
    if cfg.out_dtype or cfg.dtype:
        return
    written = Counter(t.out_dtype for t in tensors if t.out_dtype in FLOAT_DTYPES)
    if not written:
        return
    dtype = written.most_common(1)[0][0]
    key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
    if config.get(key) != dtype:
        config[key] = dtype


def set_vocab_size(config: dict[str, Any], rows: int) -> None:
    """Make config.json agree with truncated embeddings (top level or the text sub-config)."""
    if "vocab_size" in config:
        config["vocab_size"] = rows
    for sub in SUB_CONFIG_KEYS:
        if isinstance(config.get(sub), dict) and "vocab_size" in config[sub]:
            config[sub]["vocab_size"] = rows


def output_config(
    cfg: MergeConfig,
    loaded: Sequence[LoadedModel],
    donor: int,
    layers: int | None,
    feeds: list[tuple[int, int]],
) -> dict[str, Any]:
    """The donor's config.json with the layer count, per-layer lists and dtype updated for the output."""
    out = json.loads(json.dumps(loaded[donor].config))
    layout = loaded[donor].layout
    if layers is not None and layout.layer_key and layers != layout.config_layers:
        node, key = out, layout.layer_key
        if "." in key:
            sub, key = key.split(".", 1)
            node = out[sub]
        old = node[key]
        node[key] = layers
        # Per-layer settings (e.g. layer_types) follow the layers they describe.
        for k, v in list(node.items()):
            if isinstance(v, list) and len(v) == old and feeds:
                src_lists = []
                for model, layer in feeds:
                    src_node = (
                        loaded[model].config if "." not in layout.layer_key else loaded[model].config[sub]
                    )
                    src_list = src_node.get(k)
                    src_lists.append(
                        src_list[layer] if isinstance(src_list, list) and layer < len(src_list) else v[0]
                    )
                node[k] = src_lists
    dtype = cfg.out_dtype or cfg.dtype
    if dtype:
        out["dtype"] = canonical_dtype(dtype)
        if "torch_dtype" in out:
            out["torch_dtype"] = out["dtype"]
    return out
