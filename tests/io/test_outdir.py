"""Output safety: a merge either leaves a complete output directory or nothing at all.

Covers refusing a non-empty output, --overwrite, failures mid-merge, Ctrl-C (SIGINT) and kill -9 of the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge
from mergesmith.cli.main import cli
from mergesmith.errors import OutputError
from mergesmith.io.outdir import atomic_dir, check_target, copy_side_files, remove_stale_temps
from mergesmith.io.write import ShardWriter
from mergesmith.methods import registry

QUIET = MergeOptions(quiet=True)


def passthrough_cfg(model: Path, method: str = "passthrough") -> str:
    return f"merge_method: {method}\nmodels:\n  - model: {model}\n"


def siblings(parent: Path, name: str = "out") -> list[str]:
    """The output and every temporary sibling of it."""
    return sorted(
        p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.mergesmith-")
    )


@pytest.fixture
def restore_log_level():
    logger = logging.getLogger("mergesmith")
    level = logger.level
    yield
    logger.setLevel(level)


# ------------------------------------------------------------------------------------------ check_target


def test_check_target_accepts_missing_and_empty_dirs(tmp_path):
    check_target(tmp_path / "missing", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty", overwrite=False)


def test_check_target_refuses_non_empty_dir_and_files(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(OutputError, match="is not empty; pass --overwrite"):
        check_target(tmp_path / "full", overwrite=False)
    check_target(tmp_path / "full", overwrite=True)
    (tmp_path / "file").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="exists and is not a directory"):
            check_target(tmp_path / "file", overwrite=overwrite)


# ------------------------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_moves_into_place_only_at_the_end(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, overwrite=False) as tmp:
        assert tmp.name.startswith(".out.mergesmith-tmp-") and tmp.parent == tmp_path
        (tmp / "f").write_text("new")
        assert not out.exists()
    assert (out / "f").read_text() == "new"
    assert siblings(tmp_path) == ["out"]


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "sub" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out, overwrite=False) as tmp:
            (tmp / "f").write_text("partial")
            raise RuntimeError("boom")
    assert siblings(out.parent) == []


def test_atomic_dir_overwrite_keeps_old_output_until_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["old"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
        assert (out / "old").exists()
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert siblings(tmp_path) == ["out"]


def test_atomic_dir_refuses_non_empty_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("keep")
    with pytest.raises(OutputError, match="not empty"):
        with atomic_dir(out, overwrite=False):
            pytest.fail("must not get here")
    assert (out / "keep").read_text() == "keep"
    assert siblings(tmp_path) == ["out"]


def test_atomic_dir_unwritable_place_is_an_output_error(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(OutputError, match="cannot create a temporary directory beside"):
        with atomic_dir(blocker / "out", overwrite=False):
            pytest.fail("must not get here")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.skipif(os.name != "posix", reason="stale temp cleanup probes pids (POSIX only)")
def test_stale_temp_siblings_of_dead_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / f".out.mergesmith-tmp-{dead_pid()}"
    alive = tmp_path / f".out.mergesmith-tmp-{os.getppid()}"  # our parent process: certainly running
    old = tmp_path / f".out.mergesmith-old-{dead_pid()}"  # may be the only copy of a previous output
    other = tmp_path / f".other.mergesmith-tmp-{dead_pid()}"  # belongs to another output
    for d in (dead, alive, old, other):
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    assert remove_stale_temps(out) == [dead]
    assert not dead.exists() and alive.exists() and old.exists() and other.exists()
    with atomic_dir(out, overwrite=False) as tmp:
        (tmp / "f").write_text("x")
    assert alive.exists() and old.exists() and other.exists()


def test_copy_side_files_skips_weights_and_optionally_tokenizer(llama_family, tmp_path):
    base = llama_family["base"]
    (tmp_path / "all").mkdir()
    names = copy_side_files(base, tmp_path / "all", copy_tokenizer=True)
    assert "tokenizer.json" in names and "generation_config.json" in names
    assert not any(n.endswith(".safetensors") or n == "config.json" for n in names)
    (tmp_path / "bare").mkdir()
    bare = copy_side_files(base, tmp_path / "bare", copy_tokenizer=False)
    assert "generation_config.json" in bare and not any(n.startswith("tokenizer") for n in bare)


# --------------------------------------------------------------------------------- run_merge: refusing


def test_non_empty_output_is_refused_and_left_untouched(llama_family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("do not touch")
    with pytest.raises(OutputError, match="is not empty; pass --overwrite"):
        run_merge(passthrough_cfg(llama_family["base"]), out, QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "do not touch"
    assert siblings(tmp_path) == ["out"]


def test_overwrite_replaces_the_output(llama_family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"junk")
    run_merge(passthrough_cfg(llama_family["ft1"]), out, MergeOptions(quiet=True, overwrite=True))
    assert not (out / "stale.safetensors").exists()
    assert (out / "config.json").is_file()
    ref = load_tensors(llama_family["ft1"])
    got = load_tensors(out)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert siblings(tmp_path) == ["out"]


def test_output_that_would_replace_an_input_is_refused(llama_family, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(llama_family["base"], model)
    before = sorted(p.name for p in model.iterdir())
    for target in (model, tmp_path):  # the model itself, or a directory holding it
        with pytest.raises(OutputError, match="holds input model"):
            run_merge(passthrough_cfg(model), target, MergeOptions(quiet=True, overwrite=True))
    assert sorted(p.name for p in model.iterdir()) == before


def test_dry_run_writes_nothing_even_into_a_non_empty_dir(llama_family, tmp_path):
    out = tmp_path / "out"
    result = run_merge(passthrough_cfg(llama_family["base"]), out, MergeOptions(quiet=True, dry_run=True))
    assert result.out_path is None and len(result.plan.tensors) > 0
    assert siblings(tmp_path) == []


# ------------------------------------------------------------------------------ run_merge: failing midway


FAIL_AFTER = {"n": 0, "limit": 5}


def _fail_after(inputs):
    FAIL_AFTER["n"] += 1
    if FAIL_AFTER["n"] > FAIL_AFTER["limit"]:
        raise RuntimeError("method exploded")
    return inputs.tensors[0].clone()


@pytest.fixture
def failing_method(monkeypatch):
    """A passthrough that raises after a few tensors, registered for this test only."""
    from mergesmith.methods.spec import MethodSpec

    name = "test_outdir_fail_after"
    registry.names()  # load the built-in methods first
    spec = MethodSpec(name=name, fn=_fail_after, max_models=1, summary="fails after a few tensors (tests)")
    monkeypatch.setitem(registry._METHODS, name, spec)  # removed again when the test ends
    FAIL_AFTER["n"] = 0
    return name


def test_method_failure_midway_leaves_no_output(llama_family, tmp_path, failing_method):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="method exploded"):
        run_merge(passthrough_cfg(llama_family["base"], failing_method), out, QUIET)
    assert FAIL_AFTER["n"] == FAIL_AFTER["limit"] + 1  # it really got partway
    assert siblings(tmp_path) == []


def test_method_failure_with_overwrite_keeps_the_previous_output(llama_family, tmp_path, failing_method):
    out = tmp_path / "out"
    run_merge(passthrough_cfg(llama_family["ft2"]), out, QUIET)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="method exploded"):
        run_merge(
            passthrough_cfg(llama_family["base"], failing_method),
            out,
            MergeOptions(quiet=True, overwrite=True),
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert siblings(tmp_path) == ["out"]


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), OutputError("writer broke")])
def test_writer_failure_midway_leaves_no_output(llama_family, tmp_path, monkeypatch, exc):
    real_write = ShardWriter.write
    calls = {"n": 0}

    def write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] > 7:
            raise exc
        return real_write(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", write)
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        run_merge(passthrough_cfg(llama_family["base"]), out, MergeOptions(quiet=True, out_shard_size="100K"))
    assert calls["n"] == 8
    assert siblings(tmp_path) == []


def test_disk_error_inside_the_writer_is_an_output_error(llama_family, tmp_path, monkeypatch):
    """A real OSError from the file (e.g. disk full) surfaces as OutputError, so the CLI says 'error:'."""
    import os

    real_open = os.open
    opened = {"n": 0}

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and str(path).endswith(".safetensors"):
            opened["n"] += 1
            if opened["n"] > 2:
                raise OSError(28, "No space left on device")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="cannot write .*model-00003-of-.*No space left on device"):
        run_merge(passthrough_cfg(llama_family["base"]), out, MergeOptions(quiet=True, out_shard_size="100K"))
    assert siblings(tmp_path) == []


def test_failure_after_the_tensors_leaves_no_output(llama_family, tmp_path, monkeypatch):
    """Side files are written in the temp dir too: a failure there still leaves nothing."""
    import mergesmith.io.outdir as outdir

    def broken(*args, **kwargs):
        raise OutputError("cannot copy side files")

    monkeypatch.setattr(outdir, "copy_side_files", broken)
    with pytest.raises(OutputError, match="cannot copy side files"):
        run_merge(passthrough_cfg(llama_family["base"]), tmp_path / "out", QUIET)
    assert siblings(tmp_path) == []


def test_cli_internal_failure_is_exit_1_without_traceback_and_no_output(
    llama_family, tmp_path, failing_method, restore_log_level
):
    cfg = tmp_path / "c.yml"
    cfg.write_text(passthrough_cfg(llama_family["base"], failing_method))
    result = CliRunner().invoke(cli, ["yaml", str(cfg), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 1
    assert result.stderr.startswith("internal error: RuntimeError: method exploded")
    assert "Traceback" not in result.stderr
    assert siblings(tmp_path) == []


# ------------------------------------------------------------------------------ interrupted CLI merges

SLOW_PLUGIN = textwrap.dedent(
    """
    import os
    import time

    from mergesmith.methods import register


    @register("slow_passthrough", max_models=1, summary="passthrough that sleeps per tensor (tests)")
    def slow_passthrough(inputs):
        time.sleep(float(os.environ.get("SLOW_SECONDS", "0.1")))
        return inputs.tensors[0].clone()
    """
)


def start_slow_merge(tmp_path: Path, model: Path) -> subprocess.Popen:
    plugin = tmp_path / "slow_plugin.py"
    plugin.write_text(SLOW_PLUGIN)
    cfg = tmp_path / "slow.yml"
    cfg.write_text(passthrough_cfg(model, "slow_passthrough"))
    env = dict(os.environ, SLOW_SECONDS="0.1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "mergesmith", "yaml", str(cfg), "out", "--method-plugin", str(plugin), "-q"],
        cwd=tmp_path,
        env=env,
        # A suite started in the background (`cmd &` in a script) inherits SIGINT ignored, and Python then
        # keeps it ignored: give the child the default disposition, so Ctrl-C reaches it as it would a user's.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_first_shard(proc: subprocess.Popen, tmp_path: Path, timeout: float = 60) -> Path:
    """Block until the merge has written into its temporary directory; return that directory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in tmp_path.glob(".out.mergesmith-tmp-*"):
            if any(tmp.glob("*.safetensors")):
                return tmp
        if proc.poll() is not None:
            pytest.fail(f"merge ended before writing anything: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("merge did not start writing in time")


@pytest.mark.skipif(os.name != "posix", reason="signals")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_mid_merge_exits_and_leaves_nothing(llama_family, tmp_path, sig, code):
    proc = start_slow_merge(tmp_path, llama_family["base"])
    try:
        wait_for_first_shard(proc, tmp_path)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert "interrupted: nothing was written to the output path" in stderr
    assert "Traceback" not in stderr
    assert siblings(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_sigkill_mid_merge_leaves_no_output_and_a_rerun_cleans_up(llama_family, tmp_path):
    proc = start_slow_merge(tmp_path, llama_family["base"])
    try:
        tmp = wait_for_first_shard(proc, tmp_path)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()  # never a half-written output under the real name
    assert siblings(tmp_path) == [tmp.name]  # the killed run's temp dir is all that remains

    result = run_merge(passthrough_cfg(llama_family["base"]), tmp_path / "out", QUIET)
    assert result.out_path == tmp_path / "out"
    assert siblings(tmp_path) == ["out"]  # the stale temp dir of the dead run is gone
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_tensors(llama_family["base"]))
