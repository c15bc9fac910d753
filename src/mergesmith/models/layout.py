"""A model's layer layout recognised from its tensor names and config.json: pre weights, blocks, post weights."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from mergesmith.errors import ModelError
from mergesmith.models.patterns import LAYER_COUNT_KEYS, LAYER_RE, PRE_HINTS, SUB_CONFIG_KEYS


@dataclass(frozen=True)
class Module:
    """One stack of blocks: `prefix.N.rest` for N in range(num_layers)."""

    prefix: str
    layers: tuple[tuple[str, ...], ...]  # per block: the `rest` names, in storage order

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def name(self, layer: int, rest: str) -> str:
        return f"{self.prefix}.{layer}.{rest}"


@dataclass(frozen=True)
class ModelLayout:
    """Pre weights, block stacks (modules, main one first) and post weights of a model."""

    pre: tuple[str, ...]
    modules: tuple[Module, ...]
    post: tuple[str, ...]
    layer_key: str | None  # config.json key of the main module's layer count
    config_layers: int | None

    @property
    def main(self) -> Module:
        return self.modules[0]


def layer_count_from_config(config: dict[str, Any]) -> tuple[str | None, int | None]:
    """(key, value) of the layer count in config.json, looking into text sub-configs too."""
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return key, config[key]
    for sub in SUB_CONFIG_KEYS:
        inner = config.get(sub)
        if isinstance(inner, dict):
            key, value = layer_count_from_config(inner)
            if key:
                return f"{sub}.{key}", value
    return None, None


def recognise(names: list[str], config: dict[str, Any], where: str = "") -> ModelLayout:
    """Group tensor names into pre / blocks / post by the layer-index pattern; check against config.json."""
    per_prefix: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    first_seen: dict[str, int] = {}
    pre: list[str] = []
    post: list[str] = []
    for i, name in enumerate(names):
        m = LAYER_RE.match(name)
        if m:
            prefix = m.group("prefix")
            per_prefix[prefix][int(m.group("idx"))].append(m.group("rest"))
            first_seen.setdefault(prefix, i)
        elif any(h in name for h in PRE_HINTS):
            pre.append(name)
        else:
            post.append(name)
    key, count = layer_count_from_config(config)
    modules = []
    for prefix, layers in per_prefix.items():
        n = max(layers) + 1
        missing = [i for i in range(n) if i not in layers]
        if missing:
            raise ModelError(
                f"{where}: blocks {missing[:5]} of {prefix} have no tensors; checkpoint incomplete?"
            )
        modules.append(Module(prefix, tuple(tuple(layers[i]) for i in range(n))))
    # Main module: the one whose depth matches config.json, else the deepest; ties by first appearance.
    modules.sort(key=lambda m: (m.num_layers != count, -m.num_layers, first_seen[m.prefix]))
    if not modules:
        raise ModelError(
            f"{where}: no layer-indexed tensors (such as model.layers.0.*) found; not a transformer?"
        )
    if count is not None and modules[0].num_layers != count:
        raise ModelError(
            f"{where}: config.json says {key}={count} but the checkpoint has "
            f"{modules[0].num_layers} blocks under {modules[0].prefix}"
        )
    return ModelLayout(tuple(pre), tuple(modules), tuple(post), key, count)
