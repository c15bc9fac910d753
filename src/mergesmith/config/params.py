"""Parameter values: scalar, gradient (list interpolated over layer position t) or filter conditions.

Resolution order, highest first: input slice (`models.*.parameters` become these) > output slice >
module > top-level `parameters`; a level whose value evaluates to None (no filter matched) is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

Scalar = (bool, int, float, str)


def is_condition(value: Any) -> bool:
    return isinstance(value, Mapping) and "value" in value and set(value) <= {"value", "filter"}


def evaluate(setting: Any, tensor_name: str, t: float, coerce: Callable[[Any], Any] = lambda v: v) -> Any:
    """Value of one setting for a tensor at layer position t in [0, 1]; None when no filter matches."""
    if is_condition(setting):
        setting = [setting]
    if isinstance(setting, Scalar):
        return coerce(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, Scalar) for e in setting):
            values = [coerce(e) for e in setting]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if not numeric:
                return values[int(t * (len(values) - 1))]
            pos = t * (len(values) - 1)
            i0 = int(pos)
            i1 = min(len(values) - 1, i0 + 1)
            frac = pos - i0
            return coerce((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            filt = cond.get("filter")
            if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
                return evaluate(cond["value"], tensor_name, t, coerce)
        return None
    raise ValueError(f"unexpected parameter value {setting!r}")


def shape_problem(setting: Any) -> str | None:
    """Explain why a setting is not a scalar, gradient or condition list, or None if it is one."""
    if is_condition(setting):
        return shape_problem(setting["value"]) if not is_condition(setting["value"]) else "nested condition"
    if isinstance(setting, Scalar):
        return None
    if isinstance(setting, list):
        if not setting:
            return "empty list"
        if all(isinstance(e, Scalar) for e in setting):
            return None
        if all(is_condition(e) for e in setting):
            for e in setting:
                if e.get("filter") is not None and not isinstance(e["filter"], str):
                    return f"filter {e['filter']!r} must be a string"
                problem = shape_problem(e["value"])
                if problem:
                    return problem
            return None
        return "a list must hold only numbers (a gradient) or only {filter, value} conditions"
    return f"expected a number, a list of numbers or {{filter, value}} conditions, got {setting!r}"


def scalars_in(setting: Any) -> list[Any]:
    """Every literal value a setting can produce (for type checks before any tensor is seen)."""
    if is_condition(setting):
        return scalars_in(setting["value"])
    if isinstance(setting, list):
        out: list[Any] = []
        for e in setting:
            out.extend(scalars_in(e))
        return out
    return [setting]


def filters_in(setting: Any) -> list[str]:
    """Filter strings used by a setting (to warn when one matches no tensor)."""
    if is_condition(setting):
        setting = [setting]
    if isinstance(setting, list):
        return [e["filter"] for e in setting if is_condition(e) and e.get("filter") not in (None, "*")]
    return []


def resolve(
    name: str,
    scopes: Iterable[Mapping[str, Any] | None],
    tensor_name: str,
    t: float,
    coerce: Callable[[Any], Any] = lambda v: v,
) -> tuple[bool, Any]:
    """First non-None value of `name` across scopes (highest precedence first): (found, value)."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, t, coerce)
            if value is not None:
                return True, value
    return False, None
