"""ERNIE-4.5-MoE: the router (`gate`) owns a `moe_statics` submodule whose
`e_score_correction_bias` has shape [1, E] -- experts on dimension 1 -- and is added to the
softmax probabilities to choose experts (not to weight them). Everything else is standard fused
experts; dense layers outside `moe_layer_start_index..moe_layer_end_index` and shared experts are
left alone."""

from __future__ import annotations

import torch
from torch import nn

from ..algorithms.merging import combine_rows
from .base import MoELayer
from .fused import FusedExpertsAdapter


class Ernie45MoeAdapter(FusedExpertsAdapter):
    model_types = ("ernie4_5_moe",)
    count_key = "moe_num_experts"

    def _statics(self, layer: MoELayer) -> nn.Module | None:
        return getattr(layer.router, "moe_statics", None)

    def _rewrite_statics(self, layer: MoELayer, make) -> None:
        statics = self._statics(layer)
        if statics is None:
            return
        bias = statics.e_score_correction_bias  # [groups, E]: experts on dim 1
        new = make(bias.data.transpose(0, 1)).transpose(0, 1).contiguous()
        statics.e_score_correction_bias = nn.Parameter(new, requires_grad=bias.requires_grad)

    def apply_clusters(self, layer: MoELayer, clusters, weights, router_weights, align: bool = False,
                       inputs=None) -> None:
        # The bias picks experts as the router rows do: it follows the router rows' combination.
        self._rewrite_statics(layer, lambda t: combine_rows(t, clusters, router_weights))
        super().apply_clusters(layer, clusters, weights, router_weights, align, inputs)

    def resize_empty(self, layer: MoELayer, count: int) -> None:
        self._rewrite_statics(layer, lambda t: torch.empty((count, *t.shape[1:]), dtype=t.dtype, device=t.device))
        super().resize_empty(layer, count)
