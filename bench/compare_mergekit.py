"""Run the same configs through mergesmith and a mergekit install; print how far apart the tensors are.

Usage: python bench/compare_mergekit.py --mergekit-venv /path/to/venv [--workdir DIR] [--dtype float32]

mergekit is never imported: its CLI runs from its own virtual environment. Deterministic methods should
agree to float rounding; random methods (dare, della) are compared by their statistics, since the two tools
draw different random numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mergesmith.testing.tiny_models import make_finetune, make_model

RANDOM = {"dare_linear", "dare_ties", "della", "della_linear"}


def configs(base: Path, a: Path, b: Path, dtype: str) -> dict[str, str]:
    models3 = f"""models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.7}}
base_model: {base}
dtype: {dtype}
"""
    out = {
        "linear": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.2}}\ndtype: {dtype}\n",
        "slerp": f"""merge_method: slerp
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {a}
        layer_range: [0, 4]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: {dtype}
""",
        "passthrough": f"""merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
dtype: {dtype}
""",
        "task_arithmetic": f"merge_method: task_arithmetic\n{models3}parameters: {{lambda: 0.8}}\n",
    }
    for method in (
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    ):
        extra = "parameters: {epsilon: 0.1}\n" if method.startswith("della") else ""
        out[method] = f"merge_method: {method}\n{models3}{extra}"
    out["della"] = out["della"].replace("parameters: {epsilon: 0.1}\n", "")
    return out


def load(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    res: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        res.update(load_file(str(f)))
    return res


def compare(ours: Path, theirs: Path, base: dict[str, torch.Tensor], random: bool) -> str:
    a, b = load(ours), load(theirs)
    if set(a) != set(b):
        return f"tensor names differ: ours-only {sorted(set(a) - set(b))[:3]} theirs-only {sorted(set(b) - set(a))[:3]}"
    if random:
        ka = sum(int((a[k] != base[k]).sum()) for k in a if k in base)
        kb = sum(int((b[k] != base[k]).sum()) for k in b if k in base)
        n = sum(a[k].numel() for k in a if k in base)
        ma = sum(float((a[k].double() - base[k].double()).abs().sum()) for k in a if k in base) / n
        mb = sum(float((b[k].double() - base[k].double()).abs().sum()) for k in b if k in base) / n
        return f"changed entries: ours {ka / n:.4f} mergekit {kb / n:.4f}; mean |delta|: ours {ma:.5f} mergekit {mb:.5f}"
    worst, where = 0.0, ""
    for k in a:
        d = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
        if d > worst:
            worst, where = d, k
    return f"max |diff| {worst:.3g}" + (f" ({where})" if worst else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit-venv", default=os.environ.get("MERGEKIT_VENV"), required=False)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", nargs="*")
    args = ap.parse_args()
    if not args.mergekit_venv:
        sys.exit("give --mergekit-venv (or MERGEKIT_VENV): a virtual environment with mergekit installed")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mergesmith-vs-mergekit-"))
    base = work / "base"
    if not base.exists():
        make_model("llama", base, seed=0)
        make_finetune(base, work / "a", seed=1, noise=0.02)
        make_finetune(base, work / "b", seed=2, noise=0.02)
    base_t = load(base)
    mk = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    print(f"{'method':<18} {'mergesmith s':>12} {'mergekit s':>11}  agreement")
    for method, text in configs(base, work / "a", work / "b", args.dtype).items():
        if args.methods and method not in args.methods:
            continue
        cfg = work / f"{method}.yml"
        cfg.write_text(text)
        times = []
        for cmd, _out in (
            (
                [
                    sys.executable,
                    "-m",
                    "mergesmith",
                    "yaml",
                    str(cfg),
                    str(work / f"ms-{method}"),
                    "--overwrite",
                    "-q",
                    "--random-seed",
                    "1",
                ],
                work / f"ms-{method}",
            ),
            ([str(mk), str(cfg), str(work / f"mk-{method}"), "--random-seed", "1"], work / f"mk-{method}"),
        ):
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if r.returncode != 0:
                print(f"{method:<18} FAILED: {' '.join(cmd[:3])}...\n{r.stderr[-800:]}")
                break
        else:
            verdict = compare(work / f"ms-{method}", work / f"mk-{method}", base_t, method in RANDOM)
            print(f"{method:<18} {times[0]:>12.2f} {times[1]:>11.2f}  {verdict}")
    print(json.dumps({"workdir": str(work)}))


if __name__ == "__main__":
    main()
