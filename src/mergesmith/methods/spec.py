"""What a merge method declares: its parameters, which inputs it accepts, and the function itself."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

Scope = Literal["global", "per_model", "non_base"]
BasePolicy = Literal["required", "optional", "ignored"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    scope: "global" (one value per tensor), "per_model" (one per input, base included) or
    "non_base" (one per input except the base model). `check` returns an error text or None.
    """

    name: str
    kind: type = float
    scope: Scope = "global"
    default: Any = REQUIRED
    help: str = ""
    check: Callable[[Any], str | None] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any) -> Any:
        """Convert a config value to this parameter's type, or raise ValueError saying why."""
        if value is None:
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError(f"{self.name} must be true or false, got {value!r}")
        if self.kind in (float, int):
            if isinstance(value, bool):
                raise ValueError(f"{self.name} must be a number, got {value!r}")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{self.name} must be a number, got {value!r}") from None
            if self.kind is int:
                if number != int(number):
                    raise ValueError(f"{self.name} must be a whole number, got {value!r}")
                return int(number)
            return number
        if self.kind is str:
            return str(value)
        return value

    def validate(self, value: Any) -> Any:
        """Coerce then apply `check`; raise ValueError with a readable message."""
        value = self.coerce(value)
        if self.check is not None and value is not None:
            problem = self.check(value)
            if problem:
                raise ValueError(f"{self.name}={value!r}: {problem}")
        return value


@dataclass(frozen=True)
class MergeInputs:
    """Tensors for one output tensor, already cast to the compute dtype, with resolved parameters."""

    tensors: tuple[torch.Tensor, ...]
    base_index: int | None
    params: Mapping[str, Any]
    per_model: tuple[Mapping[str, Any], ...]
    name: str = ""
    generator: torch.Generator | None = None

    @property
    def base(self) -> torch.Tensor | None:
        return None if self.base_index is None else self.tensors[self.base_index]

    @property
    def others(self) -> tuple[torch.Tensor, ...]:
        """Inputs other than the base model, in config order."""
        return tuple(t for i, t in enumerate(self.tensors) if i != self.base_index)

    @property
    def others_params(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(p for i, p in enumerate(self.per_model) if i != self.base_index)


@dataclass(frozen=True)
class ArrayInputs:
    """What a method's fused CPU kernel gets: flat, contiguous numpy views of the inputs and of the output,
    all of one dtype (bfloat16, seen as its uint16 bits, or float32), with the resolved parameters. The
    executor makes them from torch tensors, or straight from the files' bytes (then torch is never loaded).
    """

    arrays: tuple[Any, ...]
    out: Any
    dtype: str  # "bfloat16" or "float32"
    base_index: int | None
    params: Mapping[str, Any]
    per_model: tuple[Mapping[str, Any], ...]
    name: str = ""
    threads: int | None = None  # the kernel's thread count (None: torch's)
    seed: int | None = None  # random methods: the seed their torch.Generator would get for this tensor
    shape: tuple[int, ...] = ()  # the output piece's shape (the arrays are flat)


MergeFn = Callable[[MergeInputs], "torch.Tensor"]
# An optional whole-tensor CPU kernel for an elementwise method: writes fn's result into `inputs.out` and
# returns True, or returns False without touching anything when it does not apply (then `fn` runs).
FusedFn = Callable[[ArrayInputs], bool]


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: a pure tensor function plus what the planner must know about it."""

    name: str
    fn: MergeFn
    params: tuple[Param, ...] = ()
    base: BasePolicy = "ignored"
    min_models: int = 1
    max_models: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    random: bool = False
    # True when each output element depends only on the same element of the inputs (no whole-tensor
    # statistics): the executor may then feed the method row chunks that stay in cache, and bound memory.
    elementwise: bool = False
    paper: str = ""
    summary: str = ""
    validate: Callable[[Mapping[str, Any], list[Mapping[str, Any]]], list[str]] | None = field(
        default=None, compare=False
    )
    fused: FusedFn | None = field(default=None, compare=False)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def check_inputs(self, n_inputs: int, has_base: bool) -> str | None:
        """Explain why this number of inputs (and base presence) is wrong for the method, or None."""
        if self.base == "required" and not has_base:
            return f"merge method {self.name!r} needs a base_model"
        if n_inputs < self.min_models:
            return f"merge method {self.name!r} needs at least {self.min_models} model(s), got {n_inputs}"
        if self.max_models is not None and n_inputs > self.max_models:
            exact = "exactly" if self.max_models == self.min_models else "at most"
            return f"merge method {self.name!r} takes {exact} {self.max_models} model(s), got {n_inputs}"
        non_base = n_inputs - (1 if has_base and self.base != "ignored" else 0)
        if non_base < self.min_non_base:
            return (
                f"merge method {self.name!r} needs at least {self.min_non_base} model(s) "
                f"besides the base model, got {non_base}"
            )
        if self.max_non_base is not None and non_base > self.max_non_base:
            return (
                f"merge method {self.name!r} takes at most {self.max_non_base} model(s) "
                f"besides the base model, got {non_base}"
            )
        return None
