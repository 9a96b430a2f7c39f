"""`PruningPlan`: the outcome of planning, as plain data a user can read, edit and re-apply.

Per MoE layer (keyed by decoder-layer index): the clusters of ORIGINAL expert ids that become one
expert each (representative first), and the weights used to merge each cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import GrapeError


@dataclass
class PruningPlan:
    clusters: dict[int, list[list[int]]]
    num_experts_before: dict[int, int]
    merge_weights: dict[int, list[list[float]]] = field(default_factory=dict)
    router_weights: dict[int, list[list[float]]] = field(default_factory=dict)
    method: str = "grape"
    router: str = "representative"
    align_neurons: bool = False
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.clusters = {int(k): [list(map(int, c)) for c in v] for k, v in self.clusters.items()}
        self.num_experts_before = {int(k): int(v) for k, v in self.num_experts_before.items()}
        self.merge_weights = {int(k): [list(map(float, w)) for w in v] for k, v in self.merge_weights.items()}
        self.router_weights = {int(k): [list(map(float, w)) for w in v] for k, v in self.router_weights.items()}
        self.validate()

    def validate(self) -> None:
        for layer, clusters in self.clusters.items():
            members = sorted(m for c in clusters for m in c)
            expected = list(range(self.num_experts_before[layer]))
            if members != expected or any(not c for c in clusters):
                raise GrapeError(
                    f"Plan layer {layer}: clusters must partition experts 0..{expected[-1]} exactly once; "
                    f"got {clusters}."
                )
            for name in ("merge_weights", "router_weights"):
                weights = getattr(self, name).get(layer)
                if weights is not None and [len(w) for w in weights] != [len(c) for c in clusters]:
                    raise GrapeError(f"Plan layer {layer}: {name} do not match the clusters' sizes.")

    @property
    def experts_per_layer(self) -> dict[int, int]:
        return {layer: len(c) for layer, c in sorted(self.clusters.items())}

    @property
    def kept_experts(self) -> dict[int, list[int]]:
        """The representative (original id) of each kept expert, per layer."""
        return {layer: [c[0] for c in clusters] for layer, clusters in sorted(self.clusters.items())}

    @property
    def num_removed(self) -> int:
        return sum(self.num_experts_before.values()) - sum(self.experts_per_layer.values())

    def summary(self) -> str:
        before = sum(self.num_experts_before.values())
        kept = list(self.experts_per_layer.values())
        return (f"{self.method}: {len(kept)} MoE layers, {before} routed experts, removing {self.num_removed} "
                f"({self.num_removed / before:.0%}): per-layer kept = {kept}")

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "router": self.router,
            "align_neurons": self.align_neurons,
            "num_experts_before": {str(k): v for k, v in sorted(self.num_experts_before.items())},
            "experts_per_layer": {str(k): v for k, v in self.experts_per_layer.items()},
            "clusters": {str(k): v for k, v in sorted(self.clusters.items())},
            "merge_weights": {str(k): v for k, v in sorted(self.merge_weights.items())},
            "router_weights": {str(k): v for k, v in sorted(self.router_weights.items())},
            "metadata": self.metadata,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        data = dict(data)
        data.pop("experts_per_layer", None)  # derived from clusters
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        return cls.from_dict(json.loads(text))
