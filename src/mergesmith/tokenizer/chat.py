"""chat_template at planning time ('auto' reads the inputs' templates), and the tokenizer the output gets."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergesmith.config.chat_template import builtin_template, template_kind, template_problem
from mergesmith.errors import ConfigError
from mergesmith.tokenizer.build import TokenizerInput

log = logging.getLogger("mergesmith")
TEMPLATE_FILE = "chat_template.jinja"  # read before tokenizer_config.json by transformers 5


def read_chat_template(model_dir: Path) -> str | None:
    """The default chat template a model directory's tokenizer loads with, or None.

    As in transformers, chat_template.jinja wins over a template in tokenizer_config.json (a string, or a
    list of named templates whose 'default' entry counts)."""
    jinja = Path(model_dir) / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg_file = Path(model_dir) / "tokenizer_config.json"
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(value, list):
        value = next(
            (e.get("template") for e in value if isinstance(e, dict) and e.get("name") == "default"), None
        )
    elif isinstance(value, dict):
        value = value.get("default")
    return value if isinstance(value, str) else None


def resolve_chat_template(value: str, inputs: Sequence[TokenizerInput]) -> str | None:
    """The template text a chat_template setting stands for; None when 'auto' finds no template.

    'auto' picks the template most of the inputs have (ties go to the first mentioned model), compared after
    stripping surrounding whitespace, and checks it like a literal template."""
    try:
        kind, text = template_kind(value)
    except ValueError as exc:
        raise ConfigError([f"chat_template: {exc}"]) from None
    if kind == "builtin":
        return builtin_template(text)
    if kind == "literal":
        return text
    found: list[tuple[str, str]] = []
    for m in inputs:
        template = read_chat_template(m.path)
        if template and template.strip():
            found.append((str(m.ref), template.strip()))
    if not found:
        log.warning(
            "chat_template: auto found no chat template in any input model; the tokenizer's own is kept"
        )
        return None
    chosen, votes = Counter(t for _, t in found).most_common(1)[0]
    owners = [name for name, t in found if t == chosen]
    log.info(
        "chat_template: auto chose the template of %s (%d of %d inputs)",
        ", ".join(owners),
        votes,
        len(inputs),
    )
    problem = template_problem(chosen)
    if problem:
        raise ConfigError([f"chat_template: auto chose the template of {', '.join(owners)}, but {problem}"])
    return chosen


@dataclass(eq=False)
class OutputTokenizer:
    """What the output directory gets instead of (or on top of) the donor's tokenizer files.

    tokenizer: a merged tokenizer (transformers object) saved with save_pretrained, replacing the donor's
    tokenizer files; None when only the chat template changes. chat_template: the template to write, if any."""

    tokenizer: Any | None
    chat_template: str | None
    description: str = ""

    @property
    def replaces_donor_files(self) -> bool:
        return self.tokenizer is not None

    def save(self, dest: Path, copy_tokenizer: bool = True) -> list[str]:
        """Write into the output directory (after the donor's side files were copied); return file names."""
        dest = Path(dest)
        if self.tokenizer is not None:
            if self.chat_template is not None:
                self.tokenizer.chat_template = self.chat_template
            saved = self.tokenizer.save_pretrained(str(dest))
            return sorted({Path(p).name for p in saved})
        if self.chat_template is None:
            return []
        if not copy_tokenizer:
            log.warning("chat_template is not written: the tokenizer is not copied (--no-copy-tokenizer)")
            return []
        (dest / TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
        cfg_file = dest / "tokenizer_config.json"
        if cfg_file.is_file():
            # Older readers take the template from here: keep it consistent with chat_template.jinja.
            data = json.loads(cfg_file.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "chat_template" in data:
                data["chat_template"] = self.chat_template
                cfg_file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return [TEMPLATE_FILE]
