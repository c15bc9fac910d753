"""Parameter semantics (config/params.py): gradients, filters and precedence exactly as mergekit evaluates them."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.config import params as P
from mergesmith.methods.spec import Param

NAME = "model.layers.3.self_attn.q_proj.weight"


def mergekit_gradient(values: list[float], t: float) -> float:
    """mergekit's evaluate_setting for a list of numbers, written out independently."""
    pos = t * (len(values) - 1)
    i0 = int(pos)
    i1 = min(len(values) - 1, i0 + 1)
    frac = pos - i0
    return (1 - frac) * values[i0] + frac * values[i1]


# ------------------------------------------------------------------------------------------ scalars, gradients


@pytest.mark.parametrize("value", [0.5, 3, True, "sum"])
def test_scalar_is_returned_for_any_tensor_and_t(value):
    for t in (0.0, 0.3, 1.0):
        assert P.evaluate(value, NAME, t) == value


@pytest.mark.parametrize(
    ("values", "t", "expected"),
    [
        ([0.0, 1.0], 0.0, 0.0),
        ([0.0, 1.0], 1.0, 1.0),
        ([0.0, 1.0], 0.25, 0.25),
        ([0.0, 0.5, 0.3, 0.7, 1.0], 0.0, 0.0),
        ([0.0, 0.5, 0.3, 0.7, 1.0], 1 / 3, 0.5 + (0.3 - 0.5) * (4 / 3 - 1)),
        ([0.0, 0.5, 0.3, 0.7, 1.0], 0.5, 0.3),
        ([0.0, 0.5, 0.3, 0.7, 1.0], 2 / 3, 0.3 + (0.7 - 0.3) * (8 / 3 - 2)),
        ([0.0, 0.5, 0.3, 0.7, 1.0], 1.0, 1.0),
        ([2.0, 4.0, 8.0], 0.75, 6.0),  # pos 1.5: halfway between 4 and 8
        ([7.0], 0.6, 7.0),  # one element: i0 = i1 = 0
    ],
)
def test_gradient_interpolates_like_mergekit(values, t, expected):
    got = P.evaluate(values, NAME, t)
    assert got == pytest.approx(expected, abs=1e-12)
    assert got == mergekit_gradient(values, t)  # the same arithmetic, so exactly equal


def test_gradient_over_layers_of_a_four_layer_slice():
    """The planner gives layer k of an n-layer slice t = k / (n - 1): 0, 1/3, 2/3, 1."""
    values = [0.0, 0.5, 0.3, 0.7, 1.0]
    got = [P.evaluate(values, NAME, k / 3) for k in range(4)]
    assert got == [mergekit_gradient(values, k / 3) for k in range(4)]
    assert got[0] == 0.0 and got[-1] == 1.0


def test_list_of_strings_picks_an_element_without_interpolation():
    values = ["a", "b", "c"]
    assert P.evaluate(values, NAME, 0.0) == "a"
    assert P.evaluate(values, NAME, 0.49) == "a"  # int(0.98) == 0
    assert P.evaluate(values, NAME, 0.5) == "b"
    assert P.evaluate(values, NAME, 0.99) == "b"
    assert P.evaluate(values, NAME, 1.0) == "c"


def test_coerce_is_applied_to_gradient_elements_and_result():
    p = Param("weight", float)
    assert P.evaluate(["0", "1"], NAME, 0.5, p.validate) == 0.5  # strings coerced first, then interpolated
    assert isinstance(P.evaluate(1, NAME, 0.5, p.validate), float)
    with pytest.raises(ValueError, match="weight must be a number"):
        P.evaluate("abc", NAME, 0.5, p.validate)


def test_empty_list_is_none_and_junk_raises():
    assert P.evaluate([], NAME, 0.5) is None
    with pytest.raises(ValueError, match="unexpected parameter value"):
        P.evaluate({"no": "value"}, NAME, 0.5)


# ------------------------------------------------------------------------------------------------ filters


def test_filter_is_a_substring_match():
    setting = [{"filter": "self_attn", "value": 0.1}, {"value": 0.9}]
    assert P.evaluate(setting, "model.layers.0.self_attn.o_proj.weight", 0) == 0.1
    assert P.evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0) == 0.9
    # substring, not glob or regex: "q_proj" matches, "layers.*.q_proj" does not
    assert P.evaluate([{"filter": "q_proj", "value": 1}], NAME, 0) == 1
    assert P.evaluate([{"filter": "layers.*.q_proj", "value": 1}], NAME, 0) is None
    assert P.evaluate([{"filter": "layers.3.", "value": 2}], NAME, 0) == 2


def test_first_matching_filter_wins():
    setting = [
        {"filter": "mlp", "value": 1},
        {"filter": "self_attn", "value": 2},
        {"filter": "q_proj", "value": 3},  # also matches NAME, but comes later
        {"value": 4},
    ]
    assert P.evaluate(setting, NAME, 0) == 2


def test_condition_without_filter_is_a_fallback_even_before_later_filters():
    setting = [{"filter": "mlp", "value": 1}, {"value": 5}, {"filter": "self_attn", "value": 2}]
    assert P.evaluate(setting, NAME, 0) == 5  # no-filter entry matches everything, so it wins first
    assert P.evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0) == 1


def test_star_filter_matches_everything():
    assert P.evaluate([{"filter": "*", "value": 7}], NAME, 0) == 7
    assert P.evaluate([{"filter": "*", "value": 7}], "", 0) == 7


def test_no_match_gives_none():
    assert P.evaluate([{"filter": "mlp", "value": 1}], NAME, 0.5) is None
    # an empty tensor name matches no filter (mergekit: `tensor_name and filter in tensor_name`)
    assert P.evaluate([{"filter": "mlp", "value": 1}], "", 0.5) is None


def test_single_condition_mapping_and_gradient_value():
    assert P.evaluate({"filter": "self_attn", "value": 0.3}, NAME, 0) == 0.3
    assert P.evaluate({"value": [0, 1]}, NAME, 0.25) == 0.25
    setting = [{"filter": "self_attn", "value": [0.0, 1.0, 0.0]}, {"value": 0.5}]
    assert P.evaluate(setting, NAME, 0.5) == 1.0
    assert P.evaluate(setting, NAME, 0.25) == 0.5


# --------------------------------------------------------------------------------------------- precedence


def test_resolve_takes_the_first_scope_that_gives_a_value():
    source = {"weight": 0.1}
    slice_ = {"weight": 0.2}
    top = {"weight": 0.3}
    assert P.resolve("weight", [source, slice_, None, top], NAME, 0) == (True, 0.1)
    assert P.resolve("weight", [None, slice_, None, top], NAME, 0) == (True, 0.2)
    assert P.resolve("weight", [{}, {}, None, top], NAME, 0) == (True, 0.3)


def test_resolve_skips_a_level_whose_filters_match_nothing():
    slice_ = {"t": [{"filter": "mlp", "value": 0.9}]}
    top = {"t": [{"filter": "self_attn", "value": 0.1}, {"value": 0.5}]}
    assert P.resolve("t", [slice_, top], NAME, 0) == (True, 0.1)
    assert P.resolve("t", [slice_, top], "model.layers.0.mlp.up_proj.weight", 0) == (True, 0.9)
    assert P.resolve("t", [slice_, top], "model.norm.weight", 0) == (True, 0.5)


def test_resolve_reports_not_found():
    assert P.resolve("t", [None, {}, {"other": 1}], NAME, 0) == (False, None)
    assert P.resolve("t", [{"t": [{"filter": "mlp", "value": 1}]}], NAME, 0) == (False, None)


def test_resolve_evaluates_gradients_at_t():
    assert P.resolve("t", [{"t": [0, 1]}], NAME, 0.75) == (True, 0.75)


# -------------------------------------------------------------------------------------- shape helpers


@pytest.mark.parametrize(
    "setting",
    [0.5, 1, True, "x", [0, 1], ["a", "b"], {"value": 1}, {"filter": "mlp", "value": [0, 1]}, [{"value": 1}]],
)
def test_well_formed_settings(setting):
    assert P.shape_problem(setting) is None


@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        ([], "empty list"),
        ([0, {"value": 1}], "a list must hold only numbers"),
        ([{"filter": 3, "value": 1}], "filter 3 must be a string"),
        ({"filter": "x", "value": {"value": 1}}, "nested condition"),
        ([{"filter": "x", "value": {"a": 1}}], "expected a number"),
        (None, "expected a number"),
        ({"a": 1}, "expected a number"),
    ],
)
def test_malformed_settings(setting, problem):
    assert problem in P.shape_problem(setting)


def test_scalars_and_filters_in():
    setting = [{"filter": "mlp", "value": [0, 0.5]}, {"filter": "*", "value": 1}, {"value": 2}]
    assert P.scalars_in(setting) == [0, 0.5, 1, 2]
    assert P.filters_in(setting) == ["mlp"]
    assert P.filters_in(0.5) == [] and P.filters_in([0, 1]) == []
    assert P.filters_in({"filter": "attn", "value": 1}) == ["attn"]


# ------------------------------------------------------------------------------------------- properties

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(finite, min_size=1, max_size=12), t=st.floats(min_value=0.0, max_value=1.0))
def test_gradient_endpoints_and_bounds(values, t):
    assert P.evaluate(values, NAME, 0.0) == values[0]
    assert P.evaluate(values, NAME, 1.0) == values[-1]
    got = P.evaluate(values, NAME, t)
    slack = 1e-9 * max(1.0, max(abs(v) for v in values))
    assert min(values) - slack <= got <= max(values) + slack
    assert got == mergekit_gradient(values, t)
    assert not math.isnan(got)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(finite, min_size=2, max_size=8), k=st.integers(min_value=0, max_value=7))
def test_gradient_hits_its_points_when_layers_match_its_length(values, k):
    """With as many layers as gradient points, layer k gets exactly the k-th value."""
    n = len(values)
    k = k % n
    assert P.evaluate(values, NAME, k / (n - 1)) == pytest.approx(values[k], rel=1e-12, abs=1e-9)


# ------------------------------------------------------------------------------- through the real planner


def test_planner_applies_gradients_filters_and_precedence(llama_family):
    """A slerp plan: per-layer t from a gradient, a filter list with fallback, pre/post weights at t=0."""
    from mergesmith.api import plan_merge

    base, ft = llama_family["base"], llama_family["ft1"]
    cfg = f"""
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {ft}
        layer_range: [0, 4]
    parameters:
      t:
        - filter: mlp
          value: [0.0, 1.0]
parameters:
  t:
    - filter: self_attn
      value: [1.0, 0.5, 0.0]
    - value: 0.25
"""
    plan = plan_merge(cfg)
    t_of = {tp.name: dict(tp.params)["t"] for tp in plan.tensors}
    for k in range(4):
        # slice-level mlp gradient: k/3 along [0, 1]
        assert t_of[f"model.layers.{k}.mlp.up_proj.weight"] == pytest.approx(k / 3)
        # slice level has no match for attention: falls through to the top-level filter list
        assert t_of[f"model.layers.{k}.self_attn.q_proj.weight"] == mergekit_gradient([1.0, 0.5, 0.0], k / 3)
        assert t_of[f"model.layers.{k}.input_layernorm.weight"] == 0.25
    assert t_of["model.embed_tokens.weight"] == 0.25
    assert t_of["model.norm.weight"] == 0.25


def test_planner_per_model_parameters_override_top_level(llama_family):
    from mergesmith.api import plan_merge

    a, b = llama_family["ft1"], llama_family["ft2"]
    cfg = f"""
merge_method: linear
models:
  - model: {a}
    parameters:
      weight:
        - filter: mlp
          value: 3.0
  - model: {b}
parameters:
  weight: 0.5
  normalize: false
"""
    plan = plan_merge(cfg)
    by_name = {tp.name: tp for tp in plan.tensors}
    mlp = by_name["model.layers.0.mlp.down_proj.weight"]
    attn = by_name["model.layers.0.self_attn.v_proj.weight"]
    assert [dict(p)["weight"] for p in mlp.per_model] == [3.0, 0.5]
    assert [dict(p)["weight"] for p in attn.per_model] == [0.5, 0.5]  # no filter matched -> top level
    assert dict(mlp.params) == {"normalize": False}


def test_planner_warns_about_a_filter_that_matches_nothing(llama_family, caplog):
    from mergesmith.api import plan_merge

    a = llama_family["ft1"]
    cfg = f"""
merge_method: linear
models:
  - model: {a}
parameters:
  weight:
    - filter: no_such_module
      value: 2.0
    - value: 1.0
"""
    with caplog.at_level("WARNING", logger="mergesmith"):
        plan = plan_merge(cfg)
    assert any("filter 'no_such_module' matches no tensor name" in w for w in plan.warnings)
    assert "no_such_module" in caplog.text
