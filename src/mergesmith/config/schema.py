"""Pydantic models of the mergekit YAML schema. Structural checks only; method-aware checks live in validate.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    field_validator,
    model_validator,
)

from mergesmith.config.ref import ModelRef

ParameterSetting = Any  # scalar | list of scalars (gradient) | {filter, value} | list of {filter, value}
Parameters = dict[str, ParameterSetting]


class _Model(BaseModel):
    # Unknown keys are kept (mergekit ignores them) and reported as warnings by the validator.
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True, frozen=True)

    @property
    def unknown_fields(self) -> list[str]:
        return list((self.model_extra or {}).keys())


def _ref(value: Any) -> ModelRef:
    return ModelRef.parse(value)


def _ref_or_keyword(value: Any) -> Any:
    return value if value in ("union", "base") else _ref(value)


# A model reference field: parsed from any mergekit spelling, written back as its string form.
Ref = Annotated[ModelRef, BeforeValidator(_ref), PlainSerializer(str)]


class InputModel(_Model):
    """An entry of `models:`."""

    model: Ref
    parameters: Parameters | None = None


class InputSlice(_Model):
    """A source of an output slice: a model and the half-open layer range [start, end)."""

    model: Ref
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _range_ok(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] < v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end] with 0 <= start <= end")
        return v


class OutputSlice(_Model):
    """An entry of `slices:`: layers taken from one or more sources and merged."""

    sources: list[InputSlice] = Field(min_length=1)
    base_model: Ref | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None


class OutputModule(_Model):
    """An entry of `modules:` (mergekit's per-module form for multimodal checkpoints)."""

    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_form(self) -> OutputModule:
        if bool(self.slices) == bool(self.models):
            raise ValueError("a module needs exactly one of 'slices' or 'models'")
        return self


class ModelTokenSource(_Model):
    kind: Literal["model_token"]
    model: Ref
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class ZeroTokenSource(_Model):
    kind: Literal["zero"]


def _token_source_tag(value: Any) -> str:
    # A mapping with `kind` is a token source of that kind; anything else is a model reference.
    if isinstance(value, dict) and "kind" in value:
        return str(value["kind"])
    return getattr(value, "kind", "model") if isinstance(value, _Model) else "model"


TokenSource = Annotated[
    Annotated[ModelTokenSource, Tag("model_token")]
    | Annotated[ZeroTokenSource, Tag("zero")]
    | Annotated[Ref, Tag("model")],
    Discriminator(
        _token_source_tag,
        custom_error_type="token_source",
        custom_error_message="a token's source is a model, {kind: model_token, model: ..., token: ...} "
        "(or token_id: ...), or {kind: zero}",
    ),
]


class TokenEmbedding(_Model):
    source: TokenSource | None = None
    force: bool = False


class TokenizerConfig(_Model):
    source: Annotated[
        Literal["union", "base"] | ModelRef, BeforeValidator(_ref_or_keyword), PlainSerializer(str)
    ] = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, gt=0)


class MergeConfig(_Model):
    """A whole merge configuration, as in mergekit's YAML."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    base_model: Ref | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: (
        Annotated[Literal["union", "base"] | ModelRef, BeforeValidator(_ref_or_keyword), PlainSerializer(str)]
        | None
    ) = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    # mergesmith extension: Python modules or .py files that register merge methods (loaded before checks)
    method_plugins: list[str] | None = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        from mergesmith._util import canonical_dtype

        return None if v is None else canonical_dtype(v)

    @model_validator(mode="after")
    def _forms(self) -> MergeConfig:
        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(given) != 1:
            what = " and ".join(given) if given else "none of them"
            raise ValueError(f"give exactly one of 'models', 'slices' or 'modules' (found {what})")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError(
                "'tokenizer_source' and 'tokenizer' cannot both be set; use the 'tokenizer' block"
            )
        return self

    @classmethod
    def from_yaml(cls, path_or_text: str) -> MergeConfig:
        """Load and validate a config from a YAML file path or YAML text."""
        from mergesmith.config.load import load_config, load_config_text

        if "\n" not in path_or_text and not path_or_text.lstrip().startswith("merge_method"):
            return load_config(path_or_text)
        return load_config_text(path_or_text)

    def referenced_models(self) -> list[ModelRef]:
        """Every model the config names, in first-mention order, without repeats."""
        seen: dict[ModelRef, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        for mod in (self.modules or {}).values():
            for m in mod.models or []:
                seen[m.model] = None
            for s in mod.slices or []:
                if s.base_model:
                    seen[s.base_model] = None
                for src in s.sources:
                    seen[src.model] = None
        return list(seen)

    def to_yaml(self) -> str:
        """Serialise back to YAML (for the model card), dropping unset fields."""
        import yaml

        class Dumper(yaml.SafeDumper):
            pass

        def lists(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
            flow = all(isinstance(e, (int, float)) for e in data)
            return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

        Dumper.add_representer(list, lists)
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.dump(data, Dumper=Dumper, sort_keys=False).rstrip()
