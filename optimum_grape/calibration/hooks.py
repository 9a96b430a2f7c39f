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
from ..algorithms.selection import top_k_routing
from ..errors import UnsupportedModelError


def _router_hook(layer, spec: RoutingSpec, recorder):
    def hook(module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        if not isinstance(logits, torch.Tensor) or logits.shape[-1] != layer.num_experts:
            raise UnsupportedModelError(
                f"The router {type(module).__name__} of MoE block {layer.name!r} does not return logits "
                f"[..., {layer.num_experts}]; the structural adapter cannot calibrate it. Write an adapter for "
                "this family (docs/adding_a_family.md).")
        hidden = args[0].reshape(-1, args[0].shape[-1])
        flat = logits.reshape(-1, logits.shape[-1])
        weights, index = top_k_routing(flat.float(), spec.scoring, spec.top_k, spec.norm_topk_prob)
        recorder.forward(hidden, index, weights.to(flat.dtype))

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
