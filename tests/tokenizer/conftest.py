"""Tiny Llama models whose tokenizers differ by added tokens, shared by the tokenizer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="session")
def tok_models(models_dir: Path) -> dict[str, Path]:
    """base: vocab 512, no chat template. inst, inst2: the same 512 tokens plus <|im_start|> (512) and
    <|im_end|> (513), a ChatML template, different random weights. tied / tied_base: tied-embedding variants."""
    from mergesmith.testing.tiny_models import make_model

    return {
        "base": make_model("llama", models_dir / "tok-base", seed=10),
        "inst": make_model("llama", models_dir / "tok-inst", seed=11, extra_tokens=CHAT_TOKENS),
        "inst2": make_model("llama", models_dir / "tok-inst2", seed=12, extra_tokens=CHAT_TOKENS),
        "tied_base": make_model("llama", models_dir / "tok-tied-base", seed=13, tie_word_embeddings=True),
        "tied": make_model(
            "llama", models_dir / "tok-tied", seed=14, tie_word_embeddings=True, extra_tokens=CHAT_TOKENS
        ),
    }
