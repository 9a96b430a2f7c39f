"""The generic adapter for transformers' fused experts (`@use_experts_implementation` classes).

Such an experts module stores every expert in 3-D tensors whose first dimension is the expert
(`gate_up_proj`/`up_proj`, `down_proj`, optional biases) and declares its layout in the flags
`has_gate`, `has_bias`, `is_transposed`; its router holds one row per expert. Everything here is
found by that structure, so most families need only a registry line.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.alignment import match_neurons, paired_index
from ..algorithms.merging import combine_rows
from ..errors import UnsupportedModelError
from .base import MoEAdapter, MoELayer, decoder_layer_index, find_router_child, set_count_attributes



def is_fused_experts(module: nn.Module) -> bool:
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and isinstance(
        getattr(module, "down_proj", None), nn.Parameter
    )


def expert_tensor_names(module: nn.Module, num_experts: int) -> list[str]:
    """Direct parameters and buffers of `module` indexed by expert on their first dimension."""
    names = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == num_experts]
    names += [n for n, b in module.named_buffers(recurse=False) if b is not None and b.dim() >= 1
              and b.shape[0] == num_experts]
    return names


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else F.linear(x, weight)
    return out + bias if bias is not None else out


class FusedExpertsAdapter(MoEAdapter):
    """Adapter for blocks holding a fused experts module and a router with one weight row per expert."""

    model_types = ()
    count_key = "num_local_experts"
    top_k_key = "num_experts_per_tok"
    supports_refit = True

    # -- locating ---------------------------------------------------------------------------------
    def find_router(self, block: nn.Module, experts: nn.Module, num_experts: int) -> nn.Module:
        router = find_router_child(block, experts, num_experts)
        if router is None:
            raise UnsupportedModelError(f"No router with {num_experts} rows found in {type(block).__name__}.")
        return router

    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        layers = []
        modules = dict(model.named_modules())
        for name, module in modules.items():
            if not is_fused_experts(module):
                continue
            block_name = name.rsplit(".", 1)[0]
            block = modules[block_name]
            num_experts = module.down_proj.shape[0]
            router = self.find_router(block, module, num_experts)
            index = decoder_layer_index(block_name)
            top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None) or self.config_top_k(model.config)
            layers.append(MoELayer(index, block_name, block, module, router, int(top_k)))
        return sorted(layers, key=lambda layer: layer.index)

    def config_top_k(self, config) -> int:
        return int(getattr(config, self.top_k_key))

    # -- measuring --------------------------------------------------------------------------------
    def run_experts(self, layer: MoELayer, hidden: torch.Tensor, expert_ids: Iterable[int]) -> torch.Tensor:
        experts = layer.experts
        if getattr(experts, "has_post_expert_norm", False):
            raise UnsupportedModelError(f"{type(experts).__name__} applies a post-expert norm, not supported yet.")
        outputs = []
        for e in expert_ids:
            proj = self.expert_activations(layer, hidden, e)
            down_bias = experts.down_proj_bias[e] if experts.has_bias else None
            outputs.append(_linear(proj, experts.down_proj[e], down_bias, experts.is_transposed))
        return torch.stack(outputs, dim=0)

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
        """make_*(name, tensor) -> the new expert-indexed tensor."""
        old = layer.num_experts
        for module, make in ((layer.experts, make_expert), (layer.router, make_router)):
            for name in expert_tensor_names(module, old):
                tensor = getattr(module, name)
                new = make(name, tensor.data)
                if isinstance(tensor, nn.Parameter):
                    setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
                else:
                    setattr(module, name, new)
        self.set_count(layer, count)

    def set_count(self, layer: MoELayer, count: int) -> None:
        set_count_attributes((layer.block, layer.experts, layer.router), count)

    def apply_clusters(self, layer: MoELayer, clusters, weights, router_weights, align: bool = False,
                       inputs: torch.Tensor | None = None) -> None:
        aligned = self.aligned_expert_tensors(layer, clusters, weights, inputs) if align else {}
        self._rewrite(layer,
                      lambda name, t: combine_rows(aligned.get(name, t), clusters, weights),
                      lambda name, t: combine_rows(t, clusters, router_weights),
                      len(clusters))

    # -- neuron alignment before averaging (algorithms/alignment.py) ------------------------------
    def _neuron_axes(self, experts: nn.Module) -> dict[str, tuple[int, bool]]:
        """Per expert tensor (one expert's slice): (axis indexing intermediate neurons, holds gate and up pairs)."""
        t = experts.is_transposed
        up = "gate_up_proj" if experts.has_gate else "up_proj"
        axes = {up: (1 if t else 0, experts.has_gate), "down_proj": (0 if t else 1, False)}
        if experts.has_bias:
            axes[up + "_bias"] = (0, experts.has_gate)
        return axes

    def _neuron_features(self, experts: nn.Module, e: int, axes) -> torch.Tensor:
        interleaved = not getattr(experts, "is_concatenated", True)
        parts = []
        for name in ("gate_up_proj", "up_proj", "down_proj"):
            if name not in axes:
                continue
            x = getattr(experts, name)[e].detach().double().movedim(axes[name][0], 0)  # [I or 2I, F]
            if axes[name][1]:
                n = x.shape[0] // 2
                x = torch.cat([x[0::2], x[1::2]] if interleaved else [x[:n], x[n:]], dim=1)
            parts.append(x)
        return torch.cat(parts, dim=1)

    def aligned_expert_tensors(self, layer: MoELayer, clusters, weights, inputs: torch.Tensor | None = None
                               ) -> dict[str, torch.Tensor]:
        """Copies of the expert tensors in which every member that is averaged into a cluster has
        its neurons permuted to match the cluster's representative (members[0]); with `inputs` (layer
        inputs [T, H]) neurons are matched on their activations on those tokens as well as on weights."""
        experts = layer.experts
        axes = self._neuron_axes(experts)
        interleaved = not getattr(experts, "is_concatenated", True)
        out = {name: getattr(experts, name).detach().clone() for name in axes}
        for members, w in zip(clusters, weights):
            rep = members[0]
            ref = self._neuron_features(experts, rep, axes)
            ref_act = self.expert_activations(layer, inputs, rep).T if inputs is not None else None
            for m, wm in zip(members[1:], w[1:]):
                if wm == 0.0:
                    continue
                mem_act = self.expert_activations(layer, inputs, m).T if inputs is not None else None
                perm = match_neurons(ref, self._neuron_features(experts, m, axes), ref_act, mem_act)
                for name, (axis, paired) in axes.items():
                    index = paired_index(perm, interleaved) if paired else perm
                    out[name][m] = out[name][m].index_select(axis, index.to(out[name].device))
        return out

    def resize_empty(self, layer: MoELayer, count: int) -> None:
        def empty(name: str, t: torch.Tensor) -> torch.Tensor:
            return torch.empty((count, *t.shape[1:]), dtype=t.dtype, device=t.device)

        self._rewrite(layer, empty, empty, count)


class StandardFusedAdapter(FusedExpertsAdapter):
    """A registry line: standard fused experts under `model_types`, counted by config key `count_key`."""

    def __init__(self, model_types: tuple[str, ...], count_key: str | None) -> None:
        self.model_types, self.count_key = tuple(model_types), count_key


class MixtralAdapter(FusedExpertsAdapter):
    model_types = ("mixtral",)
    count_key = "num_local_experts"


class Qwen3MoeAdapter(FusedExpertsAdapter):
    model_types = ("qwen3_moe",)
    count_key = "num_experts"


class OlmoeAdapter(FusedExpertsAdapter):
    model_types = ("olmoe",)
    count_key = "num_experts"
