"""The command line: exit codes, messages on stderr without tracebacks, --dry-run, shards, methods, flags."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests.conftest import load_tensors

from mergesmith.cli.main import cli


@pytest.fixture(autouse=True)
def restore_log_level():
    """`mergesmith yaml` sets the mergesmith logger's level; keep that from leaking into other tests."""
    logger = logging.getLogger("mergesmith")
    level = logger.level
    yield
    logger.setLevel(level)


def write_cfg(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def linear_cfg(tmp_path: Path, llama_family) -> Path:
    a, b = llama_family["ft1"], llama_family["ft2"]
    return write_cfg(
        tmp_path / "linear.yml",
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.4}}\ndtype: float32\n",
    )


def load_tensors_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "mergesmith", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="mergesmith")


# ------------------------------------------------------------------------------- real processes (python -m)


def test_module_merge_succeeds_with_several_shards(llama_family, tmp_path):
    cfg = linear_cfg(tmp_path, llama_family)
    proc = run_module("yaml", str(cfg), "out", "--out-shard-size", "300K", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:  # the limit counts tensor bytes; no single tensor exceeds 300K here
        data = load_tensors_file(shard)
        assert 0 < sum(t.numel() * t.element_size() for t in data.values()) <= 300_000, shard.name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    merged, a, b = load_tensors(out), load_tensors(llama_family["ft1"]), load_tensors(llama_family["ft2"])
    k = "model.layers.1.self_attn.k_proj.weight"
    assert ((merged[k] - (0.6 * a[k] + 0.4 * b[k])).abs().max()) < 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.yml", "out"]


def test_module_bad_config_exits_2_with_message_and_no_traceback(tmp_path):
    cfg = write_cfg(
        tmp_path / "bad.yml",
        "merge_method: slerpp\nmodels:\n  - model: a\n    parameters:\n      densty: 1\n",
    )
    proc = run_module("yaml", str(cfg), "out", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: Invalid merge configuration in ")
    assert "unknown merge method 'slerpp' (did you mean 'slerp'?)" in proc.stderr
    assert "(line 1)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yml"]


# ---------------------------------------------------------------------------------------------- yaml


def test_success_prints_a_summary(llama_family, tmp_path):
    out = tmp_path / "out"
    result = invoke("yaml", str(linear_cfg(tmp_path, llama_family)), str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"merged {len(load_tensors(out))} tensors into {out}")
    for name in ("config.json", "model.safetensors.index.json", "README.md", "tokenizer.json"):
        assert (out / name).is_file(), name


def test_quiet_success_prints_nothing(llama_family, tmp_path):
    result = invoke("yaml", str(linear_cfg(tmp_path, llama_family)), str(tmp_path / "out"), "-q")
    assert result.exit_code == 0
    assert result.stdout == ""


def test_dry_run_prints_the_plan_and_writes_nothing(llama_family, tmp_path):
    cfg = linear_cfg(tmp_path, llama_family)
    out = tmp_path / "out"
    result = invoke("yaml", str(cfg), str(out), "--dry-run")
    assert result.exit_code == 0, result.output
    n = len(load_tensors(llama_family["ft1"]))
    text = result.stdout
    assert "merge method: linear" in text
    assert f"output tensors: {n}" in text
    assert "bytes read: " in text and "bytes written: " in text and "KB" in text
    assert f"methods: linear x{n}" in text
    assert "output dtypes: float32" in text
    assert "output layers: 4" in text
    assert str(llama_family["ft1"]) in text and str(llama_family["ft2"]) in text
    assert "\ntensors:\n" not in text  # per-tensor lines only with -v
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.yml"]


def test_verbose_dry_run_lists_every_tensor(llama_family, tmp_path):
    result = invoke("yaml", str(linear_cfg(tmp_path, llama_family)), str(tmp_path / "out"), "-v", "--dry-run")
    assert result.exit_code == 0, result.output
    listing = result.stdout.split("tensors:\n", 1)[1].splitlines()
    lines = [x for x in listing if not x.startswith("      [")]  # per-model parameter lines are indented more
    names = set(load_tensors(llama_family["ft1"]))
    assert len(lines) == len(names)
    i = next(i for i, x in enumerate(listing) if x.strip().startswith("model.layers.0.mlp.up_proj.weight "))
    assert "[128, 64] float32 <- linear([0]model.layers.0.mlp.up_proj.weight" in listing[i]
    assert "normalize=True" in listing[i]
    assert listing[i + 1].split() == ["[0]", "weight=0.6"] and listing[i + 2].split() == ["[1]", "weight=0.4"]
    assert not (tmp_path / "out").exists()


def test_dry_run_still_validates(tmp_path):
    cfg = write_cfg(tmp_path / "bad.yml", "merge_method: linear\nmodels:\n  - model: a\n")
    result = invoke("yaml", str(cfg), str(tmp_path / "out"), "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert "needs parameter 'weight'" in result.stderr


def test_out_shard_size_gives_several_shards(llama_family, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "yaml", str(linear_cfg(tmp_path, llama_family)), str(out), "--out-shard-size", "300K", "-q"
    )
    assert result.exit_code == 0, result.output
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"


def test_non_empty_output_refused_then_overwrite(llama_family, tmp_path):
    cfg = linear_cfg(tmp_path, llama_family)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("yaml", str(cfg), str(out), "-q")
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"error: output directory {out.absolute()} is not empty; pass --overwrite"
    )
    assert "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    result = invoke("yaml", str(cfg), str(out), "-q", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.yml", "out"]


def test_output_path_that_is_a_file(llama_family, tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    result = invoke("yaml", str(linear_cfg(tmp_path, llama_family)), str(target))
    assert result.exit_code == 2
    assert f"Invalid value for 'OUT_PATH': Directory '{target}' is a file" in result.stderr
    assert target.read_text() == "a file"


def test_missing_config_file(tmp_path):
    result = invoke("yaml", str(tmp_path / "nope.yml"), str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: Invalid merge configuration: config file")
    assert "does not exist" in result.stderr


def test_config_file_without_yaml_suffix_is_read_as_a_file(llama_family, tmp_path):
    cfg = linear_cfg(tmp_path, llama_family).rename(tmp_path / "merge.conf")
    result = invoke("yaml", str(cfg), str(tmp_path / "out"), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "merge method: linear" in result.stdout
    missing = invoke("yaml", str(tmp_path / "missing.conf"), str(tmp_path / "out"), "--dry-run")
    assert missing.exit_code == 2 and "config file" in missing.stderr and "does not exist" in missing.stderr


def test_config_file_that_is_not_text(tmp_path):
    cfg = tmp_path / "weights.yml"
    cfg.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    result = invoke("yaml", str(cfg), str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "is not UTF-8 text" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--out-shard-size", "lots"], "Invalid value for '--out-shard-size': cannot read size 'lots'"),
        (["--read-ahead", "0"], "Invalid value for '--read-ahead'"),
        (["--num-threads", "0"], "Invalid value for '--num-threads'"),
        (["--random-seed", "x"], "Invalid value for '--random-seed'"),
        (["--no-such-flag"], "No such option '--no-such-flag'"),
    ],
)
def test_bad_flag_values_are_usage_errors(llama_family, tmp_path, flags, expected):
    result = invoke("yaml", str(linear_cfg(tmp_path, llama_family)), str(tmp_path / "out"), *flags)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--device", "toaster"], "unknown device 'toaster'"),
        (["--device", "meta"], "device 'meta' is not supported"),
    ],
)
def test_bad_device_is_a_clear_error(llama_family, tmp_path, flags, expected):
    result = invoke("yaml", str(linear_cfg(tmp_path, llama_family)), str(tmp_path / "out"), *flags)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {expected}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.yml"]


def test_cuda_without_a_gpu_is_a_clear_error(llama_family, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = invoke("yaml", str(linear_cfg(tmp_path, llama_family)), str(tmp_path / "out"), "--cuda")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: device 'cuda' asked for, but no CUDA device is available")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear.yml"]


def test_mergekit_compat_flags_are_accepted(llama_family, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "yaml",
        str(linear_cfg(tmp_path, llama_family)),
        str(out),
        "--lazy-unpickle",
        "--allow-crimes",
        "--random-seed",
        "7",
        "--no-copy-tokenizer",
        "--trust-remote-code",
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert not (out / "tokenizer.json").exists()
    assert (out / "config.json").is_file()


def test_method_plugin_that_does_not_exist(llama_family, tmp_path):
    result = invoke(
        "yaml", str(linear_cfg(tmp_path, llama_family)), str(tmp_path / "out"), "--method-plugin", "nope.py"
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("error: method plugin file 'nope.py' not found")


def test_method_plugin_that_fails_to_import(llama_family, tmp_path):
    plugin = write_cfg(tmp_path / "broken_plugin.py", "raise ImportError('needs a missing package')\n")
    result = invoke(
        "yaml", str(linear_cfg(tmp_path, llama_family)), str(tmp_path / "out"), "--method-plugin", str(plugin)
    )
    assert result.exit_code == 2
    assert "could not load method plugin" in result.stderr and "needs a missing package" in result.stderr
    assert not (tmp_path / "out").exists()


def test_help_lists_mergekit_flag_names():
    result = invoke("yaml", "--help")
    assert result.exit_code == 0
    for flag in (
        "--cuda",
        "--allow-crimes",
        "--out-shard-size",
        "--random-seed",
        "--lazy-unpickle",
        "--copy-tokenizer / --no-copy-tokenizer",
        "--trust-remote-code",
        "--transformers-cache",
        "--overwrite",
        "--dry-run",
        "--method-plugin",
        "-v, --verbose",
    ):
        assert flag in result.stdout, flag
    assert "Exit codes: 0 success, 2 bad config/input/output" in result.stdout


def test_top_level_help_and_version():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "yaml" in result.stdout and "methods" in result.stdout
    version = invoke("--version")
    assert version.exit_code == 0 and version.stdout.startswith("mergesmith, version ")


# -------------------------------------------------------------------------------------------- methods


def test_methods_lists_every_method():
    from mergesmith.methods import registry

    result = invoke("methods")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert listed == registry.names()
    assert {"linear", "slerp", "passthrough", "task_arithmetic"} <= set(listed)


def test_methods_linear_explains_the_method():
    result = invoke("methods", "linear")
    assert result.exit_code == 0
    text = result.stdout
    assert text.startswith("linear: ")
    assert "base model: not used; models: 1 to any number" in text
    assert "weight" in text and "required" in text
    assert "normalize" in text and "default True" in text


def test_methods_slerp_shows_its_rules():
    result = invoke("methods", "slerp")
    assert result.exit_code == 0
    assert "base model: required; models: 2 to 2" in result.stdout


def test_methods_unknown_name_suggests():
    result = invoke("methods", "slerpp")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown merge method 'slerpp' (did you mean 'slerp'?)")


def test_main_exits_with_the_command_status_without_teardown(monkeypatch, capsys):
    """main() leaves through os._exit (no interpreter teardown) with the status click gives."""
    import mergesmith.cli.main as entry

    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(entry.os, "_exit", fake_exit)
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))  # restored after
    monkeypatch.setattr(entry.gc, "disable", lambda: None)  # main() turns collection off for its process
    for argv, want in ((["methods"], 0), (["yaml"], 2), (["nope"], 2)):
        monkeypatch.setattr(sys, "argv", ["mergesmith", *argv])
        with pytest.raises(SystemExit):
            entry.main()
        assert codes[-1] == want
    assert "linear" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        entry.run_cli(lambda: (_ for _ in ()).throw(BrokenPipeError()), 0)  # `| head` closed the pipe
    assert codes[-1] == 141
