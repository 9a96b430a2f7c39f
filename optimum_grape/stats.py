"""`ExpertStats`: what calibration measured, per MoE layer and expert. Saved as safetensors.

This is the boundary between measuring (calibration, which needs the model) and planning (pure,
which needs only these tensors), so a plan can be recomputed or compared across methods without
running the model again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_TENSOR_FIELDS = ("router_weight", "tokens", "weight_mass", "saliency", "max_output", "similarity", "mean_output",
                  "router_logits", "expert_outputs")


@dataclass
class LayerStats:
    """Statistics of one MoE layer. Per-expert vectors are float64 and indexed by original expert id."""

    num_experts: int
    floor: int  # fewest experts this layer may keep: max(top_k, user floor)
    routing: dict  # RoutingSpec.to_dict(): lets planning re-route without the model
    router_weight: torch.Tensor  # [E, H] router rows (router-guided methods, attaching dropped experts)
    tokens: torch.Tensor  # [E] tokens routed to each expert (count-guided / frequency)
    weight_mass: torch.Tensor  # [E] sum of routing weights received
    saliency: torch.Tensor  # [E] REAP: mean over routed tokens of g_j(x) * ||f_j(x)||_2
    max_output: torch.Tensor | None = None  # [E] largest |output| on routed tokens (super experts)
    similarity: torch.Tensor | None = None  # [E, E] expert-output similarity on the same tokens
    mean_output: torch.Tensor | None = None  # [E, H] mean expert output (C-Prune embedding)
    router_logits: torch.Tensor | None = None  # [T, E] on the sampled tokens
    expert_outputs: torch.Tensor | None = None  # [E, T, H] on the sampled tokens (enumerate only)
    # End to end: {"kl": KL to the unpruned model on held-aside tokens when only this layer loses
    # "merges" experts by the method's probe clusters, "local_cost": their summed relative merge cost}
    sensitivity: dict | None = None


@dataclass
class ExpertStats:
    layers: dict[int, LayerStats]
    metadata: dict = field(default_factory=dict)

    @property
    def num_experts(self) -> dict[int, int]:
        return {l: s.num_experts for l, s in self.layers.items()}

    @property
    def floors(self) -> dict[int, int]:
        return {l: s.floor for l, s in self.layers.items()}

    def save(self, path: str | Path) -> None:
        tensors, layer_meta = {}, {}
        for index, layer in self.layers.items():
            layer_meta[str(index)] = {"num_experts": layer.num_experts, "floor": layer.floor,
                                      "routing": layer.routing, "sensitivity": layer.sensitivity}
            for name in _TENSOR_FIELDS:
                value = getattr(layer, name)
                if value is not None:
                    tensors[f"layers.{index}.{name}"] = value.detach().cpu().contiguous()
        header = {"grape_stats": json.dumps({"metadata": self.metadata, "layers": layer_meta})}
        save_file(tensors, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> "ExpertStats":
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads(handle.metadata()["grape_stats"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        layers = {}
        for index, meta in header["layers"].items():
            values = {name: tensors.get(f"layers.{index}.{name}") for name in _TENSOR_FIELDS}
            layers[int(index)] = LayerStats(**meta, **values)
        return cls(layers=dict(sorted(layers.items())), metadata=header["metadata"])

