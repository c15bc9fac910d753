"""Model references as written in configs: `path`, `org/name@revision`, `model+lora`. Parsing only, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelPath:
    """A local path or a hub repo id, with an optional revision."""

    path: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelPath:
        text = text.strip()
        if not text:
            raise ValueError("model path is empty")
        if text.count("@") > 1:
            raise ValueError(f"model path {text!r} has more than one '@' (use path@revision)")
        if "@" in text:
            path, rev = text.split("@")
            if not path or not rev:
                raise ValueError(f"model path {text!r} must look like name@revision")
            return cls(path, rev)
        return cls(text)

    def __str__(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


@dataclass(frozen=True)
class ModelRef:
    """A model, optionally with a LoRA adapter to apply on top of it."""

    model: ModelPath
    lora: ModelPath | None = None

    @classmethod
    def parse(cls, value: Any) -> ModelRef:
        """Accept the string forms and mergekit's mapping form {model: {path, revision}, lora: ...}."""
        if isinstance(value, ModelRef):
            return value
        if isinstance(value, str):
            if "+" in value:
                model, _, lora = value.partition("+")
                return cls(ModelPath.parse(model), ModelPath.parse(lora))
            return cls(ModelPath.parse(value))
        if isinstance(value, dict):
            model = value.get("model")
            if model is None:
                raise ValueError("model reference mapping needs a 'model' key")
            lora = value.get("lora")
            return cls(_path_from(model), _path_from(lora) if lora is not None else None)
        raise ValueError(f"cannot read model reference {value!r}: expected a string such as 'org/name'")

    def __str__(self) -> str:
        return f"{self.model}+{self.lora}" if self.lora else str(self.model)


def _path_from(value: Any) -> ModelPath:
    if isinstance(value, str):
        return ModelPath.parse(value)
    if isinstance(value, dict) and "path" in value:
        return ModelPath(str(value["path"]), value.get("revision"))
    raise ValueError(f"cannot read model path {value!r}")
