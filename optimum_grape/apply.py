"""Applying a `PruningPlan` to a model in place, and recording the new layout in its config.

The only module that changes a model: tensors through the family adapter, counts in the config
(DESIGN.md decision 4) so that `save_pretrained` writes a checkpoint that loads back.
"""

from __future__ import annotations

import json
import logging

import torch

from .adapters import MoEAdapter, find_moe_layers
from .adapters.fused import is_fused_experts, text_config
from .algorithms.merging import cluster_weights, router_weights
from .errors import GrapeError
from .plan import PruningPlan

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
def apply_plan(model, plan: PruningPlan, pruning_config=None) -> None:
    adapter, layers = find_moe_layers(model)
    by_index = {layer.index: layer for layer in layers}
    for index, clusters in sorted(plan.clusters.items()):
        layer = by_index.get(index)
        if layer is None:
            raise GrapeError(f"The plan prunes decoder layer {index}, which is not an MoE layer of this model "
                             f"(MoE layers: {sorted(by_index)}).")
        if layer.num_experts != plan.num_experts_before[index]:
            raise GrapeError(
                f"Layer {index} has {layer.num_experts} experts but the plan was made for "
                f"{plan.num_experts_before[index]}: apply a plan to the model it was planned on, unpruned."
            )
        weights = plan.merge_weights.get(index) or cluster_weights(clusters, None, "drop")
        routers = plan.router_weights.get(index) or router_weights(clusters, plan.router)
        overrides = adapter.routing_overrides(layer, len(clusters))  # asked before the layer changes
        adapter.apply_clusters(layer, clusters, weights, routers, plan.align_neurons)
        if overrides:
            adapter.apply_routing_overrides(layer, overrides)
            plan.metadata.setdefault("routing_overrides", {})[str(index)] = overrides
    if plan.metadata.get("routing_overrides"):
        changed = plan.metadata["routing_overrides"]
        logger.warning("%d layer(s) keep expert counts their grouped router cannot split (%s): routing there falls "
                       "back as recorded in the plan, config and model card: %s", len(changed),
                       ", ".join(f"layer {l}: {plan.experts_per_layer[int(l)]}" for l in changed),
                       next(iter(changed.values())))
    record_layout(model, adapter, plan, pruning_config)
    logger.info("Applied plan. %s", plan.summary())


def record_layout(model, adapter: MoEAdapter, plan: PruningPlan, pruning_config=None) -> None:
    """Write the per-layer counts into `model.config` so that save/reload rebuilds the same shapes."""
    from .config import GrapeConfig

    config, decoder_config = model.config, text_config(model.config)  # a multimodal model: its text decoder's
    counts = plan.experts_per_layer
    if pruning_config is None:
        pruning_config = GrapeConfig(method=plan.method, num_experts_to_prune=max(1, plan.num_removed))
    pruning_config.pruned_layout = layout_from_plan(plan)
    config.quantization_config = pruning_config
    num_layers = getattr(decoder_config, "num_hidden_layers", max(counts) + 1)
    config.num_local_experts_per_layer = [counts.get(i) for i in range(num_layers)]
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
