"""Merges whose every tensor a fused CPU kernel can take from the stored bytes (linear, slerp, TIES,
DARE-TIES, DELLA on bfloat16/float32 safetensors) run without loading torch, and write what the torch code
writes."""

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
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.6, density: 0.4}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
    "parameters: {{rescale: true, rescale_mode: l2}}\n",
    "della": "merge_method: della\nbase_model: {base}\nmodels:\n  - model: {a}\n"
    "    parameters: {{weight: 0.6, density: 0.4, epsilon: 0.1}}\n  - model: {b}\n"
    "    parameters: {{weight: 0.5, density: 0.7, epsilon: 0.2}}\n",
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
        run_merge(sys.argv[1], sys.argv[2], MergeOptions(quiet=True, random_seed=3))
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
        if method in ("slerp", "dare_ties", "della"):  # kernels sum norms in float64: float32 rounding apart
            torch.testing.assert_close(fast[name], want, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(fast[name], want), name


def test_a_random_methods_kernel_gets_the_seed_of_its_torch_generator(llama_family, tmp_path, monkeypatch):
    """The kernel sees the seed the torch code's generator gets for the same tensor, so either one draws
    the same random numbers (here the kernel declines, and the torch code runs)."""
    from mergesmith import MergeOptions, run_merge
    from mergesmith.methods import registry
    from mergesmith.methods.spec import MethodSpec

    kernel_seeds: dict[str, int | None] = {}
    torch_seeds: dict[str, int] = {}

    def kernel(a):
        kernel_seeds[a.name] = a.seed
        return False

    def first(inputs):
        torch_seeds[inputs.name] = inputs.generator.initial_seed()
        return inputs.tensors[0]

    name = "test_random_with_kernel"
    registry.names()  # the built-in methods first
    spec = MethodSpec(name, first, random=True, fused=kernel)
    monkeypatch.setitem(registry._METHODS, name, spec)  # removed again when the test ends
    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = f"merge_method: {name}\nmodels:\n  - model: {a}\n  - model: {b}\n"
    run_merge(cfg, tmp_path / "out", MergeOptions(quiet=True, random_seed=5))
    assert kernel_seeds == torch_seeds and len(set(torch_seeds.values())) == len(torch_seeds) > 10


def test_a_kernel_failure_mid_merge_falls_back_to_torch(llama_family, tmp_path, monkeypatch, caplog):
    """numba failing on the stored bytes: the unit (and every later one) is merged by the torch code, over
    the same bytes, and the files are the torch path's."""
    from numba.core.errors import TypingError

    from mergesmith import MergeOptions, run_merge
    from mergesmith.methods import numba_kernels, task_vector_fast

    cfg = CONFIGS["ties"].format(base=llama_family["base"], a=llama_family["ft1"], b=llama_family["ft2"])
    monkeypatch.setenv("MERGESMITH_KERNELS", "torch")
    run_merge(cfg, tmp_path / "torch", MergeOptions(quiet=True))
    monkeypatch.setenv("MERGESMITH_KERNELS", "")
    calls = []
    real = numba_kernels.combine_fused

    def fails_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise TypingError("no implementation for this platform")
        return real(*args)

    monkeypatch.setattr(numba_kernels, "combine_fused", fails_on_the_third)
    monkeypatch.setattr(task_vector_fast, "_BROKEN", None)  # restored after the test
    run_merge(cfg, tmp_path / "fallback", MergeOptions(quiet=True))
    assert len(calls) == 3 and "fused CPU kernels unavailable" in caplog.text
    got, want = load_tensors(tmp_path / "fallback"), load_tensors(tmp_path / "torch")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
