"""User methods: registered from Python, from a plugin file on the command line, or named in the config."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge

PLUGIN = textwrap.dedent(
    """
    from mergesmith.methods import MergeInputs, Param, register


    @register("scaled_sum_{tag}", params=(Param("scale", float, "global", 0.5),), elementwise=True)
    def scaled_sum(inputs: MergeInputs):
        \"\"\"Sum of the inputs times scale.\"\"\"
        return sum(inputs.tensors) * inputs.params["scale"]
    """
)


def _cfg(a, b, method: str, extra: str = "") -> str:
    return f"merge_method: {method}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{scale: 0.25}}\n{extra}"


def test_plugin_named_in_config(llama_family, tmp_path):
    plugin = tmp_path / "plug_cfg.py"
    plugin.write_text(PLUGIN.format(tag="cfg"))
    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = _cfg(a, b, "scaled_sum_cfg", f"method_plugins: [{plugin}]\n")
    run_merge(cfg, tmp_path / "out", MergeOptions(quiet=True))
    run_merge(cfg, tmp_path / "again", MergeOptions(quiet=True))  # loading twice is harmless
    out, ta, tb = (load_tensors(p) for p in (tmp_path / "out", a, b))
    k = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(out[k], (ta[k] + tb[k]) * 0.25)


def test_plugin_on_command_line_and_in_config(llama_family, tmp_path):
    plugin = tmp_path / "plug_cli.py"
    plugin.write_text(PLUGIN.format(tag="cli"))
    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = tmp_path / "c.yml"
    cfg.write_text(_cfg(a, b, "scaled_sum_cli", f"method_plugins: [{plugin}]\n"))
    cmd = [sys.executable, "-m", "mergesmith", "yaml", str(cfg), str(tmp_path / "out"), "-q"]
    done = subprocess.run([*cmd, "--method-plugin", str(plugin)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text(_cfg(a, b, "scaled_sum_cli", "method_plugins: [./no_such_plugin.py]\n"))
    failed = subprocess.run(
        [sys.executable, "-m", "mergesmith", "yaml", str(bad), str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2 and "method_plugins[0]" in failed.stderr and "not found" in failed.stderr
