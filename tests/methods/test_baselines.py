"""The baselines (methods/baselines.py), known answers on constructed statistics: frequency, REAP,
random, router-guided merging, NAEE's enumeration."""

import pytest
import torch

from factories import kept, plan_for, synthetic_stats, tiny_model
from optimum_grape import GrapeConfig, GrapeConfigError, GrapePruner


def test_frequency_drops_the_never_routed_expert():
    stats = synthetic_stats()
    stats.layers[1].tokens[5] = 0.0
    plan = plan_for("frequency", stats, num_experts_to_prune=1, allocation="global")
    assert kept(plan, 1) == [0, 1, 2, 3, 4, 6, 7] and plan.experts_per_layer[0] == 8
    uniform = plan_for("frequency", stats, num_experts_to_prune=4)
    assert 5 not in kept(uniform, 1)


def test_reap_drops_the_lowest_saliency():
    stats = synthetic_stats()
    for l in stats.layers:
        stats.layers[l].saliency = torch.arange(8, 0, -1, dtype=torch.float64)  # expert 7 lowest
    plan = plan_for("reap", stats, num_experts_to_prune=4)
    assert all(kept(plan, l) == list(range(7)) for l in range(4))


def test_drop_methods_drop_and_merge_variant_averages():
    dropped = plan_for("frequency")
    assert all(w == [1.0] + [0.0] * (len(w) - 1) for ws in dropped.merge_weights.values() for w in ws)
    merged = plan_for("frequency", merge="weighted")
    assert any(len([x for x in w if x > 0]) > 1 for ws in merged.merge_weights.values() for w in ws)


def test_enumerate_refuses_too_many_subsets_before_calibration():
    model = tiny_model("mixtral", experts=8)
    pruner = GrapePruner(GrapeConfig(method="enumerate", pruning_ratio=0.5, method_kwargs={"max_subsets": 10}))
    with pytest.raises(GrapeConfigError, match="max_subsets=10"):
        pruner.calibrate(model, [])


def test_random_is_seeded():
    a, b, c = (plan_for("random", seed=s, num_experts_to_prune=8) for s in (1, 1, 2))
    assert a.clusters == b.clusters and a.clusters != c.clusters


def test_router_merge_joins_experts_to_their_router_twin():
    stats = synthetic_stats()
    st = stats.layers[0]
    st.router_logits[:, 7] = st.router_logits[:, 2] * 1.01
    st.tokens[:] = torch.tensor([90, 80, 70, 60, 50, 40, 30, 1], dtype=torch.float64)
    plan = plan_for("router_merge", stats, num_experts_to_prune=4)
    assert [2, 7] in [sorted(c) for c in plan.clusters[0]]
