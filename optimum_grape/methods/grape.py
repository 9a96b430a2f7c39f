"""`grape`: GRAPE (arXiv 2604.06542). Global: Algorithm 1 over all layers' similarity matrices.
Uniform: the same greedy pair merging, with the same cut in every layer (the paper's ablation).

The default preset plans on merge costs (usage-aware, comparable across layers), caps what one
layer may lose, protects super experts, and offers candidates (the uniform allocation and several
gammas) that `GrapePruner` scores end to end; the 'paper' preset is Algorithm 1 as published
(docs/methods.md, "Presets")."""

from __future__ import annotations

import torch

from ..algorithms.budget import uniform_removals
from ..algorithms.grape import grape_global_merge, greedy_merge_to, greedy_merges
from ..algorithms.safeguards import layer_caps, super_experts
from ..algorithms.similarity import cost_kernel
from .base import AUTO, Candidate, Hyperparameter, PruningMethod

# Gammas planned when entropy_tolerance='auto': from nearly uniform to no entropy bound at all. Each
# is planned with and without the layer cap and scored end to end beside the uniform allocation.
AUTO_GAMMAS = (0.01, 0.03, 0.1, 0.3, 1.0)
# The global plan used when candidates cannot be scored (`plan(stats)` without a model): the lower of
# the gammas the end-to-end choice picked on the default testbed (0.03 in 6 of 6 runs at 25%, 0.1 in 5
# of 6 at 50%; benchmarks/results/default/quality.json, `chosen`): closer to uniform, so a plan nothing
# checked errs toward caution.
UNSCORED_GAMMA = 0.03
# A merge whose cost kernel is at least this (a cost below 1% of the model's median merge cost: exact
# or near copies) is free: it does not count against the layer cap.
FREE_MERGE = 0.99


def end_to_end_costs(stats) -> dict[int, torch.Tensor]:
    """Minus merge costs in units of end-to-end KL: each layer's relative costs times its measured
    sensitivity, KL of its probe merges / their summed relative cost. That cost is floored at a tenth of
    the median over layers, so a layer whose probe merges look free locally (planted copies) is not
    given an exploding scale by a small KL that the local model cannot see (re-routing). Layers
    without a measurement take the median sensitivity."""
    measured = {l: s.sensitivity for l, s in stats.layers.items() if s.sensitivity}
    if measured:
        floor = 0.1 * float(torch.tensor([m["local_cost"] for m in measured.values()]).median())
        scale = {l: m["kl"] / max(m["local_cost"], floor, 1e-12) for l, m in measured.items()}
        default = float(torch.tensor(list(scale.values())).median())
    else:
        scale, default = {}, 1.0
    return {l: s.similarity * max(scale.get(l, default), 1e-12) for l, s in stats.layers.items()}


class GrapeMethod(PruningMethod):
    name = "grape"
    needs = frozenset({"similarity"})
    default_allocation = "global"
    default_merge = "weighted"
    merge_choices = ("weighted", "drop")
    reference = "GRAPE, arXiv 2604.06542"
    hyperparameters = {"gammas": Hyperparameter("gammas planned and scored when entropy_tolerance='auto'", 0.0, 1.0,
                                                many=True)}

    def _inputs(self, stats, config):
        sims = {l: s.similarity for l, s in stats.layers.items()}
        if stats.metadata.get("similarity") == "merge_cost":
            sims = cost_kernel(end_to_end_costs(stats))
        protected = self._protected(stats, config)
        return sims, protected

    @staticmethod
    def _protected(stats, config) -> dict[int, list[int]]:
        return super_experts({l: s.max_output for l, s in stats.layers.items()}) if config.protect_super_experts else {}

    def probe(self, stats, budget, floors, allocation, config):
        """Merge costs are relative to each layer's own output, but a layer's output matters more or less
        to the model's predictions (a first layer feeding every later one is far more sensitive). So
        calibration measures, per layer, the KL that its uniform share of cheapest merges causes end to
        end, and planning rescales that layer's costs by KL / local cost (`end_to_end_costs`)."""
        if stats.metadata.get("similarity") != "merge_cost" or allocation != "global":
            return None
        protected = self._protected(stats, config)
        removals = uniform_removals(stats.num_experts, floors, budget)
        out = {}
        for l, s in stats.layers.items():
            clusters, sims = greedy_merges(s.similarity, max(1, removals[l]), set(protected.get(l, ())))
            out[l] = (clusters, -sum(sims))
        return out

    def _uniform(self, stats, sims, protected, budget, floors):
        removals = uniform_removals(stats.num_experts, floors, budget)
        return {l: greedy_merge_to(sims[l], stats.num_experts[l] - removals[l], set(protected.get(l, ())))
                for l in sims}

    def _global(self, stats, sims, protected, budget, floors, gamma, config, capped: bool = True):
        groups = {l: (s.routing.get("n_group", 1), s.routing.get("min_grouped", 0)) for l, s in stats.layers.items()
                  if s.routing.get("n_group", 1) > 1}
        caps = layer_caps(stats.num_experts, floors, budget, config.layer_cap if capped else None)
        free = FREE_MERGE if stats.metadata.get("similarity") == "merge_cost" else None
        result = grape_global_merge(sims, floors, budget, gamma, groups, caps, protected, free_above=free)
        meta = {"entropy_tolerance": gamma, "restarts": result.restarts, "entropy_before": result.entropy_before,
                "entropy_after": result.entropy_after, "entropy_threshold": result.entropy_threshold,
                "layer_caps": {str(l): c for l, c in caps.items()},
                "merge_order": [list(m) for m in result.merge_order]}
        return result.clusters, meta

    def _shared_metadata(self, sims, protected) -> dict:
        # Mean pairwise similarity per layer: the redundancy GRAPE ranks layers by (plots, model card).
        redundancy = {str(l): float(s[~torch.eye(s.shape[0], dtype=torch.bool)].mean()) if s.shape[0] > 1 else 0.0
                      for l, s in sims.items()}
        return {"layer_redundancy": redundancy, "super_experts": {str(l): e for l, e in protected.items()}}

    def replan_layer(self, similarity, keep, protected):
        # Within one layer the kernel keeps the cost order, so the raw similarity plans the same merges.
        return greedy_merge_to(similarity, keep, protected)

    def cluster(self, stats, budget, floors, allocation, config):
        sims, protected = self._inputs(stats, config)
        meta = self._shared_metadata(sims, protected)
        if allocation == "uniform":
            return self._uniform(stats, sims, protected, budget, floors), meta
        gamma = UNSCORED_GAMMA if config.entropy_tolerance == AUTO else float(config.entropy_tolerance)
        clusters, extra = self._global(stats, sims, protected, budget, floors, gamma, config)
        return clusters, {**meta, **extra}

    def candidates(self, stats, budget, floors, allocation, config):
        if allocation != "global" or config.entropy_tolerance != AUTO:
            return None
        sims, protected = self._inputs(stats, config)
        shared = {**self._shared_metadata(sims, protected),
                  "layer_caps": {str(l): c for l, c in layer_caps(stats.num_experts, floors, budget,
                                                                   config.layer_cap).items()}}
        out: list[Candidate] = []

        def add(name: str, clusters, meta: dict) -> None:
            # Equal plans are scored once; the uniform allocation is always scored, as the reference.
            if name == "uniform" or all(clusters != c.clusters for c in out):
                out.append(Candidate(name, clusters, {**shared, **meta}))

        def add_global(gamma: float, capped: bool) -> None:
            clusters, meta = self._global(stats, sims, protected, budget, floors, float(gamma), config, capped)
            add(f"gamma={gamma:g}" + ("" if capped else ", no cap"), clusters, {**meta, "allocation_rule": "global"})

        add_global(UNSCORED_GAMMA, True)  # the fallback first: what is used when no model scores them
        add("uniform", self._uniform(stats, sims, protected, budget, floors), {"allocation_rule": "uniform"})
        for gamma in config.method_kwargs.get("gammas", AUTO_GAMMAS):
            for capped in (True, False) if config.layer_cap is not None else (True,):
                add_global(gamma, capped)
        return out
