"""Session fixtures: tiny random models built once per test session, plus helpers to read outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama_family(models_dir: Path) -> dict[str, Path]:
    """A tiny Llama base and three fine-tunes of it (base + noise), float32, 4 layers."""
    from mergesmith.testing.tiny_models import make_finetune, make_model

    base = make_model("llama", models_dir / "llama-base", seed=0)
    out = {"base": base}
    for i in (1, 2, 3):
        out[f"ft{i}"] = make_finetune(base, models_dir / f"llama-ft{i}", seed=i, noise=0.02)
    return out


@pytest.fixture(scope="session")
def arch_models(models_dir: Path) -> dict[str, Path]:
    """One tiny model per supported architecture, plus a fine-tune of each (for merges)."""
    from mergesmith.testing.tiny_models import ARCHITECTURES, make_finetune, make_model

    out: dict[str, Path] = {}
    for arch in ARCHITECTURES:
        base = make_model(arch, models_dir / f"{arch}-base", seed=0)
        out[arch] = base
        out[f"{arch}-ft"] = make_finetune(base, models_dir / f"{arch}-ft", seed=7, noise=0.02)
    return out


def load_tensors(model_dir: Path) -> dict:
    """Every tensor of a safetensors model directory, by name."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def tensors_of():
    return load_tensors
