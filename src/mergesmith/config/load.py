"""YAML text -> validated MergeConfig, with every problem reported at once and located by YAML line."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path as FsPath
from typing import Any

import yaml
from pydantic import ValidationError

from mergesmith._util import suggest
from mergesmith.config.schema import MergeConfig
from mergesmith.config.validate import Path, check_config
from mergesmith.errors import ConfigError

log = logging.getLogger("mergesmith")


def load_config(path: str | FsPath) -> MergeConfig:
    """Read and validate a YAML config file; raise ConfigError naming every problem."""
    p = FsPath(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file {str(p)!r} does not exist"]) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file {str(p)!r}: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"config file {str(p)!r} is not UTF-8 text (byte {exc.start}): is it really a YAML file?"]
        ) from None
    return load_config_text(text, source=str(p))


def load_config_text(text: str, source: str | None = None) -> MergeConfig:
    """Validate YAML text as a merge config (structure, then method-aware checks)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"the file is not valid YAML{where}: {problem}"], source) from None
    if not isinstance(data, dict):
        raise ConfigError(
            ["the config must be a YAML mapping with at least 'merge_method' and 'models' or 'slices'"],
            source,
        )
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as exc:
        problems = _pydantic_problems(exc, data, root)
        # Check the rest too, so one run reports every problem: drop the broken top-level fields and retry.
        broken = {err["loc"][0] for err in exc.errors() if err["loc"]}
        rest = {k: v for k, v in data.items() if k not in broken}
        try:
            partial = MergeConfig.model_validate(rest)
        except ValidationError:
            partial = None
        if partial is not None:
            findings = check_config(partial)
            problems += [
                f"{_fmt(p)}{_line(root, p)}: {m}" for p, m in findings.problems if p[:1] not in broken
            ]
        else:
            for key in data:
                if key not in MergeConfig.model_fields:
                    hint = suggest(str(key), list(MergeConfig.model_fields))
                    if hint:
                        problems.append(f"{key}{_line(root, (key,))}: unknown field {key!r}{hint}")
        raise ConfigError(problems, source) from None
    findings = check_config(cfg)
    for path, msg in findings.warnings:
        log.warning("%s%s: %s", _fmt(path), _line(root, path), msg)
    if findings.problems:
        raise ConfigError([f"{_fmt(p)}{_line(root, p)}: {m}" for p, m in findings.problems], source)
    return cfg


def _fmt(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _line(root: yaml.Node | None, path: Path) -> str:
    """' (line N)' for the deepest YAML node reachable along path, or ''."""
    node = root
    found = None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == part or str(k.value) == str(part)), None)
            key_node = next((k for k, v in node.value if k.value == part or str(k.value) == str(part)), None)
            if nxt is None:
                break
            found = key_node
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            found = node
        else:
            break
    return f" (line {found.start_mark.line + 1})" if found is not None else ""


def _pydantic_problems(exc: ValidationError, data: dict[str, Any], root: yaml.Node | None) -> list[str]:
    """Turn pydantic errors into 'field.path (line N): message', one per field, union noise removed."""
    seen: dict[Path, str] = {}
    for err in exc.errors(include_url=False):
        path: list[str | int] = []
        node: Any = data
        for part in err["loc"]:
            if isinstance(node, dict) and part in node:
                path.append(part)
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                path.append(part)
                node = node[part]
            elif isinstance(node, dict) and err["type"] == "missing" and part == err["loc"][-1]:
                path.append(part)
        key = tuple(path)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            msg = f"required field {path[-1]!r} is missing" if path else msg
            if path and isinstance(node, dict):  # a misspelt key is the usual reason: point at it
                close = difflib.get_close_matches(str(path[-1]), [str(k) for k in node], n=1, cutoff=0.6)
                if close:
                    msg += f" (is {close[0]!r} a misspelling of it?)"
        elif err["type"] == "literal_error" or "union" in err["type"]:
            msg = f"invalid value {node!r}: {msg}"
        # Keep the most specific message per field: custom value errors beat type noise from union branches.
        if key not in seen or err["type"] == "value_error":
            seen[key] = msg
    return [f"{_fmt(k)}{_line(root, k)}: {m}" for k, m in seen.items()]
