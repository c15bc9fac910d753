"""Test helpers: tiny random Hugging Face checkpoints built on disk (used by the test suite and the demo).

Nothing heavy is imported here; transformers/tokenizers are imported lazily inside the helpers.
"""

from __future__ import annotations

from mergesmith.testing.tiny_models import (
    ARCHITECTURES,
    DEFAULT_VOCAB_SIZE,
    build_tokenizer,
    make_config,
    make_finetune,
    make_model,
    make_tokenizer,
    save_as_pytorch_bin,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_VOCAB_SIZE",
    "build_tokenizer",
    "make_config",
    "make_finetune",
    "make_model",
    "make_tokenizer",
    "save_as_pytorch_bin",
]
