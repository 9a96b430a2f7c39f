"""Budgets and floors (algorithms/budget.py), pure."""

import pytest

from optimum_grape.algorithms.budget import check_budget, uniform_removals
from optimum_grape.errors import BudgetError


def test_uniform_removals_are_even_and_respect_floors():
    n = {0: 8, 1: 8, 2: 8, 3: 8}
    assert uniform_removals(n, {l: 2 for l in n}, 4) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert uniform_removals(n, {l: 2 for l in n}, 6) == {0: 1, 1: 1, 2: 2, 3: 2}
    assert sum(uniform_removals({0: 4, 1: 8}, {0: 3, 1: 2}, 6).values()) == 6
    with pytest.raises(BudgetError, match="at most"):
        check_budget(n, {l: 7 for l in n}, 5)
