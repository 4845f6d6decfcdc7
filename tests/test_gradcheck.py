"""The gradient checker must catch wrong gradients, not only pass right ones."""

import numpy as np
import pytest

from minivlmoe.ops import gelu, sparse_linear
from minivlmoe.gradcheck import (GradcheckCase, assert_gradients, check_case, rel_errors,
                                  roundoff_floor)


def linear_case(backward):
    rng = np.random.default_rng(0)
    params = sparse_linear.init(rng, 6, 4, 0.5, dtype=np.float64)
    x = rng.standard_normal((5, 6))
    return GradcheckCase("linear", {"x": x, "params": params},
                         lambda a: sparse_linear.forward(a["x"], a["params"]), backward)


def test_correct_backward_passes():
    rows = assert_gradients(linear_case(
        lambda d, c: dict(zip(("x", "params"), sparse_linear.backward(d, c)))),
        np.random.default_rng(1))
    assert [r.argument for r in rows] == ["x", "params.W", "params.b"]
    assert all(r.max_rel_error < 1e-7 for r in rows)


def test_missing_bias_term_is_caught_and_named():
    def wrong(d, c):
        dx, g = sparse_linear.backward(d, c)
        return {"x": dx, "params": {"W": g["W"], "b": 0.9 * g["b"]}}
    with pytest.raises(AssertionError, match=r"op 'linear', argument 'params.b' at index \(\d+,\)"):
        assert_gradients(linear_case(wrong), np.random.default_rng(1))


def test_small_error_in_one_sparse_entry_is_caught():
    def wrong(d, c):
        dx, g = sparse_linear.backward(d, c)
        g["W"].data[3] += 1e-4 * (1 + abs(g["W"].data[3]))
        return {"x": dx, "params": g}
    with pytest.raises(AssertionError, match="params.W"):
        assert_gradients(linear_case(wrong), np.random.default_rng(1))


def test_wrong_pattern_is_refused():
    def wrong(d, c):
        dx, g = sparse_linear.backward(d, c)
        return {"x": dx, "params": {"W": g["W"].tocsc().tocsr()[:, ::-1].tocsr(), "b": g["b"]}}
    with pytest.raises(AssertionError, match="sparsity pattern"):
        assert_gradients(linear_case(wrong), np.random.default_rng(1))


def test_backward_writing_into_dout_is_caught():
    def mutating(d, c):
        d *= 2.0
        return {"x": gelu.backward(d, c)}
    case = GradcheckCase("gelu", {"x": np.ones((2, 3))}, lambda a: gelu.forward(a["x"]), mutating)
    with pytest.raises(ValueError, match="read-only"):
        check_case(case, np.random.default_rng(0))


def test_large_inputs_use_sampled_entries_and_directions():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 30))  # 1200 entries > max_full
    case = GradcheckCase("gelu", {"x": x}, lambda a: gelu.forward(a["x"]),
                         lambda d, c: {"x": gelu.backward(d, c)})
    (row,) = check_case(case, rng, max_full=256, n_sample=20, n_directions=5)
    assert row.checked == 25 and row.passed


def test_rel_error_floor_is_relative_to_largest_entry():
    a = np.array([1.0, 1e-9])
    n = np.array([1.0, 2e-9])  # tiny entry off by 100% but 1e-9 of the scale: round-off level
    assert rel_errors(a, n).max() < 1e-6
    n = np.array([1.0, 1e-9 + 1e-4])
    assert rel_errors(a, n).max() > 1e-3


def test_roundoff_floor_only_forgives_roundoff():
    # all gradients ~3e-6 while L's terms add up to S = 1: round-off eps*S/h ~ 2e-10
    floor = roundoff_floor(1.0, 1e-6, 1e-6)
    a = np.array([3.0e-6, -2.0e-6])
    assert rel_errors(a, a + 2e-10, floor).max() < 1e-6      # round-off level: forgiven
    assert rel_errors(a, a + 1e-8, floor).max() > 1e-6       # 0.3% off: still caught
    assert rel_errors(a, 1.01 * a, floor).max() > 1e-6       # a 1% wrong factor: caught


def test_small_gradients_with_a_wrong_factor_are_still_caught():
    rng = np.random.default_rng(4)
    # GELU in its tail: gradients ~1e-2, outputs ~1e-3. (Deeper, near x = -6, the forward's
    # own cancellation in 1 + tanh(u) dominates and no finite difference is accurate.)
    x = -3.0 + 0.1 * rng.standard_normal((3, 4))
    case = GradcheckCase("gelu", {"x": x}, lambda a: gelu.forward(a["x"]),
                         lambda d, c: {"x": 1.05 * gelu.backward(d, c)})
    with pytest.raises(AssertionError, match="argument 'x'"):
        assert_gradients(case, rng)
    assert_gradients(case._replace(backward=lambda d, c: {"x": gelu.backward(d, c)}), rng)


# ----------------------------------------------------------------------------------------
# a backward cannot pass by omission: every differentiable argument is checked or skipped


def right_linear(d, c):
    return dict(zip(("x", "params"), sparse_linear.backward(d, c)))


def test_a_backward_that_drops_one_argument_fails_naming_op_and_argument():
    def drops_bias(d, c):
        dx, g = sparse_linear.backward(d, c)
        return {"x": dx, "params": {"W": g["W"]}}
    with pytest.raises(AssertionError, match=r"linear: backward returned no gradient for "
                                             r"differentiable arguments \['params\.b'\]"):
        assert_gradients(linear_case(drops_bias), np.random.default_rng(1))


def test_a_dropped_sparse_weight_fails_too():
    def drops_weight(d, c):
        dx, g = sparse_linear.backward(d, c)
        return {"x": dx, "params": {"b": g["b"]}}
    with pytest.raises(AssertionError, match=r"\['params\.W'\]"):
        check_case(linear_case(drops_weight), np.random.default_rng(1))


def test_a_skipped_argument_is_a_row_with_its_reason_and_not_a_failure():
    def drops_bias(d, c):
        dx, g = sparse_linear.backward(d, c)
        return {"x": dx, "params": {"W": g["W"]}}
    case = linear_case(drops_bias)._replace(skip={"params.b": "left out on purpose"})
    rows = assert_gradients(case, np.random.default_rng(1))
    assert [(r.argument, r.skipped) for r in rows] == [
        ("x", ""), ("params.W", ""), ("params.b", "left out on purpose")]
    assert rows[-1].passed and rows[-1].checked == 0 and rows[-1].shape == (4,)


def test_a_gradient_for_a_skipped_argument_fails():
    case = linear_case(right_linear)._replace(skip={"params.b": "left out on purpose"})
    with pytest.raises(AssertionError, match=r"gradients for skipped arguments \['params\.b'\]"):
        check_case(case, np.random.default_rng(1))


@pytest.mark.parametrize("path", ["params.c", "params", "y"])
def test_a_skip_naming_no_differentiable_argument_fails(path):
    case = linear_case(right_linear)._replace(skip={path: "a typo"})
    with pytest.raises(AssertionError, match=rf"skip names \['{path}'\], expected "
                                             r"differentiable arguments"):
        check_case(case, np.random.default_rng(1))


def test_float_inputs_need_a_gradient_or_a_skip_integer_and_bool_inputs_do_not():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3))
    inputs = {"x": x, "ids": np.array([1, 2]), "flags": np.array([True, False]),
              "scale": 2.0, "noise": rng.standard_normal((2, 3))}

    def fwd(a):
        return gelu.forward(a["x"] + 0.0 * a["noise"])

    def bwd(d, c):
        return {"x": gelu.backward(d, c)}

    case = GradcheckCase("gelu(noise)", inputs, fwd, bwd)
    with pytest.raises(AssertionError, match=r"gelu\(noise\): backward returned no gradient "
                                             r"for differentiable arguments \['noise'\]"):
        check_case(case, rng)
    rows = assert_gradients(case._replace(skip={"noise": "a constant of the case"}), rng)
    assert [r.argument for r in rows] == ["x", "noise"]


def test_a_case_with_only_skipped_arguments_has_nothing_to_check():
    case = GradcheckCase("gelu", {"x": np.ones((2, 2))}, lambda a: gelu.forward(a["x"]),
                         lambda d, c: {}, skip={"x": "nothing"})
    with pytest.raises(AssertionError, match="no gradients to check"):
        assert_gradients(case, np.random.default_rng(0))
