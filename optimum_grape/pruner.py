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
from pathlib import Path

import torch
from transformers.utils.logging import tqdm  # honours disable_progress_bar() and HF_HUB_DISABLE_PROGRESS_BARS

from .adapters import find_moe_layers
from .adapters.alignment import reused_alignments
from .algorithms.budget import check_budget
from .calibration import (check_token_ids, distributed, load_calibration_data, recording, sample_windows,
                          warn_if_degenerate, warn_if_little_data)
from .calibration.recorder import set_batch
from .calibration.stream import forward_for_states
from .checkpoint.save import push_pruned, save_pruned
from .config import GrapeConfig
from .errors import GrapeConfigError
from .layerwise import LayerwiseModel
from .merging.apply import apply_plan
from .merging.with_data import DataMerger
from .methods import PruningMethod, get_method, resolve_allocation, resolve_merge
from .plan import PruningPlan
from .planning.build import Planner
from .runtime.memory import return_free_memory
from .stats import ExpertStats
from .validation import check_fingerprint

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
        self.planner = Planner(config, self.method, self.allocation, self.merge, self.router)
        if config.sequential and type(self.method).replan_layer is PruningMethod.replan_layer:
            raise GrapeConfigError(f"sequential=True re-plans one layer at a time, which method {config.method!r} "
                                   "cannot do; use method='grape' or 'local_merge', or sequential=False.")
        self.last_plan: PruningPlan | None = None
        self.evaluation: dict = {}
        self.timings: dict = {}
        # Calibration windows held aside to score candidate plans end to end (set by `calibrate`).
        self.selection_batches: list[torch.Tensor] = []
        self.selection_overlaps = False
        self.sampling: dict = {}  # how the calibration windows were drawn (recorded in the statistics)
        # The calibration batches themselves, for merging with data (merging/with_data.py; set by `calibrate`).
        self.calibration_batches: list[torch.Tensor] = []
        # Neuron matches computed by the sensitivity probe, reused by candidate scoring and the final
        # apply: one Hungarian assignment per cluster member (adapters/alignment.py).
        self._alignments: dict = {}

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

    def _check_sequence_length(self, model) -> None:
        """Windows longer than the model's positions fail deep inside attention, or run for hours."""
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        positions = getattr(text_config, "max_position_embeddings", None)
        if isinstance(positions, int) and self.config.sequence_length > positions:
            raise GrapeConfigError(f"GrapeConfig.sequence_length={self.config.sequence_length} is longer than the "
                                   f"model's {positions} positions (max_position_embeddings); use at most {positions}, "
                                   f"e.g. {min(256, positions)} (CLI: --sequence-length).")

    # -- 1. measure -------------------------------------------------------------------------------
    def prepare_data(self, data=None, tokenizer=None, model=None) -> list[torch.Tensor]:
        """Tokenise the calibration data into the batches calibration records (`calibration_batches`,
        also used to merge with data) and the windows held aside to score candidate plans
        (`selection_batches`). `calibrate` calls it; call it yourself to plan saved statistics with
        the model (`plan(stats, model)`) without calibrating again. With `model`, token ids beyond its
        vocabulary (a tokenizer of another model) are refused here, not deep inside the forward."""
        c = self.config
        data = load_calibration_data(c.dataset if data is None else data)
        if model is not None:
            self._check_sequence_length(model)
        sample = sample_windows(data, tokenizer, c.sequence_length, c.num_samples, c.selection_samples, c.seed)
        if model is not None:
            check_token_ids(torch.cat([sample.windows.flatten(), sample.held_aside.flatten()]), model)
        warn_if_degenerate(sample.windows)
        self.calibration_batches = list(sample.windows.split(c.batch_size))
        logger.info("Calibration data: %d windows of %d tokens (+%d held aside to score plans) from %d of %d documents, "
                    "visited in an order shuffled with seed %d", sample.windows.shape[0], sample.windows.shape[1],
                    sample.held_aside.shape[0], sample.documents_used, sample.documents_total, c.seed)
        self.selection_overlaps = not sample.held_aside_unseen
        self.selection_batches = list(sample.held_aside.split(c.batch_size)) if sample.held_aside.numel() else []
        self.sampling = {"documents_used": sample.documents_used, "documents_total": sample.documents_total,
                         "order": f"documents shuffled with seed {c.seed}", "windows": int(sample.windows.shape[0]),
                         "held_aside_windows": int(sample.held_aside.shape[0]),
                         "held_aside_unseen": sample.held_aside_unseen}
        if self.selection_overlaps:
            logger.warning(
                "GRAPE: the calibration data (%d documents, %d windows of %d tokens) has no document left after the "
                "%d calibration windows, so the %d windows that score candidate plans are calibration windows: the "
                "choice between plans is then judged on the text it was measured on. Give more text than num_samples "
                "x sequence_length tokens (GrapeConfig.dataset / --dataset) or lower num_samples.",
                sample.documents_total, sample.windows.shape[0], c.sequence_length, c.num_samples,
                sample.held_aside.shape[0])
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
        batches = self.prepare_data(data, tokenizer, module)
        adapter, layers = find_moe_layers(module)
        warn_if_little_data(sum(b.numel() for b in batches), layers)
        needs = frozenset(self.method.needs) | frozenset(extra_needs)

        def finalize(recorder, layer):
            layer_stats = recorder.finalize(needs, self.config.similarity, module.config, adapter.layer_floor(layer))
            return_free_memory()  # every expert's outputs on the layer's samples: the pass's largest temporaries
            return layer_stats

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
        self._alignments = {}  # new statistics: matches of earlier weights never count (they are checked anyway)
        with reused_alignments(self._alignments):
            self.planner.measure_sensitivity(model, stats, self.selection_batches)
        num_tokens = sum(b.numel() for b in batches)
        self.timings["calibration_s"] = time.perf_counter() - start
        metadata = {"model_type": module.config.model_type, "architecture": type(module).__name__,
                    "num_tokens": num_tokens, "num_sequences":
                    sum(b.shape[0] for b in batches), "similarity": self.config.similarity,
                    "needs": sorted(needs), "seed": self.config.seed, "sampling": self.sampling}
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
                forward_for_states(model, batch.to(device))
        finally:
            model.train(was_training)

    # -- 2. plan (pure, unless candidates are scored on the model) --------------------------------
    def plan(self, stats: ExpertStats, model=None) -> PruningPlan:
        """The plan for `stats`. When the method offers several candidates (GRAPE with
        entropy_tolerance='auto') and `model` is given, each is scored end to end on the calibration
        windows `calibrate` held aside and the closest to the unpruned model is kept; the model is
        left unchanged. Without `model`, the method's fallback candidate is used (for GRAPE: its global
        allocation at the fixed entropy tolerance `methods.grape.UNSCORED_GAMMA`, with a warning that it
        was not scored)."""
        start = time.perf_counter()
        with reused_alignments(self._alignments):
            plan = self.planner.plan(stats, model, self.selection_batches, self.selection_overlaps)
        self.timings["plan_s"] = time.perf_counter() - start
        self.last_plan = plan
        return plan

    # -- 3. change --------------------------------------------------------------------------------
    def apply(self, model, plan: PruningPlan, check_model: bool = True) -> None:
        """Apply `plan` in place, one MoE layer at a time, each layer's old tensors freed once it is merged
        (a plan that does not fit is refused before any layer changes; merging/apply.py). A plan computed for another model (its fingerprint:
        architecture and router weights) is refused unless `check_model=False`. After `calibrate` (or
        with `calibration_batches` set), merges run layer by layer on calibration data when the config
        asks for it (activation-aware alignment, refit, sequential re-planning: merging/with_data.py); the plan is
        updated to what was applied."""
        merger = self._data_merger(model, plan)
        with reused_alignments(self._alignments):
            apply_plan(model, plan, self._resolved_config(plan), check_model=check_model, merger=merger)
        self._record_merge(plan, merger)

    def _data_merger(self, model, plan: PruningPlan, inputs_of=None):
        c = self.config
        wanted = (plan.align_neurons and c.align_on_activations) or c.refit or c.sequential
        if not wanted or not self.calibration_batches:
            if c.refit or c.sequential:
                logger.warning("GRAPE: refit/sequential need calibration data: call calibrate() first (or set "
                               "GrapePruner.calibration_batches); merging without it.")
            return None
        replan = self.planner.replanner(plan) if c.sequential else None
        return DataMerger(model, self.calibration_batches, refit=c.refit, replan=replan,
                          max_tokens=c.merge_tokens, seed=c.seed, inputs_of=inputs_of)

    def _resolved_config(self, plan: PruningPlan) -> GrapeConfig:
        # The checkpoint records the settings actually used (method defaults and end-to-end choices
        # resolved), not None.
        merge = plan.metadata.get("merge") or self.merge
        return GrapeConfig.from_dict({**self.config.to_dict(), "allocation": self.allocation, "merge": merge,
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

        # Converted layers are kept between passes beside the output, on the disk the user chose for it.
        model = LayerwiseModel(path, trust_remote_code, scratch_beside=Path(output).expanduser().resolve())
        try:
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
                    self.prepare_data(data, tokenizer, model.module)
                plan = self.plan(stats, model)
            else:
                self.prepare_data(data, tokenizer, model.module)
                if check_model:
                    check_fingerprint(plan.model_fingerprint, None, {
                        "model_type": model.config.model_type, "architecture": type(model.module).__name__,
                        "router_sha256": model.router_fingerprint()})
            return self.save_layerwise(model, plan, output, tokenizer, overwrite=overwrite, base_model=base_model)
        finally:
            model.close()  # the scratch copies, also when a step fails

    def save_layerwise(self, model, plan: PruningPlan, output, tokenizer=None, overwrite: bool = False,
                       base_model: str | None = None):
        """Apply `plan` to a LayerwiseModel as its layers stream from disk, writing the checkpoint."""
        def write(folder):
            merger = self._data_merger(None, plan)  # its inputs are set by the streamed pass
            with reused_alignments(self._alignments):
                model.write_pruned(folder, plan, self._resolved_config(plan), merger, self.calibration_batches)
            self._record_merge(plan, merger)

        return save_pruned(model.module, output, tokenizer=tokenizer, plan=plan, overwrite=overwrite,
                           evaluation=self.evaluation, base_model=base_model, write_model=write)

    def prune(self, model, data=None, tokenizer=None):
        stats = self.calibrate(model, data, tokenizer)
        self.apply(model, self.plan(stats, model))
        return model

    # -- 4. save ----------------------------------------------------------------------------------
    def save_pretrained(self, model, out_dir, tokenizer=None, overwrite: bool = False, base_model: str | None = None):
        return save_pruned(model, out_dir, tokenizer=tokenizer, plan=self.last_plan, overwrite=overwrite,
                           evaluation=self.evaluation, base_model=base_model)

    def push_to_hub(self, model, repo_id: str, tokenizer=None, private: bool | None = None, token=None,
                    base_model: str | None = None):
        return push_pruned(model, repo_id, tokenizer=tokenizer, plan=self.last_plan, evaluation=self.evaluation,
                           private=private, token=token, base_model=base_model)
