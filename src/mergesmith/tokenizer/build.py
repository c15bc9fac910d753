"""The output vocabulary: which tokenizer the merge gets, and where each of its tokens sits in every input.

The rules follow mergekit's tokenizer merge:

- `base`: the base model's tokenizer (the first model's when there is no base model), without tokens whose id
  is beyond the model's own vocabulary size (`vocab_size` in its config.json);
- `union`: the base tokenizer, extended by every token any input has that it lacks. Ids of the base model's
  tokens do not move; ordinary tokens of other models come next, then their added (special) tokens, each
  added once with the settings of the first model that has it;
- a model reference: that model's tokenizer as it is.

Tokens named in `tokenizer.tokens` that the result lacks are added to it. For every input model, a
permutation gives the row of each output token in that model's embedding (-1 where it lacks the token).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesmith.config.ref import ModelRef
from mergesmith.errors import PlanError
from mergesmith.models.patterns import SUB_CONFIG_KEYS

log = logging.getLogger("mergesmith")


@dataclass(frozen=True)
class TokenizerInput:
    """An input model as the tokenizer code needs it: its reference, directory and config.json."""

    ref: ModelRef
    path: Path
    config: dict[str, Any] = field(compare=False, repr=False)


def config_vocab_size(config: dict[str, Any]) -> int | None:
    """`vocab_size` from a config.json: top level, or the text model's sub-config of a multimodal model."""
    value = config.get("vocab_size")
    if isinstance(value, int) and value > 0:
        return value
    for key in SUB_CONFIG_KEYS:
        sub = config.get(key)
        if isinstance(sub, dict) and isinstance(sub.get("vocab_size"), int) and sub["vocab_size"] > 0:
            return sub["vocab_size"]
    return None


def load_tokenizer(path: str | Path) -> Any:
    """A model directory's tokenizer through transformers (never running remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def strip_tokenizer(tok: Any, vocab_size: int, what: str) -> Any:
    """The tokenizer without tokens whose id is >= vocab_size (ids the model has no embedding row for).

    Only fast BPE tokenizers can be cut down (as in mergekit); a merge rule that builds a removed token is
    dropped too, so that the result still loads."""
    extra = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not extra:
        return tok
    if not getattr(tok, "is_fast", False):
        raise PlanError(
            f"the tokenizer of {what} has {len(extra)} tokens beyond the model's vocab_size {vocab_size} and "
            "is not a fast tokenizer, so it cannot be cut down for a tokenizer merge"
        )
    data = json.loads(tok.backend_tokenizer.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise PlanError(
            f"the tokenizer of {what} has {len(extra)} tokens beyond the model's vocab_size {vocab_size}; only "
            f"BPE tokenizers can be cut down for a tokenizer merge, this one is {model.get('type')!r}"
        )
    data["added_tokens"] = [a for a in data.get("added_tokens", []) if a["id"] < vocab_size]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if i < vocab_size}

    def keep(rule: Any) -> bool:
        parts = rule.split(" ") if isinstance(rule, str) else list(rule)
        return not any(p in extra for p in parts) and "".join(parts) not in extra

    model["merges"] = [m for m in model.get("merges", []) if keep(m)]
    with tempfile.TemporaryDirectory(prefix="mergesmith-tok-") as tmp:
        tok.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        cfg_file = Path(tmp) / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            decoder = cfg.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                cfg["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < vocab_size}
            for key in ("additional_special_tokens", "extra_special_tokens"):
                if isinstance(cfg.get(key), list):
                    cfg[key] = [
                        t for t in cfg[key] if (t if isinstance(t, str) else t.get("content")) not in extra
                    ]
            cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        return load_tokenizer(tmp)


def union_tokenizer(base: Any, others: Sequence[tuple[str, Any, int]]) -> Any:
    """Extend `base` (modified in place and returned) by the tokens of every other tokenizer.

    others: (name, tokenizer, vocab_size) for every model, base first. Tokens with ids >= vocab_size have no
    embedding row and are left out."""
    base_vocab = base.get_vocab()
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for name, tok, vocab_size in others:
        skipped = 0
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx >= vocab_size:
                skipped += 1
                continue
            ordinary.setdefault(token, None)
        for idx, info in sorted(tok.added_tokens_decoder.items()):
            if idx >= vocab_size:
                continue
            first = added.setdefault(info.content, info)
            if first is not info and _settings(first) != _settings(info):
                log.warning(
                    "token %r is added with other settings by %s; keeping the first", info.content, name
                )
        if skipped:
            log.warning(
                "%s: %d tokenizer tokens have ids >= its vocab_size %d and are left out",
                name,
                skipped,
                vocab_size,
            )
    new = [t for t in ordinary if t not in base_vocab and t not in added]
    if new:
        base.add_tokens(new)
    base.add_tokens(list(added.values()))
    return base


def _settings(info: Any) -> tuple:
    return tuple(getattr(info, k, None) for k in ("single_word", "lstrip", "rstrip", "normalized", "special"))
