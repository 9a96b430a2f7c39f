"""The generic adapter for transformers' fused experts (`@use_experts_implementation` classes).

Such an experts module stores every expert in 3-D tensors whose first dimension is the expert
(`gate_up_proj`/`up_proj`, `down_proj`, optional biases) and declares its layout in the flags
`has_gate`, `has_bias`, `is_transposed`, `has_post_expert_norm`. Its sparse block holds a router
(a child named `gate` or `router`, or any child) with a weight of one row per expert, possibly in a
sub-module (`gate.wg`, `router.proj`), and maybe per-expert vectors beside it: a correction bias on
the router or on the block, a per-expert scale. Everything here is found by that structure, in the
text decoder (`model.get_decoder()`) only, so a vision tower's experts are never touched. How the
router turns logits into weights is not guessed: `routing.py` infers and verifies it on the model.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.merging import combine_rows
from ..errors import UnsupportedModelError
from .alignment import aligned_expert_tensors
from .base import MoEAdapter, MoELayer, decoder_layer_index, outputs_of, set_count_attributes
from .grouped import GroupedRouting
from .rules import InferredRouting

ROUTER_NAMES = ("gate", "router")
TOP_K_KEYS = ("num_experts_per_tok", "top_k_experts", "moe_k", "moe_topk", "top_k", "moe_top_k",
              "num_experts_per_token")


def is_fused_experts(module: nn.Module) -> bool:
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and isinstance(
        getattr(module, "down_proj", None), nn.Parameter
    )


def text_config(config):
    """The decoder's config of a multimodal config (itself for a text model)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def decoder_of(model: nn.Module) -> tuple[str, nn.Module]:
    """(module path, module) of the text decoder: `model.get_decoder()` when it is part of `model`."""
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if module is decoder:
            return name, module
    return "", model


def expert_axis(tensor: torch.Tensor | None, num_experts: int) -> int | None:
    """The dimension of `tensor` that indexes experts: 0 for [E, ...], 1 for [1, E] (ERNIE's statics)."""
    if tensor is None or tensor.dim() == 0:
        return None
    if tensor.shape[0] == num_experts:
        return 0
    if tensor.dim() == 2 and tensor.shape[0] == 1 and tensor.shape[1] == num_experts:
        return 1
    return None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out + bias if bias is not None else out


class FusedExpertsAdapter(GroupedRouting, InferredRouting, MoEAdapter):
    """Any block holding a fused experts module and a router with one weight row per expert. Routing
    is inferred and verified on the model (`rules.py`, `routing.py`) before anything is changed."""

    def __init__(self, model_types: Iterable[str] = (), count_key: str | None = None, routing: dict | None = None,
                 routing_check: str | None = None) -> None:
        self.model_types, self.count_key = tuple(model_types), count_key
        if routing is not None:
            self.routing = dict(routing)
        if routing_check is not None:
            self.routing_check = routing_check

    # -- locating ---------------------------------------------------------------------------------
    def accepts(self, name: str, block: nn.Module, router: nn.Module) -> bool:
        """Whether this sparse block is pruned (a family adapter may keep some whole, e.g. hash-routed)."""
        return True

    def find_router(self, block: nn.Module, experts: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(router, module holding the router weight [E, H]): a child named `gate`/`router` first."""
        num_experts = experts.down_proj.shape[0]
        children = sorted(((n, c) for n, c in block.named_children() if c is not experts),
                          key=lambda item: item[0] not in ROUTER_NAMES)
        for _, child in children:
            for module in child.modules():
                weight = getattr(module, "weight", None)
                if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts:
                    return child, module
        rows = {n: tuple(p.shape) for n, p in block.named_parameters() if p.dim() == 2 and not n.startswith("experts")}
        scored = sorted({shape[0] for shape in rows.values() if num_experts < shape[0] <= 2 * num_experts})
        what = (f" (its router scores {scored[0]} classes for {num_experts} experts: a skip expert or shared experts "
                "scored with the routed ones)") if scored else ""
        raise UnsupportedModelError(
            f"{type(block).__name__} holds {num_experts} fused experts but no router weight with {num_experts} rows"
            f"{what}; 2-D weights beside the experts: {rows}. Such a router needs a family adapter that says which "
            "rows are experts and how weights are normalised (docs/adding_a_family.md).")

    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        prefix, decoder = decoder_of(model)
        modules = dict(decoder.named_modules(prefix=prefix))
        layers: dict[int, MoELayer] = {}
        for name, module in modules.items():
            if not is_fused_experts(module):
                continue
            block_name = name.rsplit(".", 1)[0]
            block = modules[block_name]
            router, logits = self.find_router(block, module)
            if not self.accepts(block_name, block, router):
                continue
            index = decoder_layer_index(block_name)
            if index in layers:
                raise UnsupportedModelError(
                    f"Decoder layer {index} holds two MoE blocks ({layers[index].name!r} and {block_name!r}); plans "
                    "address one block per layer. Register the family with an adapter whose `accepts` keeps one "
                    "(docs/adding_a_family.md).")
            layers[index] = MoELayer(index, block_name, block, module, router, self.top_k(model, block, router),
                                     logits=logits)
        return [layers[i] for i in sorted(layers)]

    def top_k(self, model: nn.Module, block: nn.Module, router: nn.Module) -> int:
        for value in (getattr(router, "top_k", None), getattr(block, "top_k", None)):
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        config = text_config(model.config)
        for key in TOP_K_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        raise UnsupportedModelError(f"{type(block).__name__}: cannot find top-k (router/block `top_k` or config keys "
                                    f"{TOP_K_KEYS}); register the family with an adapter that says it.")

    # -- expert-indexed tensors -------------------------------------------------------------------
    def routing_tensors(self, layer: MoELayer) -> list[tuple[nn.Module, str, int]]:
        """(owner, name, expert axis) of every router-side tensor indexed by expert: the router's
        (weight, bias, correction bias, per-expert scale, recursively) and the block's own vectors."""
        n, found = layer.num_experts, []
        owners = [(m, True) for m in layer.router.modules()] + [(layer.block, False)]
        for owner, recurse_ok in owners:
            tensors = list(owner.named_parameters(recurse=False)) + list(owner.named_buffers(recurse=False))
            for name, tensor in tensors:
                axis = expert_axis(tensor, n)
                if axis is not None and (recurse_ok or tensor.dim() == 1):
                    found.append((owner, name, axis))
        return found

    def expert_tensor_names(self, layer: MoELayer) -> list[str]:
        n, experts = layer.num_experts, layer.experts
        tensors = list(experts.named_parameters(recurse=False)) + list(experts.named_buffers(recurse=False))
        return [name for name, t in tensors if t is not None and t.dim() >= 1 and t.shape[0] == n]

    def count_modules(self, layer: MoELayer) -> list[nn.Module]:
        return [layer.block, layer.experts, *layer.router.modules()]

    def set_count(self, layer: MoELayer, count: int, old: int | None = None) -> None:
        set_count_attributes(self.count_modules(layer), count, old)

    # -- measuring --------------------------------------------------------------------------------
    def run_experts(self, layer: MoELayer, hidden: torch.Tensor, expert_ids: Iterable[int]) -> torch.Tensor:
        experts = layer.experts
        norm = getattr(experts, "post_expert_norm", None) if getattr(experts, "has_post_expert_norm", False) else None
        if getattr(experts, "has_post_expert_norm", False) and norm is None:
            raise UnsupportedModelError(f"{type(experts).__name__} declares a post-expert norm but has no "
                                        "`post_expert_norm` module; register the family with an adapter.")

        def output_of(e: int) -> torch.Tensor:
            proj = self.expert_activations(layer, hidden, e)
            down_bias = experts.down_proj_bias[e] if experts.has_bias else None
            out = _linear(proj, experts.down_proj[e], down_bias, experts.is_transposed)
            return norm(out) if norm is not None else out

        return outputs_of(expert_ids, output_of)

    def merges_with_data(self, layer: MoELayer) -> bool:
        # Not when a norm follows the down projection: a least-squares refit of it would be wrong.
        return not getattr(layer.experts, "has_post_expert_norm", False)

    def expert_activations(self, layer: MoELayer, hidden: torch.Tensor, e: int) -> torch.Tensor:
        """[T, I]: the intermediate activations of expert e (what its down projection reads)."""
        experts = layer.experts
        up_name = "gate_up_proj" if experts.has_gate else "up_proj"
        up_bias = getattr(experts, up_name + "_bias")[e] if experts.has_bias else None
        proj = _linear(hidden, getattr(experts, up_name)[e], up_bias, experts.is_transposed)
        return experts._apply_gate(proj) if experts.has_gate else experts.act_fn(proj)

    def set_down_projection(self, layer: MoELayer, e: int, weight: torch.Tensor) -> None:
        """Replace expert e's down projection by `weight` [H, I] (the bias, if any, is kept)."""
        down = layer.experts.down_proj
        new = down.data.clone()
        new[e] = (weight.T if layer.experts.is_transposed else weight).to(new.dtype)
        layer.experts.down_proj = nn.Parameter(new, requires_grad=down.requires_grad)

    # -- changing ---------------------------------------------------------------------------------
    def _rewrite(self, layer: MoELayer, make_expert, make_router, count: int) -> None:
        """make_*(name, tensor with experts on dim 0) -> the new tensor, experts on dim 0."""
        old, routing = layer.num_experts, self.routing_tensors(layer)
        for name in self.expert_tensor_names(layer):
            _replace(layer.experts, name, 0, lambda t, name=name: make_expert(name, t))
        for owner, name, axis in routing:
            _replace(owner, name, axis, lambda t, name=name: make_router(name, t))
        self.set_count(layer, count, old)

    def apply_clusters(self, layer: MoELayer, clusters, weights, router_weights, align: bool = False,
                       inputs: torch.Tensor | None = None) -> None:
        # With calibration inputs, neurons are matched on their activations as well as their weights.
        acts = (lambda e: self.expert_activations(layer, inputs, e).T) if inputs is not None else None
        aligned = aligned_expert_tensors(layer.experts, clusters, weights, acts) if align else {}
        self._rewrite(layer,
                      # popped: each tensor's aligned rows read the old tensor, which must go once it is replaced
                      lambda name, t: combine_rows(t, clusters, weights, aligned.pop(name, None)),
                      lambda name, t: combine_rows(t, clusters, router_weights),
                      len(clusters))

    def resize_empty(self, layer: MoELayer, count: int) -> None:
        def empty(name: str, t: torch.Tensor) -> torch.Tensor:
            return torch.empty((count, *t.shape[1:]), dtype=t.dtype, device=t.device)

        self._rewrite(layer, empty, empty, count)


def _replace(owner: nn.Module, name: str, axis: int, make) -> None:
    tensor = getattr(owner, name)
    new = make(tensor.data.movedim(axis, 0)).movedim(0, axis).contiguous()
    if isinstance(tensor, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
    else:
        setattr(owner, name, new)
