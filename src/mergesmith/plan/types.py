"""The plan as immutable values; the executor only follows it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesmith.config.ref import ModelRef


@dataclass(frozen=True)
class InputModel:
    """A resolved input model: where it lives and what it holds."""

    ref: ModelRef
    path: Path
    config: dict[str, Any] = field(compare=False, hash=False, repr=False)
    lora: Path | None = None  # adapter directory applied on top of `path` as tensors are read


@dataclass(frozen=True)
class Source:
    model: int  # index into MergePlan.models
    name: str  # tensor name in that model (may be a tied alias of the output name)
    rows: int | None = None  # keep only the first `rows` rows (vocabulary truncation)


@dataclass(frozen=True)
class TensorPlan:
    """How to produce one output tensor."""

    name: str
    method: str  # registered method name, or "copy" for non-float buffers
    sources: tuple[Source, ...]
    base_index: int | None
    params: tuple[tuple[str, Any], ...]
    per_model: tuple[tuple[tuple[str, Any], ...], ...]
    shape: tuple[int, ...]
    compute_dtype: str
    out_dtype: str
    seed: int | None = None
    # Vocabulary alignment for embedding-like tensors (built by the tokenizer package): an object with
    # `align(tensors: list[Tensor]) -> list[Tensor]` mapping each source's rows onto the output vocabulary.
    vocab: Any = field(default=None, compare=False, hash=False)

    @property
    def out_nbytes(self) -> int:
        from mergesmith._util import dtype_itemsize

        n = dtype_itemsize(self.out_dtype)
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class MergePlan:
    """Everything the executor and writer need; rendering it is --dry-run."""

    method: str
    models: tuple[InputModel, ...]
    tensors: tuple[TensorPlan, ...]
    out_config: dict[str, Any] = field(compare=False, hash=False)
    donor: int  # model whose tokenizer and small files are copied
    bytes_in: int
    warnings: tuple[str, ...] = ()
    tokenizer: Any = field(default=None, compare=False, hash=False)  # output tokenizer to save, if merged
    tokenizer_donor: int | None = None  # model whose tokenizer files to copy, when not the donor

    @property
    def bytes_out(self) -> int:
        return sum(t.out_nbytes for t in self.tensors)
