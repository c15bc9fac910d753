"""chat_template: auto, the built-in templates, literal templates, and broken templates failing up front."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mergesmith import MergeOptions, run_merge
from mergesmith.cli.main import cli
from mergesmith.config.chat_template import builtin_names, builtin_template, render, template_problem
from mergesmith.config.ref import ModelRef
from mergesmith.errors import ConfigError
from mergesmith.testing.tiny_models import CHATML_TEMPLATE
from mergesmith.tokenizer import TokenizerInput, read_chat_template
from mergesmith.tokenizer.chat import resolve_chat_template

QUIET = MergeOptions(quiet=True)
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]
EXPECTED = {
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nTell me a joke.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nTell me a joke.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST] You are a helpful assistant.\n\nHi there [/INST] Hello! How can I help?</s>"
    " [INST] Tell me a joke. [/INST]",
    "alpaca": "You are a helpful assistant.\n\n### Instruction:\nHi there\n\n### Response:\nHello! How can I help?"
    "\n\n### Instruction:\nTell me a joke.\n\n### Response:\n",
    "exaone": "[|system|]You are a helpful assistant.[|endofturn|]\n[|user|]Hi there\n"
    "[|assistant|]Hello! How can I help?[|endofturn|]\n[|user|]Tell me a joke.\n[|assistant|]",
}
LITERAL = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


def tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def linear(paths: list[Path], base: Path | None = None, **top: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "merge_method": "linear",
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths],
    }
    if base is not None:
        cfg["base_model"] = str(base)
    cfg.update(top)
    return cfg


def test_builtin_templates_render_the_standard_formats():
    assert builtin_names() == ("alpaca", "chatml", "exaone", "llama3", "mistral")
    for name in builtin_names():
        assert template_problem(builtin_template(name)) is None
        assert render(builtin_template(name), CONVERSATION) == EXPECTED[name], name
    assert render(builtin_template("chatml"), CONVERSATION[:2], add_generation_prompt=False).endswith(
        "<|im_end|>\n"
    )
    alpaca = render(
        builtin_template("alpaca"),
        [{"role": "user", "content": "Sort these"}, {"role": "user_context", "content": "3 1 2"}],
    )
    assert alpaca == "### Instruction:\nSort these\n\n### Input:\n3 1 2\n\n### Response:\n"
    with pytest.raises(Exception, match="alternate"):
        render(
            builtin_template("mistral"), [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_template_is_written_where_transformers_reads_it(tok_models, tmp_path, name):
    """No tokenizer merge: the donor's tokenizer files are copied and the template is added beside them."""
    inst, inst2 = tok_models["inst"], tok_models["inst2"]
    out = tmp_path / "out"
    run_merge(linear([inst, inst2], inst, chat_template=name), out, QUIET)
    assert (out / "chat_template.jinja").read_text() == builtin_template(name)
    assert (out / "tokenizer.json").read_bytes() == (inst / "tokenizer.json").read_bytes()
    tok = tokenizer(out)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == EXPECTED[name]


def test_literal_template_and_a_merged_tokenizer(tok_models, tmp_path):
    base, inst = tok_models["base"], tok_models["inst"]
    out = tmp_path / "out"
    run_merge(linear([base, inst], base, tokenizer_source="union", chat_template=LITERAL), out, QUIET)
    tok = tokenizer(out)
    assert len(tok) == 514
    text = tok.apply_chat_template(CONVERSATION[1:3], tokenize=False, add_generation_prompt=True)
    assert text == "[USER] Hi there\n[ASSISTANT] Hello! How can I help?\n[ASSISTANT] "
    assert read_chat_template(out) == LITERAL


def test_auto_picks_the_most_common_template(tok_models, tmp_path):
    base, inst, inst2 = tok_models["base"], tok_models["inst"], tok_models["inst2"]
    out = tmp_path / "out"
    # The base model has no template, the other two have ChatML; the union tokenizer starts from the base.
    run_merge(linear([base, inst, inst2], base, tokenizer_source="union", chat_template="auto"), out, QUIET)
    assert read_chat_template(out) == CHATML_TEMPLATE.strip()
    tok = tokenizer(out)
    ids = tok.apply_chat_template(CONVERSATION[1:2], add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert 512 in ids and 513 in ids


def write_template_dir(root: Path, name: str, jinja: str | None = None, config: Any = None) -> TokenizerInput:
    d = root / name
    d.mkdir()
    if jinja is not None:
        (d / "chat_template.jinja").write_text(jinja)
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": config}))
    return TokenizerInput(ModelRef.parse(str(d)), d, {})


def test_auto_reads_every_place_a_template_can_be(tmp_path):
    chatml, llama3 = CHATML_TEMPLATE, builtin_template("llama3")
    a = write_template_dir(tmp_path, "a", jinja=chatml)
    b = write_template_dir(tmp_path, "b", config=llama3)
    c = write_template_dir(
        tmp_path,
        "c",
        config=[{"name": "default", "template": llama3 + "\n"}, {"name": "tools", "template": "x"}],
    )
    d = write_template_dir(tmp_path, "d", jinja=chatml, config=llama3)  # the .jinja file wins
    e = write_template_dir(tmp_path, "e")
    assert resolve_chat_template("auto", [a, b, c]) == llama3.strip()
    assert resolve_chat_template("auto", [a, b]) == chatml.strip()  # a tie goes to the first model
    assert resolve_chat_template("auto", [d, b]) == chatml.strip()
    assert resolve_chat_template("auto", [e]) is None
    assert resolve_chat_template("chatml", [e]) == builtin_template("chatml")


def test_auto_refuses_a_broken_template_from_an_input(tok_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tok_models["inst"], broken)
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}")
    with pytest.raises(ConfigError, match="auto chose the template of .*broken.*TypeError"):
        run_merge(
            linear([broken, tok_models["inst2"], tok_models["base"]], broken, chat_template="auto"),
            tmp_path / "out",
            QUIET,
        )
    assert not (tmp_path / "out").exists()


def test_template_kept_consistent_in_tokenizer_config_and_left_out_without_tokenizer(
    tok_models, tmp_path, caplog
):
    legacy = tmp_path / "legacy"
    shutil.copytree(tok_models["inst"], legacy)
    (legacy / "chat_template.jinja").unlink()
    cfg_file = legacy / "tokenizer_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "chat_template": CHATML_TEMPLATE}))
    out = tmp_path / "out"
    run_merge(linear([legacy, tok_models["inst2"]], legacy, chat_template="llama3"), out, QUIET)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == builtin_template(
        "llama3"
    )
    assert tokenizer(out).chat_template == builtin_template("llama3")

    bare = tmp_path / "bare"
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        run_merge(
            linear([legacy, tok_models["inst2"]], legacy, chat_template="llama3"),
            bare,
            MergeOptions(quiet=True, copy_tokenizer=False),
        )
    assert not list(bare.glob("tokenizer*")) and not (bare / "chat_template.jinja").exists()
    assert "chat_template is not written" in caplog.text


def test_templates_may_refuse_some_conversations_but_not_all():
    no_system = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    assert template_problem(no_system) is None
    refuses_all = "{{ raise_exception('no chats here') }}{% for m in messages %}{% endfor %}"
    assert "renders none of the sample conversations" in template_problem(refuses_all)
    assert "no chats here" in template_problem(refuses_all)
    generation = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert template_problem(generation) is None


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}{{ m['content'] }}", "not valid Jinja"),
        ("{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}", "TypeError"),
        ("{{ ''.__class__.__mro__ }}{% for m in messages %}{% endfor %}", "SecurityError"),
        ("chatlm", "did you mean 'chatml'?"),
        ("{{ messages }}", "is not 'auto', a built-in template"),
    ],
)
def test_broken_template_fails_through_the_cli_before_any_output(tok_models, tmp_path, template, message):
    cfg = linear([tok_models["inst"], tok_models["inst2"]], tok_models["inst"], chat_template=template)
    import yaml

    cfg_file = tmp_path / "config.yml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["yaml", str(cfg_file), str(out)])
    assert result.exit_code == 2, result.output
    assert "chat_template" in result.output and message in result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))
