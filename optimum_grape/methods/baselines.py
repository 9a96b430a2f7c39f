"""The local (and, where they have a natural cross-layer score, global) baselines every method is
compared against under the same budget: frequency, REAP, random, router-guided merging, local
output-similarity merging, and NAEE's exhaustive enumeration."""

from __future__ import annotations

import torch

from ..algorithms.budget import uniform_removals
from ..algorithms.selection import (average_linkage, best_subset, count_subsets, lowest_globally, lowest_per_layer,
                                    router_guided_groups, share_of_layer)
from ..errors import BudgetError, GrapeConfigError
from .base import Hyperparameter, PruningMethod, keep_result


class _ScoreMethod(PruningMethod):
    """Keep the highest-scoring experts; removed ones join their nearest kept expert (dropped under
    merge='drop', averaged in under merge='weighted')."""

    def scores(self, stats, config) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def cluster(self, stats, budget, floors, allocation, config):
        scores = self.scores(stats, config)
        if allocation == "global":
            kept = lowest_globally({l: share_of_layer(s) for l, s in scores.items()}, floors, budget)
        else:
            kept = lowest_per_layer(scores, uniform_removals(stats.num_experts, floors, budget))
        return keep_result(kept, stats)


class FrequencyMethod(_ScoreMethod):
    name = "frequency"
    reference = "count-guided, He et al. 2024, arXiv 2406.02500"

    def scores(self, stats, config):
        return {l: s.tokens for l, s in stats.layers.items()}


class ReapMethod(_ScoreMethod):
    name = "reap"
    reference = "REAP, Cerebras 2025 (saliency = mean of gate weight x output norm over routed tokens)"

    def scores(self, stats, config):
        return {l: s.saliency for l, s in stats.layers.items()}


class RandomMethod(_ScoreMethod):
    name = "random"
    reference = "seeded random removal: the floor every method must beat"

    def scores(self, stats, config):
        gen = torch.Generator().manual_seed(config.seed)
        # share_of_layer keeps these comparable across layers for allocation='global'
        return {l: torch.rand(s.num_experts, generator=gen, dtype=torch.float64) + 1e-3
                for l, s in sorted(stats.layers.items())}


class _LocalMergeBase(PruningMethod):
    """Merging methods that cut every layer equally and group each layer on its own."""

    allocations = ("uniform",)
    default_merge = "weighted"

    def group_layer(self, layer_stats, keep: int) -> list[list[int]]:
        raise NotImplementedError

    def cluster(self, stats, budget, floors, allocation, config):
        removals = uniform_removals(stats.num_experts, floors, budget)
        return {l: self.group_layer(s, s.num_experts - removals[l]) for l, s in stats.layers.items()}, {}


class RouterMergeMethod(_LocalMergeBase):
    name = "router_merge"
    needs = frozenset({"router_logits"})
    reference = "MC-SMoE, Li et al., ICLR 2024"

    def group_layer(self, layer_stats, keep):
        return router_guided_groups(layer_stats.router_logits, layer_stats.tokens, keep)


class LocalMergeMethod(_LocalMergeBase):
    name = "local_merge"
    needs = frozenset({"similarity"})
    reference = "DEK-like local baseline, arXiv 2407.09590"

    def group_layer(self, layer_stats, keep):
        return average_linkage(layer_stats.similarity, keep)

    def replan_layer(self, similarity, keep, protected):
        return average_linkage(similarity, keep)


class EnumerateMethod(PruningMethod):
    name = "enumerate"
    needs = frozenset({"expert_outputs", "router_logits"})
    allocations = ("uniform",)
    reference = "NAEE, Lu et al., ACL 2024"
    default_max_subsets = 5000
    hyperparameters = {"max_subsets": Hyperparameter("most expert subsets scored in one layer (default 5000)", 1,
                                                     integer=True)}

    def _max_subsets(self, config) -> int:
        return int(config.method_kwargs.get("max_subsets", self.default_max_subsets))

    def check(self, num_experts, config, floors=None) -> None:
        floors = floors or {l: 1 for l in num_experts}
        budget = config.budget_for(sum(num_experts.values()))
        try:
            removals = uniform_removals(num_experts, floors, budget)
        except BudgetError:
            return  # the pruner reports the budget error itself
        worst = max(count_subsets(n, n - removals[l]) for l, n in num_experts.items())
        if worst > self._max_subsets(config):
            raise GrapeConfigError(
                f"method='enumerate' would score {worst} expert subsets in one layer, over the limit "
                f"max_subsets={self._max_subsets(config)}; it is only feasible for few experts per layer. Use "
                "method='grape' or 'reap', or raise GrapeConfig(method_kwargs={'max_subsets': N})."
            )

    def cluster(self, stats, budget, floors, allocation, config):
        removals = uniform_removals(stats.num_experts, floors, budget)
        kept, errors = {}, {}
        for l, s in stats.layers.items():
            kept[l], errors[str(l)] = best_subset(s.expert_outputs, s.router_logits, s.routing,
                                                  s.num_experts - removals[l])
        return keep_result(kept, stats, {"reconstruction_error": errors})
