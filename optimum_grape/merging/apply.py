"""Applying a `PruningPlan` to a model in place, and recording the new layout in its config.

The only module that changes a model: tensors through the family adapter, counts in the config
(docs/design.md, "Per-layer counts in config.json") so that `save_pretrained` writes a checkpoint that loads back.

A plan is checked against every layer before any layer changes, so a plan that does not fit changes
nothing. Layers are then merged one at a time and each layer's old tensors are freed as soon as it
is done: holding them until the last layer would cost a second copy of most experts, which is what
a user pruning a 60 GB model cannot spare. A layer that fails while changing is put back as it was;
the layers before it stay merged, and the error says which (reload the model).
"""

from __future__ import annotations

import json
import logging

import torch
from transformers.utils.logging import tqdm  # honours disable_progress_bar() and HF_HUB_DISABLE_PROGRESS_BARS

from ..adapters import MoEAdapter, find_moe_layers
from ..adapters.fused import is_fused_experts, text_config
from ..algorithms.merging import router_weights
from ..plan import PruningPlan
from ..runtime.memory import return_free_memory
from ..validation import check_plan_fits

logger = logging.getLogger("optimum_grape")


def layout_from_plan(plan: PruningPlan) -> dict:
    """What a checkpoint must remember to be rebuilt: counts, kept/merged ids, routing overrides."""
    return {
        "experts_per_layer": {str(k): v for k, v in plan.experts_per_layer.items()},
        "num_experts_before": {str(k): v for k, v in sorted(plan.num_experts_before.items())},
        "clusters": {str(k): v for k, v in sorted(plan.clusters.items())},
        "method": plan.method,
        "routing_overrides": plan.metadata.get("routing_overrides", {}),
    }


@torch.no_grad()
def apply_plan(model, plan: PruningPlan, pruning_config=None, check_model: bool = True, merger=None) -> None:
    """Apply `plan` to `model` in place, one layer at a time (see the module docstring), then record
    the new layout in `model.config`. `check_model=False` skips the check that the plan was computed for
    this model (its fingerprint); the layers, counts and top-k floors are always checked. `merger`
    (refine.DataMerger) merges each layer with calibration data and may re-plan its clusters (same
    counts); the plan is updated to what was applied."""
    adapter = apply_clusters(model, plan, check_model, merger, progress=True)
    if plan.metadata.get("routing_overrides"):
        changed = plan.metadata["routing_overrides"]
        logger.warning("%d layer(s) keep expert counts their grouped router cannot split (%s): routing there falls "
                       "back as recorded in the plan, config and model card: %s", len(changed),
                       ", ".join(f"layer {l}: {plan.experts_per_layer[int(l)]}" for l in changed),
                       next(iter(changed.values())))
    record_layout(model, adapter, plan, pruning_config)
    logger.info("Merged the experts of %d MoE layers.", len(plan.clusters))


@torch.no_grad()
def apply_clusters(model, plan: PruningPlan, check_model: bool = False, merger=None, found=None,
                   progress: bool = False) -> MoEAdapter:
    """Rewrite every MoE layer the plan covers (tensors and routing), leaving `model.config` alone:
    what candidate scoring needs, and the first half of `apply_plan`. The plan is checked against every
    layer first (`validation.check_plan_fits`); see the module docstring for a failure midway."""
    plan.validate()
    # `found`: (adapter, layers) already located (layer-by-layer mode: most layers are on the meta device)
    adapter, layers = found or find_moe_layers(model)
    targets = check_plan_fits(plan, adapter, layers, model if check_model else None)
    # Asked before any layer changes: the answer depends on the layer's current routing.
    overrides = {index: adapter.routing_overrides(layer, len(plan.clusters[index])) for index, layer in targets.items()}
    merged: list[int] = []
    for index, layer in tqdm(sorted(targets.items()), desc="GRAPE merging", unit="layer", leave=False,
                             disable=not progress):
        snapshot = Snapshot(list(layer.block.modules()))
        try:
            _apply_layer(adapter, layer, plan, index, merger, overrides[index])
        except BaseException as err:
            snapshot.restore()
            if merged:
                err.add_note(f"optimum-grape: MoE layer {index} was put back as it was, but layers {merged} were "
                             "already merged: the model is partially pruned. Reload it before using it.")
            raise
        del snapshot  # the layer's old tensors: freed now, not after the last layer
        return_free_memory()
        merged.append(index)
    # Recomputed from the model, never taken from the plan: a stale or edited value would reach the
    # checkpoint's config and break loading.
    plan.metadata["routing_overrides"] = {str(index): changed for index, changed in sorted(overrides.items()) if changed}
    return adapter


def _apply_layer(adapter: MoEAdapter, layer, plan: PruningPlan, index: int, merger, overrides) -> None:
    clusters = plan.clusters[index]
    weights, routers = plan.merge_weights_of(index), plan.router_weights_of(index)
    if merger is not None and adapter.merges_with_data(layer):
        plan.clusters[index], plan.merge_weights[index] = merger(adapter, layer, clusters, weights, routers,
                                                                 plan.align_neurons)
        plan.router_weights[index] = router_weights(plan.clusters[index], plan.router)
    else:
        adapter.apply_clusters(layer, clusters, weights, routers, plan.align_neurons)
    if overrides:
        adapter.apply_routing_overrides(layer, overrides)


class Snapshot:
    """What `restore` needs to undo any change applying a plan makes to `modules`: their attributes,
    parameters, buffers and submodules as they were, and each parameter's tensor. Applying a plan only
    replaces tensors, modules and integer attributes (it never writes into a tensor), so this shallow
    snapshot is exact and costs no copy of the weights."""

    def __init__(self, modules) -> None:
        self.saved = []
        for module in modules:
            state = {k: dict(v) if k in ("_parameters", "_buffers", "_modules") else v for k, v in vars(module).items()}
            tensors = [(p, p.data) for p in module._parameters.values() if p is not None]
            self.saved.append((module, state, tensors))

    def restore(self) -> None:
        for module, state, tensors in self.saved:
            for key in set(vars(module)) - set(state):
                del vars(module)[key]
            vars(module).update(state)
            for param, data in tensors:
                param.data = data


def record_layout(model, adapter: MoEAdapter, plan: PruningPlan, pruning_config=None) -> None:
    """Write the per-layer counts into `model.config` so that save/reload rebuilds the same shapes."""
    from ..config import GrapeConfig

    config, decoder_config = model.config, text_config(model.config)  # a multimodal model: its text decoder's
    counts = plan.experts_per_layer
    if pruning_config is None:
        pruning_config = GrapeConfig(method=plan.method, num_experts_to_prune=max(1, plan.num_removed))
    pruning_config.pruned_layout = layout_from_plan(plan)
    config.quantization_config = pruning_config
    num_layers = getattr(decoder_config, "num_hidden_layers", max(counts) + 1)
    config.num_local_experts_per_layer = [counts.get(i) for i in range(num_layers)]
    if plan.metadata.get("routing_overrides"):  # carried outside quantization_config too (checkpoint/requantized.py)
        config.grape_routing_overrides = plan.metadata["routing_overrides"]
    distinct = set(counts.values())
    if len(distinct) == 1 and adapter.count_key and not _experts_left_whole(model):
        # Uniform counts: the native key is enough for plain transformers to rebuild the shapes.
        setattr(decoder_config, adapter.count_key, distinct.pop())
        overrides = plan.metadata.get("routing_overrides") or {}
        same = {json.dumps(v, sort_keys=True) for v in overrides.values()}
        if len(overrides) == len(counts) and len(same) == 1:
            for key, value in next(iter(overrides.values())).items():  # e.g. n_group=1 in every layer
                setattr(decoder_config, key, value)


def _experts_left_whole(model) -> bool:
    """Whether fused experts outside the pruned layers exist (hash-routed layers, a vision tower's):
    they may read the same count key, which then must keep its value."""
    pruned = {id(layer.experts) for layer in find_moe_layers(model, verify=False)[1]}
    return any(is_fused_experts(m) and id(m) not in pruned for m in model.modules())


def resize_to_layout(model, layout: dict) -> None:
    """Shrink the MoE layers of a freshly built (meta) model to a checkpoint's per-layer counts."""
    adapter, layers = find_moe_layers(model)
    counts = {int(k): int(v) for k, v in layout["experts_per_layer"].items()}
    overrides = {int(k): v for k, v in (layout.get("routing_overrides") or {}).items()}
    for layer in layers:
        if layer.index in counts and counts[layer.index] != layer.num_experts:
            adapter.resize_empty(layer, counts[layer.index])
        if overrides.get(layer.index):
            adapter.apply_routing_overrides(layer, overrides[layer.index])
