"""The `chat_template` setting: 'auto', a built-in template name, or a literal Jinja template.

Everything here works on the config alone (no model is read): telling the three forms apart, loading the
built-in templates shipped in `mergesmith/_data/chat_templates/`, and checking that a template compiles and
renders a sample conversation in a sandbox, so that a broken template stops the run before any merge work.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from importlib import resources
from typing import Any

from mergesmith._util import suggest

AUTO = "auto"

# Conversations a usable template must render at least one of (templates may reject some shapes on
# purpose, e.g. a system turn or two user turns in a row, by calling raise_exception).
SAMPLE_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "Hello, who are you?"},),
    (
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am a merged model."},
        {"role": "user", "content": "Tell me a joke."},
    ),
    (
        {"role": "user", "content": "Hello, who are you?"},
        {"role": "assistant", "content": "I am a merged model."},
        {"role": "user", "content": "Tell me a joke."},
    ),
)
SAMPLE_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def _template_dir() -> Any:
    return resources.files("mergesmith") / "_data" / "chat_templates"


@functools.lru_cache(maxsize=1)
def builtin_names() -> tuple[str, ...]:
    """Names of the templates shipped with mergesmith (file stems under _data/chat_templates)."""
    return tuple(
        sorted(p.name[: -len(".jinja")] for p in _template_dir().iterdir() if p.name.endswith(".jinja"))
    )


def builtin_template(name: str) -> str:
    """The text of a built-in template."""
    if name not in builtin_names():
        raise KeyError(name)
    return (_template_dir() / f"{name}.jinja").read_text(encoding="utf-8")


def template_kind(value: str) -> tuple[str, str]:
    """Classify a chat_template value as ('auto', ''), ('builtin', name) or ('literal', text).

    The rules are mergekit's: a short single-line value without '{' naming a shipped template is that
    template; anything else must look like a Jinja template (contain '{' and be at least 20 characters).
    Raises ValueError with a readable message otherwise."""
    if value == AUTO:
        return AUTO, ""
    one_line_name = len(value) < 256 and "\n" not in value and "{" not in value
    if one_line_name and value in builtin_names():
        return "builtin", value
    if len(value) < 20 or "{" not in value:
        names = ", ".join(builtin_names())
        hint = suggest(value, [AUTO, *builtin_names()]) if one_line_name else ""
        raise ValueError(
            f"chat_template {value!r} is not 'auto', a built-in template ({names}) or a Jinja template{hint}"
        )
    return "literal", value


class TemplateRejected(Exception):
    """A template called raise_exception(): it refuses that conversation on purpose."""


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    """A sandboxed Jinja environment with the helpers and settings transformers gives chat templates."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering just
        # emits the body.
        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise TemplateRejected(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render(
    template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True, **tokens: str
) -> str:
    """Render a chat template the way transformers' apply_chat_template does (sandboxed)."""
    special = {**SAMPLE_SPECIAL_TOKENS, **tokens}
    compiled = _environment().from_string(template)
    return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **special)


def template_problem(template: str) -> str | None:
    """Why a template cannot be used, or None: it must compile and render at least one sample conversation
    without an error (a deliberate raise_exception for one sample shape is fine)."""
    import jinja2

    try:
        _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        return f"the chat template is not valid Jinja: {exc.message} (template line {exc.lineno})"
    except jinja2.TemplateError as exc:
        return f"the chat template is not valid Jinja: {exc}"
    failures: list[str] = []
    for sample in SAMPLE_CONVERSATIONS:
        try:
            render(template, [dict(m) for m in sample])
        except TemplateRejected as exc:
            failures.append(f"it refuses the conversation: {exc}")
        except Exception as exc:  # any runtime failure of the template itself
            reason = str(exc) or type(exc).__name__
            return f"the chat template fails when rendering a sample conversation: {type(exc).__name__}: {reason}"
        else:
            return None
    roles = " / ".join(",".join(m["role"] for m in s) for s in SAMPLE_CONVERSATIONS)
    return f"the chat template renders none of the sample conversations ({roles}); {failures[-1]}"
