"""From a method's clusters to a `PruningPlan`, for one resolved configuration: representatives
ordered first, merge and router weights, the plan's record of how it was made, the budget and the
floors checked; when a method offers several candidates, the choice among them end to end
(`scoring.py`), and the per-layer sensitivity probe that GRAPE's default plans with."""

from __future__ import annotations

import logging
import time

import torch

from ..algorithms.budget import check_budget
from ..algorithms.merging import cluster_weights, order_clusters, router_weights
from ..algorithms.similarity import expert_similarity
from ..config import GrapeConfig
from ..errors import GrapeError
from ..adapters.fingerprint import stats_fingerprint
from ..merging.with_data import replan_weights
from ..methods import Candidate, PruningMethod
from ..plan import PruningPlan
from ..stats import ExpertStats
from .scoring import SCORE_METRIC, score_plans

logger = logging.getLogger("optimum_grape")


class Planner:
    """Plans for one configuration, with the method and its resolved allocation, merge and router."""

    def __init__(self, config: GrapeConfig, method: PruningMethod, allocation: str, merge: str, router: str) -> None:
        self.config, self.method = config, method
        self.allocation, self.merge, self.router = allocation, merge, router

    def floors(self, stats: ExpertStats) -> dict[int, int]:
        return {l: max(s.floor, self.config.min_experts_per_layer) for l, s in stats.layers.items()}

    def align_neurons(self, merge: str | None = None) -> bool:
        return self.config.align_neurons and (merge or self.merge) != "drop"

    # -- the plan ---------------------------------------------------------------------------------
    def plan(self, stats: ExpertStats, model=None, selection_batches=(), selection_overlaps: bool = False
             ) -> PruningPlan:
        """The plan for `stats`; candidates (if the method offers several) scored on `model` over
        `selection_batches`."""
        missing = [n for n in self.method.needs for l, s in stats.layers.items() if getattr(s, n) is None]
        if missing:
            raise GrapeError(f"Method {self.method.name!r} needs {sorted(set(missing))} in the statistics; "
                             "recalibrate with this config (statistics record only what their method needed).")
        floors = self.floors(stats)
        budget = self.config.budget_for(sum(stats.num_experts.values()))
        check_budget(stats.num_experts, floors, budget)
        options = self.method.candidates(stats, budget, floors, self.allocation, self.config)
        scorable = model is not None and bool(selection_batches)
        if options is not None and scorable and self.config.merge is None and len(self.method.merge_choices) > 1:
            # The merge is chosen end to end like the allocation: every candidate with each merge.
            options = [Candidate(c.name + ("" if merge == self.merge else f", merge={merge}"), c.clusters, c.metadata,
                                 merge) for c in options for merge in self.method.merge_choices]
        if options is None:
            raw, metadata = self.method.cluster(stats, budget, floors, self.allocation, self.config)
            plan = self.build(stats, raw, metadata, floors, budget)
        else:
            plan = self.choose(stats, options, floors, budget, model, list(selection_batches), selection_overlaps)
        plan.model_fingerprint = stats_fingerprint(stats)  # applying it to another model is refused
        return plan

    def build(self, stats: ExpertStats, raw, metadata: dict, floors: dict[int, int], budget: int,
              merge: str | None = None) -> PruningPlan:
        merge = merge or self.merge
        metadata = dict(metadata)
        chosen = {int(l): list(r) for l, r in metadata.pop("representatives", {}).items()}
        clusters, weights, routers = {}, {}, {}
        for l in sorted(raw):
            clusters[l] = self.ordered(stats, l, raw[l], chosen)
            weights[l] = self.merge_weights(stats, l, clusters[l], merge)
            routers[l] = router_weights(clusters[l], self.router)
        metadata = {"allocation": self.allocation, "merge": merge, "budget": budget,
                    "similarity": self.config.similarity if "similarity" in self.method.needs else None,
                    "entropy_tolerance": self.config.entropy_tolerance, "floors": {str(k): v for k, v in floors.items()},
                    "calibration": stats.metadata, **metadata}
        plan = PruningPlan(clusters=clusters, num_experts_before=stats.num_experts, merge_weights=weights,
                           router_weights=routers, method=self.method.name, router=self.router,
                           align_neurons=self.align_neurons(merge), metadata=metadata)
        if plan.num_removed != budget:
            raise GrapeError(f"Method {self.method.name!r} removed {plan.num_removed} experts, not the budget {budget}.")
        for layer, kept in plan.experts_per_layer.items():
            if kept < floors[layer]:
                raise GrapeError(f"Method {self.method.name!r} left layer {layer} with {kept} < floor {floors[layer]}.")
        return plan

    @staticmethod
    def ordered(stats: ExpertStats, layer: int, raw, chosen: dict) -> list[list[int]]:
        """Representative first: a method's chosen keeper, else the most-routed member."""
        priority = stats.layers[layer].tokens.double().clone()
        priority[chosen.get(layer, [])] += float(priority.abs().sum()) + 1.0
        return order_clusters(raw, priority)

    def merge_weights(self, stats: ExpertStats, layer: int, clusters, merge: str | None = None) -> list[list[float]]:
        merge = merge or self.merge
        st = stats.layers[layer]
        mass = st.tokens * st.saliency if merge == "saliency" else st.tokens  # REAM: saliency-weighted
        return self.method.merge_weights(layer, stats, clusters, merge, self.config) or \
            cluster_weights(clusters, mass, "weighted" if merge == "saliency" else merge)

    # -- end to end -------------------------------------------------------------------------------
    def choose(self, stats: ExpertStats, options, floors, budget, model, selection_batches, overlaps: bool
               ) -> PruningPlan:
        scored = model is not None and bool(selection_batches) and len(options) > 1
        if not scored:  # only the fallback is used: build nothing else
            options = options[:1]
        plans = [self.build(stats, c.clusters, {**c.metadata, "candidate": c.name}, floors, budget, c.merge)
                 for c in options]
        if scored:
            tokens = sum(b.numel() for b in selection_batches)
            logger.info("GRAPE: scoring %d candidate plans: each applied in turn, its next-token distribution compared "
                        "with the unpruned model's (KL per token) on %d held-aside tokens ...", len(plans), tokens)
            scores = score_plans(model, plans, selection_batches)
            for c, p, s in zip(options, plans, scores):
                logger.info("  %-34s KL %.5f   experts kept per layer %s", c.name, s, list(p.experts_per_layer.values()))
            best = min(range(len(plans)), key=lambda i: (scores[i], i))
            selection = {"metric": SCORE_METRIC, "tokens": tokens, "overlaps_calibration": overlaps}
        else:
            scores, best = [None] * len(plans), 0
            why = "no model given to plan()" if model is None else "no held-aside calibration windows"
            logger.warning("GRAPE: candidate plans not scored (%s): using the %r candidate, the method's fallback. "
                           "Pass the model to GrapePruner.plan(stats, model) to choose end to end.", why,
                           options[0].name)
            selection = {"metric": None, "not_scored_because": why}
        plan = plans[best]
        plan.metadata["candidates"] = [
            {"name": c.name, "experts_per_layer": list(p.experts_per_layer.values()), "score": s,
             "entropy_tolerance": c.metadata.get("entropy_tolerance"), "merge": p.metadata["merge"]}
            for c, p, s in zip(options, plans, scores)]
        plan.metadata["selection"] = {**selection, "chosen": options[best].name}
        if scored:
            uniform = next((s for c, s in zip(options, scores) if c.name == "uniform"), None)
            logger.info("GRAPE: chose %s (KL %.5f%s)", options[best].name, scores[best],
                        "" if uniform is None else f"; uniform {uniform:.5f}")
        return plan

    def measure_sensitivity(self, model, stats: ExpertStats, selection_batches) -> None:
        """End-to-end KL of the method's probe clusters, one layer at a time (`PruningMethod.probe`),
        stored on each layer's statistics for the method to plan with."""
        floors = self.floors(stats)
        budget = self.config.budget_for(sum(stats.num_experts.values()))
        probe = self.method.probe(stats, budget, floors, self.allocation, self.config)
        if not probe or not selection_batches:
            return
        plans = []
        for l, (raw, _) in sorted(probe.items()):
            clusters = self.ordered(stats, l, raw, {})
            plans.append(PruningPlan(clusters={l: clusters}, num_experts_before={l: stats.num_experts[l]},
                                     merge_weights={l: self.merge_weights(stats, l, clusters)},
                                     router_weights={l: router_weights(clusters, self.router)}, method=self.method.name,
                                     router=self.router, align_neurons=self.align_neurons(),
                                     metadata={"candidate": f"probe layer {l}"}))
        start = time.perf_counter()
        logger.info("GRAPE: measuring each MoE layer's sensitivity: its share of the cheapest merges applied alone, "
                    "KL to the unpruned model on %d held-aside tokens (%d layers) ...",
                    sum(b.numel() for b in selection_batches), len(plans))
        scores = score_plans(model, plans, selection_batches)
        for (l, (raw, local_cost)), kl in zip(sorted(probe.items()), scores):
            stats.layers[l].sensitivity = {"kl": kl, "merges": stats.num_experts[l] - len(raw),
                                           "local_cost": local_cost}
        logger.info("GRAPE: sensitivity measured in %.1fs; KL per layer, in layer order: %s",
                    time.perf_counter() - start, [round(k, 4) for k in scores])

    # -- sequential re-planning -------------------------------------------------------------------
    def replanner(self, plan: PruningPlan):
        """Re-plans one layer on its current inputs with the method's own per-layer rule (sequential)."""
        protected = {int(l): set(e) for l, e in (plan.metadata.get("super_experts") or {}).items()}
        config = self.config
        merge = plan.metadata.get("merge") or self.merge

        def replan(index, adapter, layer, hidden, gates):
            rows = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(config.seed))
            rows = rows[:config.max_tokens_per_layer].to(hidden.device)
            outputs = adapter.run_experts(layer, hidden[rows], range(layer.num_experts)).float()
            sim = expert_similarity(outputs, config.similarity, gates[rows].float()).cpu()
            raw = self.method.replan_layer(sim, len(plan.clusters[index]), protected.get(index, set()))
            if raw is None:
                raise GrapeError(f"Method {self.method.name!r} cannot re-plan one layer: set sequential=False.")
            counts = (gates > 0).double().sum(0).cpu()
            clusters = order_clusters(raw, counts)
            weights, routers = replan_weights(clusters, gates.cpu(), "weighted" if merge == "saliency" else merge,
                                              self.router)
            return clusters, weights, routers

        return replan
