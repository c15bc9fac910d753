"""Tokenizer merging (`tokenizer_source`, the `tokenizer:` block) and chat templates.

`plan_tokenizer` runs while planning: it builds the output tokenizer and the per-model permutations
(`Vocabulary`, which hands out one `VocabAligner` per embedding-like tensor) and resolves `chat_template`.
The result's `OutputTokenizer` is written into the output directory after the merge.
"""

from __future__ import annotations

from collections.abc import Sequence

from mergesmith.config.schema import MergeConfig
from mergesmith.tokenizer.build import TokenizerInput, config_vocab_size
from mergesmith.tokenizer.chat import OutputTokenizer, read_chat_template, resolve_chat_template
from mergesmith.tokenizer.embed import VocabAligner
from mergesmith.tokenizer.vocab import Vocabulary, build_vocabulary

__all__ = [
    "OutputTokenizer",
    "TokenizerInput",
    "VocabAligner",
    "Vocabulary",
    "config_vocab_size",
    "plan_tokenizer",
    "read_chat_template",
]


def plan_tokenizer(
    cfg: MergeConfig,
    inputs: Sequence[TokenizerInput],
    base: int,
    cache_dir: str | None = None,
    warnings: list[str] | None = None,
) -> tuple[Vocabulary | None, OutputTokenizer | None]:
    """The merged vocabulary (None without tokenizer settings) and what to write as the output tokenizer
    (None when the donor's tokenizer files are copied unchanged).

    inputs: the merge's models in plan order; base: index of the base model (the first model without one).
    Raises ConfigError for an unusable chat template, PlanError for tokenizers that cannot be merged."""
    from mergesmith.models.resolve import resolve

    warnings = warnings if warnings is not None else []
    source, tokens, pad = cfg.tokenizer_source, None, None
    if cfg.tokenizer is not None:
        source, tokens, pad = cfg.tokenizer.source, cfg.tokenizer.tokens, cfg.tokenizer.pad_to_multiple_of
    template = resolve_chat_template(cfg.chat_template, inputs) if cfg.chat_template is not None else None
    vocab = None
    if source is not None:
        vocab = build_vocabulary(
            source, tokens, pad, inputs, base, lambda ref: resolve(ref, cache_dir), warnings
        )
    if vocab is None and template is None:
        return None, None
    description = vocab.describe() if vocab is not None else "donor's tokenizer"
    if template is not None:
        description += ", chat template " + (
            cfg.chat_template if len(cfg.chat_template or "") < 20 else "(literal)"
        )
    return vocab, OutputTokenizer(vocab.tokenizer if vocab is not None else None, template, description)
