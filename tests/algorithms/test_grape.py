"""GRAPE's global allocation (algorithms/grape.py), pure: planted copies merged first, deterministic
and exact, the entropy freeze, floors, already-joined pairs, union-find, whole groups for grouped
routers, caps and protected experts."""

import pytest
import torch

from optimum_grape.algorithms.grape import UnionFind, grape_global_merge, greedy_merge_to
from optimum_grape.errors import BudgetError


def planted_similarities(layers=4, experts=8, hot_layer=2, copies=(0, 1, 2, 3, 4, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    sims = {}
    for l in range(layers):
        s = torch.rand(experts, experts, generator=gen, dtype=torch.float64) * 0.2
        s = (s + s.T) / 2
        if l == hot_layer:
            for i in copies:
                for j in copies:
                    s[i, j] = 1.0
        s.fill_diagonal_(1.0)
        sims[l] = s
    return sims


def test_grape_merges_only_the_planted_copies():
    sims = planted_similarities()
    result = grape_global_merge(sims, {l: 2 for l in sims}, budget=3, entropy_tolerance=0.1)
    for layer, clusters in result.clusters.items():
        if layer != 2:
            assert clusters == [[e] for e in range(8)]
    merged = [c for c in result.clusters[2] if len(c) > 1]
    assert all(set(c) <= {0, 1, 2, 3, 4, 5} for c in merged)
    assert sum(len(c) - 1 for c in merged) == 3
    assert [m[0] for m in result.merge_order] == [2, 2, 2]


def test_grape_is_deterministic_and_exact():
    sims = planted_similarities(seed=3)
    a = grape_global_merge(sims, {l: 2 for l in sims}, budget=10, entropy_tolerance=0.05)
    b = grape_global_merge(sims, {l: 2 for l in sims}, budget=10, entropy_tolerance=0.05)
    assert a.clusters == b.clusters
    assert sum(len(c) for c in a.clusters.values()) == 32 - 10


def test_entropy_freeze_spreads_the_budget_and_restarts():
    sims = planted_similarities(copies=tuple(range(8)))  # layer 2 is wholly redundant
    strict = grape_global_merge(sims, {l: 2 for l in sims}, budget=8, entropy_tolerance=0.0)
    # gamma = 0 freezes a layer after each merge: merges rotate over layers, with restarts.
    assert strict.restarts >= 1
    assert len({m[0] for m in strict.merge_order}) == 4
    loose = grape_global_merge(sims, {l: 2 for l in sims}, budget=6, entropy_tolerance=1.0)
    assert len(loose.clusters[2]) == 2  # gamma = 1 never freezes: all in the redundant layer


def test_floor_is_never_broken_and_budget_beyond_floor_is_refused():
    sims = planted_similarities(copies=tuple(range(8)))
    result = grape_global_merge(sims, {l: 3 for l in sims}, budget=12, entropy_tolerance=1.0)
    assert min(len(c) for c in result.clusters.values()) >= 3
    with pytest.raises(BudgetError, match="at most 20"):
        grape_global_merge(sims, {l: 3 for l in sims}, budget=21, entropy_tolerance=0.1)


def test_already_joined_pair_is_subtracted_but_not_merged():
    # 0~1, 1~2 strong, so (0,2) is processed after both merges: it must not count as a merge.
    s = torch.full((4, 4), 0.0, dtype=torch.float64)
    s[0, 1] = s[1, 0] = 0.9
    s[1, 2] = s[2, 1] = 0.8
    s[0, 2] = s[2, 0] = 0.7
    s.fill_diagonal_(1.0)
    clusters = greedy_merge_to(s, 1)
    assert clusters == [[0, 1, 2, 3]]
    result = grape_global_merge({0: s, 1: torch.eye(4, dtype=torch.float64)}, {0: 1, 1: 1}, budget=2,
                                entropy_tolerance=1.0)
    assert result.clusters[0] == [[0, 1, 2], [3]]
    assert len(result.merge_order) == 2


def test_union_find():
    uf = UnionFind(5)
    assert uf.union(3, 4) and uf.union(0, 3) and not uf.union(4, 0)
    assert uf.groups() == [[0, 3, 4], [1], [2]]


def test_grouped_layers_merge_whole_groups_and_fall_back_only_for_a_remainder():
    gen = torch.Generator().manual_seed(5)
    sims = {}
    for l in range(3):
        s = torch.rand(16, 16, generator=gen, dtype=torch.float64)
        sims[l] = (s + s.T) / 2
    groups = {l: (4, 8) for l in sims}  # n_group 4, grouping valid from 8 experts on
    floors = {l: 2 for l in sims}
    exact = grape_global_merge(sims, floors, 8, 1.0, groups)
    counts = [len(c) for c in exact.clusters.values()]
    assert sum(counts) == 48 - 8 and all(c % 4 == 0 and c >= 8 for c in counts)
    rest = grape_global_merge(sims, floors, 9, 1.0, groups)
    counts = [len(c) for c in rest.clusters.values()]
    assert sum(counts) == 48 - 9 and sum(c % 4 != 0 for c in counts) == 1  # one layer takes the remainder
    deep = grape_global_merge(sims, floors, 30, 1.0, groups)  # beyond grouped floors: single merges go on
    assert sum(len(c) for c in deep.clusters.values()) == 18 and min(len(c) for c in deep.clusters.values()) >= 2


def test_global_merge_respects_caps_and_never_merges_protected_experts():
    gen = torch.Generator().manual_seed(0)
    sims = {l: torch.rand(8, 8, generator=gen) for l in range(4)}
    sims[2] = sims[2] + 10  # one layer far more redundant than the rest
    sims = {l: (s + s.T) / 2 for l, s in sims.items()}
    uncapped = grape_global_merge(sims, {l: 2 for l in sims}, 8, 1.0)
    assert len(uncapped.clusters[2]) == 2  # without a cap the redundant layer takes everything
    capped = grape_global_merge(sims, {l: 2 for l in sims}, 8, 1.0, caps={l: 3 for l in sims},
                                protected={2: {0, 5}})
    assert all(len(c) >= 5 for c in capped.clusters.values())
    assert sum(8 - len(c) for c in capped.clusters.values()) == 8
    assert [0] in capped.clusters[2] and [5] in capped.clusters[2]


def test_free_merges_come_first_and_do_not_count_against_the_cap():
    """A layer holding copies (similarity 1) merges them whatever the cap and the other layers'
    redundancy; only costly merges count against the cap."""
    gen = torch.Generator().manual_seed(1)
    sims = {l: (lambda s: (s + s.T) / 2)(0.5 + 0.4 * torch.rand(8, 8, generator=gen, dtype=torch.float64))
            for l in range(4)}
    for i in range(4):
        for j in range(4):
            sims[2][i, j] = 1.0  # experts 0-3 of layer 2: free merges
    sims[3] = sims[3] * 0 + 0.98  # layer 3 looks the most redundant in total, but no merge of it is free
    sims[3].fill_diagonal_(1.0)
    floors, caps = {l: 2 for l in sims}, {l: 1 for l in sims}
    capped = grape_global_merge(sims, floors, 3, 1.0, caps=caps)
    assert len(capped.clusters[2]) == 7  # without free_above the cap stops the copies at one merge
    free = grape_global_merge(sims, floors, 5, 1.0, caps=caps, free_above=0.99)
    assert [m[0] for m in free.merge_order[:3]] == [2, 2, 2]  # with it the free merges come first
    assert len(free.clusters[2]) == 5 and sum(8 - len(c) for c in free.clusters.values()) == 5
    assert all(8 - len(c) <= 1 for l, c in free.clusters.items() if l != 2)  # costly merges obey the cap
