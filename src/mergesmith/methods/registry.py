"""Name -> MethodSpec registry. Duplicate names are rejected; unknown names get a 'did you mean'."""

from __future__ import annotations

import importlib

from mergesmith.errors import MethodError
from mergesmith.methods.spec import FusedFn, MergeFn, MethodSpec, Param

_METHODS: dict[str, MethodSpec] = {}
_BUILTIN_MODULES = (
    "linear",
    "slerp",
    "passthrough",
    "task_arithmetic",
    "sce",
    "ram",
    "nuslerp",
    "multislerp",
    "karcher",
    "model_stock",
    "nearswap",
    "arcee_fusion",
)
_loaded = False
_PLUGINS: set[str] = set()  # plugins already imported (by resolved path or module name)


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(f"mergesmith.methods.{mod}")


def register_spec(spec: MethodSpec) -> MethodSpec:
    """Add a method; refuse a name already taken and malformed parameter lists."""
    if spec.name in _METHODS:
        raise MethodError(f"a merge method named {spec.name!r} is already registered")
    names = [p.name for p in spec.params]
    if len(set(names)) != len(names):
        raise MethodError(f"merge method {spec.name!r} declares a parameter twice: {names}")
    if spec.base == "ignored" and any(p.scope == "non_base" for p in spec.params):
        raise MethodError(f"merge method {spec.name!r} has non_base parameters but ignores the base model")
    _METHODS[spec.name] = spec
    return spec


def register(
    name: str,
    *,
    params: tuple[Param, ...] | list[Param] = (),
    base: str = "ignored",
    min_models: int = 1,
    max_models: int | None = None,
    min_non_base: int = 0,
    max_non_base: int | None = None,
    random: bool = False,
    elementwise: bool = False,
    paper: str = "",
    summary: str = "",
    fused: FusedFn | None = None,
):
    """Decorator: register `fn(inputs: MergeInputs) -> Tensor` as merge method `name`."""

    def wrap(fn: MergeFn) -> MergeFn:
        register_spec(
            MethodSpec(
                name=name,
                fn=fn,
                params=tuple(params),
                base=base,  # type: ignore[arg-type]
                min_models=min_models,
                max_models=max_models,
                min_non_base=min_non_base,
                max_non_base=max_non_base,
                random=random,
                elementwise=elementwise,
                paper=paper,
                summary=summary or (fn.__doc__ or "").strip().split("\n")[0],
                fused=fused,
            )
        )
        return fn

    return wrap


def get(name: str) -> MethodSpec:
    """Return the spec registered as `name` or raise MethodError listing the known names."""
    _load_builtins()
    if name not in _METHODS:
        from mergesmith._util import suggest

        known = ", ".join(sorted(_METHODS))
        raise MethodError(f"unknown merge method {name!r}{suggest(name, sorted(_METHODS))}; known: {known}")
    return _METHODS[name]


def names() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def all_specs() -> list[MethodSpec]:
    _load_builtins()
    return [_METHODS[n] for n in sorted(_METHODS)]


def load_plugin(module: str) -> None:
    """Import a user module (dotted name or .py path) whose import registers methods."""
    import importlib.util
    from pathlib import Path

    _load_builtins()
    key = str(Path(module).resolve()) if module.endswith(".py") or "/" in module else module
    if key in _PLUGINS:  # named both on the command line and in the config, or loaded by an earlier run
        return
    try:
        if module.endswith(".py") or "/" in module:
            path = Path(module)
            spec = importlib.util.spec_from_file_location(f"mergesmith_plugin_{path.stem}", path)
            if spec is None or spec.loader is None or not path.is_file():
                raise MethodError(f"method plugin file {module!r} not found")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            importlib.import_module(module)
    except MethodError:
        raise
    except Exception as exc:  # a plugin's own failure, reported with its name
        raise MethodError(f"could not load method plugin {module!r}: {exc}") from exc
    _PLUGINS.add(key)
