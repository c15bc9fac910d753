"""End to end: real config -> real model files -> merged directory, checked against plain formulas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge

QUIET = MergeOptions(quiet=True)


def yaml_models(method: str, entries: list[tuple[Path, dict]], **top) -> str:
    lines = [f"merge_method: {method}", "models:"]
    for path, params in entries:
        lines.append(f"  - model: {path}")
        if params:
            lines.append(f"    parameters: {json.dumps(params)}")
    for k, v in top.items():
        lines.append(f"{k}: {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def test_linear_matches_weighted_average(llama_family, tmp_path):
    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = yaml_models("linear", [(a, {"weight": 0.7}), (b, {"weight": 0.1})])
    run_merge(cfg, tmp_path / "out", QUIET)
    out, ta, tb = load_tensors(tmp_path / "out"), load_tensors(a), load_tensors(b)
    assert set(out) == set(ta)
    for k in out:
        expected = (0.7 * ta[k] + 0.1 * tb[k]) / 0.8
        torch.testing.assert_close(out[k], expected, rtol=1e-5, atol=1e-6)


def test_linear_without_normalize_and_one_model_is_identity(llama_family, tmp_path):
    a = llama_family["ft1"]
    run_merge(yaml_models("linear", [(a, {"weight": 1.0})]), tmp_path / "one", QUIET)
    ta = load_tensors(a)
    for k, v in load_tensors(tmp_path / "one").items():
        assert torch.equal(v, ta[k])
    b = llama_family["ft2"]
    cfg = yaml_models(
        "linear", [(a, {"weight": 0.5}), (b, {"weight": 0.25})], parameters={"normalize": False}
    )
    run_merge(cfg, tmp_path / "raw", QUIET)
    tb = load_tensors(b)
    for k, v in load_tensors(tmp_path / "raw").items():
        torch.testing.assert_close(v, 0.5 * ta[k] + 0.25 * tb[k], rtol=1e-5, atol=1e-6)


def plain_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a64, b64 = a.double(), b.double()
    dot = float((a64 / a64.norm() * (b64 / b64.norm())).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * a64 + t * b64
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)


def test_slerp_gradient_and_filters(llama_family, tmp_path):
    base, ft = llama_family["base"], llama_family["ft3"]
    cfg = f"""
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {ft}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""
    run_merge(cfg, tmp_path / "out", QUIET)
    out, ta, tb = load_tensors(tmp_path / "out"), load_tensors(base), load_tensors(ft)

    def grad(values: list[float], layer: int) -> float:
        pos = layer / 3 * (len(values) - 1)
        i0 = int(pos)
        i1 = min(i0 + 1, len(values) - 1)
        return values[i0] + (values[i1] - values[i0]) * (pos - i0)

    for k, v in out.items():
        if ".layers." in k:
            layer = int(k.split(".")[2])
            if "self_attn" in k:
                t = grad([0, 0.5, 0.3, 0.7, 1], layer)
            elif "mlp" in k:
                t = grad([1, 0.5, 0.7, 0.3, 0], layer)
            else:
                t = 0.5
        else:
            t = 0.5
        torch.testing.assert_close(v.double(), plain_slerp(t, ta[k], tb[k]), rtol=1e-4, atol=1e-6)
    # endpoints: layer 0 attention is pure base, layer 3 attention pure fine-tune
    assert torch.allclose(
        out["model.layers.0.self_attn.q_proj.weight"], ta["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.allclose(
        out["model.layers.3.self_attn.q_proj.weight"], tb["model.layers.3.self_attn.q_proj.weight"]
    )


def test_task_arithmetic_formula_and_precedence(llama_family, tmp_path):
    base, a, b = llama_family["base"], llama_family["ft1"], llama_family["ft2"]
    cfg = f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters:
      weight: 0.3
  - model: {b}
    parameters:
      weight:
        - filter: mlp
          value: 0.9
        - value: 0.2
parameters:
  weight: 5.0
  lambda: 1.5
dtype: float32
"""
    run_merge(cfg, tmp_path / "out", QUIET)
    out, t0, ta, tb = (load_tensors(p) for p in (tmp_path / "out", base, a, b))
    for k, v in out.items():
        wb = 0.9 if "mlp" in k else 0.2
        expected = t0[k] + 1.5 * (0.3 * (ta[k] - t0[k]) + wb * (tb[k] - t0[k]))
        torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-6)


def test_slice_parameters_override_model_and_top_level(llama_family, tmp_path):
    """Precedence: slices.*.sources.parameters > slices.*.parameters > top-level parameters."""
    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = f"""
merge_method: linear
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
        parameters: {{weight: 3.0}}
      - model: {b}
        layer_range: [0, 2]
    parameters: {{weight: 1.0}}
  - sources:
      - model: {a}
        layer_range: [2, 4]
      - model: {b}
        layer_range: [2, 4]
parameters:
  weight: 0.0
  normalize: false
"""
    run_merge(cfg, tmp_path / "out", QUIET)
    out, ta, tb = (load_tensors(p) for p in (tmp_path / "out", a, b))
    k0 = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(out[k0], 3.0 * ta[k0] + 1.0 * tb[k0])
    k1 = "model.layers.3.mlp.up_proj.weight"
    torch.testing.assert_close(out[k1], torch.zeros_like(ta[k1]))


def test_passthrough_frankenmerge_stacks_and_duplicates_layers(llama_family, tmp_path):
    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = f"""
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
merge_method: passthrough
dtype: float32
"""
    run_merge(cfg, tmp_path / "out", QUIET)
    out, ta, tb = (load_tensors(p) for p in (tmp_path / "out", a, b))
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["num_hidden_layers"] == 6
    for i in range(3):
        k = f"model.layers.{i}.mlp.down_proj.weight"
        assert torch.equal(out[k], ta[k])
    for j, src in zip(range(3, 6), range(1, 4)):
        assert torch.equal(
            out[f"model.layers.{j}.mlp.down_proj.weight"], tb[f"model.layers.{src}.mlp.down_proj.weight"]
        )
        o = out[f"model.layers.{j}.self_attn.o_proj.weight"]
        assert torch.equal(o, tb[f"model.layers.{src}.self_attn.o_proj.weight"] * 0.5)
    assert torch.equal(out["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], tb["model.norm.weight"])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 6
    logits = model(torch.tensor([[1, 5, 9, 11]])).logits
    assert torch.isfinite(logits).all()


def test_dtype_and_out_dtype(llama_family, tmp_path):
    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = yaml_models(
        "linear", [(a, {"weight": 1}), (b, {"weight": 1})], dtype="bfloat16", out_dtype="float16"
    )
    run_merge(cfg, tmp_path / "out", QUIET)
    out, ta, tb = (load_tensors(p) for p in (tmp_path / "out", a, b))
    k = "model.layers.0.mlp.up_proj.weight"
    assert out[k].dtype == torch.float16
    expected = ((ta[k].bfloat16().float() + tb[k].bfloat16().float()) / 2).bfloat16().half()
    torch.testing.assert_close(out[k], expected)
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["dtype"] == "float16"


def test_sharded_output_and_side_files(llama_family, tmp_path):
    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = yaml_models("linear", [(a, {"weight": 1}), (b, {"weight": 1})])
    run_merge(cfg, tmp_path / "out", MergeOptions(quiet=True, out_shard_size="300K"))
    out_dir = tmp_path / "out"
    shards = sorted(out_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    tensors = load_tensors(out_dir)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
    ):
        assert (out_dir / name).is_file(), name
    card = (out_dir / "README.md").read_text()
    assert "merge_method: linear" in card and str(a) in card
    run_merge(cfg, tmp_path / "bare", MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    assert not (tmp_path / "bare" / "README.md").exists()


def test_sharded_input_reads_like_single_file(llama_family, models_dir, tmp_path):
    from mergesmith.testing.tiny_models import make_model

    sharded = make_model("llama", models_dir / "llama-sharded", seed=0, shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    run_merge(yaml_models("passthrough", [(sharded, {})]), tmp_path / "out", QUIET)
    ref = load_tensors(llama_family["base"])
    out = load_tensors(tmp_path / "out")
    assert set(out) == set(ref)
    for k in ref:
        assert torch.equal(out[k], ref[k])


@pytest.mark.parametrize("seed", [0, 1])
def test_random_seed_is_reproducible_for_api(llama_family, tmp_path, seed):
    from mergesmith.methods import registry

    if "dare_linear" not in registry.names():
        pytest.skip("dare_linear not registered")
    base, a = llama_family["base"], llama_family["ft1"]
    cfg = yaml_models("dare_linear", [(a, {"weight": 1.0, "density": 0.5})], base_model=str(base))
    run_merge(cfg, tmp_path / "x", MergeOptions(quiet=True, random_seed=seed))
    run_merge(cfg, tmp_path / "y", MergeOptions(quiet=True, random_seed=seed))
    x, y = load_tensors(tmp_path / "x"), load_tensors(tmp_path / "y")
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_mergeconfig_from_yaml_file_and_text(llama_family, tmp_path):
    from mergesmith import MergeConfig

    text = yaml_models("linear", [(llama_family["ft1"], {"weight": 1.0})])
    path = tmp_path / "c.yml"
    path.write_text(text)
    from_file, from_text = MergeConfig.from_yaml(str(path)), MergeConfig.from_yaml(text)
    assert from_file == from_text and from_file.merge_method == "linear"
    run_merge(from_file, tmp_path / "out", QUIET)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize(
    ("stored", "compute", "skipped"),
    [
        ("bfloat16", "bfloat16", True),
        ("bfloat16", "float32", True),
        ("float32", "float64", True),
        ("bfloat16", "float16", False),  # float16 cannot hold 70000: the cast must happen
        ("float32", "bfloat16", False),
    ],
)
def test_passthrough_skips_casts_only_when_they_are_exact(stored, compute, skipped):
    from mergesmith.engine.execute import _merge
    from mergesmith.plan.types import Source, TensorPlan

    t = torch.tensor([1.0, 70000.0, 1e-3, 3.14159], dtype=getattr(torch, stored))
    tp = TensorPlan("w", "passthrough", (Source(0, "w"),), None, (), ((),), (4,), compute, stored)
    out = _merge(tp, [t], 0, "cpu")
    assert (out is t) == skipped
    expected = t.to(getattr(torch, compute)).to(getattr(torch, stored))
    assert torch.equal(out, expected)
