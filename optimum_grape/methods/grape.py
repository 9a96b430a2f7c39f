"""`grape`: GRAPE (arXiv 2604.06542). Global: Algorithm 1 over all layers' similarity matrices.
Uniform: the same greedy pair merging, with the same cut in every layer (the paper's ablation)."""

from __future__ import annotations

from ..algorithms.budget import uniform_removals
from ..algorithms.grape import greedy_merge_to, grape_global_merge
from .base import PruningMethod


class GrapeMethod(PruningMethod):
    name = "grape"
    needs = frozenset({"similarity"})
    default_allocation = "global"
    default_merge = "weighted"
    reference = "GRAPE, arXiv 2604.06542"

    def cluster(self, stats, budget, floors, allocation, config):
        sims = {l: s.similarity for l, s in stats.layers.items()}
        if allocation == "uniform":
            removals = uniform_removals(stats.num_experts, floors, budget)
            return {l: greedy_merge_to(sims[l], stats.num_experts[l] - removals[l]) for l in sims}, {}
        groups = {l: (s.routing.get("n_group", 1), s.routing.get("min_grouped", 0)) for l, s in stats.layers.items()
                  if s.routing.get("n_group", 1) > 1}
        result = grape_global_merge(sims, floors, budget, config.entropy_tolerance, groups)
        meta = {"restarts": result.restarts, "entropy_before": result.entropy_before,
                "entropy_after": result.entropy_after, "entropy_threshold": result.entropy_threshold,
                "merge_order": [list(m) for m in result.merge_order]}
        return result.clusters, meta
