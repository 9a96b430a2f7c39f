"""Pure-function tests: similarity, budgets, GRAPE's greedy allocation, merging. Milliseconds each."""

import math

import pytest
import torch

from optimum_grape.algorithms.budget import check_budget, uniform_removals
from optimum_grape.algorithms.grape import UnionFind, greedy_merge_to, grape_global_merge
from optimum_grape.algorithms.merging import cluster_weights, combine_rows, order_clusters
from optimum_grape.algorithms.similarity import expert_similarity
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


@pytest.mark.parametrize("measure", ["cka", "cosine", "mse"])
def test_identical_experts_are_maximally_similar(measure):
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(4, 50, 16, generator=gen)
    outputs[2] = outputs[0]
    sim = expert_similarity(outputs, measure)
    assert torch.allclose(sim, sim.T)
    off = sim.clone().fill_diagonal_(-math.inf)
    assert divmod(int(off.argmax()), 4) in [(0, 2), (2, 0)]
    assert float(sim[0, 2]) == pytest.approx(float(sim[0, 0]), abs=1e-9)


def test_cka_is_invariant_to_scale_and_rotation():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    outputs = torch.stack([x, 3.0 * x @ q, torch.randn(60, 8, generator=gen)])
    sim = expert_similarity(outputs, "cka")
    assert float(sim[0, 1]) == pytest.approx(1.0, abs=1e-9)
    assert float(sim[0, 2]) < 0.5


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


def test_uniform_removals_are_even_and_respect_floors():
    n = {0: 8, 1: 8, 2: 8, 3: 8}
    assert uniform_removals(n, {l: 2 for l in n}, 4) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert uniform_removals(n, {l: 2 for l in n}, 6) == {0: 1, 1: 1, 2: 2, 3: 2}
    assert sum(uniform_removals({0: 4, 1: 8}, {0: 3, 1: 2}, 6).values()) == 6
    with pytest.raises(BudgetError, match="at most"):
        check_budget(n, {l: 7 for l in n}, 5)


def test_combine_rows_identity_and_weighted_average():
    t = torch.randn(4, 3, 2)
    assert torch.equal(combine_rows(t, [[0], [1], [2], [3]], [[1.0]] * 4), t)
    merged = combine_rows(t, [[1, 3], [0], [2]], [[0.25, 0.75], [1.0], [1.0]])
    assert torch.allclose(merged[0], 0.25 * t[1] + 0.75 * t[3], atol=1e-6)


def test_cluster_weights_and_order():
    freq = torch.tensor([10.0, 30.0, 0.0, 60.0])
    clusters = order_clusters([[0, 1, 3], [2]], freq)
    assert clusters == [[2], [3, 0, 1]]
    assert cluster_weights(clusters, freq, "weighted") == [[1.0], [0.6, 0.1, 0.3]]
    assert cluster_weights(clusters, freq, "drop") == [[1.0], [1.0, 0.0, 0.0]]


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
