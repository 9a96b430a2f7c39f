"""Calibration for experts that transformers' `ExpertsInterface` does not dispatch (an `nn.ModuleList`
of MLPs: the 4.x layout and remote-code models).

A forward hook on each layer's router sees the tokens entering the sparse block and the router
logits; it re-derives the routing the block applies (`RoutingSpec`: softmax -> top-k -> optional
renormalisation) and feeds the same `LayerRecorder` as the fused path, so the statistics (tokens,
weight_mass, saliency, sampled hidden states) have the same meaning. The model's own output is not
changed. Hooks are removed on exit, whatever happens.
"""

from __future__ import annotations

import contextlib

import torch

from ..adapters.base import RoutingSpec
from ..errors import UnsupportedModelError


def route(logits: torch.Tensor, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index, top_k_weights) of [T, E] router logits under `spec`."""
    scores = torch.sigmoid(logits.float()) if spec.scoring == "sigmoid" else torch.softmax(logits.float(), dim=-1)
    weights, index = torch.topk(scores, spec.top_k, dim=-1)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return index, weights.to(logits.dtype)


def _router_hook(layer, spec: RoutingSpec, recorder):
    def hook(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        if not isinstance(logits, torch.Tensor) or logits.shape[-1] != layer.num_experts:
            raise UnsupportedModelError(
                f"The router {type(module).__name__} of MoE block {layer.name!r} does not return logits "
                f"[..., {layer.num_experts}]; the structural adapter cannot calibrate it. Write an adapter for "
                "this family (docs/adding_a_family.md).")
        hidden = args[0].reshape(-1, args[0].shape[-1])
        index, weights = route(logits.reshape(-1, logits.shape[-1]), spec)
        recorder.forward(hidden, index, weights)

    return hook


@contextlib.contextmanager
def router_hooks(model, adapter, layers, recorders):
    """Record every layer of `recorders` from forward hooks on the routers for the duration of the block."""
    handles = []
    try:
        for layer in layers:
            spec = adapter.routing_spec(layer, model.config)
            handles.append(layer.router.register_forward_hook(_router_hook(layer, spec, recorders[layer.index])))
        yield recorders
    finally:
        for handle in handles:
            handle.remove()
