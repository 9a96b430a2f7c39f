"""`cprune` (methods/cprune.py) on constructed statistics: two stages and affinity weights."""

import pytest

from factories import plan_for


def test_cprune_two_stages_and_affinity_weights():
    plan = plan_for("cprune", num_experts_to_prune=8)
    meta = plan.metadata["cprune"]
    assert meta["layer_budget"] == 4 and meta["global_budget"] == 4 and plan.router == "mean"
    assert plan.experts_per_layer == {0: 7, 1: 7, 2: 3, 3: 7}  # 1 per layer, then the global stage -> planted layer
    for l, clusters in plan.clusters.items():
        for members, w, r in zip(clusters, plan.merge_weights[l], plan.router_weights[l]):
            assert sum(w) == pytest.approx(1.0) and r == pytest.approx([1 / len(members)] * len(members))
