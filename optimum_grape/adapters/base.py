"""What the rest of optimum-grape may know about an MoE layer: the `MoELayer` record and the
`MoEAdapter` protocol. Model-family knowledge lives only in subclasses of `MoEAdapter`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")
# Instance attributes that copy the expert count at construction; forward reads these, not config.
COUNT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts", "out_features")


def decoder_layer_index(module_name: str) -> int:
    """The decoder-layer index in a module path such as `model.layers.7.mlp.experts`."""
    match = _LAYER_INDEX.search(module_name + ".")
    if match is None:
        raise UnsupportedModelError(f"Cannot tell the decoder layer of MoE block {module_name!r}.")
    return int(match.group(1))


def find_router_child(block: nn.Module, experts: nn.Module, num_experts: int) -> nn.Module | None:
    """The child of `block` (other than the experts) whose weight has one row per expert."""
    for child in block.children():
        weight = getattr(child, "weight", None)
        if child is not experts and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                and weight.shape[0] == num_experts:
            return child
    return None


def set_count_attributes(modules: Iterable[nn.Module], count: int, old: int | None = None) -> None:
    """Set every copied expert count (COUNT_ATTRIBUTES; `out_features` on Linear routers only); with
    `old`, only attributes that held it (a block's `num_experts` may mean something else, e.g. top-k)."""
    for module in modules:
        for attr in COUNT_ATTRIBUTES:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and old in (None, value):
                if attr == "out_features" and not isinstance(module, nn.Linear):
                    continue
                setattr(module, attr, count)


@dataclass
class MoELayer:
    """One sparse MoE block of a decoder layer, as located by an adapter."""

    index: int  # decoder-layer index (the key used by plans and configs)
    name: str  # module path of the sparse block
    block: nn.Module
    experts: nn.Module
    router: nn.Module
    top_k: int
    logits: nn.Module | None = None  # the module holding the router weight [E, H] when not `router` itself

    @property
    def num_experts(self) -> int:
        return int(self.router_weight().shape[0])

    def router_weight(self) -> torch.Tensor:
        return (self.logits if self.logits is not None else self.router).weight


@dataclass(frozen=True)
class RoutingSpec:
    """How a layer turns router logits into weights; enough for pure planning code to re-route
    (`algorithms.selection.top_k_routing`), and what an adapter's routing is verified against."""

    top_k: int
    scoring: str = "softmax"  # "softmax", "sigmoid" or "sqrtsoftplus"
    norm_topk_prob: bool = True
    # Group-limited routing (DeepSeek-V3 style): counts that keep grouping are multiples of n_group
    # of at least min_grouped; planning prefers those, and other counts fall back to ungrouped.
    n_group: int = 1
    min_grouped: int = 0
    topk_group: int = 1
    group_score: str = "top2"  # a group's score: sum of its top-2 choices ("top2", V3) or its best ("max", V2)
    choice_on: str = "scores"  # what a correction bias is added to before top-k: "scores" or "logits"
    scale: float = 1.0  # constant factor on the weights (routed_scaling_factor and alike)

    def to_dict(self) -> dict:
        return {"top_k": self.top_k, "scoring": self.scoring, "norm_topk_prob": self.norm_topk_prob,
                "n_group": self.n_group, "min_grouped": self.min_grouped, "topk_group": self.topk_group,
                "group_score": self.group_score, "choice_on": self.choice_on, "scale": self.scale}

    def choice_options(self, choice_bias=None) -> dict:
        """Keyword arguments of `top_k_routing` beyond scoring, top-k and renormalisation."""
        grouped = {"n_group": self.n_group, "topk_group": self.topk_group, "group_score": self.group_score} \
            if self.n_group > 1 else {}
        return {"choice_bias": choice_bias, "choice_on": self.choice_on, **grouped}


def outputs_of(expert_ids: Iterable[int], output_of) -> torch.Tensor:
    """[len(expert_ids), T, H]: `output_of(e)` of each expert, written into one tensor as each is computed.
    Stacking a list of them afterwards would hold every output twice, and the many per-expert outputs
    of a fine-grained layer (128 of 1 MB at the 512 tokens compared per layer) freed together leave the
    allocator's heap fragmented: in-memory GRAPE calibration on the 128-expert benchmark model peaked
    0.1-0.2 GB higher in some runs than in others, in the similarity pass."""
    ids = list(expert_ids)
    if not ids:
        return torch.stack([])  # refused, as stacking nothing always was
    first = output_of(ids[0])
    out = first.new_empty((len(ids), *first.shape))
    out[0] = first
    del first
    for i, e in enumerate(ids[1:], start=1):
        out[i] = output_of(e)
    return out


class MoEAdapter:
    """Protocol every family adapter implements (see docs/adding_a_family.md).

    Finding blocks, running one expert, reading router logits, and rewriting a layer to a given
    set of clusters are the only operations the algorithms and the pruner rely on.
    """

    model_types: tuple[str, ...] = ()
    count_key: str | None = "num_local_experts"  # native config key holding experts per layer (None: none)
    # How calibration observes routing: "experts_interface" (transformers' ExpertsInterface, fused
    # experts) or "hooks" (forward hooks on the router, for experts in an nn.ModuleList).
    calibration: str = "experts_interface"
    # Save in the checkpoint's original key layout (per-expert keys, what other tools read); False when
    # that layout cannot hold the pruned model (ERNIE-VL splits one expert list in equal halves on load).
    save_original_format: bool = True

    def find_layers(self, model: nn.Module) -> list[MoELayer]:
        raise NotImplementedError

    def run_experts(self, layer: MoELayer, hidden: torch.Tensor, expert_ids: Iterable[int]) -> torch.Tensor:
        """Outputs [len(expert_ids), T, H] of the given experts on the same tokens, without routing weights
        (`outputs_of` gathers them)."""
        raise NotImplementedError

    def router_logits(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        """Default: a router whose `weight` (and optional `bias`) rows are the experts."""
        return F.linear(hidden, layer.router.weight, getattr(layer.router, "bias", None))

    def routing_spec(self, layer: MoELayer, config) -> RoutingSpec:
        """Default: softmax, top-k, renormalised unless `config.norm_topk_prob` is False."""
        return RoutingSpec(top_k=layer.top_k, scoring="softmax",
                           norm_topk_prob=bool(getattr(config, "norm_topk_prob", True)))

    def check_needs(self, layers: list[MoELayer], needs) -> None:
        """Refuse, before calibration, statistics this family cannot provide (default: all can)."""

    def layer_floor(self, layer: MoELayer) -> int:
        """Fewest experts this layer's routing can work with."""
        return layer.top_k

    def apply_clusters(self, layer: MoELayer, clusters, weights, router_weights, align: bool = False,
                       inputs: torch.Tensor | None = None) -> None:
        """Rewrite the layer so that kept expert c = sum_i weights[c][i] * expert clusters[c][i], and
        router row c = sum_i router_weights[c][i] * row clusters[c][i]; update every count attribute.
        With `align`, each averaged member's neurons are first permuted to match the representative's
        (on their activations on `inputs` [T, H] as well as their weights, where given and supported)."""
        raise NotImplementedError

    # Merging with calibration data (merging/with_data.py): activation-aware alignment and least-squares refits.
    def merges_with_data(self, layer: MoELayer) -> bool:
        """Whether `expert_activations` / `set_down_projection` describe this layer's experts exactly."""
        return False

    def expert_activations(self, layer: MoELayer, hidden: torch.Tensor, e: int) -> torch.Tensor:
        """[T, I]: the intermediate activations of expert e on `hidden`."""
        raise UnsupportedModelError(f"{type(self).__name__} cannot expose expert activations; refit=False.")

    def set_down_projection(self, layer: MoELayer, e: int, weight: torch.Tensor) -> None:
        """Replace expert e's down projection by `weight` [H, I]."""
        raise UnsupportedModelError(f"{type(self).__name__} cannot replace down projections; refit=False.")

    def resize_empty(self, layer: MoELayer, count: int) -> None:
        """Resize a freshly built (meta/empty) layer to `count` experts before weights are loaded."""
        raise NotImplementedError

    def routing_overrides(self, layer: MoELayer, count: int) -> dict:
        """Config-style routing settings this layer must change to work with `count` experts
        (e.g. `{"n_group": 1, "topk_group": 1}` when groups no longer divide it); {} when none."""
        return {}

    def apply_routing_overrides(self, layer: MoELayer, overrides: dict) -> None:
        """Set `overrides` (as returned by `routing_overrides`) on the layer's modules."""
        if overrides:
            raise NotImplementedError(f"{type(self).__name__} cannot apply routing overrides {overrides}.")
