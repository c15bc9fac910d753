"""End to end on real files: ties / dare / della / linear merges with the fused CPU kernels write the same
bytes as the torch definition (slerp: the same up to a rounding step in a few entries, its kernel sums in
float64), and the result loads in transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge
from mergesmith.testing.tiny_models import make_finetune, make_model

pytest.importorskip("numba")


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A bfloat16 Llama with tensors large enough (>= 65536 entries) for the fused kernels."""
    root = tmp_path_factory.mktemp("wide")
    base = make_model("llama", root / "base", hidden=256, num_layers=2, dtype="bfloat16", seed=3)
    return base, make_finetune(base, root / "ft1", seed=1), make_finetune(base, root / "ft2", seed=2)


def config(method: str, base: Path, a: Path, b: Path) -> dict:
    if method == "slerp":
        return {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(a)}],
            "parameters": {"t": [0.2, 0.7]},
            "dtype": "bfloat16",
        }
    if method == "linear":
        return {
            "merge_method": "linear",
            "models": [
                {"model": str(m), "parameters": {"weight": w}} for m, w in ((base, 0.3), (a, 0.5), (b, -0.1))
            ],
            "dtype": "bfloat16",
        }
    extra = {"epsilon": 0.1} if method == "della" else {}
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 0.6, "density": 0.5, **extra}},
            {"model": str(b), "parameters": {"weight": 0.4, "density": 0.7, **extra}},
        ],
        "dtype": "bfloat16",
    }


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "slerp", "linear"])
def test_fused_kernels_write_the_same_files(wide_models, tmp_path, monkeypatch, method) -> None:
    from mergesmith.methods import numba_kernels

    used = []
    kernel = {"slerp": "lerp_into", "linear": "weighted_sum", "della": "della_mask"}.get(
        method, "combine_fused"
    )
    real_kernel = getattr(numba_kernels, kernel)
    monkeypatch.setattr(numba_kernels, kernel, lambda *a: used.append(True) or real_kernel(*a))
    opts = MergeOptions(quiet=True, random_seed=11)
    monkeypatch.setenv("MERGESMITH_KERNELS", "torch")
    run_merge(config(method, *wide_models), tmp_path / "torch", opts)
    assert not any(x is not None for x in used)
    monkeypatch.setenv("MERGESMITH_KERNELS", "")
    run_merge(config(method, *wide_models), tmp_path / "fused", opts)
    assert any(x is not None for x in used), "no tensor took the fused path"
    shards = sorted(p.name for p in (tmp_path / "torch").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "fused").glob("*.safetensors"))
    if method != "slerp":
        for name in shards:
            assert (tmp_path / "torch" / name).read_bytes() == (tmp_path / "fused" / name).read_bytes()
    else:
        slow, fast = load_tensors(tmp_path / "torch"), load_tensors(tmp_path / "fused")
        x, y = load_tensors(wide_models[0]), load_tensors(wide_models[1])
        assert slow.keys() == fast.keys()
        for k, a in slow.items():
            a, b = a.float(), fast[k].float()
            # one bfloat16 step, or the float32 rounding of the inputs' terms where they cancel
            bound = 2**-7 * torch.maximum(a.abs(), b.abs()) + 2**-21 * (
                x[k].float().abs() + y[k].float().abs()
            )
            assert ((a - b).abs() <= bound).all(), k
            assert (a != b).float().mean() < 0.01, k

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("method", ["dare_ties", "linear"])
def test_kernels_write_into_the_shards_only_when_they_use_every_core(
    wide_models, tmp_path, monkeypatch, method
):
    """Whole-tensor kernels (every core) compute into regions mapped on the shard files; an elementwise
    merge, which leaves a core to the reader and writer, lets the writer copy its results instead."""
    import os

    from mergesmith.io.write import ShardWriter

    if (os.cpu_count() or 1) < 2:
        pytest.skip("with one core every kernel uses every core")
    claims = []
    real = ShardWriter.claim

    def spy(self, name, start_row, nbytes):
        place = real(self, name, start_row, nbytes)
        claims.append(place is not None)
        return place

    monkeypatch.setattr(ShardWriter, "claim", spy)
    run_merge(config(method, *wide_models), tmp_path / "out", MergeOptions(quiet=True, random_seed=3))
    if method == "linear":
        assert claims == []
        return
    from mergesmith._util import reserve_file_space

    with open(tmp_path / "probe", "wb") as fh:
        maps = reserve_file_space(
            fh.fileno(), 1 << 16
        )  # regions are mapped only where blocks can be reserved
    assert claims and all(c == maps for c in claims)
