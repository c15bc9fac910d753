"""Byte-for-byte units: unchanged passthrough tensors and non-float copies move as stored bytes, and a merge
made only of them (a frankenmerge) runs without importing torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge
from mergesmith.api import plan_merge
from mergesmith.engine.execute import plan_units
from mergesmith.errors import PlanError
from mergesmith.io.index import index_model_dir
from mergesmith.io.read import ModelReader


def franken_cfg(a: Path, b: Path, extra: str = "") -> str:
    return f"""
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
{extra}"""


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.suffix == ".safetensors"}


def test_frankenmerge_never_imports_torch_and_copies_exact_bytes(llama_family, tmp_path):
    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = tmp_path / "franken.yml"
    cfg.write_text(franken_cfg(a, b))
    code = textwrap.dedent(f"""
        import sys
        from mergesmith import MergeOptions, run_merge
        run_merge({str(cfg)!r}, {str(tmp_path / "out")!r}, MergeOptions(quiet=True))
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numba")))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    out, ta, tb = (load_tensors(p) for p in (tmp_path / "out", a, b))
    assert len(out) == 2 + 6 * 9 + 1  # embeddings, lm_head, 6 layers of 9 tensors, final norm
    for i in range(3):
        k = f"model.layers.{i}.self_attn.q_proj.weight"
        assert torch.equal(out[k], ta[k])
    for j, src in zip(range(3, 6), range(1, 4)):
        k = f"model.layers.{src}.mlp.up_proj.weight"
        assert torch.equal(out[f"model.layers.{j}.mlp.up_proj.weight"], tb[k])
    # the same merge through torch (a scale of 1.0 forces the compute path) writes the same files
    scaled = franken_cfg(a, b, "parameters: {scale: 1.0}\n")
    run_merge(scaled, tmp_path / "torch", MergeOptions(quiet=True))
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "torch")


def test_dry_run_of_a_computing_method_does_not_import_torch(llama_family, tmp_path):
    a, b = llama_family["ft1"], llama_family["ft2"]
    code = textwrap.dedent(f"""
        import sys
        from mergesmith import MergeOptions, run_merge
        cfg = "merge_method: slerp\\nbase_model: {a}\\nmodels:\\n  - model: {a}\\n  - model: {b}\\n"
        cfg += "parameters: {{t: 0.5}}\\ndtype: bfloat16\\n"
        result = run_merge(cfg, {str(tmp_path / "out")!r}, MergeOptions(dry_run=True))
        print(len(result.plan.tensors), "torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(2 + 4 * 9 + 1), "False"]


def test_raw_row_ranges_equal_whole_tensors(llama_family, tmp_path):
    a, b = llama_family["ft1"], llama_family["ft2"]
    plan = plan_merge(franken_cfg(a, b))
    readers = [ModelReader(index_model_dir(m.path)) for m in plan.models]
    units = plan_units(plan, 10_000, set(), readers)
    assert all(u.raw for u in units) and any(not u.whole for u in units)
    run_merge(franken_cfg(a, b), tmp_path / "whole", MergeOptions(quiet=True))
    run_merge(franken_cfg(a, b), tmp_path / "ranges", MergeOptions(quiet=True, max_memory="80KB"))
    assert shard_bytes(tmp_path / "whole") == shard_bytes(tmp_path / "ranges")


def test_changed_tensors_are_not_raw(llama_family):
    a, b = llama_family["ft1"], llama_family["ft2"]
    for extra in ("parameters: {scale: 0.5}\n", "dtype: bfloat16\n"):  # a scale, or a cast to another dtype
        plan = plan_merge(franken_cfg(a, b, extra))
        readers = [ModelReader(index_model_dir(m.path)) for m in plan.models]
        assert not any(u.raw for u in plan_units(plan, 10**9, set(), readers))


@pytest.fixture
def with_ids(llama_family, tmp_path) -> dict[str, Path]:
    """Two copies of a fine-tune whose file also holds an int64 tensor: equal in one pair, not in the other."""
    out = {}
    for name, ids in (("one", torch.arange(6)), ("same", torch.arange(6)), ("other", torch.arange(6) * 2)):
        d = tmp_path / name
        shutil.copytree(llama_family["ft1"], d)
        (f,) = d.glob("*.safetensors")
        tensors = load_file(str(f))
        tensors["model.token_ids"] = ids
        save_file(tensors, str(f), metadata={"format": "pt"})
        out[name] = d
    return out


def test_non_float_tensors_are_copied_when_the_inputs_agree(with_ids, tmp_path):
    cfg = f"merge_method: linear\nmodels:\n  - model: {with_ids['one']}\n    parameters: {{weight: 1}}\n"
    cfg += f"  - model: {with_ids['same']}\n    parameters: {{weight: 1}}\n"
    run_merge(cfg, tmp_path / "out", MergeOptions(quiet=True))
    assert torch.equal(load_tensors(tmp_path / "out")["model.token_ids"], torch.arange(6))
    with pytest.raises(PlanError, match="non-float tensor 'model.token_ids' differs"):
        run_merge(
            cfg.replace(str(with_ids["same"]), str(with_ids["other"])), tmp_path / "bad", MergeOptions()
        )
    assert not (tmp_path / "bad").exists()


def test_planning_promotes_mixed_dtypes_as_torch_does():
    import itertools

    from mergesmith.plan.build import _promote

    floats = ("float16", "bfloat16", "float32", "float64")
    for n in range(1, 5):
        for dtypes in itertools.combinations(floats, n):
            want = getattr(torch, dtypes[0])
            for d in dtypes[1:]:
                want = torch.promote_types(want, getattr(torch, d))
            assert _promote(set(dtypes)) == str(want).removeprefix("torch."), dtypes
