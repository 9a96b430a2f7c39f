"""PhiMoE: the router is an `nn.Linear` subclass named `router` (its `out_features` copies the
expert count) and routing is sparsemixer, hard-coded to two experts per token whatever
`num_experts_per_tok` says, so every layer keeps at least 2 experts."""

from __future__ import annotations

from .base import MoELayer, RoutingSpec
from .fused import FusedExpertsAdapter

SPARSEMIXER_TOP_K = 2


class PhimoeAdapter(FusedExpertsAdapter):
    model_types = ("phimoe",)
    count_key = "num_local_experts"

    def layer_floor(self, layer: MoELayer) -> int:
        return max(layer.top_k, SPARSEMIXER_TOP_K)

    def routing_spec(self, layer: MoELayer, config) -> RoutingSpec:
        # sparsemixer at inference: top-1 by logit, then the best remaining within a jitter margin;
        # softmax top-2 is the closest standard description for planning code.
        return RoutingSpec(top_k=SPARSEMIXER_TOP_K, scoring="softmax", norm_topk_prob=True)
