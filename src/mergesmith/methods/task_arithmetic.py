"""The task-vector family: base + lambda * combine(sparsify(model - base) * weight).

Each named method is a row of data (sparsifier, sign consensus, defaults) over one code path.
The rows and their defaults follow mergekit 0.1.5's method table:

    method            sparsifier           sign consensus  normalize  rescale  extra
    task_arithmetic   -                    no              false      false
    ties              magnitude top-k      yes             true       false
    dare_linear       random (bernoulli)   no              false      true
    dare_ties         random (bernoulli)   yes             false      true
    breadcrumbs       magnitude_outliers   no              false      false    gamma=0.01
    breadcrumbs_ties  magnitude_outliers   yes             false      false    gamma=0.01
    della             della magprune       yes             true       true     epsilon=0.15
    della_linear      della magprune       no              false      true     epsilon=0.15

Rows with a sparsifier also take `rescale_mode` (global, default "l1"): how `rescale` restores
the scale of a sparsified task vector. "l1" (mergekit) multiplies by the ratio of L1 norms
before/after pruning; "keep_prob" (the DARE / DELLA papers) divides each kept entry by its
keep probability; "l2" and "linf" match those norms instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergesmith._util import lazy_module
from mergesmith.methods import primitives, task_vector_fast
from mergesmith.methods.registry import register_spec
from mergesmith.methods.spec import MergeInputs, MethodSpec, Param

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

# sparsifier(delta, per-model params, global params, generator) -> sparsified delta
Sparsifier = Callable[
    ["torch.Tensor", dict[str, Any], dict[str, Any], "torch.Generator | None"], "torch.Tensor"
]


def _density_check(v: float) -> str | None:
    return None if 0.0 < v <= 1.0 else "density must be in (0, 1]"


@dataclass(frozen=True)
class TaskVectorMethod:
    """One row of the family table."""

    name: str
    sign_consensus: bool
    normalize: bool
    rescale: bool
    paper: str
    summary: str
    sparsify: Sparsifier | None = None
    extra_params: tuple[Param, ...] = ()
    random: bool = False
    validate: Callable[[Mapping[str, Any], list[Mapping[str, Any]]], list[str]] | None = None


def sign_mask(weighted: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """Elect a sign per element by the sign of the summed weighted deltas (TIES); mask agreeing entries."""
    sign = weighted.sign().to(mask_dtype)
    majority = (weighted.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


def combine(row: TaskVectorMethod, inputs: MergeInputs) -> torch.Tensor:
    """Shared body of every task-vector method."""
    base = inputs.base
    assert base is not None
    others = inputs.others
    if not others:
        return base
    fast = task_vector_fast.fast_combine(row, inputs)
    if fast is not None:
        return fast
    params = dict(inputs.params)
    deltas = base.new_empty((len(others), *base.shape))
    for i, (tensor, mp) in enumerate(zip(others, inputs.others_params)):
        delta = tensor - base
        if row.sparsify is not None:
            delta = row.sparsify(delta, dict(mp), params, inputs.generator)
        deltas[i] = delta
        del delta
    weights = torch.tensor([float(mp["weight"]) for mp in inputs.others_params], dtype=deltas.dtype)
    weights = weights.to(deltas.device).reshape((-1,) + (1,) * base.dim())
    deltas.mul_(weights)
    if row.sign_consensus:
        mask = sign_mask(deltas, torch.int8 if params["int8_mask"] else base.dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if params["normalize"]:
        mixed /= divisor
    if params["lambda"] != 1:
        mixed *= params["lambda"]
    return (base + mixed).to(base.dtype)


def register_row(row: TaskVectorMethod) -> MethodSpec:
    """Build the MethodSpec of one family row and register it."""
    params = (
        Param("weight", float, "non_base", help="scale of this model's task vector"),
        Param(
            "density", float, "non_base", 1.0, help="fraction of the task vector kept", check=_density_check
        ),
        *row.extra_params,
        Param("lambda", float, "global", 1.0, help="scale of the combined task vector"),
        Param("normalize", bool, "global", row.normalize, help="divide by the sum of the weights"),
        Param("rescale", bool, "global", row.rescale, help="rescale kept entries to preserve the norm"),
        Param("int8_mask", bool, "global", False, help="store the sign mask as int8 to save memory"),
    )
    return register_spec(
        MethodSpec(
            name=row.name,
            fn=lambda inputs, _row=row: combine(_row, inputs),
            params=params,
            base="required",
            random=row.random,
            # without a sparsifier every output entry depends only on the same entry of the inputs
            elementwise=row.sparsify is None,
            paper=row.paper,
            summary=row.summary,
            validate=row.validate,
            fused=(lambda a, _row=row: task_vector_fast.sparse_into(_row, a))
            if row.sparsify in (_magnitude, _random, _della) and row.sign_consensus
            else None,
        )
    )


# --------------------------------------------------------------------------- sparsifier adapters


def _rescale(params: Mapping[str, Any]) -> str | None:
    return str(params.get("rescale_mode", "l1")) if params.get("rescale") else None


def _magnitude(delta: torch.Tensor, mp: dict[str, Any], params: dict[str, Any], gen: Any) -> torch.Tensor:
    return primitives.magnitude_prune(delta, float(mp["density"]), _rescale(params))


def _random(delta: torch.Tensor, mp: dict[str, Any], params: dict[str, Any], gen: Any) -> torch.Tensor:
    return primitives.bernoulli_prune(delta, float(mp["density"]), _rescale(params), gen)


def _outliers(delta: torch.Tensor, mp: dict[str, Any], params: dict[str, Any], gen: Any) -> torch.Tensor:
    return primitives.magnitude_outliers_prune(
        delta, float(mp["density"]), float(mp["gamma"]), _rescale(params)
    )


def _della(delta: torch.Tensor, mp: dict[str, Any], params: dict[str, Any], gen: Any) -> torch.Tensor:
    return primitives.della_magprune(delta, float(mp["density"]), float(mp["epsilon"]), _rescale(params), gen)


# --------------------------------------------------------------------------- della pre-flight check


def _anchors(value: Any) -> list[float] | None:
    """A number or a numeric gradient list as gradient anchors; None for anything else."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        return None
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float, str)):
            return None
        try:
            out.append(float(item))
        except ValueError:
            return None
    return out


def _at(anchors: list[float], t: float) -> float:
    """Piecewise-linear gradient value at t in [0, 1], anchors evenly spaced (mergekit's rule)."""
    if len(anchors) == 1:
        return anchors[0]
    scaled = t * (len(anchors) - 1)
    i = min(int(scaled), len(anchors) - 2)
    frac = scaled - i
    return (1 - frac) * anchors[i] + frac * anchors[i + 1]


def _positions(anchors: list[float]) -> set[float]:
    """Gradient positions (in [0, 1]) of the anchors, plus both ends."""
    n = len(anchors)
    return {0.0, 1.0} | {i / (n - 1) for i in range(1, n - 1)}


def della_validate(globals_: Mapping[str, Any], per_model: list[Mapping[str, Any]]) -> list[str]:
    """Problems with della's density/epsilon that can be seen before any tensor is read.

    Each entry of `per_model` is checked with its own values, falling back to `globals_`.
    No defaults are assumed: an entry where density or epsilon is missing (or is not a plain
    number or numeric gradient, e.g. a filtered value) is skipped, so a partial view of the
    config (one parameter block) never produces a false alarm. The planner, which passes
    every non-base model's resolved values, therefore checks every combination actually used;
    the sparsifier itself also refuses a bad pair when the tensor is merged. Numeric gradients
    are checked exactly over their whole range (see the comment in the loop).
    """
    problems: list[str] = []
    globals_ = globals_ or {}
    for index, entry in enumerate(per_model or [{}]):
        entry = entry or {}
        density = _anchors(entry.get("density", globals_.get("density")))
        epsilon = _anchors(entry.get("epsilon", globals_.get("epsilon")))
        if density is None or epsilon is None:
            continue
        points = sorted(_positions(density) | _positions(epsilon))
        gradient = len(density) > 1 or len(epsilon) > 1
        problem = None
        for t in points:
            problem = primitives.della_bounds_problem(_at(density, t), _at(epsilon, t))
            if problem:
                break
        if problem is None:
            # Between anchors both constraints are linear in t, so the anchors suffice except
            # next to a point t* where density crosses 1 (or 0): there density + epsilon - 1 (or
            # epsilon - density) equals epsilon(t*), so the pair is invalid nearby iff epsilon(t*) > 0.
            for t0, t1 in zip(points, points[1:]):
                d0, d1 = _at(density, t0), _at(density, t1)
                for edge, beyond in ((1.0, lambda d: d >= 1), (0.0, lambda d: d <= 0)):
                    if beyond(d0) != beyond(d1):
                        crossing = t0 + (edge - d0) / (d1 - d0) * (t1 - t0)
                        if _at(epsilon, crossing) > 0:
                            t = crossing
                            problem = (
                                "della needs 0 < density - epsilon and density + epsilon < 1 wherever "
                                f"0 < density < 1, but this fails next to where the density gradient "
                                f"reaches {edge:g}"
                            )
                            break
                if problem:
                    break
        if problem:
            where = f" (gradient position {t:.3g})" if gradient else ""
            who = f"model #{index + 1}: " if len(per_model or ()) > 1 else ""
            problems.append(f"{who}{problem}{where}")
    return problems


def _fraction_check(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def _epsilon_check(v: float) -> str | None:
    return None if 0.0 <= v < 1.0 else "epsilon must be in [0, 1)"


def _mode_check(v: str) -> str | None:
    return None if v in primitives.RESCALE_MODES else f"must be one of {', '.join(primitives.RESCALE_MODES)}"


RESCALE_MODE = Param(
    "rescale_mode",
    str,
    "global",
    "l1",
    help="how rescale restores scale: l1 (mergekit), keep_prob (divide by keep probability), l2, linf",
    check=_mode_check,
)
GAMMA = Param(
    "gamma",
    float,
    "non_base",
    0.01,
    help="fraction of largest-magnitude entries dropped",
    check=_fraction_check,
)
EPSILON = Param(
    "epsilon",
    float,
    "non_base",
    0.15,
    help="keep probabilities span density +/- epsilon",
    check=_epsilon_check,
)

TIES_PAPER = "https://arxiv.org/abs/2306.01708"
DARE_PAPER = "https://arxiv.org/abs/2311.03099"
BREADCRUMBS_PAPER = "https://arxiv.org/abs/2312.06795"
DELLA_PAPER = "https://arxiv.org/abs/2406.11617"

ROWS: tuple[TaskVectorMethod, ...] = (
    TaskVectorMethod(
        name="task_arithmetic",
        sign_consensus=False,
        normalize=False,
        rescale=False,
        paper="https://arxiv.org/abs/2212.04089",
        summary="Add weighted task vectors (model - base) to the base model.",
    ),
    TaskVectorMethod(
        name="ties",
        sign_consensus=True,
        normalize=True,
        rescale=False,
        paper=TIES_PAPER,
        summary="Keep each task vector's largest entries, elect signs, average the agreeing entries.",
        sparsify=_magnitude,
        extra_params=(RESCALE_MODE,),
    ),
    TaskVectorMethod(
        name="dare_linear",
        sign_consensus=False,
        normalize=False,
        rescale=True,
        paper=DARE_PAPER,
        summary="Randomly drop task-vector entries, rescale, and add the weighted sum to the base.",
        sparsify=_random,
        extra_params=(RESCALE_MODE,),
        random=True,
    ),
    TaskVectorMethod(
        name="dare_ties",
        sign_consensus=True,
        normalize=False,
        rescale=True,
        paper=DARE_PAPER,
        summary="Randomly drop task-vector entries, rescale, then TIES sign election.",
        sparsify=_random,
        extra_params=(RESCALE_MODE,),
        random=True,
    ),
    TaskVectorMethod(
        name="breadcrumbs",
        sign_consensus=False,
        normalize=False,
        rescale=False,
        paper=BREADCRUMBS_PAPER,
        summary="Drop the largest outliers and the smallest entries of each task vector, then add.",
        sparsify=_outliers,
        extra_params=(GAMMA, RESCALE_MODE),
    ),
    TaskVectorMethod(
        name="breadcrumbs_ties",
        sign_consensus=True,
        normalize=False,
        rescale=False,
        paper=BREADCRUMBS_PAPER,
        summary="Model Breadcrumbs sparsification followed by TIES sign election.",
        sparsify=_outliers,
        extra_params=(GAMMA, RESCALE_MODE),
    ),
    TaskVectorMethod(
        name="della",
        sign_consensus=True,
        normalize=True,
        rescale=True,
        paper=DELLA_PAPER,
        summary="Magnitude-ranked random dropping (MagPrune), rescale, TIES sign election.",
        sparsify=_della,
        extra_params=(EPSILON, RESCALE_MODE),
        random=True,
        validate=della_validate,
    ),
    TaskVectorMethod(
        name="della_linear",
        sign_consensus=False,
        normalize=False,
        rescale=True,
        paper=DELLA_PAPER,
        summary="Magnitude-ranked random dropping (MagPrune), rescale, weighted sum.",
        sparsify=_della,
        extra_params=(EPSILON, RESCALE_MODE),
        random=True,
        validate=della_validate,
    ),
)

for _row in ROWS:
    register_row(_row)
