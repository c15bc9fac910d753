"""Method-aware checks of a parsed config. Every problem is collected with its field path; nothing is read from disk."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from mergesmith._util import suggest
from mergesmith.config import params as P
from mergesmith.config.ref import ModelRef
from mergesmith.config.schema import MergeConfig, OutputSlice

Path = tuple[str | int, ...]

# Fields parsed and validated now, implemented by a later release: refusing beats silently ignoring.
NOT_YET: dict[str, str] = {}


@dataclass
class Findings:
    problems: list[tuple[Path, str]] = field(default_factory=list)
    warnings: list[tuple[Path, str]] = field(default_factory=list)

    def error(self, path: Path, msg: str) -> None:
        self.problems.append((path, msg))

    def warn(self, path: Path, msg: str) -> None:
        self.warnings.append((path, msg))


@dataclass(frozen=True)
class SliceGroup:
    """One output slice in normalised form: its sources, base and where it came from in the YAML."""

    path: Path
    sources: tuple[tuple[ModelRef, Path], ...]
    base: ModelRef | None


def slice_groups(cfg: MergeConfig) -> Iterator[SliceGroup]:
    """Every merge group of the config, as mergekit normalises `models:` into one full-depth slice."""

    def from_models(models: list, prefix: Path) -> SliceGroup:
        srcs = [(m.model, (*prefix, "models", i)) for i, m in enumerate(models)]
        if cfg.base_model and cfg.base_model not in [m for m, _ in srcs]:
            srcs.append((cfg.base_model, ("base_model",)))
        return SliceGroup((*prefix, "models"), tuple(srcs), cfg.base_model)

    def from_slices(slices: list[OutputSlice], prefix: Path) -> Iterator[SliceGroup]:
        for i, s in enumerate(slices):
            path = (*prefix, "slices", i)
            srcs = tuple((src.model, (*path, "sources", j)) for j, src in enumerate(s.sources))
            yield SliceGroup(path, srcs, s.base_model or cfg.base_model)

    if cfg.models:
        yield from_models(cfg.models, ())
    if cfg.slices:
        yield from from_slices(cfg.slices, ())
    for name, mod in (cfg.modules or {}).items():
        if mod.models:
            yield from_models(mod.models, ("modules", name))
        if mod.slices:
            yield from from_slices(mod.slices, ("modules", name))


def parameter_blocks(cfg: MergeConfig) -> Iterator[tuple[Path, dict[str, Any], str]]:
    """Every `parameters:` mapping with its path and level ('top', 'module', 'slice' or 'input')."""
    if cfg.parameters:
        yield ("parameters",), cfg.parameters, "top"
    for i, m in enumerate(cfg.models or []):
        if m.parameters:
            yield ("models", i, "parameters"), m.parameters, "input"

    def slices(sl: list[OutputSlice], prefix: Path) -> Iterator[tuple[Path, dict[str, Any], str]]:
        for i, s in enumerate(sl):
            if s.parameters:
                yield (*prefix, "slices", i, "parameters"), s.parameters, "slice"
            for j, src in enumerate(s.sources):
                if src.parameters:
                    yield (*prefix, "slices", i, "sources", j, "parameters"), src.parameters, "input"

    yield from slices(cfg.slices or [], ())
    for name, mod in (cfg.modules or {}).items():
        if mod.parameters:
            yield ("modules", name, "parameters"), mod.parameters, "module"
        for i, m in enumerate(mod.models or []):
            if m.parameters:
                yield ("modules", name, "models", i, "parameters"), m.parameters, "input"
        yield from slices(mod.slices or [], ("modules", name))


def check_config(cfg: MergeConfig) -> Findings:
    """All method-aware problems and warnings of a structurally valid config."""
    from mergesmith.errors import MethodError
    from mergesmith.methods import registry

    f = Findings()
    for key, msg in NOT_YET.items():
        if getattr(cfg, key) is not None:
            f.error((key,), msg)
    _unknown_fields(cfg, f)
    _slice_lengths(cfg, f)
    _tokenizer_settings(cfg, f)
    for i, plugin in enumerate(cfg.method_plugins or []):
        try:
            registry.load_plugin(plugin)
        except MethodError as exc:
            f.error(("method_plugins", i), str(exc))
    try:
        spec = registry.get(cfg.merge_method)
    except MethodError as exc:
        f.error(("merge_method",), str(exc))
        return f

    for path, block, level in parameter_blocks(cfg):
        for name, setting in block.items():
            param = spec.param(name)
            where = (*path, name)
            if param is None:
                known = ", ".join(spec.param_names) or "none"
                f.error(
                    where,
                    f"merge method {spec.name!r} has no parameter {name!r}{suggest(name, spec.param_names)}; "
                    f"its parameters: {known}",
                )
                continue
            problem = P.shape_problem(setting)
            if problem:
                f.error(where, problem)
                continue
            for value in P.scalars_in(setting):
                try:
                    param.validate(value)
                except ValueError as exc:
                    f.error(where, str(exc))
                    break
            if param.scope == "global" and level == "input":
                f.warn(
                    where,
                    f"{name!r} is a global parameter of {spec.name!r}; a value given for one model is ignored "
                    "(as in mergekit): move it to the slice's or the top-level parameters",
                )

    for group in slice_groups(cfg):
        models = [m for m, _ in group.sources]
        has_base = group.base is not None and spec.base != "ignored"
        if has_base and group.base not in models:
            f.error(
                (*group.path, "base_model") if group.path[-2:-1] == ("slices",) else ("base_model",),
                f"base model {group.base} is not one of this slice's sources; with merge method "
                f"{spec.name!r} the base model must be listed among them",
            )
        if len(set(models)) != len(models):
            f.error(group.path, "the same model is listed twice in one merge group")
        problem = spec.check_inputs(len(models), has_base)
        if problem:
            f.error(group.path if spec.base != "required" or has_base else ("base_model",), problem)
        _required_params(cfg, spec, group, f)
    if spec.validate is not None:
        for path, block, _level in parameter_blocks(cfg):
            scalars = {k: v for k, v in block.items() if isinstance(v, (int, float, bool, str))}
            for msg in spec.validate(scalars, [scalars]):
                f.error(path, msg)
    return f


def _required_params(cfg: MergeConfig, spec: Any, group: SliceGroup, f: Findings) -> None:
    """Each required parameter must be given somewhere that reaches every model that needs it."""
    top = set(cfg.parameters or {})
    slice_level: set[str] = set()
    per_source: dict[ModelRef, set[str]] = {}
    node: Any = cfg
    for key in group.path:
        node = node[key] if isinstance(key, int) or isinstance(node, dict) else getattr(node, key, None)
    if group.path and group.path[-1] == "models":
        for m in node:
            per_source[m.model] = set(m.parameters or {})
    elif node is not None:
        slice_level = set(node.parameters or {})
        for src in node.sources:
            per_source.setdefault(src.model, set()).update(src.parameters or {})
    if group.path[:1] == ("modules",):
        top |= set(cfg.modules[group.path[1]].parameters or {})  # type: ignore[index]
    for param in spec.params:
        if not param.required:
            continue
        if param.scope == "global":
            if param.name not in top | slice_level:
                f.error(("parameters",), f"merge method {spec.name!r} needs parameter {param.name!r}")
            continue
        for model, path in group.sources:
            if param.scope == "non_base" and model == group.base:
                continue
            if param.name not in top | slice_level | per_source.get(model, set()):
                f.error(path, f"model {model} needs parameter {param.name!r} for merge method {spec.name!r}")


def _tokenizer_settings(cfg: MergeConfig, f: Findings) -> None:
    """chat_template must be usable as written; token sources should name models of the merge."""
    from mergesmith.config.chat_template import template_kind, template_problem

    if cfg.chat_template is not None:
        try:
            kind, text = template_kind(cfg.chat_template)
        except ValueError as exc:
            f.error(("chat_template",), str(exc))
        else:
            problem = template_problem(text) if kind == "literal" else None
            if problem:
                f.error(("chat_template",), problem)
    if cfg.tokenizer is None or not cfg.tokenizer.tokens:
        return
    known = set(cfg.referenced_models())
    for token, setting in cfg.tokenizer.tokens.items():
        src = setting.source
        model = src if isinstance(src, ModelRef) else getattr(src, "model", None)
        if model is not None and model not in known:
            f.warn(
                ("tokenizer", "tokens", token, "source"),
                f"model {model} is not one of the merged models, so {token!r} cannot take its embedding "
                "from it: planning fails if an input lacks the token (or it is forced)",
            )


def _slice_lengths(cfg: MergeConfig, f: Findings) -> None:
    for group_slices, prefix in [(cfg.slices, ())] + [
        (m.slices, ("modules", n)) for n, m in (cfg.modules or {}).items()
    ]:
        for i, s in enumerate(group_slices or []):
            lengths = [src.layer_range[1] - src.layer_range[0] for src in s.sources]
            if len(set(lengths)) > 1:
                f.error(
                    (*prefix, "slices", i, "sources"),
                    f"all sources of a slice must span the same number of layers, got {lengths}",
                )


def _unknown_fields(cfg: MergeConfig, f: Findings) -> None:
    """Keys the schema does not know: a near miss of a real field is an error, anything else a warning
    (mergekit ignores unknown keys, so configs carrying extra notes must still run)."""

    def walk(obj: Any, path: Path) -> None:
        if hasattr(obj, "model_extra"):
            for key in obj.unknown_fields:
                hint = suggest(key, list(type(obj).model_fields))
                if hint:  # a near miss of a real field is almost surely a typo that would change the merge
                    f.error((*path, key), f"unknown field {key!r}{hint}")
                else:
                    f.warn((*path, key), f"unknown field {key!r} is ignored")
            for name in type(obj).model_fields:
                walk(getattr(obj, name), (*path, name))
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                walk(item, (*path, i))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if hasattr(v, "model_extra"):
                    walk(v, (*path, k))

    walk(cfg, ())
