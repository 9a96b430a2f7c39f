"""Group-limited routers (DeepSeek-V2/V3, GLM4-MoE and the many families built on their router): the
router views its E scores as `num_group` contiguous blocks of E / num_group experts and keeps the
best `topk_group` blocks (V3 scores a block by its top-2 choices, V2's `group_limited_greedy` by its
best one). The groups are read from the router's instance attributes, so any family with such a
router gets this by inheritance.

After pruning to E' experts a layer keeps grouping when E' is divisible by num_group with >= 2
experts per group and the kept groups still hold top_k experts; otherwise it falls back to
ungrouped top-k (num_group = topk_group = 1 on that layer), recorded in
`plan.metadata["routing_overrides"]` and the checkpoint. Groups are contiguous blocks of the
RENUMBERED experts (clusters stay in original-id order), so a kept expert may change group when
removals are unbalanced across groups.
"""

from __future__ import annotations

from .base import MoELayer

UNGROUPED = {"n_group": 1, "topk_group": 1}


class GroupedRouting:
    """Planning constraints and fallback for routers with `num_group` / `topk_group` attributes."""

    def is_grouped(self, layer: MoELayer) -> bool:
        if getattr(layer.router, "topk_method", "group_limited_greedy") == "greedy":  # DeepSeek-V2 without groups
            return False
        groups = getattr(layer.router, "num_group", None)
        return isinstance(groups, int) and groups > 1 and isinstance(getattr(layer.router, "topk_group", None), int)

    def group_rules(self, layer: MoELayer) -> list[dict]:
        """Routing-rule fields for a grouped layer (both group scores; V2's is the max), else one ungrouped."""
        if not self.is_grouped(layer):
            return [{}]
        groups, topk_group = int(layer.router.num_group), int(layer.router.topk_group)
        first = "max" if getattr(layer.router, "topk_method", None) == "group_limited_greedy" else "top2"
        return [{"n_group": groups, "topk_group": topk_group, "group_score": score}
                for score in (first, "max" if first == "top2" else "top2")]

    def group_spec(self, layer: MoELayer) -> dict:
        """n_group and the fewest experts that keep grouping valid (group_count_ok), for planning."""
        if not self.is_grouped(layer):
            return {}
        groups = int(layer.router.num_group)
        count = next(c for c in range(groups, layer.num_experts + 1, groups) if self.group_count_ok(layer, c))
        return {"n_group": groups, "min_grouped": count, "topk_group": int(layer.router.topk_group)}

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
