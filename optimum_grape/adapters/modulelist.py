"""The structural adapter for experts kept as an `nn.ModuleList` of MLP modules: the transformers
4.x layout (`block_sparse_moe.experts.{j}.w1/w2/w3`, `mlp.experts.{j}.gate_proj/...`) and most
remote-code MoE models. It is chosen by structure, not by `model_type`, so such a model needs no
new code as long as:

- the sparse block has a child `experts` (an `nn.ModuleList` of >= 2 modules of one class) and a
  sibling router whose `weight` has one row per expert (an `nn.Linear` or alike);
- the router's forward returns the logits [tokens, E], and the block turns them into weights by
  softmax -> top-k (-> renormalise when `config.norm_topk_prob`, default True), as Mixtral does.

Calibration cannot go through transformers' `ExpertsInterface` here: it uses a forward hook on the
router (calibration/hooks.py). Routers that return something other than logits, or use groups or a
correction bias, need their own adapter (docs/adding_a_family.md).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from ..algorithms.merging import combine_rows
from ..errors import UnsupportedModelError
from .base import MoEAdapter, MoELayer, decoder_layer_index, find_router_child, outputs_of, set_count_attributes

logger = logging.getLogger("optimum_grape")
COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "top_k", "moe_top_k")


def native_count_key(config, num_experts: int | None = None) -> str | None:
    """The config key that holds the number of experts (equal to `num_experts` when given), for
    families found by structure."""
    return next((key for key in COUNT_KEYS if isinstance(getattr(config, key, None), int)
                 and num_experts in (None, getattr(config, key))), None)


def is_expert_list(module: nn.Module) -> bool:
    return (isinstance(module, nn.ModuleList) and len(module) >= 2
            and len({type(m) for m in module}) == 1 and any(True for _ in module[0].parameters()))



class ModuleListExpertsAdapter(MoEAdapter):
    """Experts as `block.experts = nn.ModuleList([MLP, ...])`, router = a sibling with weight [E, H]."""

    model_types = ()
    calibration = "hooks"

    def __init__(self, count_key: str | None = None) -> None:
        self.count_key = count_key

    # -- locating ---------------------------------------------------------------------------------
    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        layers = []
        for name, block in model.named_modules():
            experts = getattr(block, "experts", None)
            if not is_expert_list(experts):
                continue
            router = self._find_router(block, experts)
            layers.append(MoELayer(decoder_layer_index(name), name, block, experts, router,
                                   self._top_k(block, router, model)))
        return sorted(layers, key=lambda layer: layer.index)

    def _find_router(self, block: nn.Module, experts: nn.ModuleList) -> nn.Module:
        router = find_router_child(block, experts, len(experts))
        if router is not None:
            return router
        raise UnsupportedModelError(
            f"{type(block).__name__} holds {len(experts)} experts in an nn.ModuleList but no router child with "
            f"a [{len(experts)}, hidden] weight; write an adapter for it (docs/adding_a_family.md).")

    def _top_k(self, block, router, model) -> int:
        for owner in (router, block):
            value = getattr(owner, "top_k", None)
            if isinstance(value, int):
                return value
        for key in TOP_K_KEYS:
            value = getattr(model.config, key, None)
            if isinstance(value, int):
                return value
        raise UnsupportedModelError(f"{type(model).__name__}: cannot find top-k (tried router/block `top_k` and "
                                    f"config keys {TOP_K_KEYS}); write an adapter for this family.")

    # -- measuring --------------------------------------------------------------------------------
    def run_experts(self, layer: MoELayer, hidden: torch.Tensor, expert_ids: Iterable[int]) -> torch.Tensor:
        return outputs_of(expert_ids, lambda e: layer.experts[e](hidden))

    # -- changing ---------------------------------------------------------------------------------
    def set_count(self, layer: MoELayer, count: int) -> None:
        set_count_attributes((layer.block, layer.router), count)

    def _set_experts(self, layer: MoELayer, experts: list[nn.Module]) -> None:
        new = nn.ModuleList(experts)
        setattr(layer.block, "experts", new)
        layer.experts = new

    def _rewrite_router(self, layer: MoELayer, make) -> None:
        old = layer.router.weight.shape[0]
        for name, tensor in list(layer.router.named_parameters(recurse=False)):
            if tensor.dim() >= 1 and tensor.shape[0] == old:
                setattr(layer.router, name, nn.Parameter(make(tensor.data), requires_grad=tensor.requires_grad))

    def apply_clusters(self, layer: MoELayer, clusters, weights, router_weights, align: bool = False,
                       inputs=None) -> None:
        if align and any(len([w for w in ws if w]) > 1 for ws in weights):
            logger.warning("Layer %d: neuron alignment before merging is implemented for fused experts only; "
                           "nn.ModuleList experts are averaged unaligned (set align_neurons=False to silence).",
                           layer.index)
        experts = list(layer.experts)
        names = [n for n, _ in experts[0].named_parameters()]
        merged = {}  # computed for every cluster before any expert is overwritten
        for name in names:
            stacked = torch.stack([dict(e.named_parameters())[name].data for e in experts])
            merged[name] = combine_rows(stacked, clusters, weights)
        kept = [experts[c[0]] for c in clusters]
        for position, expert in enumerate(kept):
            params = dict(expert.named_parameters())
            for name in names:
                params[name].data = merged[name][position].clone()  # own storage: safetensors refuses shared
        self._rewrite_router(layer, lambda t: combine_rows(t, clusters, router_weights))
        self._set_experts(layer, kept)
        self.set_count(layer, len(clusters))

    def resize_empty(self, layer: MoELayer, count: int) -> None:
        if count > len(layer.experts):
            raise UnsupportedModelError(f"Layer {layer.index} has {len(layer.experts)} experts; cannot grow to {count}.")
        self._set_experts(layer, list(layer.experts)[:count])
        self._rewrite_router(layer, lambda t: torch.empty((count, *t.shape[1:]), dtype=t.dtype, device=t.device))
        self.set_count(layer, count)
