"""DeepSeek-V2/V3 and GLM4-MoE: routers with group-limited top-k, sigmoid scores (V3/GLM4), an
`e_score_correction_bias` per expert and `routed_scaling_factor`; shared experts beside the routed
ones and the first `first_k_dense_replace` layers dense (neither is ever touched).

The tensors are standard fused experts, so only routing needs knowledge here. A group-limited
router views its E scores as `n_group` contiguous blocks of E / n_group experts and keeps the best
`topk_group` blocks (V3/GLM4 score a block by its top-2 experts). After pruning to E' experts a
layer keeps grouping when E' is divisible by n_group with >= 2 experts per group and the kept
groups still hold top_k experts; otherwise it falls back to ungrouped top-k (n_group = topk_group
= 1 on that layer), recorded in `plan.metadata["routing_overrides"]` and the checkpoint. Groups are
contiguous blocks of the RENUMBERED experts (clusters stay in original-id order), so a kept expert
may change group when removals are unbalanced across groups.
"""

from __future__ import annotations

from .base import MoELayer, RoutingSpec
from .fused import FusedExpertsAdapter

UNGROUPED = {"n_group": 1, "topk_group": 1}


class GroupedRouterAdapter(FusedExpertsAdapter):
    """Fused experts behind a router with `num_group` / `topk_group` instance attributes."""

    count_key = "n_routed_experts"
    scoring = "sigmoid"

    def is_grouped(self, layer: MoELayer) -> bool:
        return int(getattr(layer.router, "num_group", 1) or 1) > 1

    def routing_spec(self, layer: MoELayer, config) -> RoutingSpec:
        return RoutingSpec(top_k=layer.top_k, scoring=self.scoring,
                           norm_topk_prob=bool(getattr(config, "norm_topk_prob", True)), **self.group_spec(layer))

    def group_spec(self, layer: MoELayer) -> dict:
        """n_group and the fewest experts that keep grouping valid (group_count_ok), for planning."""
        if not self.is_grouped(layer):
            return {}
        groups = int(layer.router.num_group)
        count = next(c for c in range(groups, layer.num_experts + 1, groups) if self.group_count_ok(layer, c))
        return {"n_group": groups, "min_grouped": count}

    def group_count_ok(self, layer: MoELayer, count: int) -> bool:
        groups, topk_group = int(layer.router.num_group), int(layer.router.topk_group)
        per_group = count // groups
        return count % groups == 0 and per_group >= 2 and topk_group * per_group >= layer.top_k

    def routing_overrides(self, layer: MoELayer, count: int) -> dict:
        if not self.is_grouped(layer) or self.group_count_ok(layer, count):
            return {}
        return dict(UNGROUPED)

    def apply_routing_overrides(self, layer: MoELayer, overrides: dict) -> None:
        if "n_group" in overrides:
            layer.router.num_group = int(overrides["n_group"])
        if "topk_group" in overrides:
            layer.router.topk_group = int(overrides["topk_group"])


class DeepseekV2Adapter(GroupedRouterAdapter):
    """Softmax scores, no renormalisation of the top-k; groups only under `group_limited_greedy`."""

    model_types = ("deepseek_v2",)
    scoring = "softmax"

    def is_grouped(self, layer: MoELayer) -> bool:
        return getattr(layer.router, "topk_method", "greedy") == "group_limited_greedy" and super().is_grouped(layer)

    def routing_spec(self, layer: MoELayer, config) -> RoutingSpec:
        return RoutingSpec(top_k=layer.top_k, scoring="softmax", norm_topk_prob=False, **self.group_spec(layer))


class DeepseekV3Adapter(GroupedRouterAdapter):
    model_types = ("deepseek_v3", "glm4_moe")
