"""Compare mergesmith's merge-method functions with mergekit's on the same random tensors.

Usage:
    python bench/compare_mergekit_methods.py --mergekit-python /path/to/mergekit-venv/bin/python \
        [--out DIR] [--json results.json]

The script writes a set of random test cases (tensors + parameters) to DIR, runs this same file
under the mergekit interpreter in `--worker` mode (which is the only place mergekit is imported),
computes mergesmith's results in this process, and prints the max absolute difference per case.
Random methods are compared by seeding mergekit's global torch RNG and mergesmith's generator
with the same seed right before the call, so on CPU they draw the same stream.

mergesmith itself never imports mergekit; this file is a development tool, not part of the package.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# --------------------------------------------------------------------------- cases


def _sparse_delta(shape: tuple[int, ...], frac: float, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(shape, generator=gen) < frac
    return torch.randn(shape, generator=gen) * 0.01 * keep


def build_cases(seed: int = 1234, small: bool = False) -> list[dict]:
    """Each case: method, tensors, base_index, global params, per-non-base params, rng seed.

    small: shrink every shape about 4x and leave out the >1M-entry case and the bf16 cases that
    differ on purpose (tie-breaking in magnitude/variance selection, float32 random draws), for
    the test fixture.
    """
    gen = torch.Generator().manual_seed(seed)

    def sz(shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(max(6, d // 4) for d in shape) if small else shape

    def family(n_others: int, shape: tuple[int, ...], scale: float = 0.02, dtype=torch.float32):
        shape = sz(shape)
        base = torch.randn(shape, generator=gen)
        others = [base + scale * torch.randn(shape, generator=gen) for _ in range(n_others)]
        return [t.to(dtype) for t in [base, *others]]

    cases: list[dict] = []

    def add(label, method, tensors, base_index, params=None, per=None, rng=None):
        skipped = ("arcee_fusion sampled (>1M)", "ties bf16", "breadcrumbs bf16", "sce bf16")
        if small and label in (*skipped, "dare_linear bf16", "della bf16"):
            return
        cases.append(
            {
                "label": label,
                "method": method,
                "tensors": tensors,
                "base_index": base_index,
                "params": params or {},
                "per": per or {},
                "rng": rng,
            }
        )

    two = {"weight": [1.0, 0.6]}
    three = {"weight": [1.0, 0.6, 0.3]}
    add("task_arithmetic", "task_arithmetic", family(3, (64, 48)), 0, {}, three)
    add("ties d=0.3", "ties", family(3, (64, 48)), 0, {}, {**three, "density": [0.3, 0.5, 0.7]})
    add(
        "ties d=0.3 rescale",
        "ties",
        family(2, (64, 48)),
        0,
        {"rescale": True},
        {**two, "density": [0.3, 0.3]},
    )
    add("ties 1-D lambda", "ties", family(2, (300,)), 0, {"lambda": 0.8}, {**two, "density": [0.2, 0.9]})
    add(
        "ties int8_mask", "ties", family(3, (32, 32)), 1, {"int8_mask": True}, {**three, "density": [0.4] * 3}
    )
    add("dare_linear", "dare_linear", family(2, (64, 48)), 0, {}, {**two, "density": [0.4, 0.6]}, rng=11)
    add("dare_ties", "dare_ties", family(3, (64, 48)), 0, {}, {**three, "density": [0.5] * 3}, rng=12)
    add(
        "dare_ties no rescale",
        "dare_ties",
        family(2, (50,)),
        0,
        {"rescale": False},
        {**two, "density": [0.5] * 2},
        rng=3,
    )
    add(
        "breadcrumbs",
        "breadcrumbs",
        family(2, (64, 48)),
        0,
        {},
        {**two, "density": [0.5, 0.7], "gamma": [0.05, 0.01]},
    )
    add(
        "breadcrumbs gamma=0",
        "breadcrumbs",
        family(2, (64, 48)),
        0,
        {},
        {**two, "density": [0.5] * 2, "gamma": [0.0] * 2},
    )
    add(
        "breadcrumbs d+g>1",
        "breadcrumbs",
        family(2, (40, 10)),
        0,
        {},
        {**two, "density": [0.9] * 2, "gamma": [0.3] * 2},
    )
    add(
        "breadcrumbs_ties rescale",
        "breadcrumbs_ties",
        family(3, (64, 48)),
        0,
        {"rescale": True},
        {**three, "density": [0.6] * 3, "gamma": [0.02] * 3},
    )
    add(
        "della",
        "della",
        family(3, (64, 48)),
        0,
        {},
        {**three, "density": [0.5] * 3, "epsilon": [0.1] * 3},
        rng=21,
    )
    add(
        "della 1-D",
        "della",
        family(2, (200,)),
        0,
        {},
        {**two, "density": [0.4] * 2, "epsilon": [0.2] * 2},
        rng=22,
    )
    add(
        "della_linear",
        "della_linear",
        family(2, (64, 48)),
        0,
        {},
        {**two, "density": [0.6, 0.3], "epsilon": [0.15, 0.1]},
        rng=23,
    )
    add("sce topk=1", "sce", family(3, (64, 48)), 0, {})
    add("sce topk=0.4", "sce", family(3, (64, 48)), 0, {"select_topk": 0.4})
    add("sce 1-D topk=0.25", "sce", family(2, (500,)), 0, {"select_topk": 0.25})

    base = torch.randn(sz((64, 48)), generator=gen)
    sparse = [base] + [base + _sparse_delta(sz((64, 48)), 0.3, gen) for _ in range(3)]
    add("ram", "ram", sparse, 0, {})
    add("ram eps=0.005", "ram", sparse, 0, {"epsilon": 0.005})
    add("ramplus_tl", "ramplus_tl", sparse, 0, {})
    add("ramplus_tl r=0.5 alpha=1", "ramplus_tl", sparse, 0, {"r": 0.5, "alpha": 1.0})

    add("nuslerp no base", "nuslerp", family(2, (64, 48))[1:], None, {}, {"weight": [0.3, 0.7]})
    add("nuslerp base", "nuslerp", family(2, (64, 48), scale=0.5), 0, {}, {"weight": [1.0, 2.0]})
    add(
        "nuslerp row_wise",
        "nuslerp",
        family(2, (64, 48), scale=0.5),
        0,
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        {"weight": [0.5, 0.5]},
    )
    add(
        "nuslerp rows",
        "nuslerp",
        family(2, (64, 48), scale=0.5)[1:],
        None,
        {"nuslerp_flatten": False},
        {"weight": [0.2, 0.5]},
    )
    add(
        "multislerp no base",
        "multislerp",
        family(3, (64, 48), scale=0.5)[1:],
        None,
        {},
        {"weight": [0.5, 0.3, 0.2]},
    )
    add("multislerp base", "multislerp", family(3, (64, 48), scale=0.5), 0, {}, {"weight": [1.0, 1.0, 2.0]})
    add(
        "multislerp unnormalized",
        "multislerp",
        family(2, (100,), scale=0.5),
        0,
        {"normalize_weights": False},
        {"weight": [0.4, 0.4]},
    )
    add("karcher 3", "karcher", family(2, (64, 48), scale=0.5), None, {})
    add("karcher 4 tol", "karcher", family(3, (30,), scale=1.0), None, {"max_iter": 50, "tol": 1e-7})
    add("model_stock", "model_stock", family(3, (64, 48)), 0, {})
    add("model_stock filter_wise", "model_stock", family(4, (64, 48)), 0, {"filter_wise": True})
    add("model_stock 1-D filter_wise", "model_stock", family(2, (300,)), 0, {"filter_wise": True})
    add("nearswap", "nearswap", family(1, (64, 48)), 0, {"t": 0.01})
    add("nearswap t=0.05 base second", "nearswap", family(1, (64, 48))[::-1], 1, {"t": 0.05})
    add("arcee_fusion", "arcee_fusion", family(1, (64, 48), scale=0.3), 0, {})
    add("arcee_fusion 1-D", "arcee_fusion", family(1, (1000,), scale=0.3), 0, {})
    add("arcee_fusion sampled (>1M)", "arcee_fusion", family(1, (1100, 1000), scale=0.3), 0, {}, rng=31)
    # bf16 compute dtype for a few deterministic methods
    bf = torch.bfloat16
    add("ties bf16", "ties", family(2, (64, 48), dtype=bf), 0, {}, {**two, "density": [0.3, 0.5]})
    add(
        "breadcrumbs bf16",
        "breadcrumbs",
        family(2, (64, 48), dtype=bf),
        0,
        {},
        {**two, "density": [0.5] * 2, "gamma": [0.05] * 2},
    )
    add("model_stock bf16", "model_stock", family(3, (64, 48), dtype=bf), 0, {})
    add("nuslerp bf16", "nuslerp", family(2, (64, 48), scale=0.5, dtype=bf), 0, {}, {"weight": [1.0, 1.0]})
    add(
        "multislerp bf16",
        "multislerp",
        family(2, (64, 48), scale=0.5, dtype=bf)[1:],
        None,
        {},
        {"weight": [1.0, 1.0]},
    )
    add("sce bf16", "sce", family(3, (64, 48), dtype=bf), 0, {"select_topk": 0.5})
    add("karcher bf16", "karcher", family(2, (64, 48), scale=0.5, dtype=bf), None, {})
    add("ram bf16", "ram", [t.to(bf) for t in sparse], 0, {})
    add("ramplus_tl bf16", "ramplus_tl", [t.to(bf) for t in sparse], 0, {})
    add("arcee_fusion bf16", "arcee_fusion", family(1, (64, 48), scale=0.3, dtype=bf), 0, {})
    # random methods in bf16: mergekit draws bf16 probabilities on CPU, mergesmith float32 (differs on purpose)
    add(
        "dare_linear bf16",
        "dare_linear",
        family(2, (64, 48), dtype=bf),
        0,
        {},
        {**two, "density": [0.4] * 2},
        rng=41,
    )
    add(
        "della bf16",
        "della",
        family(2, (64, 48), dtype=bf),
        0,
        {},
        {**two, "density": [0.5] * 2, "epsilon": [0.1] * 2},
        rng=42,
    )
    return cases


# --------------------------------------------------------------------------- mergekit side


def run_worker(cases_path: str, results_path: str) -> None:
    """Runs under the mergekit interpreter: compute every case with mergekit's functions."""
    from mergekit.merge_methods.api import merge_tensors

    cases = torch.load(cases_path, weights_only=True)
    results = []
    for case in cases:
        params = dict(case["params"])
        params.update(case["per"])
        if case["rng"] is not None:
            torch.manual_seed(case["rng"])
        try:
            out = merge_tensors(
                case["tensors"], case["method"], parameters=params, base_index=case["base_index"]
            )
            results.append({"ok": True, "out": out})
        except Exception as exc:  # report, keep going
            results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    torch.save(results, results_path)


# --------------------------------------------------------------------------- mergesmith side


def run_ours(case: dict) -> torch.Tensor:
    from mergesmith.methods import get
    from mergesmith.methods.spec import MergeInputs

    spec = get(case["method"])
    tensors = tuple(case["tensors"])
    base_index = case["base_index"]
    globals_ = {p.name: case["params"].get(p.name, p.default) for p in spec.params if p.scope == "global"}
    non_base = [i for i in range(len(tensors)) if i != base_index]
    per_model: list[dict] = [{} for _ in tensors]
    for p in spec.params:
        if p.scope == "global":
            continue
        values = case["per"].get(p.name)
        for j, i in enumerate(non_base):
            per_model[i][p.name] = p.default if values is None else values[j]
    gen = None if case["rng"] is None else torch.Generator().manual_seed(case["rng"])
    inputs = MergeInputs(
        tensors=tensors,
        base_index=base_index,
        params=globals_,
        per_model=tuple(per_model),
        name=case["label"],
        generator=gen,
    )
    return spec.fn(inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mergekit-python", help="python interpreter of a venv with mergekit installed")
    parser.add_argument("--out", help="directory for cases/results (default: a temporary directory)")
    parser.add_argument("--json", help="also write the table as JSON to this file")
    parser.add_argument(
        "--fixture",
        help="write small cases and mergekit's outputs to this .pt file (for tests/methods) and exit",
    )
    parser.add_argument("--worker", nargs=2, metavar=("CASES", "RESULTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(*args.worker)
        return 0
    if not args.mergekit_python:
        parser.error("--mergekit-python is required")

    out_dir = Path(args.out or tempfile.mkdtemp(prefix="mergesmith-vs-mergekit-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = build_cases(small=bool(args.fixture))
    cases_path, results_path = out_dir / "cases.pt", out_dir / "mergekit_results.pt"
    torch.save(cases, cases_path)
    subprocess.run(
        [args.mergekit_python, str(Path(__file__).resolve()), "--worker", str(cases_path), str(results_path)],
        check=True,
    )
    theirs = torch.load(results_path, weights_only=True)
    if args.fixture:
        failed = [c["label"] for c, r in zip(cases, theirs) if not r["ok"]]
        if failed:
            raise SystemExit(f"mergekit failed on {failed}")
        for case, their in zip(cases, theirs):
            case["expected"] = their["out"]
        torch.save(cases, args.fixture)
        print(f"wrote {len(cases)} cases to {args.fixture}")
        return 0

    rows = []
    print(f"{'case':34s} {'method':16s} {'dtype':9s} {'max |diff|':>12s}  {'max |out|':>10s}  exact")
    for case, their in zip(cases, theirs):
        dtype = str(case["tensors"][0].dtype).replace("torch.", "")
        row = {"case": case["label"], "method": case["method"], "dtype": dtype}
        try:
            ours = run_ours(case)
        except Exception as exc:
            ours, row["our_error"] = None, f"{type(exc).__name__}: {exc}"
        if not their["ok"]:
            row["mergekit_error"] = their["error"]
        if ours is not None and their["ok"]:
            a, b = ours.double(), their["out"].double()
            row["max_abs_diff"] = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
            row["max_abs_out"] = float(b.abs().max())
            row["exact"] = bool(torch.equal(ours.to(their["out"].dtype), their["out"]))
            print(
                f"{case['label']:34s} {case['method']:16s} {dtype:9s} {row['max_abs_diff']:12.3e}  "
                f"{row['max_abs_out']:10.3e}  {row['exact']}"
            )
        else:
            print(
                f"{case['label']:34s} {case['method']:16s} {dtype:9s} ERROR ours={row.get('our_error')} "
                f"mergekit={row.get('mergekit_error')}"
            )
        rows.append(row)
    torch.save({"cases": cases, "mergekit": theirs}, out_dir / "all.pt")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
