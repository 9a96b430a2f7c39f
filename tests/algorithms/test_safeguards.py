"""Safeguards of GRAPE's default allocation (algorithms/safeguards.py), pure: per-layer caps and
super-expert protection."""

import torch

from optimum_grape.algorithms.safeguards import layer_caps, super_experts


def test_layer_caps_bound_each_layer_but_always_fit_the_uniform_plan():
    num, floors = {l: 8 for l in range(6)}, {l: 2 for l in range(6)}
    assert layer_caps(num, floors, 12, 2.0) == {l: 4 for l in range(6)}
    assert layer_caps(num, floors, 24, 2.0) == {l: 6 for l in range(6)}  # the floor binds first
    assert layer_caps(num, floors, 3, 1.0) == {l: 1 for l in range(6)}  # uniform share never cut
    assert layer_caps(num, floors, 12, None) == {l: 6 for l in range(6)}


def test_super_experts_are_the_extreme_outliers_only():
    flat = {l: torch.full((8,), 3.0, dtype=torch.float64) + 0.1 * l for l in range(4)}
    assert super_experts(flat) == {}
    flat[2][5] = 300.0
    assert super_experts(flat) == {2: [5]}
