"""LoRA adapters as inputs (`base+adapter`): applied tensor by tensor, checked against peft's own
merge_and_unload, from local directories and the hub cache, with --lora-merge-cache, and broken ones."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tests.conftest import load_tensors
from tests.models.test_resolve import fake_hub_cache

from mergesmith import MergeOptions, run_merge
from mergesmith.api import plan_merge
from mergesmith.cli.main import cli
from mergesmith.errors import ModelError, PlanError
from mergesmith.io.lora import bind_adapter, read_adapter_config
from mergesmith.io.read import open_model

peft = pytest.importorskip("peft")

QUIET = MergeOptions(quiet=True)
TARGETS = ["q_proj", "v_proj", "down_proj"]
TARGETS_FULL = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


@pytest.fixture(autouse=True)
def restore_log_level():
    logger = logging.getLogger("mergesmith")
    level = logger.level
    yield
    logger.setLevel(level)


def make_adapter(base: Path, out: Path, *, seed: int = 0, safe: bool = True, **config) -> Path:
    """Save a peft LoRA adapter for `base` whose A and B are random (non-zero), as training would leave."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
        peft_model.save_pretrained(out, safe_serialization=safe)
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What peft itself produces: the base with the adapter merged (merge_and_unload), float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def passthrough(ref: str) -> str:
    return f"merge_method: passthrough\nmodels:\n  - model: {ref}\ndtype: float32\n"


def assert_matches_peft(out_dir: Path, base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    out, ref, orig = load_tensors(out_dir), peft_merged(base, adapter), load_tensors(base)
    assert set(out) == set(orig)
    changed = [k for k in out if not torch.equal(out[k], orig[k])]
    assert changed, "the adapter changed nothing"
    for k in out:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    return out


@pytest.fixture(scope="session")
def llama_adapter(llama_family, models_dir) -> Path:
    return make_adapter(
        llama_family["base"], models_dir / "llama-lora", r=4, lora_alpha=8, target_modules=TARGETS
    )


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), prog_name="mergesmith")


# ------------------------------------------------------------------------------------- matches peft


def test_passthrough_equals_peft_merge_and_unload(llama_family, llama_adapter, tmp_path):
    base = llama_family["base"]
    result = run_merge(passthrough(f"{base}+{llama_adapter}"), tmp_path / "out", QUIET)
    out = assert_matches_peft(tmp_path / "out", base, llama_adapter)
    changed = {k for k in out if not torch.equal(out[k], load_tensors(base)[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(4) for m in TARGETS_FULL}
    assert result.plan.models[0].lora == llama_adapter
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- {base}+{llama_adapter}" in card


def test_rslora_with_rank_and_alpha_patterns(llama_family, tmp_path):
    base = llama_family["base"]
    adapter = make_adapter(
        base,
        tmp_path / "rslora",
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=TARGETS,
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 32},
    )
    cfg = read_adapter_config(adapter)
    assert cfg.use_rslora and cfg.scaling("model.layers.0.self_attn.v_proj", 4) == 32 / 2
    run_merge(passthrough(f"{base}+{adapter}"), tmp_path / "out", QUIET)
    assert_matches_peft(tmp_path / "out", base, adapter)


def test_fan_in_fan_out_conv1d_gpt2(arch_models, tmp_path):
    base = arch_models["gpt2"]
    # c_attn and c_proj are Conv1D (weights stored in x out); lm_head is an nn.Linear in the same adapter.
    adapter = make_adapter(
        base,
        tmp_path / "gpt2-lora",
        r=4,
        lora_alpha=16,
        fan_in_fan_out=True,
        target_modules=["c_attn", "c_fc"],
    )
    assert read_adapter_config(adapter).fan_in_fan_out
    run_merge(passthrough(f"{base}+{adapter}"), tmp_path / "out", QUIET)
    out = assert_matches_peft(tmp_path / "out", base, adapter)
    assert out["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)


@pytest.mark.parametrize(
    "extra",
    [
        # embedding LoRA, a full lm_head and trained biases (lora_only) stored by the adapter
        {
            "target_modules": ["q_proj", "k_proj", "embed_tokens"],
            "modules_to_save": ["lm_head"],
            "bias": "lora_only",
        },
        # lora_bias: lora_B has a bias that adds (scaled) to the layer's bias
        {"target_modules": ["q_proj", "k_proj"], "lora_bias": True},
    ],
    ids=["embedding-modules_to_save-bias", "lora_bias"],
)
def test_embedding_lora_modules_to_save_and_biases(arch_models, tmp_path, extra):
    from safetensors import safe_open

    base = arch_models["qwen2"]  # q/k/v projections have biases
    adapter = make_adapter(base, tmp_path / "qwen-lora", r=4, lora_alpha=4, **extra)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    if "bias" in extra:
        assert any("lora_embedding_A" in k for k in keys) and "base_model.model.lm_head.weight" in keys
        # As training would leave them: the stored full tensors differ from the base's.
        from safetensors.torch import load_file, save_file

        sd = load_file(str(adapter / "adapter_model.safetensors"))
        for k in (
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias",
            "base_model.model.lm_head.weight",
        ):
            sd[k] = sd[k] + 0.25
        save_file(sd, str(adapter / "adapter_model.safetensors"))
    else:
        assert any(k.endswith("lora_B.bias") for k in keys)
    run_merge(passthrough(f"{base}+{adapter}"), tmp_path / "out", QUIET)
    assert_matches_peft(tmp_path / "out", base, adapter)


def test_adapter_model_bin_and_pickle_base(llama_family, models_dir, tmp_path):
    from mergesmith.testing.tiny_models import save_as_pytorch_bin

    base = llama_family["base"]
    adapter = make_adapter(base, tmp_path / "bin-lora", safe=False, r=4, lora_alpha=8, target_modules=TARGETS)
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    run_merge(passthrough(f"{base}+{adapter}"), tmp_path / "out", QUIET)
    assert_matches_peft(tmp_path / "out", base, adapter)
    # A pickle base: its tensors are shared (mmap) and must not be changed in place by the update.
    pbase = save_as_pytorch_bin(base, tmp_path / "pbase")
    run_merge(passthrough(f"{pbase}+{adapter}"), tmp_path / "out2", QUIET)
    a, b = load_tensors(tmp_path / "out"), load_tensors(tmp_path / "out2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_base_keeps_its_dtype(models_dir, tmp_path):
    from mergesmith.testing.tiny_models import make_model

    base = make_model("llama", tmp_path / "bf16", seed=3, dtype="bfloat16")
    adapter = make_adapter(base, tmp_path / "bf16-lora", r=4, lora_alpha=8, target_modules=TARGETS)
    run_merge(f"merge_method: passthrough\nmodels:\n  - model: {base}+{adapter}\n", tmp_path / "out", QUIET)
    out, ref = load_tensors(tmp_path / "out"), peft_merged(base, adapter)  # peft on a float32 copy
    k = "model.layers.1.self_attn.q_proj.weight"
    assert out[k].dtype == torch.bfloat16
    # One rounding of the float32 result, exactly as computing in float32 and casting would give.
    assert torch.equal(out[k], ref[k].to(torch.bfloat16))


def test_reader_rows_and_ranges(llama_family, llama_adapter, arch_models, tmp_path):
    base = llama_family["base"]
    reader = open_model(base, llama_adapter)
    full = reader.read("model.layers.0.mlp.down_proj.weight")
    torch.testing.assert_close(reader.read("model.layers.0.mlp.down_proj.weight", 5), full[:5])
    torch.testing.assert_close(reader.read_range("model.layers.0.mlp.down_proj.weight", 7, 40), full[7:40])
    plain = reader.read_range("model.norm.weight", 3, 9)
    assert torch.equal(plain, load_tensors(base)["model.norm.weight"][3:9])
    reader.close()
    gpt2 = arch_models["gpt2"]
    adapter = make_adapter(
        gpt2, tmp_path / "g", r=2, lora_alpha=2, fan_in_fan_out=True, target_modules=["c_attn"]
    )
    reader = open_model(gpt2, adapter)
    full = reader.read("transformer.h.1.attn.c_attn.weight")
    torch.testing.assert_close(reader.read_range("transformer.h.1.attn.c_attn.weight", 10, 30), full[10:30])
    reader.close()


# --------------------------------------------------------------------------------------- in merges


def test_linear_merge_with_another_model(llama_family, llama_adapter, tmp_path):
    base, ft = llama_family["base"], llama_family["ft1"]
    cfg = f"""
merge_method: linear
models:
  - model: {base}+{llama_adapter}
    parameters: {{weight: 0.7}}
  - model: {ft}
    parameters: {{weight: 0.3}}
dtype: float32
"""
    run_merge(cfg, tmp_path / "out", QUIET)
    out, merged, other = load_tensors(tmp_path / "out"), peft_merged(base, llama_adapter), load_tensors(ft)
    for k in ("model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"):
        torch.testing.assert_close(out[k], 0.7 * merged[k] + 0.3 * other[k], rtol=1e-5, atol=1e-6)


def test_row_range_reads_under_a_memory_budget(llama_family, llama_adapter, tmp_path):
    """With --max-memory the executor reads elementwise merges in row ranges: the adapter applies per range."""
    base, ft = llama_family["base"], llama_family["ft1"]
    cfg = f"""
merge_method: linear
models:
  - model: {base}+{llama_adapter}
    parameters: {{weight: 0.5}}
  - model: {ft}
    parameters: {{weight: 0.5}}
dtype: float32
"""
    run_merge(cfg, tmp_path / "whole", QUIET)
    run_merge(cfg, tmp_path / "ranged", MergeOptions(quiet=True, max_memory=80_000))
    a, b = load_tensors(tmp_path / "whole"), load_tensors(tmp_path / "ranged")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def test_same_base_with_and_without_adapter(llama_family, llama_adapter, tmp_path):
    base = llama_family["base"]
    cfg = f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {base}+{llama_adapter}
    parameters: {{weight: 0.5}}
dtype: float32
"""
    run_merge(cfg, tmp_path / "out", QUIET)
    out, merged, orig = load_tensors(tmp_path / "out"), peft_merged(base, llama_adapter), load_tensors(base)
    k = "model.layers.3.self_attn.v_proj.weight"
    torch.testing.assert_close(out[k], orig[k] + 0.5 * (merged[k] - orig[k]), rtol=1e-5, atol=1e-6)


def test_dry_run_names_the_adapter(llama_family, llama_adapter, tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(passthrough(f"{llama_family['base']}+{llama_adapter}"))
    result = invoke(
        "yaml", str(cfg), str(tmp_path / "out"), "--dry-run", "--lora-merge-cache", str(tmp_path / "c")
    )
    assert result.exit_code == 0, result.output
    assert f"{llama_family['base']}+{llama_adapter}" in result.stdout
    assert f"adapter {llama_adapter}" in result.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()  # dry runs read no tensor data


def test_adapters_from_the_hub_cache(llama_family, llama_adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "acme/tiny-llama", llama_family["base"])
    fake_hub_cache(cache, "acme/tiny-lora", llama_adapter, revision_name="v1", commit="c" * 40)
    opts = MergeOptions(quiet=True, transformers_cache=str(cache))
    run_merge(passthrough("acme/tiny-llama+acme/tiny-lora@v1"), tmp_path / "out", opts)
    assert_matches_peft(tmp_path / "out", llama_family["base"], llama_adapter)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- acme/tiny-llama+acme/tiny-lora@v1" in card
    # A local base with a hub adapter, and the mapping form.
    cfg = f"""
merge_method: passthrough
models:
  - model:
      model: {{path: {llama_family["base"]}}}
      lora: {{path: acme/tiny-lora, revision: v1}}
dtype: float32
"""
    run_merge(cfg, tmp_path / "out2", opts)
    a, b = load_tensors(tmp_path / "out"), load_tensors(tmp_path / "out2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PlanError, match=r"LoRA adapter acme/tiny-lora@v2: not a local directory"):
        plan_merge(passthrough("acme/tiny-llama+acme/tiny-lora@v2"), opts)


# ---------------------------------------------------------------------------------- --lora-merge-cache


def test_lora_merge_cache_is_written_then_reused(llama_family, llama_adapter, tmp_path, monkeypatch):
    import mergesmith.io.lora as lora_mod

    base, cache = llama_family["base"], tmp_path / "lora-cache"
    cfg = tmp_path / "c.yml"
    cfg.write_text(passthrough(f"{base}+{llama_adapter}"))
    result = invoke("yaml", str(cfg), str(tmp_path / "out1"), "-q", "--lora-merge-cache", str(cache))
    assert result.exit_code == 0, result.output
    entries = [p for p in cache.iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    entry = entries[0]
    assert (entry / "config.json").is_file() and (entry / "model.safetensors.index.json").is_file()
    assert (entry / "tokenizer.json").is_file()
    assert_matches_peft(entry, base, llama_adapter)  # the entry is a normal model directory
    assert_matches_peft(tmp_path / "out1", base, llama_adapter)

    def boom(*args, **kwargs):
        raise AssertionError("the cached merge should have been reused")

    monkeypatch.setattr(lora_mod, "_build_merged_copy", boom)
    plan = plan_merge(cfg, MergeOptions(lora_merge_cache=str(cache)))
    assert plan.models[0].path == entry and plan.models[0].lora is None
    result = invoke("yaml", str(cfg), str(tmp_path / "out2"), "-q", "--lora-merge-cache", str(cache))
    assert result.exit_code == 0, result.output
    a, b = load_tensors(tmp_path / "out1"), load_tensors(tmp_path / "out2")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A changed adapter file gives a new key: the stale entry is not used.
    monkeypatch.undo()
    copy = shutil.copytree(llama_adapter, tmp_path / "adapter-copy")
    plan1 = plan_merge(passthrough(f"{base}+{copy}"), MergeOptions(lora_merge_cache=str(cache)))
    st = os.stat(copy / "adapter_model.safetensors")
    os.utime(copy / "adapter_model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    plan2 = plan_merge(passthrough(f"{base}+{copy}"), MergeOptions(lora_merge_cache=str(cache)))
    assert plan1.models[0].path != plan2.models[0].path
    assert len([p for p in cache.iterdir()]) == 3


def test_failed_cache_build_leaves_no_entry(llama_family, llama_adapter, tmp_path, monkeypatch):
    import mergesmith.io.lora as lora_mod

    cache = tmp_path / "cache"

    def fail(base, adapter, out):
        (out / "partial.safetensors").write_bytes(b"x")
        raise ModelError("disk on fire")

    monkeypatch.setattr(lora_mod, "_build_merged_copy", fail)
    with pytest.raises(PlanError, match="disk on fire"):
        plan_merge(
            passthrough(f"{llama_family['base']}+{llama_adapter}"), MergeOptions(lora_merge_cache=str(cache))
        )
    assert list(cache.iterdir()) == []


# --------------------------------------------------------------------------------------- broken adapters


def run_cli_merge(tmp_path: Path, ref: str):
    cfg = tmp_path / "c.yml"
    cfg.write_text(passthrough(ref))
    result = invoke("yaml", str(cfg), str(tmp_path / "out"), "-q")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    return result.stderr


def test_missing_adapter_config_is_a_clear_error(llama_family, llama_adapter, tmp_path):
    broken = shutil.copytree(llama_adapter, tmp_path / "no-config")
    (broken / "adapter_config.json").unlink()
    err = run_cli_merge(tmp_path, f"{llama_family['base']}+{broken}")
    assert f"{broken / 'adapter_config.json'} is missing" in err and "not a PEFT adapter directory" in err


def test_missing_adapter_weights_and_directory(llama_family, llama_adapter, tmp_path):
    broken = shutil.copytree(llama_adapter, tmp_path / "no-weights")
    (broken / "adapter_model.safetensors").unlink()
    err = run_cli_merge(tmp_path, f"{llama_family['base']}+{broken}")
    assert "no adapter weights found (expected adapter_model.safetensors or adapter_model.bin)" in err
    err = run_cli_merge(tmp_path, f"{llama_family['base']}+{tmp_path / 'nowhere'}")
    assert f"LoRA adapter {tmp_path / 'nowhere'}: directory {tmp_path / 'nowhere'} does not exist" in err


def test_dora_is_refused(llama_family, tmp_path):
    adapter = make_adapter(
        llama_family["base"], tmp_path / "dora", r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True
    )
    err = run_cli_merge(tmp_path, f"{llama_family['base']}+{adapter}")
    assert str(adapter / "adapter_config.json") in err and "DoRA" in err
    # Magnitude vectors give the same answer when the config does not say use_dora.
    raw = json.loads((adapter / "adapter_config.json").read_text())
    raw["use_dora"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="DoRA magnitude vectors"):
        open_model(llama_family["base"], adapter)


def test_other_peft_types_are_refused(llama_family, llama_adapter, tmp_path):
    other = shutil.copytree(llama_adapter, tmp_path / "ia3")
    raw = json.loads((other / "adapter_config.json").read_text())
    raw["peft_type"] = "IA3"
    (other / "adapter_config.json").write_text(json.dumps(raw))
    err = run_cli_merge(tmp_path, f"{llama_family['base']}+{other}")
    assert "peft_type 'IA3'" in err and str(other / "adapter_config.json") in err


def test_adapter_for_another_base_lists_the_mismatches(arch_models, llama_adapter, tmp_path):
    # A llama adapter on a mistral of the same sizes fits; on a wider model the shapes do not.
    from mergesmith.testing.tiny_models import make_model

    wide = make_model("llama", tmp_path / "wide", seed=1, hidden=96)
    err = run_cli_merge(tmp_path, f"{wide}+{llama_adapter}")
    assert "does not fit the base model" in err
    assert "module model.layers.0.self_attn.q_proj: the adapter's update has shape [64, 64]" in err
    assert "q_proj.weight has [96, 96]" in err and "(12 problems; was it trained on this base?)" in err
    err = run_cli_merge(tmp_path, f"{arch_models['gpt2']}+{llama_adapter}")
    assert "targets model.layers.0.self_attn.q_proj.weight, which the base model does not have" in err


def test_bind_reports_every_problem(llama_family, llama_adapter, tmp_path):
    from mergesmith.io.index import index_model_dir

    broken = shutil.copytree(llama_adapter, tmp_path / "half")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(broken / "adapter_model.safetensors"))
    del sd["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    sd["base_model.model.model.layers.0.mlp.gate_proj.lora_C.weight"] = torch.zeros(2, 2)
    save_file(sd, str(broken / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="does not know how to apply: .*lora_C"):
        bind_adapter(broken, index_model_dir(llama_family["base"]))
    del sd["base_model.model.model.layers.0.mlp.gate_proj.lora_C.weight"]
    save_file(sd, str(broken / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="module model.layers.1.self_attn.q_proj has no lora_B tensor"):
        bind_adapter(broken, index_model_dir(llama_family["base"]))


def test_adapter_name_segments_are_accepted(llama_family, llama_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    named = shutil.copytree(llama_adapter, tmp_path / "named")
    sd = load_file(str(named / "adapter_model.safetensors"))
    sd = {
        k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
        for k, v in sd.items()
    }
    save_file(sd, str(named / "adapter_model.safetensors"))
    run_merge(passthrough(f"{llama_family['base']}+{named}"), tmp_path / "out", QUIET)
    assert_matches_peft(tmp_path / "out", llama_family["base"], llama_adapter)


def test_mergesmith_never_imports_peft():
    import ast

    src = Path(__file__).resolve().parents[2] / "src" / "mergesmith"
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "peft" for n in names), path
