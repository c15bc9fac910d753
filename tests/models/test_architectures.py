"""Every supported architecture: recognised from names + config.json, copied exactly, merged, and loaded."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge
from mergesmith.io.index import index_model_dir
from mergesmith.models.layout import recognise
from mergesmith.testing.tiny_models import ARCHITECTURES

QUIET = MergeOptions(quiet=True)
PREFIX = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_layout_is_recognised(arch_models, arch):
    path = arch_models[arch]
    index = index_model_dir(path)
    layout = recognise(index.names, json.loads((path / "config.json").read_text()))
    assert layout.main.prefix == PREFIX[arch]
    assert layout.main.num_layers == 4
    assert any("emb" in n or "wte" in n for n in layout.pre)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_passthrough_copy_is_exact(arch_models, tmp_path, arch):
    src = arch_models[arch]
    run_merge(f"merge_method: passthrough\nmodels:\n  - model: {src}\n", tmp_path / "out", QUIET)
    a, b = load_tensors(src), load_tensors(tmp_path / "out")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_merged_model_loads_in_transformers(arch_models, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    base, ft = arch_models[arch], arch_models[f"{arch}-ft"]
    cfg = f"""
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {ft}
parameters:
  t: [0.2, 0.8]
dtype: bfloat16
"""
    run_merge(cfg, tmp_path / "out", QUIET)
    saved_names = set(load_tensors(base))
    out_names = set(load_tensors(tmp_path / "out"))
    # Same tensor set as transformers saves: a tied head gets no extra lm_head.
    assert out_names == saved_names
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(base)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    with torch.no_grad():
        logits = model(torch.tensor([[1, 17, 42, 99, 7]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "qwen2"])
def test_layer_stacking_updates_config(arch_models, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    a, b = arch_models[arch], arch_models[f"{arch}-ft"]
    cfg = f"""
merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
"""
    run_merge(cfg, tmp_path / "out", QUIET)
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    key = next(k for k in ("num_hidden_layers", "n_layer") if k in conf)
    assert conf[key] == 6
    for k, v in conf.items():
        if isinstance(v, list) and k.endswith("layer_types"):
            assert len(v) == 6
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_tied_and_untied_inputs_mix(models_dir, tmp_path):
    """An untied output whose other input ties its head takes that model's embedding as its head."""
    from mergesmith.testing.tiny_models import make_model

    untied = make_model("llama", models_dir / "llama-untied", seed=3, tie_word_embeddings=False)
    tied = make_model("llama", models_dir / "llama-tied", seed=4, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_tensors(tied)
    cfg = f"""
merge_method: linear
base_model: {untied}
models:
  - model: {untied}
    parameters: {{weight: 0.5}}
  - model: {tied}
    parameters: {{weight: 0.5}}
"""
    run_merge(cfg, tmp_path / "out", QUIET)
    out, tu, tt = load_tensors(tmp_path / "out"), load_tensors(untied), load_tensors(tied)
    expected = (tu["lm_head.weight"] + tt["model.embed_tokens.weight"]) / 2
    torch.testing.assert_close(out["lm_head.weight"], expected)


def test_pytorch_bin_input(arch_models, models_dir, tmp_path):
    from mergesmith.testing.tiny_models import save_as_pytorch_bin

    src = save_as_pytorch_bin(arch_models["llama"], models_dir / "llama-bin")
    assert (src / "pytorch_model.bin").is_file()
    run_merge(f"merge_method: passthrough\nmodels:\n  - model: {src}\n", tmp_path / "out", QUIET)
    a, b = load_tensors(arch_models["llama"]), load_tensors(tmp_path / "out")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_vocab_mismatch_truncates_with_warning(models_dir, tmp_path, caplog):
    from mergesmith.testing.tiny_models import make_model

    small = make_model("llama", models_dir / "llama-v512", seed=5)
    big = make_model("llama", models_dir / "llama-v514", seed=6, extra_tokens=("<|im_start|>", "<|im_end|>"))
    cfg = f"""
merge_method: linear
models:
  - model: {big}
    parameters: {{weight: 1.0}}
  - model: {small}
    parameters: {{weight: 1.0}}
"""
    with caplog.at_level("WARNING", logger="mergesmith"):
        run_merge(cfg, tmp_path / "out", QUIET)
    assert any("vocabularies differ" in r.getMessage() for r in caplog.records)
    out, ts, tb = load_tensors(tmp_path / "out"), load_tensors(small), load_tensors(big)
    assert out["model.embed_tokens.weight"].shape[0] == 512
    expected = (ts["model.embed_tokens.weight"] + tb["model.embed_tokens.weight"][:512]) / 2
    torch.testing.assert_close(out["model.embed_tokens.weight"], expected)
    # config.json follows the truncated tensors even though the donor (first model) had 514 tokens
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 512
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    # the tokenizer matches the truncated embeddings: it comes from the 512-token model
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 512
