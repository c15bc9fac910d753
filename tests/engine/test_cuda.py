"""The CUDA path: same tensors as the CPU merge. Skipped where no CUDA device exists (CI never has one)."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import load_tensors

from mergesmith import MergeOptions, run_merge

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "dare_ties"])
def test_cuda_merge_matches_cpu(llama_family, tmp_path, method):
    base, a, b = llama_family["base"], llama_family["ft1"], llama_family["ft2"]
    if method == "slerp":
        cfg = f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\nparameters: {{t: 0.3}}\n"
    else:
        cfg = (
            f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
            f"  - model: {a}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.4, density: 0.5}}\n"
        )
    run_merge(cfg, tmp_path / "cpu", MergeOptions(quiet=True, random_seed=3))
    run_merge(cfg, tmp_path / "gpu", MergeOptions(quiet=True, random_seed=3, cuda=True))
    cpu, gpu = load_tensors(tmp_path / "cpu"), load_tensors(tmp_path / "gpu")
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-6)
