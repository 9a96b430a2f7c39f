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
from . import distributed
from .calibration import calibration_windows, held_aside, load_calibration_data, recording, warn_if_little_data
from .calibration.recorder import set_batch
from .config import GrapeConfig
from .errors import GrapeConfigError, GrapeError
from .fingerprint import stats_fingerprint
from .methods import PruningMethod, get_method, resolve_allocation, resolve_merge
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
        if config.sequential and type(self.method).replan_layer is PruningMethod.replan_layer:
            raise GrapeConfigError(f"sequential=True re-plans one layer at a time, which method {config.method!r} "
                                   "cannot do; use method='grape' or 'local_merge', or sequential=False.")
        self.last_plan: PruningPlan | None = None
        self.evaluation: dict = {}
        self.timings: dict = {}
        # Calibration windows held aside to score candidate plans end to end (set by `calibrate`).
        self.selection_batches: list[torch.Tensor] = []
        self.selection_overlaps = False
        # The calibration batches themselves, for merging with data (refine.py; set by `calibrate`).
        self.calibration_batches: list[torch.Tensor] = []

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
    def prepare_data(self, data=None, tokenizer=None) -> list[torch.Tensor]:
        """Tokenise the calibration data into the batches calibration records (`calibration_batches`,
        also used to merge with data) and the windows held aside to score candidate plans
        (`selection_batches`). `calibrate` calls it; call it yourself to plan saved statistics with
        the model (`plan(stats, model)`) without calibrating again."""
        data = load_calibration_data(self.config.dataset if data is None else data)
        windows = calibration_windows(data, tokenizer, self.config.sequence_length)
        self.calibration_batches = list(windows[:self.config.num_samples].split(self.config.batch_size))
        aside, self.selection_overlaps = held_aside(windows, self.config.num_samples, self.config.selection_samples)
        self.selection_batches = list(aside.split(self.config.batch_size)) if aside.numel() else []
        return self.calibration_batches

    @torch.no_grad()
    def calibrate(self, model, data=None, tokenizer=None, extra_needs=()) -> ExpertStats:
        """Run the calibration data through `model`, recording per layer and expert what the method needs.

        `extra_needs` records more (e.g. every method's needs, to compare methods on ONE calibration:
        `extra_needs=optimum_grape.methods.NEEDS`)."""
        if self.config.layer_by_layer and not hasattr(model, "record"):
            raise GrapeConfigError("GrapeConfig(layer_by_layer=True) prunes a checkpoint from disk without loading it: "
                                   "call GrapePruner.prune_checkpoint(path, output) (CLI: --layer-by-layer), or set "
                                   "layer_by_layer=False to calibrate a model already in memory.")
        module = getattr(model, "module", model)  # a LayerwiseModel's meta-device skeleton
        self.check(module)
        batches = self.prepare_data(data, tokenizer)
        adapter, layers = find_moe_layers(module)
        warn_if_little_data(sum(b.numel() for b in batches), layers)
        needs = frozenset(self.method.needs) | frozenset(extra_needs)

        def finalize(recorder, layer):
            return recorder.finalize(needs, self.config.similarity, module.config, adapter.layer_floor(layer))

        start = time.perf_counter()
        with recording(module, adapter, layers, len(batches), self.config.max_tokens_per_layer,
                       self.config.seed) as recorders:
            # This rank's share of the batches (all of them in one process), each under its global index.
            mine = distributed.shard(batches)
            if hasattr(model, "record"):  # held layer by layer: one streamed pass, each layer finalised while loaded
                layer_stats = model.record(mine, recorders, finalize)
            else:
                self._record_in_memory(model, mine, recorders)
        if not hasattr(model, "record"):
            layer_stats = {layer.index: finalize(recorders[layer.index], layer) for layer in layers}
        stats = ExpertStats(layers=layer_stats, metadata={"similarity": self.config.similarity})
        self._measure_sensitivity(model, stats)
        num_tokens = sum(b.numel() for b in batches)
        self.timings["calibration_s"] = time.perf_counter() - start
        metadata = {"model_type": module.config.model_type, "architecture": type(module).__name__,
                    "num_tokens": num_tokens, "num_sequences":
                    sum(b.shape[0] for b in batches), "similarity": self.config.similarity,
                    "needs": sorted(needs), "seed": self.config.seed}
        logger.info("GRAPE: calibrated %d MoE layers on %d tokens in %.1fs", len(layers), num_tokens,
                    self.timings["calibration_s"])
        stats.metadata = metadata
        return stats

    @staticmethod
    def _record_in_memory(model, mine, recorders) -> None:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            for index, batch in tqdm(mine, desc="GRAPE calibration", unit="batch", leave=False):
                set_batch(recorders, index)
                model(input_ids=batch.to(device), use_cache=False)
        finally:
            model.train(was_training)

    def _measure_sensitivity(self, model, stats: ExpertStats) -> None:
        """End-to-end KL of the method's probe clusters, one layer at a time (see `PruningMethod.probe`)."""
        floors = {l: max(s.floor, self.config.min_experts_per_layer) for l, s in stats.layers.items()}
        budget = self.config.budget_for(sum(stats.num_experts.values()))
        probe = self.method.probe(stats, budget, floors, self.allocation, self.config)
        if not probe or not self.selection_batches:
            return
        from .candidates import score_plans

        plans = []
        for l, (raw, _) in sorted(probe.items()):
            clusters = self._ordered(stats, l, raw, {})
            plans.append(PruningPlan(clusters={l: clusters}, num_experts_before={l: stats.num_experts[l]},
                                     merge_weights={l: self._merge_weights(stats, l, clusters)},
                                     router_weights={l: router_weights(clusters, self.router)}, method=self.method.name,
                                     router=self.router, align_neurons=self.config.align_neurons and self.merge != "drop",
                                     metadata={"candidate": f"probe layer {l}"}))
        start = time.perf_counter()
        scores = score_plans(model, plans, self.selection_batches)
        for (l, (raw, local_cost)), kl in zip(sorted(probe.items()), scores):
            stats.layers[l].sensitivity = {"kl": kl, "merges": stats.num_experts[l] - len(raw),
                                           "local_cost": local_cost}
        logger.info("GRAPE: measured each layer's sensitivity end to end in %.1fs (KL per layer: %s)",
                    time.perf_counter() - start, [round(k, 4) for k in scores])

    # -- 2. plan (pure, unless candidates are scored on the model) --------------------------------
    def plan(self, stats: ExpertStats, model=None) -> PruningPlan:
        """The plan for `stats`. When the method offers several candidates (GRAPE with
        entropy_tolerance='auto') and `model` is given, each is scored end to end on the calibration
        windows `calibrate` held aside and the closest to the unpruned model is kept; the model is
        left unchanged. Without `model`, the method's fallback candidate (uniform for GRAPE) is used."""
        missing = [n for n in self.method.needs for l, s in stats.layers.items() if getattr(s, n) is None]
        if missing:
            raise GrapeError(f"Method {self.method.name!r} needs {sorted(set(missing))} in the statistics; "
                             "recalibrate with this config (statistics record only what their method needed).")
        floors = {l: max(s.floor, self.config.min_experts_per_layer) for l, s in stats.layers.items()}
        total = sum(stats.num_experts.values())
        budget = self.config.budget_for(total)
        check_budget(stats.num_experts, floors, budget)
        start = time.perf_counter()
        options = self.method.candidates(stats, budget, floors, self.allocation, self.config)
        if options is None:
            raw, metadata = self.method.cluster(stats, budget, floors, self.allocation, self.config)
            plan = self._build_plan(stats, raw, metadata, floors, budget)
        else:
            plan = self._choose(stats, options, floors, budget, model)
        plan.model_fingerprint = stats_fingerprint(stats)  # applying it to another model is refused
        self.timings["plan_s"] = time.perf_counter() - start
        self.last_plan = plan
        return plan

    def _build_plan(self, stats: ExpertStats, raw, metadata: dict, floors: dict[int, int], budget: int) -> PruningPlan:
        metadata = dict(metadata)
        chosen = {int(l): list(r) for l, r in metadata.pop("representatives", {}).items()}
        clusters, weights, routers = {}, {}, {}
        for l in sorted(raw):
            clusters[l] = self._ordered(stats, l, raw[l], chosen)
            weights[l] = self._merge_weights(stats, l, clusters[l])
            routers[l] = router_weights(clusters[l], self.router)
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
        return plan

    @staticmethod
    def _ordered(stats: ExpertStats, layer: int, raw, chosen: dict) -> list[list[int]]:
        """Representative first: a method's chosen keeper, else the most-routed member."""
        priority = stats.layers[layer].tokens.double().clone()
        priority[chosen.get(layer, [])] += float(priority.abs().sum()) + 1.0
        return order_clusters(raw, priority)

    def _merge_weights(self, stats: ExpertStats, layer: int, clusters) -> list[list[float]]:
        st = stats.layers[layer]
        mass = st.tokens * st.saliency if self.merge == "saliency" else st.tokens  # REAM: saliency-weighted
        return self.method.merge_weights(layer, stats, clusters, self.merge, self.config) or \
            cluster_weights(clusters, mass, "weighted" if self.merge == "saliency" else self.merge)

    def _choose(self, stats: ExpertStats, options, floors, budget, model) -> PruningPlan:
        from .candidates import score_plans

        plans = [self._build_plan(stats, c.clusters, {**c.metadata, "candidate": c.name}, floors, budget)
                 for c in options]
        scored = model is not None and bool(self.selection_batches) and len(plans) > 1
        if scored:
            tokens = sum(b.numel() for b in self.selection_batches)
            logger.info("GRAPE: scoring %d candidate plans by KL to the unpruned model on %d held-aside tokens",
                        len(plans), tokens)
            scores = score_plans(model, plans, self.selection_batches)
            best = min(range(len(plans)), key=lambda i: (scores[i], i))
            selection = {"metric": "mean KL(unpruned || pruned) per token over the unpruned model's top-256 "
                                   "tokens plus the rest (candidates.py)",
                         "tokens": tokens, "overlaps_calibration": self.selection_overlaps}
        else:
            scores, best = [None] * len(plans), 0
            why = "no model given to plan()" if model is None else "no held-aside calibration windows"
            logger.warning("GRAPE: %d candidate plans not scored (%s): using the %r candidate. Pass the model to "
                           "GrapePruner.plan(stats, model) to choose end to end.", len(plans), why, options[0].name)
            selection = {"metric": None, "not_scored_because": why}
        plan = plans[best]
        plan.metadata["candidates"] = [
            {"name": c.name, "experts_per_layer": list(p.experts_per_layer.values()), "score": s,
             "entropy_tolerance": c.metadata.get("entropy_tolerance")} for c, p, s in zip(options, plans, scores)]
        plan.metadata["selection"] = {**selection, "chosen": options[best].name}
        if scored:
            logger.info("GRAPE: chose %s (KL %.5f; uniform %.5f)", options[best].name, scores[best], scores[0])
        return plan

    # -- 3. change --------------------------------------------------------------------------------
    def apply(self, model, plan: PruningPlan, check_model: bool = True) -> None:
        """Apply `plan` in place, all or nothing. A plan computed for another model (its fingerprint:
        architecture and router weights) is refused unless `check_model=False`. After `calibrate` (or
        with `calibration_batches` set), merges run layer by layer on calibration data when the config
        asks for it (activation-aware alignment, refit, sequential re-planning: refine.py); the plan is
        updated to what was applied."""
        merger = self._data_merger(model, plan)
        apply_plan(model, plan, self._resolved_config(), check_model=check_model, merger=merger)
        self._record_merge(plan, merger)

    def _data_merger(self, model, plan: PruningPlan, inputs_of=None):
        from .refine import DataMerger

        c = self.config
        wanted = (plan.align_neurons and c.align_on_activations) or c.refit or c.sequential
        if not wanted or not self.calibration_batches:
            if c.refit or c.sequential:
                logger.warning("GRAPE: refit/sequential need calibration data: call calibrate() first (or set "
                               "GrapePruner.calibration_batches); merging without it.")
            return None
        replan = self._replanner(plan) if c.sequential else None
        return DataMerger(model, self.calibration_batches, refit=c.refit, replan=replan,
                          max_tokens=c.merge_tokens, seed=c.seed, inputs_of=inputs_of)

    def _resolved_config(self) -> GrapeConfig:
        # The checkpoint records the settings actually used (method defaults resolved), not None.
        return GrapeConfig.from_dict({**self.config.to_dict(), "allocation": self.allocation, "merge": self.merge,
                                      "router": self.router})

    def _record_merge(self, plan: PruningPlan, merger) -> None:
        if merger is not None:
            plan.metadata["merged_with_data"] = {
                "align_on_activations": plan.align_neurons and self.config.align_on_activations,
                "refit": self.config.refit, "sequential": self.config.sequential, "layers": merger.report}
        self.last_plan = plan

    # -- layer by layer, from disk ----------------------------------------------------------------
    def prune_checkpoint(self, path, output, data=None, tokenizer=None, *, stats: ExpertStats | None = None,
                         plan: PruningPlan | None = None, overwrite: bool = False, trust_remote_code: bool = False,
                         base_model: str | None = None, check_model: bool = True, save_stats=None):
        """Calibrate, plan, merge and save the checkpoint folder `path` one decoder layer at a time
        (`layerwise`): peak memory is the non-layer weights, one layer and the calibration states, never
        the model. The plan and the weights written are those of `prune` + `save_pretrained` on the
        loaded model. `plan` applies a saved plan; `stats` plans saved statistics without calibrating."""
        from transformers import AutoTokenizer

        from .layerwise import LayerwiseModel
        from .validation import check_fingerprint

        model = LayerwiseModel(path, trust_remote_code)
        if tokenizer is None:
            try:  # the checkpoint's own; token-id data needs none, text data says so when it is missing
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            except (OSError, ValueError):
                tokenizer = None
        if plan is None:
            if stats is None:
                stats = self.calibrate(model, data, tokenizer)
                if save_stats:
                    stats.save(save_stats)
            else:
                self.prepare_data(data, tokenizer)
            plan = self.plan(stats, model)
        else:
            self.prepare_data(data, tokenizer)
            if check_model:
                check_fingerprint(plan.model_fingerprint, None, {
                    "model_type": model.config.model_type, "architecture": type(model.module).__name__,
                    "router_sha256": model.router_fingerprint()})
        return self.save_layerwise(model, plan, output, tokenizer, overwrite=overwrite, base_model=base_model)

    def save_layerwise(self, model, plan: PruningPlan, output, tokenizer=None, overwrite: bool = False,
                       base_model: str | None = None):
        """Apply `plan` to a LayerwiseModel as its layers stream from disk, writing the checkpoint."""
        from .checkpoint import save_pruned

        def write(folder):
            merger = self._data_merger(None, plan)  # its inputs are set by the streamed pass
            model.write_pruned(folder, plan, self._resolved_config(), merger, self.calibration_batches)
            self._record_merge(plan, merger)

        return save_pruned(model.module, output, tokenizer=tokenizer, plan=plan, overwrite=overwrite,
                           evaluation=self.evaluation, base_model=base_model, write_model=write)

    def _replanner(self, plan: PruningPlan):
        """Re-plans one layer on its current inputs with the method's own per-layer rule (sequential)."""
        from .algorithms.similarity import expert_similarity
        from .refine import replan_weights

        protected = {int(l): set(e) for l, e in (plan.metadata.get("super_experts") or {}).items()}

        def replan(index, adapter, layer, hidden, gates):
            rows = torch.randperm(hidden.shape[0], generator=torch.Generator().manual_seed(self.config.seed))
            rows = rows[:self.config.max_tokens_per_layer].to(hidden.device)
            outputs = adapter.run_experts(layer, hidden[rows], range(layer.num_experts)).float()
            sim = expert_similarity(outputs, self.config.similarity, gates[rows].float()).cpu()
            raw = self.method.replan_layer(sim, len(plan.clusters[index]), protected.get(index, set()))
            if raw is None:
                raise GrapeError(f"Method {self.method.name!r} cannot re-plan one layer: set sequential=False.")
            counts = (gates > 0).double().sum(0).cpu()
            clusters = order_clusters(raw, counts)
            weights, routers = replan_weights(clusters, gates.cpu(), "weighted" if self.merge == "saliency"
                                              else self.merge, self.router)
            return clusters, weights, routers

        return replan

    def prune(self, model, data=None, tokenizer=None):
        stats = self.calibrate(model, data, tokenizer)
        self.apply(model, self.plan(stats, model))
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
