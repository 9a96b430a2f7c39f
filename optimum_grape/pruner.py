"""`GrapePruner`: the four separable steps (calibrate -> plan -> apply -> save) behind one object.

    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25))
    stats = pruner.calibrate(model, texts, tokenizer)   # measures; model unchanged
    plan = pruner.plan(stats)                           # pure
    pruner.apply(model, plan)                           # changes the model in place
    pruner.save_pretrained(model, "out", tokenizer)     # Hub-ready folder
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

from .adapters import find_moe_layers
from .algorithms.budget import check_budget
from .algorithms.merging import cluster_weights, order_clusters, router_weights
from .apply import apply_plan
from .calibration import calibration_batches, load_calibration_data, recording
from .config import GrapeConfig
from .errors import GrapeError
from .methods import get_method, resolve_allocation, resolve_merge
from .plan import PruningPlan
from .stats import ExpertStats

logger = logging.getLogger("optimum_grape")


class GrapePruner:
    def __init__(self, config: GrapeConfig | None = None, **kwargs) -> None:
        if config is None:
            config = GrapeConfig(**kwargs)
        elif kwargs:
            raise TypeError("Pass either a GrapeConfig or keyword fields, not both.")
        config.validate()
        self.config = config
        self.method = get_method(config.method)
        self.allocation = resolve_allocation(self.method, config.allocation)
        self.merge = resolve_merge(self.method, config.merge)
        self.router = config.router or self.method.default_router
        self.last_plan: PruningPlan | None = None
        self.evaluation: dict = {}
        self.timings: dict = {}

    # -- checks -----------------------------------------------------------------------------------
    def check(self, model) -> dict[int, int]:
        """Everything that can be refused from the model and config alone; returns per-layer floors."""
        adapter, layers = find_moe_layers(model)
        adapter.check_needs(layers, self.method.needs)
        num_experts = {layer.index: layer.num_experts for layer in layers}
        floors = {layer.index: max(adapter.layer_floor(layer), self.config.min_experts_per_layer)
                  for layer in layers}
        check_budget(num_experts, floors, self.config.budget_for(sum(num_experts.values())))
        self.method.check(num_experts, self.config, floors)
        return floors

    # -- 1. measure -------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, model, data=None, tokenizer=None, extra_needs=()) -> ExpertStats:
        """Run the calibration data through `model`, recording per layer and expert what the method needs.

        `extra_needs` records more (e.g. every method's needs, to compare methods on ONE calibration:
        `extra_needs=optimum_grape.methods.NEEDS`)."""
        self.check(model)
        data = load_calibration_data(self.config.dataset if data is None else data)
        batches = calibration_batches(data, tokenizer, self.config.num_samples, self.config.sequence_length,
                                      self.config.batch_size)
        adapter, layers = find_moe_layers(model)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            with recording(model, adapter, layers, len(batches), self.config.max_tokens_per_layer,
                           self.config.seed) as recorders:
                for batch in tqdm(batches, desc="GRAPE calibration", unit="batch", leave=False):
                    model(input_ids=batch.to(device), use_cache=False)
            needs = frozenset(self.method.needs) | frozenset(extra_needs)
            layer_stats = {
                layer.index: recorders[layer.index].finalize(needs, self.config.similarity, model.config,
                                                             adapter.layer_floor(layer))
                for layer in layers
            }
        finally:
            model.train(was_training)
        num_tokens = sum(b.numel() for b in batches)
        self.timings["calibration_s"] = time.perf_counter() - start
        metadata = {"model_type": model.config.model_type, "num_tokens": num_tokens, "num_sequences":
                    sum(b.shape[0] for b in batches), "similarity": self.config.similarity,
                    "needs": sorted(needs), "seed": self.config.seed}
        logger.info("GRAPE: calibrated %d MoE layers on %d tokens in %.1fs", len(layers), num_tokens,
                    self.timings["calibration_s"])
        return ExpertStats(layers=layer_stats, metadata=metadata)

    # -- 2. plan (pure) ---------------------------------------------------------------------------
    def plan(self, stats: ExpertStats) -> PruningPlan:
        missing = [n for n in self.method.needs for l, s in stats.layers.items() if getattr(s, n) is None]
        if missing:
            raise GrapeError(f"Method {self.method.name!r} needs {sorted(set(missing))} in the statistics; "
                             "recalibrate with this config (statistics record only what their method needed).")
        floors = {l: max(s.floor, self.config.min_experts_per_layer) for l, s in stats.layers.items()}
        total = sum(stats.num_experts.values())
        budget = self.config.budget_for(total)
        check_budget(stats.num_experts, floors, budget)
        start = time.perf_counter()
        raw, metadata = self.method.cluster(stats, budget, floors, self.allocation, self.config)
        chosen = {int(l): list(r) for l, r in metadata.pop("representatives", {}).items()}
        clusters, weights, routers = {}, {}, {}
        for l in sorted(raw):
            priority = stats.layers[l].tokens.double().clone()
            priority[chosen.get(l, [])] += float(priority.abs().sum()) + 1.0  # a method's chosen keepers do
            clusters[l] = order_clusters(raw[l], priority)
            weights[l] = self.method.merge_weights(l, stats, clusters[l], self.merge, self.config) or \
                cluster_weights(clusters[l], stats.layers[l].tokens, self.merge)
            routers[l] = router_weights(clusters[l], self.router)
        self.timings["plan_s"] = time.perf_counter() - start
        metadata = {"allocation": self.allocation, "merge": self.merge, "budget": budget,
                    "similarity": self.config.similarity if "similarity" in self.method.needs else None,
                    "entropy_tolerance": self.config.entropy_tolerance, "floors": {str(k): v for k, v in floors.items()},
                    "calibration": stats.metadata, **metadata}
        plan = PruningPlan(clusters=clusters, num_experts_before=stats.num_experts, merge_weights=weights,
                           router_weights=routers, method=self.method.name, router=self.router,
                           align_neurons=self.config.align_neurons and self.merge != "drop", metadata=metadata)
        if plan.num_removed != budget:
            raise GrapeError(f"Method {self.method.name!r} removed {plan.num_removed} experts, not the budget {budget}.")
        for layer, kept in plan.experts_per_layer.items():
            if kept < floors[layer]:
                raise GrapeError(f"Method {self.method.name!r} left layer {layer} with {kept} < floor {floors[layer]}.")
        self.last_plan = plan
        return plan

    # -- 3. change --------------------------------------------------------------------------------
    def apply(self, model, plan: PruningPlan) -> None:
        # The checkpoint records the settings actually used (method defaults resolved), not None.
        resolved = {**self.config.to_dict(), "allocation": self.allocation, "merge": self.merge, "router": self.router}
        apply_plan(model, plan, GrapeConfig.from_dict(resolved))
        self.last_plan = plan

    def prune(self, model, data=None, tokenizer=None):
        stats = self.calibrate(model, data, tokenizer)
        self.apply(model, self.plan(stats))
        return model

    # -- 4. save ----------------------------------------------------------------------------------
    def save_pretrained(self, model, out_dir, tokenizer=None, overwrite: bool = False, base_model: str | None = None):
        from .checkpoint import save_pruned

        return save_pruned(model, out_dir, tokenizer=tokenizer, plan=self.last_plan, overwrite=overwrite,
                           evaluation=self.evaluation, base_model=base_model)

    def push_to_hub(self, model, repo_id: str, tokenizer=None, private: bool | None = None, token=None,
                    base_model: str | None = None):
        from .checkpoint import push_pruned

        return push_pruned(model, repo_id, tokenizer=tokenizer, plan=self.last_plan, evaluation=self.evaluation,
                           private=private, token=token, base_model=base_model)
