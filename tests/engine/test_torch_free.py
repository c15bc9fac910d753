"""Merges whose every tensor a fused CPU kernel can take from the stored bytes (linear, slerp, TIES on
bfloat16/float32 safetensors) run without loading torch, and write what the torch code writes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.conftest import load_tensors

pytest.importorskip("numba")

CONFIGS = {
    "linear": "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.4}}\n  - model: {base}\n    parameters: {{weight: -0.1}}\n",
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {a}\n"
    "parameters: {{t: [0.1, 0.8]}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.6, density: 0.4}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
    "parameters: {{lambda: 1.2}}\n",
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_kernel_merges_never_load_torch(llama_family, tmp_path, method):
    cfg = tmp_path / f"{method}.yml"
    cfg.write_text(
        CONFIGS[method].format(base=llama_family["base"], a=llama_family["ft1"], b=llama_family["ft2"])
    )
    code = textwrap.dedent("""
        import sys
        from mergesmith import MergeOptions, run_merge
        run_merge(sys.argv[1], sys.argv[2], MergeOptions(quiet=True))
        print("torch" in sys.modules)
    """)
    runs = {}
    for kernels in ("", "torch"):
        out = tmp_path / (kernels or "kernels")
        env = dict(os.environ, MERGESMITH_KERNELS=kernels)
        done = subprocess.run(
            [sys.executable, "-c", code, str(cfg), str(out)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        assert done.stdout.strip() == ("True" if kernels else "False")
        runs[kernels] = load_tensors(out)
    fast, slow = runs[""], runs["torch"]
    assert fast.keys() == slow.keys()
    for name, want in slow.items():
        if method == "slerp":  # its kernel sums the norms in float64: within float32 rounding
            torch.testing.assert_close(fast[name], want, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(fast[name], want), name
