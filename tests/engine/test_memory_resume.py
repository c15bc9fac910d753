"""Bounded memory (row-chunked merges under --max-memory), resumable merges and the output manifest."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge
from mergesmith.engine.execute import plan_units
from mergesmith.errors import PlanError


def linear_cfg(a: Path, b: Path, method: str = "linear") -> str:
    return f"""
merge_method: {method}
models:
  - model: {a}
    parameters: {{weight: 0.3}}
  - model: {b}
    parameters: {{weight: 0.7}}
dtype: float32
"""


def shard_bytes(d: Path) -> dict[str, bytes]:
    names = [p for p in d.iterdir() if p.suffix == ".safetensors" or p.name.endswith("index.json")]
    return {p.name: p.read_bytes() for p in names}


def test_row_chunked_merge_equals_whole_tensor_merge(llama_family, tmp_path):
    """Tensors larger than the --max-memory chunk threshold are merged in row ranges, bit-identically."""
    a, b = llama_family["ft1"], llama_family["ft2"]
    run_merge(linear_cfg(a, b), tmp_path / "whole", MergeOptions(quiet=True))
    # 80 KB budget -> 10 KB units: the 512x64 embedding (128 KB per input) and the MLP weights are split
    run_merge(linear_cfg(a, b), tmp_path / "chunked", MergeOptions(quiet=True, max_memory="80KB"))
    assert shard_bytes(tmp_path / "whole") == shard_bytes(tmp_path / "chunked")


def test_units_split_only_elementwise_tensors(llama_family):
    from mergesmith.api import plan_merge
    from mergesmith.io.index import index_model_dir
    from mergesmith.io.read import ModelReader

    a, b = llama_family["ft1"], llama_family["ft2"]
    for method, split in (("linear", True), ("slerp", False)):
        cfg = linear_cfg(a, b, method)
        if method == "slerp":
            cfg = cfg.replace("parameters: {weight: 0.3}", "").replace("parameters: {weight: 0.7}", "")
            cfg += f"base_model: {a}\nparameters: {{t: 0.5}}\n"
        plan = plan_merge(cfg)
        readers = [ModelReader(index_model_dir(m.path)) for m in plan.models]
        units = plan_units(plan, 10_000, set(), readers)
        assert (len(units) > len(plan.tensors)) is split
        for u in units:  # ranges of one tensor tile it exactly, in order
            assert 0 <= u.start < u.stop or u.tp.shape == ()


def test_max_memory_too_small_is_refused_before_starting(llama_family, tmp_path):
    base, a = llama_family["base"], llama_family["ft1"]
    cfg = f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\nparameters: {{t: 0.5}}\n"
    with pytest.raises(PlanError, match="--max-memory .* is too small: tensor 'model.embed_tokens.weight'"):
        run_merge(cfg, tmp_path / "out", MergeOptions(quiet=True, max_memory="100KB"))
    assert not (tmp_path / "out").exists()


def test_manifest_lists_inputs_and_verifies_outputs(llama_family, tmp_path):
    a, b = llama_family["ft1"], llama_family["ft2"]
    run_merge(linear_cfg(a, b), tmp_path / "out", MergeOptions(quiet=True, out_shard_size="200K"))
    out = tmp_path / "out"
    manifest = json.loads((out / "mergesmith_manifest.json").read_text())
    assert [i["path"] for i in manifest["inputs"]] == [str(a), str(b)]
    assert all(f["header_sha256"] for i in manifest["inputs"] for f in i["files"])
    listed = {o["name"]: o for o in manifest["outputs"]}
    on_disk = {p.name for p in out.iterdir()} - {"mergesmith_manifest.json"}
    assert set(listed) == on_disk
    for name, entry in listed.items():
        data = (out / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), name
    assert not (out / "mergesmith-journal.jsonl").exists()


SLOW_PLUGIN = textwrap.dedent(
    """
    import time

    from mergesmith.methods import register


    @register("slow_linear", params=(), min_models=1)
    def slow_linear(inputs):
        time.sleep(0.08)
        return sum(inputs.tensors) / len(inputs.tensors)
    """
)


SLOW_KERNEL_PLUGIN = textwrap.dedent(
    """
    import time

    from mergesmith.methods import linear, register
    from mergesmith.methods.spec import Param


    def slow_fused(a):
        time.sleep(0.08)
        return linear._linear_fused(a)


    params = (Param("weight", float, "per_model", 1.0), Param("normalize", bool, "global", True))
    register("slow_linear", params=params, fused=slow_fused)(linear.linear)  # whole tensors: in place
    """
)


def _slow_run(
    tmp_path: Path, a: Path, b: Path, *extra: str, quiet: bool = True, plugin: str = SLOW_PLUGIN
) -> subprocess.Popen:
    (tmp_path / "slow_plugin.py").write_text(plugin)
    cfg = tmp_path / "slow.yml"
    cfg.write_text(f"merge_method: slow_linear\nmodels:\n  - model: {a}\n  - model: {b}\n")
    cmd = [sys.executable, "-m", "mergesmith", "yaml", str(cfg), "out", "--method-plugin", "slow_plugin.py"]
    cmd += ["-q"] if quiet else []
    cmd += ["--out-shard-size", "100K", *extra]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _journal_lines(tmp_path: Path) -> int:
    for d in tmp_path.glob(".out.mergesmith-tmp-*"):
        j = d / "mergesmith-journal.jsonl"
        if j.is_file():
            return len(j.read_text().splitlines())
    return 0


@pytest.mark.skipif(os.name != "posix", reason="signals")
@pytest.mark.parametrize("plugin", [SLOW_PLUGIN, SLOW_KERNEL_PLUGIN], ids=["torch", "kernel-in-place"])
def test_killed_merge_resumes_to_identical_output(llama_family, tmp_path, plugin):
    """Killed mid-way and resumed, the merge gives a clean run's bytes: with torch results written to the
    shards, and with a fused kernel computing straight into the shard files (mapped, see claim)."""
    a, b = llama_family["ft1"], llama_family["ft2"]
    clean = tmp_path / "clean"
    clean.mkdir()
    done = _slow_run(clean, a, b, plugin=plugin)
    assert done.wait(timeout=120) == 0, done.communicate()[1]

    work = tmp_path / "work"
    work.mkdir()
    proc = _slow_run(work, a, b, plugin=plugin)
    deadline = time.monotonic() + 60
    while _journal_lines(work) < 3 and time.monotonic() < deadline:  # header + at least two shards
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (work / "out").exists()
    partial = list(work.glob(".out.mergesmith-tmp-*"))
    assert len(partial) == 1
    # corrupt nothing; resume with the same command plus --resume
    again = _slow_run(work, a, b, "--resume", quiet=False, plugin=plugin)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "already complete and verified" in err
    assert not list(work.glob(".out.mergesmith-tmp-*"))
    assert shard_bytes(work / "out") == shard_bytes(clean / "out")


def test_resume_rejects_corrupt_shard_and_rewrites_it(llama_family, tmp_path, monkeypatch):
    """A journaled shard whose bytes changed is written again; the result still equals a clean run."""
    from mergesmith.io import write as write_mod

    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = linear_cfg(a, b, "dare_linear").replace("{weight: 0.3}", "{weight: 0.3, density: 0.5}")
    cfg = cfg.replace("{weight: 0.7}", "{weight: 0.7, density: 0.5}") + f"base_model: {a}\n"
    opts = MergeOptions(quiet=True, out_shard_size="100K", resume=True)

    calls = {"n": 0}
    original = write_mod.ShardWriter._close_shard

    def interrupt_after_three(self):
        was_open = self._shard in self._open
        original(self)
        calls["n"] += was_open
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(write_mod.ShardWriter, "_close_shard", interrupt_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_merge(cfg, tmp_path / "out", opts)
    monkeypatch.setattr(write_mod.ShardWriter, "_close_shard", original)
    (partial,) = tmp_path.glob(".out.mergesmith-tmp-*")
    # the interrupted run is ours (same pid): rename it as a dead run's would be named
    dead = partial.with_name(".out.mergesmith-tmp-999999")
    partial.rename(dead)
    shards = sorted(dead.glob("model-*.safetensors"))
    assert len(shards) >= 2
    data = bytearray(shards[1].read_bytes())
    data[-1] ^= 0xFF
    shards[1].write_bytes(bytes(data))

    run_merge(cfg, tmp_path / "out", opts)
    seed = json.loads((tmp_path / "out" / "mergesmith_manifest.json").read_text())["random_seed"]
    # no --random-seed was given: the journal kept the seed, so a clean run with it gives the same bytes
    run_merge(cfg, tmp_path / "clean", MergeOptions(quiet=True, out_shard_size="100K", random_seed=seed))
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "clean")
    ref = load_tensors(tmp_path / "clean")
    assert all(torch.equal(v, ref[k]) for k, v in load_tensors(tmp_path / "out").items())
