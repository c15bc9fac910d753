"""Click flags generated from MergeOptions fields, so every subcommand shares names, defaults and help."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from mergesmith.options import MergeOptions

# Boolean options that default to on get a --no-X form; the rest are plain switches.
_NEGATABLE = {"copy_tokenizer", "write_model_card"}
_SHORT = {"verbosity": "-v", "quiet": "-q"}
_HIDDEN_TYPES = {"out_shard_size": str, "max_memory": str}


def merge_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with one flag per MergeOptions field."""
    for name, field in reversed(list(MergeOptions.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if name == "verbosity":
            fn = click.option("-v", "--verbose", "verbosity", count=True, help=help_text)(fn)
        elif field.annotation is bool:
            decls = [f"{flag}/--no-{name.replace('_', '-')}"] if name in _NEGATABLE else [flag]
            if name in _SHORT:
                decls.insert(0, _SHORT[name])
            extra = {} if name in _NEGATABLE else {"is_flag": True}
            fn = click.option(
                *decls, name, default=field.default, show_default=name in _NEGATABLE, help=help_text, **extra
            )(fn)
        else:
            kind = _HIDDEN_TYPES.get(name, int if "int" in str(field.annotation) else str)
            fn = click.option(flag, name, type=kind, default=None, help=help_text)(fn)
    return fn


def options_from(kwargs: dict[str, Any]) -> MergeOptions:
    """Build MergeOptions from click kwargs, leaving unset values at their defaults.

    A value MergeOptions rejects (e.g. `--out-shard-size abc`) is a usage error: click prints it and exits 2.
    """
    from pydantic import ValidationError

    values = {k: kwargs.pop(k) for k in list(kwargs) if k in MergeOptions.model_fields}
    try:
        return MergeOptions(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if repr(err["input"]) not in msg:
            msg += f" (got {err['input']!r})"
        raise click.BadParameter(msg, param_hint=f"'--{name.replace('_', '-')}'") from None
