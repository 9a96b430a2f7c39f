"""Choosing experts per layer (algorithms/selection.py), pure: NAEE's enumeration finds the exact
best subset."""

import pytest
import torch

from factories import ROUTING
from optimum_grape.algorithms.selection import best_subset, route


def test_enumerate_finds_the_exact_best_subset():
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(4, 30, 5, generator=gen)
    logits = torch.randn(30, 4, generator=gen)
    logits[:, 3] = -10.0  # expert 3 is never anyone's top-1: removing it changes nothing
    subset, err = best_subset(outputs, logits, {"top_k": 1, "scoring": "softmax", "norm_topk_prob": True}, 3)
    assert subset == [0, 1, 2] and err == pytest.approx(0.0, abs=1e-12)
    # exhaustive = brute force on a top-2 case
    import itertools
    spec = ROUTING
    full = torch.einsum("te,eth->th", route(logits, spec), outputs.double())
    errors = {s: float(((torch.einsum("te,eth->th", route(logits, spec, list(s)), outputs.double()) - full) ** 2)
                       .sum(-1).mean()) for s in itertools.combinations(range(4), 2)}
    assert tuple(best_subset(outputs, logits, spec, 2)[0]) == min(errors, key=errors.get)
