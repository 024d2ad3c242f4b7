"""The tests' bitwise comparison (ckpt_helpers.assert_bitwise, trainer_helpers.assert_same) compares bytes,
not values: torch.equal would call -0.0 equal to 0.0 and a nan unequal to itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ckpt_helpers import assert_bitwise
from trainer_helpers import assert_same

COMPARES = [assert_bitwise, assert_same]


@pytest.mark.parametrize("compare", COMPARES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_negative_zero_differs_from_zero(compare, dtype):
    a = torch.tensor([1.0, 0.0, 2.0], dtype=dtype)
    b = torch.tensor([1.0, -0.0, 2.0], dtype=dtype)
    assert torch.equal(a, b)  # what a value comparison would conclude
    with pytest.raises(AssertionError, match=r"state/'w'.*element 1"):
        compare({"w": a}, {"w": b}, "state")


@pytest.mark.parametrize("compare", COMPARES)
def test_identical_nans_are_equal_other_nans_are_not(compare):
    a = torch.tensor([1.0, math.nan, 3.0])
    assert not torch.equal(a, a.clone())  # a value comparison fails on nan == nan
    compare({"w": a, "loss": math.nan}, {"w": a.clone(), "loss": float("nan")})
    other_nan = a.clone()
    other_nan.view(torch.int32)[1] ^= 1  # another nan payload: a different bit pattern
    assert math.isnan(float(other_nan[1]))
    with pytest.raises(AssertionError, match="bytes differ"):
        compare(a, other_nan)


@pytest.mark.parametrize("compare", COMPARES)
def test_dtype_shape_and_python_floats(compare):
    with pytest.raises(AssertionError, match="float32"):
        compare(torch.zeros(3), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(AssertionError, match=r"\[3\] vs .*\[1, 3\]"):
        compare(torch.zeros(3), torch.zeros(1, 3))
    with pytest.raises(AssertionError):
        compare([0.0], [-0.0])
    with pytest.raises(AssertionError):
        compare(np.array([0.0]), np.array([-0.0]))
    compare(np.array([math.nan]), np.array([math.nan]))
    compare((1, [2.5, "x"], {"a": torch.arange(4)}), (1, [2.5, "x"], {"a": torch.arange(4)}))
    with pytest.raises(AssertionError):
        compare((1, 2), [1, 2])  # a tuple is not a list


def test_assert_same_requires_key_order():
    assert_bitwise({"a": 1, "b": 2}, {"b": 2, "a": 1})
    with pytest.raises(AssertionError, match="keys"):
        assert_same({"a": 1, "b": 2}, {"b": 2, "a": 1})
