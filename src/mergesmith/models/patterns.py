"""Architecture knowledge as data: layer-indexed name patterns, config-key aliases, tied tensor pairs."""

from __future__ import annotations

import re

# A transformer block tensor: <prefix>.<N>.<rest>, where the prefix ends in one of these container names.
# Covers model.layers.N (Llama, Mistral, Qwen, Gemma, Phi-3), transformer.h.N (GPT-2),
# gpt_neox.layers.N, model.decoder.layers.N (OPT), transformer.blocks.N (MPT), encoder.layer.N (BERT).
LAYER_CONTAINERS = ("layers", "h", "blocks", "layer", "block")
LAYER_RE = re.compile(
    r"^(?P<prefix>(?:[\w.]*?\.)??(?:" + "|".join(LAYER_CONTAINERS) + r"))\.(?P<idx>\d+)\.(?P<rest>.+)$"
)

# config.json keys that hold the number of transformer blocks, most common first.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# config.json keys nested one level down in multimodal configs that hold the decoder's own config.
SUB_CONFIG_KEYS = ("text_config", "language_config", "llm_config")

# Non-layer tensors whose name contains one of these come before the blocks; all others come after.
PRE_HINTS = ("embed", "wte", "wpe", "tok_embeddings", "word_embeddings", "position_embeddings")

# Output head name -> input embedding names it is tied to when the checkpoint omits the head.
TIED_HEADS: dict[str, tuple[str, ...]] = {
    "lm_head.weight": (
        "model.embed_tokens.weight",
        "transformer.wte.weight",
        "model.language_model.embed_tokens.weight",
    ),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),
    "output.weight": ("tok_embeddings.weight",),
}

# Substrings marking tensors indexed by token id along dim 0 (rows may be truncated to a common vocab).
VOCAB_HINTS = ("embed_tokens", "wte", "embed_in", "embed_out", "lm_head", "tok_embeddings", "word_embeddings")
