"""Bad input: every broken config or model set gives its own clear error, all at once, and writes nothing."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge
from mergesmith.cli.main import cli
from mergesmith.config import load_config, load_config_text
from mergesmith.errors import ConfigError, MergesmithError, PlanError

# id, YAML text, substrings every problem text must hold (joined), the YAML line the message names (or None)
BAD_CONFIGS = [
    (
        "unknown-method",
        "merge_method: slerpp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t: 0.5\n",
        ["merge_method", "unknown merge method 'slerpp'", "did you mean 'slerp'?"],
        1,
    ),
    (
        "unknown-parameter",
        "merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n      weight: 1\n"
        "      densty: 0.5\n",
        ["models[0].parameters.densty", "has no parameter 'densty'", "did you mean 'density'?"],
        7,
    ),
    (
        "slerp-without-base",
        "merge_method: slerp\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t: 0.5\n",
        ["base_model", "merge method 'slerp' needs a base_model"],
        None,
    ),
    (
        "task-arithmetic-without-base",
        "merge_method: task_arithmetic\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
        "  - model: b\n    parameters: {weight: 1}\n",
        ["merge method 'task_arithmetic' needs a base_model"],
        None,
    ),
    (
        "slerp-three-models",
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n  - model: c\n"
        "parameters:\n  t: 0.5\n",
        ["models", "'slerp' takes exactly 2 model(s), got 3"],
        3,
    ),
    (
        "passthrough-two-models",
        "merge_method: passthrough\nmodels:\n  - model: a\n  - model: b\n",
        ["'passthrough' takes exactly 1 model(s), got 2"],
        2,
    ),
    (
        "models-and-slices",
        "merge_method: passthrough\nmodels:\n  - model: a\nslices:\n  - sources:\n      - model: a\n"
        "        layer_range: [0, 2]\n",
        ["give exactly one of 'models', 'slices' or 'modules'", "found models and slices"],
        None,
    ),
    (
        "negative-layer-range",
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [-1, 2]\n",
        ["slices[0].sources[0].layer_range", "[-1, 2]", "0 <= start <= end"],
        5,
    ),
    (
        "layer-range-end-before-start",
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [3, 2]\n",
        ["layer_range [3, 2] must be [start, end]"],
        5,
    ),
    (
        "layer-range-three-numbers",
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2, 4]\n",
        ["slices[0].sources[0].layer_range", "at most 2 items"],
        5,
    ),
    (
        "unequal-slice-lengths",
        "merge_method: linear\nparameters: {weight: 1}\nslices:\n  - sources:\n      - model: a\n"
        "        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 3]\n",
        ["slices[0].sources", "same number of layers, got [2, 3]"],
        4,
    ),
    (
        "bad-dtype",
        "merge_method: linear\ndtype: float17\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
        ["dtype", "unknown dtype 'float17'", "bfloat16"],
        2,
    ),
    (
        "bad-out-dtype",
        "merge_method: linear\nout_dtype: int4\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
        ["out_dtype", "unknown dtype 'int4'"],
        2,
    ),
    (
        "not-yaml",
        "merge_method: [linear\nmodels: {\n",
        ["not valid YAML"],
        2,
    ),
    (
        "yaml-tab",
        "merge_method: linear\nmodels:\n\t- model: a\n",
        ["not valid YAML", "'\\t'"],
        3,
    ),
    ("yaml-list", "- a\n- b\n", ["must be a YAML mapping"], None),
    ("yaml-scalar", "just some words\n", ["must be a YAML mapping"], None),
    ("empty-file", "", ["must be a YAML mapping"], None),
    (
        "weight-not-a-number",
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: abc}\n",
        ["models[0].parameters.weight", "weight must be a number, got 'abc'"],
        4,
    ),
    (
        "gradient-element-not-a-number",
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters:\n"
        "  t: [0, abc, 1]\n",
        ["parameters.t", "t must be a number, got 'abc'"],
        7,
    ),
    (
        "bool-not-a-bool",
        "merge_method: linear\nparameters: {normalize: maybe}\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
        ["parameters.normalize", "normalize must be true or false, got 'maybe'"],
        2,
    ),
    (
        "filter-not-a-string",
        "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t:\n"
        "    - filter: 3\n      value: 0.5\n",
        ["filter 3 must be a string"],
        7,
    ),
    (
        "value-out-of-range",
        "merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters: {weight: 1, density: 2}\n",
        ["models[0].parameters.density", "density must be in (0, 1]"],
        5,
    ),
    (
        "chat-template-unknown-name",
        "merge_method: linear\nchat_template: chatlm\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
        ["chat_template", "is not 'auto', a built-in template", "did you mean 'chatml'?"],
        2,
    ),
    (
        "chat-template-broken-jinja",
        "merge_method: linear\nchat_template: \"{% for m in messages %}{{ m['content'] }}\"\nmodels:\n"
        "  - model: a\n    parameters: {weight: 1}\n",
        ["chat_template", "not valid Jinja"],
        2,
    ),
    (
        "token-source-kind",
        "merge_method: linear\ntokenizer:\n  tokens:\n    x:\n      source: {kind: bogus}\nmodels:\n"
        "  - model: a\n    parameters: {weight: 1}\n",
        ["tokenizer.tokens.x.source", "a token's source is a model"],
        5,
    ),
    (
        "misspelt-top-level-key",
        "merge_method: linear\nbase_modle: a\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
        ["unknown field 'base_modle'", "did you mean 'base_model'?"],
        2,
    ),
    (
        "misspelt-nested-key",
        "merge_method: linear\nmodels:\n  - model: a\n    paramters: {weight: 1}\n",
        ["unknown field 'paramters'", "did you mean 'parameters'?"],
        4,
    ),
    (
        "misspelt-required-key",
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_rnge: [0, 2]\n",
        ["required field 'layer_range' is missing", "'layer_rnge'"],
        4,
    ),
    (
        "missing-merge-method",
        "models:\n  - model: a\n",
        ["required field 'merge_method' is missing"],
        None,
    ),
    (
        "model-reference-not-a-string",
        "merge_method: passthrough\nmodels:\n  - model: 5\n",
        ["models[0].model", "cannot read model reference 5"],
        3,
    ),
    (
        "same-model-twice",
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: a\n"
        "    parameters: {weight: 1}\n",
        ["the same model is listed twice"],
        2,
    ),
    (
        "base-not-among-slice-sources",
        "merge_method: slerp\nbase_model: c\nparameters: {t: 0.5}\nslices:\n  - sources:\n      - model: a\n"
        "        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 2]\n",
        ["base model c is not one of this slice's sources"],
        None,
    ),
]


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize(("case", "text", "expected", "line"), BAD_CONFIGS, ids=_ids(BAD_CONFIGS))
def test_bad_config_is_one_clear_config_error(case, text, expected, line):
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    exc = info.value
    assert exc.problems, case
    message = str(exc)
    assert message.startswith("Invalid merge configuration")
    for piece in expected:
        assert piece in message, f"{case}: {piece!r} not in {message!r}"
    if line is not None:
        assert f"(line {line})" in message, message
    assert "Traceback" not in message and "pydantic" not in message.lower()


def test_missing_weight_for_linear_is_reported_per_model():
    with pytest.raises(ConfigError) as info:
        load_config_text("merge_method: linear\nmodels:\n  - model: a\n  - model: b\n")
    assert len(info.value.problems) == 2
    assert "models[0] (line 3): model a needs parameter 'weight'" in info.value.problems[0]
    assert "models[1] (line 4): model b needs parameter 'weight'" in info.value.problems[1]


def test_weight_given_once_at_top_level_is_enough():
    cfg = load_config_text(
        "merge_method: linear\nparameters: {weight: 1}\nmodels:\n  - model: a\n  - model: b\n"
    )
    assert cfg.merge_method == "linear"


def test_every_problem_is_reported_at_once_with_lines():
    text = """\
merge_method: linear
dtype: float17
base_modle: a
models:
  - model: a
    parameters:
      weight: abc
  - model: b
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, source="multi.yml")
    exc = info.value
    assert len(exc.problems) == 4, exc.problems
    joined = "\n".join(exc.problems)
    assert "dtype (line 2): unknown dtype 'float17'" in joined
    assert "base_modle (line 3): unknown field 'base_modle' (did you mean 'base_model'?)" in joined
    assert "models[0].parameters.weight (line 7): weight must be a number, got 'abc'" in joined
    assert "models[1] (line 8): model b needs parameter 'weight'" in joined
    text_of_error = str(exc)
    assert text_of_error.startswith("Invalid merge configuration in multi.yml (4 problems):")
    assert text_of_error.count("\n  - ") == 4


def test_structural_and_method_problems_are_reported_together():
    text = "merge_method: slerpp\ndtype: nope\nchat_template: chatlm\nmodels:\n  - model: a\n"
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    joined = "\n".join(info.value.problems)
    assert len(info.value.problems) == 3, info.value.problems
    assert "unknown dtype 'nope'" in joined
    assert "unknown merge method 'slerpp' (did you mean 'slerp'?)" in joined
    assert "chat_template (line 3)" in joined and "did you mean 'chatml'?" in joined


def test_unknown_parameters_in_several_places_are_all_reported():
    text = """\
merge_method: slerp
base_model: a
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
        parameters: {weigth: 1}
      - model: b
        layer_range: [0, 2]
    parameters: {tt: 0.5}
parameters:
  t: 0.5
  densty: 0.1
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert any("slices[0].sources[0].parameters.weigth (line 7)" in p for p in problems)
    assert any("slices[0].parameters.tt (line 10)" in p and "did you mean 't'?" in p for p in problems)
    assert any("parameters.densty (line 13)" in p and "its parameters: t" in p for p in problems)


def test_unrelated_unknown_key_only_warns(caplog):
    text = "merge_method: linear\nmy_notes: merged for the demo\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        cfg = load_config_text(text)
    assert cfg.merge_method == "linear"
    assert "my_notes (line 2): unknown field 'my_notes' is ignored" in caplog.text


def test_global_parameter_given_per_model_warns(caplog):
    text = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1, normalize: false}\n"
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        load_config_text(text)
    assert "'normalize' is a global parameter of 'linear'" in caplog.text


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"merge_method: linear\n\xff\xfe\x00junk\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(binary)
    named = tmp_path / "named.yml"
    named.write_text("merge_method: slerpp\nmodels:\n  - model: a\n")
    with pytest.raises(ConfigError, match=r"in .*named\.yml: merge_method \(line 1\)"):
        load_config(named)


def test_config_errors_are_mergesmith_errors():
    assert issubclass(ConfigError, MergesmithError)
    assert issubclass(PlanError, MergesmithError)


# ---------------------------------------------------------------------------------------- through the CLI


@pytest.fixture
def restore_log_level():
    logger = logging.getLogger("mergesmith")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.mark.parametrize(("case", "text", "expected", "line"), BAD_CONFIGS, ids=_ids(BAD_CONFIGS))
def test_bad_config_through_cli(case, text, expected, line, tmp_path, restore_log_level):
    cfg = tmp_path / "config.yml"
    cfg.write_text(text)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["yaml", str(cfg), str(out), "-q"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("error: Invalid merge configuration in ")
    assert "Traceback" not in result.stderr
    for piece in expected:
        assert piece in result.stderr, result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yml"]  # no output, no temp sibling


# -------------------------------------------------------------------------------------- plan-time errors


@pytest.fixture(scope="session")
def odd_models(models_dir: Path, llama_family) -> dict[str, Path]:
    """Models that do not fit the tiny llama family: narrower, shallower, one tensor short, incomplete dirs."""
    from safetensors.torch import load_file, save_file

    from mergesmith.testing.tiny_models import make_model

    base = llama_family["base"]
    out = {
        "wide32": make_model("llama", models_dir / "odd-llama-h32", seed=0, hidden=32, with_tokenizer=False),
        "shallow": make_model(
            "llama", models_dir / "odd-llama-2l", seed=0, num_layers=2, with_tokenizer=False
        ),
    }
    holey = models_dir / "odd-llama-holey"
    holey.mkdir()
    tensors = {k: v for f in sorted(base.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(holey / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", holey / "config.json")
    out["holey"] = holey
    no_weights = models_dir / "odd-no-weights"
    no_weights.mkdir()
    shutil.copy(base / "config.json", no_weights / "config.json")
    out["no_weights"] = no_weights
    no_config = models_dir / "odd-no-config"
    no_config.mkdir()
    for f in base.glob("*.safetensors"):
        shutil.copy(f, no_config / f.name)
    out["no_config"] = no_config
    return out


def linear_of(*paths: Path | str) -> str:
    lines = ["merge_method: linear", "models:"]
    for p in paths:
        lines += [f"  - model: {p}", "    parameters: {weight: 1.0}"]
    return "\n".join(lines) + "\n"


def plan_error(cfg: str, tmp_path: Path, **opts) -> str:
    out = tmp_path / "out"
    with pytest.raises(PlanError) as info:
        run_merge(cfg, out, MergeOptions(quiet=True, **opts))
    assert not out.exists()
    assert not list(tmp_path.glob(".out.mergesmith-tmp-*"))
    return str(info.value)


def test_model_path_that_does_not_exist(llama_family, tmp_path):
    msg = plan_error(linear_of(llama_family["base"], tmp_path / "no-such-model"), tmp_path)
    assert "cannot read the input models" in msg
    assert f"directory {tmp_path / 'no-such-model'} does not exist" in msg


def test_directory_without_weights_and_without_config(odd_models, tmp_path):
    msg = plan_error(linear_of(odd_models["no_weights"], odd_models["no_config"]), tmp_path)
    # both models are reported in one error
    assert f"no model weights found in {odd_models['no_weights']}" in msg
    assert "the directory holds config.json" in msg
    assert f"{odd_models['no_config'] / 'config.json'} is missing" in msg


def test_model_path_that_is_a_file(llama_family, tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"")
    msg = plan_error(linear_of(llama_family["base"], f), tmp_path)
    assert "is a file; give the directory that holds config.json" in msg


def test_hub_name_not_in_cache_offline(llama_family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    msg = plan_error(linear_of(llama_family["base"], "nobody/no-such-model"), tmp_path)
    assert "model nobody/no-such-model: not a local directory and not in the Hugging Face cache" in msg


def test_different_shapes_list_every_mismatch(llama_family, odd_models, tmp_path):
    msg = plan_error(linear_of(llama_family["base"], odd_models["wide32"]), tmp_path)
    n = int(re.search(r"cannot be planned \((\d+) problems\)", msg).group(1))
    assert n > 20  # every layer tensor, not just the first
    assert "tensor 'model.embed_tokens.weight' has different shapes across models" in msg
    assert f"{llama_family['base']}: [512, 64], {odd_models['wide32']}: [512, 32]" in msg
    assert "tensor 'model.layers.0.mlp.down_proj.weight' has different shapes" in msg
    assert f"... and {n - 24} more" in msg  # long lists are cut, with the remainder counted


def test_allow_crimes_does_not_merge_different_shapes(llama_family, odd_models, tmp_path):
    msg = plan_error(linear_of(llama_family["base"], odd_models["wide32"]), tmp_path, allow_crimes=True)
    assert "has different shapes across models" in msg


def test_different_depths_in_models_form(llama_family, odd_models, tmp_path):
    msg = plan_error(linear_of(llama_family["base"], odd_models["shallow"]), tmp_path)
    assert "'models:' merges need models of equal depth" in msg
    assert f"{odd_models['shallow']} has 2" in msg and "use slices" in msg


def test_layer_range_beyond_the_model_is_a_plan_error(llama_family, tmp_path):
    cfg = f"""
merge_method: passthrough
slices:
  - sources:
      - model: {llama_family["base"]}
        layer_range: [0, 3]
  - sources:
      - model: {llama_family["ft1"]}
        layer_range: [2, 6]
"""
    load_config_text(cfg)  # the config alone is fine: layer counts are only known from the model
    msg = plan_error(cfg, tmp_path)
    assert "(1 problem)" in msg
    assert f"slices[1].sources[0].layer_range [2, 6]: model {llama_family['ft1']} has only 4 layers" in msg


def test_missing_tensor_is_an_error_unless_allow_crimes(llama_family, odd_models, tmp_path):
    base, holey = llama_family["base"], odd_models["holey"]
    name = "model.layers.2.mlp.up_proj.weight"
    msg = plan_error(linear_of(base, holey), tmp_path)
    assert f"tensor {name!r} is missing from {holey}" in msg
    assert "(1 problem)" in msg

    out = tmp_path / "crimes"
    run_merge(linear_of(base, holey), out, MergeOptions(quiet=True, allow_crimes=True))
    merged, ref = load_tensors(out), load_tensors(base)
    assert set(merged) == set(ref)
    assert (merged[name] == ref[name]).all()  # only the base has it: a one-model weighted average


def test_plan_error_through_cli(llama_family, odd_models, tmp_path, restore_log_level):
    cfg = tmp_path / "c.yml"
    cfg.write_text(linear_of(llama_family["base"], odd_models["wide32"]))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["yaml", str(cfg), str(out)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: the merge cannot be planned (")
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yml"]


def test_dict_and_path_configs_validate_the_same(tmp_path):
    from mergesmith.api import as_config

    with pytest.raises(ConfigError, match="unknown merge method 'slerpp'"):
        as_config({"merge_method": "slerpp", "models": [{"model": "a"}]})
    p = tmp_path / "merge.conf"  # no .yml suffix: still read as a file, not as YAML text
    p.write_text(json.dumps({"merge_method": "passthrough", "models": [{"model": "a"}]}))
    assert as_config(str(p)).merge_method == "passthrough"
    assert as_config(p).merge_method == "passthrough"
