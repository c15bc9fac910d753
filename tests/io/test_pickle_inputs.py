"""PyTorch pickle checkpoints as inputs: single and sharded `pytorch_model.bin`, read lazily (mmap) and only
through torch.load(weights_only=True); a pickle that needs code execution is refused and never run."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge
from mergesmith.cli.main import cli
from mergesmith.errors import ModelError
from mergesmith.io.index import index_model_dir
from mergesmith.io.read import load_pickle_state, open_model
from mergesmith.testing.tiny_models import save_as_pytorch_bin

QUIET = MergeOptions(quiet=True)


@pytest.fixture(autouse=True)
def restore_log_level():
    logger = logging.getLogger("mergesmith")
    level = logger.level
    yield
    logger.setLevel(level)


def save_as_sharded_bin(model_dir: Path, out_dir: Path, shards: int = 3) -> Path:
    """Like save_as_pytorch_bin, but split over `shards` files with a pytorch_model.bin.index.json."""
    single = save_as_pytorch_bin(model_dir, out_dir)
    state = torch.load(single / "pytorch_model.bin", weights_only=True)
    (single / "pytorch_model.bin").unlink()
    names = list(state)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, out_dir / fname)
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return out_dir


@pytest.fixture(scope="module")
def bins(llama_family, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bins")
    return {
        "single": save_as_pytorch_bin(llama_family["ft1"], root / "single"),
        "sharded": save_as_sharded_bin(llama_family["ft1"], root / "sharded"),
    }


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_pickle_input_equals_the_safetensors_original(bins, llama_family, tmp_path, kind):
    src = bins[kind]
    if kind == "sharded":
        assert len(list(src.glob("pytorch_model-*.bin"))) == 3 and not (src / "pytorch_model.bin").exists()
    index = index_model_dir(src)
    assert index.format == "pickle"
    assert len({info.file for info in index.tensors.values()}) == (3 if kind == "sharded" else 1)
    run_merge(f"merge_method: passthrough\nmodels:\n  - model: {src}\n", tmp_path / "out", QUIET)
    a, b = load_tensors(llama_family["ft1"]), load_tensors(tmp_path / "out")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_pickle_input_in_a_linear_merge(bins, llama_family, tmp_path):
    cfg = f"""
merge_method: linear
models:
  - model: {bins["sharded"]}
    parameters: {{weight: 0.25}}
  - model: {llama_family["ft2"]}
    parameters: {{weight: 0.75}}
dtype: float32
"""
    run_merge(cfg, tmp_path / "out", QUIET)
    out, a, b = (load_tensors(p) for p in (tmp_path / "out", llama_family["ft1"], llama_family["ft2"]))
    k = "model.layers.1.mlp.gate_proj.weight"
    torch.testing.assert_close(out[k], 0.25 * a[k] + 0.75 * b[k])


def test_pickles_are_loaded_with_weights_only_and_mmap(bins, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    reader = open_model(bins["sharded"])
    t = reader.read("model.layers.0.self_attn.q_proj.weight", rows=3)
    assert t.shape[0] == 3
    reader.close()
    assert calls and all(c.get("weights_only") is True and c.get("mmap") is True for c in calls)


def test_reads_do_not_change_the_shared_state(bins):
    """Pickled tensors are views of one mmap'd state: a reader hands them out as they are stored."""
    reader = open_model(bins["single"])
    name = "model.layers.0.self_attn.q_proj.weight"
    first = reader.read(name).clone()
    assert torch.equal(reader.read(name, 4), first[:4])
    assert torch.equal(reader.read(name), first)
    reader.close()


# ------------------------------------------------------------------------------------- unsafe pickles


class _Evil:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_evil(path: Path, marker: Path, how: str) -> None:
    payload = {"model.embed_tokens.weight": torch.zeros(2, 2), "x": _Evil(marker)}
    if how == "zip":
        torch.save(payload, path)
    elif how == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, not written by torch at all
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["zip", "legacy", "raw"])
def test_code_executing_pickle_is_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "pytorch_model.bin"
    write_evil(bad, marker, how)
    with pytest.raises(ModelError) as err:
        load_pickle_state(bad)
    msg = str(err.value)
    assert msg.startswith(f"refusing to load {bad}: ")
    if how != "raw":  # a protocol-4 bare pickle is refused earlier, at an opcode torch does not accept
        assert "would import and call posix.system" in msg or "would import and call os.system" in msg
    assert not marker.exists()


def test_unsafe_pickle_through_the_cli_exits_2(llama_family, tmp_path):
    model = save_as_pytorch_bin(llama_family["base"], tmp_path / "evil-model")
    marker = tmp_path / "PWNED"
    write_evil(model / "pytorch_model.bin", marker, "zip")
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: passthrough\nmodels:\n  - model: {model}\n")
    result = CliRunner().invoke(cli, ["yaml", str(cfg), str(tmp_path / "out")], prog_name="mergesmith")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"refusing to load {model / 'pytorch_model.bin'}" in result.stderr
    assert "weights_only" in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unsafe_shard_of_a_sharded_pickle(bins, tmp_path):
    import shutil

    src = shutil.copytree(bins["sharded"], tmp_path / "m")
    marker = tmp_path / "PWNED"
    shard = src / "pytorch_model-00002-of-00003.bin"
    write_evil(shard, marker, "zip")
    with pytest.raises(ModelError, match=f"refusing to load {shard}"):
        index_model_dir(src)
    assert not marker.exists()


def test_pickle_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(2), "step": 3}, path)
    with pytest.raises(ModelError, match="does not hold a plain dictionary of tensors"):
        load_pickle_state(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ModelError, match=f"refusing to load {path}: it is not a plain PyTorch checkpoint"):
        load_pickle_state(path)
