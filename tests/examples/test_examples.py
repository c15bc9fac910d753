"""Every shipped example config runs unchanged on tiny models laid out as the examples expect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mergesmith import MergeOptions, run_merge
from mergesmith.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yml"))


@pytest.fixture(scope="module")
def example_root(tmp_path_factory, llama_family) -> Path:
    """A directory holding ./models/{base,ft-a,ft-b,ft-c} as the example configs name them."""
    root = tmp_path_factory.mktemp("examples")
    for name, src in (("base", "base"), ("ft-a", "ft1"), ("ft-b", "ft2"), ("ft-c", "ft3")):
        shutil.copytree(llama_family[src], root / "models" / name)
    return root


def test_there_are_examples_for_every_method():
    from mergesmith.methods import registry

    methods = {load_config(p).merge_method for p in EXAMPLES}
    assert set(registry.names()) <= methods


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_merges(example_root, example, monkeypatch, tmp_path):
    monkeypatch.chdir(example_root)
    result = run_merge(example, tmp_path / "out", MergeOptions(quiet=True, random_seed=0))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len(result.plan.tensors) > 0
    assert config["num_hidden_layers"] in (4, 6)
