"""Model references resolved through a real Hugging Face cache layout, offline."""

from __future__ import annotations

import shutil

import pytest
import torch
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge
from mergesmith.config.ref import ModelRef
from mergesmith.errors import ModelError
from mergesmith.models.resolve import resolve


def fake_hub_cache(cache, repo: str, src, revision_name: str = "main", commit: str = "a" * 40):
    """Lay out `src` as the hub cache does: models--org--name/{refs/<rev>, snapshots/<commit>/...}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copyfile(f, snap / f.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision_name).write_text(commit)
    return snap


def test_repo_id_resolves_from_cache_offline(llama_family, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = fake_hub_cache(cache, "acme/tiny-llama", llama_family["ft1"])
    fake_hub_cache(cache, "acme/tiny-llama", llama_family["ft2"], revision_name="v2", commit="b" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve(ModelRef.parse("acme/tiny-llama"), str(cache)) == snap
    cfg = """
merge_method: linear
models:
  - model: acme/tiny-llama
    parameters: {weight: 1.0}
  - model: acme/tiny-llama@v2
    parameters: {weight: 1.0}
"""
    run_merge(cfg, tmp_path / "out", MergeOptions(quiet=True, transformers_cache=str(cache)))
    out, a, b = (load_tensors(p) for p in (tmp_path / "out", llama_family["ft1"], llama_family["ft2"]))
    k = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(out[k], (a[k] + b[k]) / 2)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- acme/tiny-llama" in card


def test_missing_repo_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        resolve(ModelRef.parse("nobody/nothing"), str(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        resolve(ModelRef.parse("./no/such/dir"), str(tmp_path))


def test_modules_form_with_decoder_alias(llama_family, tmp_path):
    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = f"""
merge_method: linear
modules:
  text_decoder:
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 4]
            parameters: {{weight: 1.0}}
          - model: {b}
            layer_range: [0, 4]
            parameters: {{weight: 3.0}}
"""
    run_merge(cfg, tmp_path / "out", MergeOptions(quiet=True))
    out, ta, tb = (load_tensors(p) for p in (tmp_path / "out", a, b))
    assert set(out) == set(ta)
    k = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(out[k], (ta[k] + 3 * tb[k]) / 4)
